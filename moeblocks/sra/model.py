"""The reference Semantic Resonance Architecture (SRA) transformer.

Legend: B batch, S sequence length, D model dim, H heads, Dh head dim (D / H),
V vocabulary, T tokens (B·S), E experts, K experts per token, L layers.

A pre-LayerNorm decoder in the style of nanoGPT: token embedding, rotary position
embedding (RoPE) inside causal multi-head attention, and every feed-forward network
replaced by a :class:`~moeblocks.MoELayer` whose router scores tokens by cosine
similarity to learnable expert anchors (the paper's "Chamber of Semantic Resonance").
``config.ffn`` swaps in a linear router or a dense FFN, the paper's baselines, or the
routing of a published MoE family at the same active size
(:mod:`moeblocks.sra.routing_presets`).

The forward pass returns an :class:`SRAOutput` record: logits plus, per MoE layer, the
routing record and the weighted auxiliary losses. Nothing is collected on ``self``.

With ``config.aux_reduce == "mean"`` (the official code's rule) the auxiliary loss added
to the training loss is the mean over the L MoE layers of each layer's weighted losses,
``L_aux = (1/L) Σ_layers Σ_losses w · loss``; with ``"sum"`` it is their sum (moeblocks 0.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from moeblocks.layer import MoELayer
from moeblocks.routing import MoEOutput, Routing
from moeblocks.sra.config import SRAConfig
from moeblocks.sra.dense import DenseFFN as DenseFFN  # its home before issue 30
from moeblocks.sra.dense import NormalLinear, residual_std
from moeblocks.sra.routing_presets import build_ffn
from moeblocks.sra.routing_presets import build_losses as build_losses  # as DenseFFN
from moeblocks.sra.routing_presets import build_moe as build_moe
from moeblocks.sra.routing_presets import build_schedule as build_schedule

__all__ = ["SRAOutput", "SRATransformer"]


@dataclass(frozen=True)
class SRAOutput:
    """What :class:`SRATransformer` returns.

    Attributes:
        logits: Next-token logits.
        routings: One routing record per MoE block, in depth order (empty for a dense
            model). Token order is the flattened ``[B, S]`` order.
        aux_losses: One dict of weighted auxiliary losses per MoE block.
        aux_scale: Multiplies the sum over blocks in :meth:`total_aux_loss`: ``1/L`` when
            the config averages over layers, 1 when it sums.
    """

    logits: Float[Tensor, "B S V"]
    routings: tuple[Routing, ...]
    aux_losses: tuple[dict[str, Float[Tensor, ""]], ...]
    aux_scale: float = 1.0

    def total_aux_loss(self) -> Float[Tensor, ""]:
        """``aux_scale`` × the sum of every block's weighted aux losses (0 when none)."""
        total = self.logits.new_zeros((), dtype=torch.float32)
        for losses in self.aux_losses:
            for value in losses.values():
                total = total + value.float()
        return total * self.aux_scale


class Rotary(nn.Module):
    """Rotary position embedding: rotates channel pairs by a position-dependent angle.

    Args:
        head_dim: Dh, even.
        max_len: Longest sequence the cached cos/sin tables cover.
        base: Frequency base (10000 as in RoFormer).
    """

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.max_len, self.base = head_dim, max_len, base
        # Not persistent: derived from the config, so checkpoints stay small.
        self.register_buffer("cos_SF", torch.empty(max_len, head_dim // 2), persistent=False)
        self.register_buffer("sin_SF", torch.empty(max_len, head_dim // 2), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fill the cos/sin tables (no randomness), in place."""
        dev = self.cos_SF.device
        half = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=dev)
        inv_freq = self.base ** (-half / self.head_dim)
        angles_SF = torch.outer(
            torch.arange(self.max_len, dtype=torch.float32, device=dev), inv_freq
        )
        self.cos_SF.copy_(angles_SF.cos())
        self.sin_SF.copy_(angles_SF.sin())

    def forward(self, x: Float[Tensor, "B H S Dh"]) -> Float[Tensor, "B H S Dh"]:
        """Rotate the two halves of the last dim as (real, imaginary) pairs."""
        S = x.shape[-2]
        cos, sin = self.cos_SF[:S].to(x.dtype), self.sin_SF[:S].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE on queries and keys."""

    def __init__(self, config: SRAConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        D = config.d_model
        self.qkv = NormalLinear(D, 3 * D, bias=config.attn_bias, std=0.02)
        self.proj = NormalLinear(D, D, bias=config.attn_bias, std=residual_std(config))
        self.rotary = Rotary(config.d_model // config.n_heads, config.seq_len)

    def forward(self, x: Float[Tensor, "B S D"]) -> Float[Tensor, "B S D"]:
        """Attend causally over the sequence."""
        B, S, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)  # 3 × [B, S, D]
        q, k, v = (t.view(B, S, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        q, k = self.rotary(q), self.rotary(k)  # [B, H, S, Dh]
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)  # [B,H,S,Dh]
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    """Pre-LN decoder block: ``x + attn(ln(x))``, then ``x + ffn(ln(x))``."""

    def __init__(self, config: SRAConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_ffn = nn.LayerNorm(config.d_model)
        self.ffn: nn.Module = build_ffn(config)

    def forward(
        self, x: Float[Tensor, "B S D"], k: int | None, mask: Bool[Tensor, "B S"] | None
    ) -> tuple[Float[Tensor, "B S D"], MoEOutput | None]:
        """Apply the block; also return the MoE layer's output record (None if dense)."""
        x = x + self.attn(self.ln_attn(x))
        h = self.ln_ffn(x)
        if isinstance(self.ffn, MoELayer):
            moe = self.ffn(h, k=k, mask=mask)
            return x + moe.out, moe
        return x + self.ffn(h), None


class NormalEmbedding(nn.Embedding):
    """``nn.Embedding`` initialised N(0, std²) (GPT-2: 0.02) instead of N(0, 1)."""

    def __init__(self, num_embeddings: int, dim: int, std: float) -> None:
        self.std = std  # read by reset_parameters, which nn.Embedding's __init__ calls
        super().__init__(num_embeddings, dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, std²), in place."""
        nn.init.normal_(self.weight, std=self.std)


class TiedHead(nn.Module):
    """The output projection ``logits = x · Wᵀ`` with ``W`` the embedding's own weight.

    Registered as ``head.weight`` (the same parameter as ``embed.weight``) and without
    a ``reset_parameters``: the embedding initialises it.
    """

    def __init__(self, embed: nn.Embedding) -> None:
        super().__init__()
        self.weight = embed.weight

    def forward(self, x: Float[Tensor, "B S D"]) -> Float[Tensor, "B S V"]:
        """Project onto the vocabulary."""
        return F.linear(x, self.weight)


class SRATransformer(nn.Module):
    """Decoder-only language model whose FFNs are mixtures of experts.

    Args:
        config: Model settings (the training fields are ignored here, except ``steps``
            and ``k_switch`` which place the k curriculum).
    """

    def __init__(self, config: SRAConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = NormalEmbedding(config.vocab_size, config.d_model, std=0.02)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_out = nn.LayerNorm(config.d_model)
        self.head = TiedHead(self.embed)  # tied input/output embedding, as in GPT-2

    @property
    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers in depth order (empty for a dense model)."""
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def set_step(self, step: int) -> None:
        """Move every router's k schedule to training step ``step``."""
        for layer in self.moe_layers:
            layer.router.schedule.set_step(step)

    @property
    def k(self) -> int:
        """The k currently in force (``k_final`` width for a dense model)."""
        layers = self.moe_layers
        return layers[0].router.schedule.k if layers else self.config.k_final

    def forward(
        self,
        idx: Int[Tensor, "B S"],
        k: int | None = None,
        mask: Bool[Tensor, "B S"] | None = None,
    ) -> SRAOutput:
        """Run the model.

        Args:
            idx: Token ids, ``S <= config.seq_len``.
            k: Experts per token for every MoE layer; ``None`` follows the schedule
                (an explicit k serves inference-time k-sweeps).
            mask: True for real tokens; padding is excluded from the aux losses. Causal
                attention already keeps trailing padding from touching real tokens.

        Returns:
            :class:`SRAOutput` with logits, routing records and weighted aux losses.
        """
        seq = idx.shape[1]
        if seq > self.config.seq_len:
            raise ValueError(f"idx has {seq} positions but config.seq_len is {self.config.seq_len}")
        x = self.drop(self.embed(idx))  # [B, S, D]
        routings: list[Routing] = []
        aux: list[dict[str, Tensor]] = []
        for block in self.blocks:
            x, moe = block(x, k, mask)
            if moe is not None:
                routings.append(moe.routing)
                aux.append(moe.aux_losses)
        logits = self.head(self.ln_out(x))  # [B, S, V]
        scale = 1.0 / len(aux) if aux and self.config.aux_reduce == "mean" else 1.0
        return SRAOutput(logits, tuple(routings), tuple(aux), scale)

    def num_params(self, active: bool = False) -> int:
        """Parameter count; with ``active``, count only the routed experts a token uses.

        A token uses the most experts its router's schedule reaches (``k_final``; 1 for
        the top-1 families), all of a layer's shared experts and every other parameter.
        """
        total = sum(p.numel() for p in self.parameters())
        if active:
            for layer in self.moe_layers:
                bank = sum(p.numel() for p in layer.experts.parameters())
                k = layer.router.schedule.max_k
                total -= bank - bank * k // layer.num_experts
        return total
