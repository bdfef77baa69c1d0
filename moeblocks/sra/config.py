"""Configuration of the reference SRA transformer and its training run.

Legend: V vocabulary, S sequence length, D model dim, H heads, L layers, E experts,
F expert hidden dim, K experts per token.

One short dataclass holds everything a run needs; presets scale it from a two-minute
CPU demo (``tiny``) to the paper's configuration (``paper``). Fields are plain JSON
types so a config round trips through ``config.json`` beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["PRESETS", "SRAConfig", "UsageError", "preset"]

FFNKind = Literal["cosine", "linear", "dense"]
BalanceKind = Literal["bandpass", "cv", "switch", "none"]


class UsageError(ValueError):
    """A problem with what the user asked for: bad path, preset, data or config.

    The CLI prints it as one line to stderr and exits with status 2.
    """


@dataclass(frozen=True)
class SRAConfig:
    """Model, routing, loss and training settings of one SRA run.

    The k curriculum is given as a fraction of ``steps`` so that shortening a run keeps
    its shape: the paper's "k rises after the 2nd of 8 epochs" is ``k_switch=0.25``.
    """

    # --- model ---
    vocab_size: int = 2048  # V: BPE vocabulary trained on the training split
    seq_len: int = 128  # S: tokens per training sequence (also the RoPE table length)
    d_model: int = 128  # D
    n_layers: int = 2  # L: pre-LN decoder blocks
    n_heads: int = 4  # H: attention heads, D must divide by H
    ffn: FFNKind = "cosine"  # FFN of every block: cosine-routed MoE, linear-routed MoE, dense
    expert: Literal["swiglu", "gelu"] = "swiglu"  # expert MLP (also the dense FFN's MLP)
    num_experts: int = 32  # E
    d_expert: int = 64  # F: hidden width of one expert (the paper's d_ff)
    dense_hidden: int = 0  # dense baseline's hidden width; 0 = k_final · F (same active params)
    # --- routing ---
    anchor_init: Literal["orthogonal", "kaiming", "batch"] = "orthogonal"  # cosine anchors
    temperature: float = 10.0  # initial τ of the cosine scorer
    k_start: int = 1  # K at step 0
    k_final: int = 2  # K after the switch
    k_switch: float = 0.25  # fraction of `steps` at which K rises to k_final
    router_noise: float = 0.0  # std of training-time noise on router scores
    dispatcher: Literal["auto", "torch", "triton"] = "auto"  # see moeblocks.make_dispatcher
    # --- auxiliary losses (weights multiply the unweighted loss) ---
    balance: BalanceKind = "bandpass"  # SRA bandpass, SRA CV², Switch load balance, none
    balance_weight: float = 0.4
    band_floor: float = 0.004  # bandpass corridor on mean expert probability P_e;
    band_ceiling: float = 0.032  # the paper's 0.0005/0.0040 for E=256, scaled by 256/E
    z_loss_weight: float = 0.0  # ST-MoE z-loss on router logits (0 = off)
    dispersion_weight: float = 0.0  # anchor dispersion (cosine router only; 0 = off)
    # --- training ---
    steps: int = 600  # optimizer steps; sets the LR and k schedules
    batch_size: int = 16  # sequences per step
    lr: float = 3e-3  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # cosine decay ends at lr · min_lr_ratio
    warmup: int = 50  # linear warmup steps
    weight_decay: float = 0.1  # on matrices only (not norms, embeddings, anchors, τ)
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    eval_every: int = 200  # steps between validation passes (0 = only at the end)
    eval_tokens: int = 16384  # validation tokens per pass during training
    ckpt_every: int = 200  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # verified checkpoints kept; older ones go once a newer verifies
    max_skipped_steps: int = 3  # steps in a row skipped for a non-finite loss/grad: then stop
    seed: int = 0  # model init and the data order (batch of step s depends on seed, s)

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "seq_len",
            "d_model",
            "n_layers",
            "n_heads",
            "num_experts",
            "d_expert",
            "k_start",
            "k_final",
            "steps",
            "batch_size",
            "keep_checkpoints",
            "max_skipped_steps",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"config.{name} must be an int >= 1, got {value!r}")
        if self.vocab_size < 257:
            raise UsageError(
                f"config.vocab_size must be >= 257 (256 bytes + 1), got {self.vocab_size}"
            )
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise UsageError(
                f"config.d_model ({self.d_model}) must divide into n_heads ({self.n_heads}) "
                "heads of even width (RoPE rotates pairs)"
            )
        choices = {
            "ffn": ("cosine", "linear", "dense"),
            "expert": ("swiglu", "gelu"),
            "anchor_init": ("orthogonal", "kaiming", "batch"),
            "dispatcher": ("auto", "torch", "triton"),
            "balance": ("bandpass", "cv", "switch", "none"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(
                    f"config.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if max(self.k_start, self.k_final) > self.num_experts:
            raise UsageError(
                f"config.k_final/k_start must be <= num_experts ({self.num_experts}), "
                f"got {self.k_start}, {self.k_final}"
            )
        if not 0.0 <= self.k_switch <= 1.0:
            raise UsageError(f"config.k_switch must be in [0, 1], got {self.k_switch}")
        if not 0.0 <= self.band_floor <= self.band_ceiling <= 1.0:
            raise UsageError(
                "config needs 0 <= band_floor <= band_ceiling <= 1, got "
                f"{self.band_floor}, {self.band_ceiling}"
            )
        if self.dense_hidden < 0 or self.warmup < 0 or self.eval_every < 0 or self.ckpt_every < 0:
            raise UsageError("config.dense_hidden, warmup, eval_every, ckpt_every must be >= 0")

    @property
    def k_switch_step(self) -> int:
        """The first step that uses ``k_final``."""
        return round(self.k_switch * self.steps)

    @property
    def dense_width(self) -> int:
        """Hidden width of the dense FFN baseline (``k_final · d_expert`` unless set)."""
        return self.dense_hidden or self.k_final * self.d_expert

    def replace(self, **changes: Any) -> SRAConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SRAConfig:
        """Rebuild a config from :meth:`to_dict` output; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UsageError(
                f"config has unknown fields {unknown}; was it written by a newer moeblocks?"
            )
        return cls(**data)

    def differences(self, other: SRAConfig) -> list[str]:
        """Names of the fields whose values differ from ``other``'s."""
        return [
            f.name
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def _band(num_experts: int) -> dict[str, float]:
    # The paper's corridor (floor 0.0005, ceiling 0.0040 at E=256) relative to uniform
    # usage 1/E, so small presets keep the same pressure.
    return {"band_floor": 0.0005 * 256 / num_experts, "band_ceiling": 0.0040 * 256 / num_experts}


PRESETS: dict[str, SRAConfig] = {
    # A few minutes on a 2-core CPU: the `moeblocks demo` model.
    "tiny": SRAConfig(),
    # A laptop-CPU hour or a few GPU minutes.
    "small": SRAConfig(
        vocab_size=8192,
        seq_len=256,
        d_model=256,
        n_layers=4,
        n_heads=4,
        num_experts=64,
        d_expert=128,
        k_start=1,
        k_final=4,
        steps=5000,
        batch_size=32,
        lr=1.5e-3,
        warmup=200,
        eval_every=500,
        eval_tokens=65536,
        ckpt_every=500,
        **_band(64),
    ),
    # SRA paper scale (WikiText-103): d 512, 4 layers, 8 heads, 256 experts × d_ff 256,
    # K=1→4 after the 2nd of 8 epochs, bandpass 0.0005/0.0040 at weight 0.4. 60k steps of
    # 32×512 tokens is about 8 passes over WikiText-103's ~120M BPE tokens.
    "paper": SRAConfig(
        vocab_size=32000,
        seq_len=512,
        d_model=512,
        n_layers=4,
        n_heads=8,
        num_experts=256,
        d_expert=256,
        k_start=1,
        k_final=4,
        k_switch=0.25,
        steps=60000,
        batch_size=32,
        lr=6e-4,
        warmup=2000,
        eval_every=2000,
        eval_tokens=262144,
        ckpt_every=2000,
        band_floor=0.0005,
        band_ceiling=0.0040,
        balance_weight=0.4,
    ),
}


def preset(name: str) -> SRAConfig:
    """The named preset (``tiny``, ``small`` or ``paper``).

    Raises:
        UsageError: For an unknown name.
    """
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]
