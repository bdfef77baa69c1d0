"""JetMoE's mixture of attention heads from stock parts: router, dispatcher, LinearExperts.

``JetMoeMoA`` has no forward (HF's raises ``NotImplementedError``): its ``map`` routes a
token to K experts and projects it into each expert's query slot, ``reduce`` projects the
attended slots back and sums them with the gates, plus a bias. ``RoutedLinear`` built from
its weights is compared with ``map`` and ``reduce``, and an attention written around it
(HF's kv projection, rotary embedding and eager attention, by hand) with the whole
``JetMoeAttention``: outputs, router logits, chosen experts, the input gradient and every
weight gradient, in fp32 and fp64, eval and training mode, plain and skewed routing. Both
classes stay in ``REFUSED`` (``from_hf`` returns an ``MoELayer``, tokens in and tokens
out; these are two halves around attention); this file shows the parts express them.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import transformers
from test_hf_families import TOL, _rel
from torch import Tensor, nn

from moeblocks.dispatch import TorchDispatcher
from moeblocks.hf.layouts import _jetmoe_read, copy_into
from moeblocks.routed_linear import RoutedLinear

B, S, D, E, K, HD, KVH = 2, 5, 16, 8, 2, 4, 2  # heads = K · KVH, slot width H = HD · KVH
CONFIG = {
    "hidden_size": D,
    "intermediate_size": 8,
    "num_local_experts": E,
    "num_experts_per_tok": K,
    "num_attention_heads": K * KVH,
    "num_key_value_heads": KVH,
    "kv_channels": HD,
}


@functools.cache
def _attention() -> nn.Module:
    from transformers.models.jetmoe.modeling_jetmoe import JetMoeAttention

    config = transformers.JetMoeConfig(**CONFIG)
    config._attn_implementation = "eager"
    block = JetMoeAttention(config, layer_idx=0)
    g = torch.Generator().manual_seed(27)
    with torch.no_grad():
        for p in block.parameters():  # the output bias too: zeros would hide it
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return block.eval()


def _fresh(dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(_attention()).to(dtype)


def _moa(hf_moa: nn.Module) -> RoutedLinear:
    """RoutedLinear with JetMoeMoA's router (top-k of float32 logits, softmax over the k)."""
    router, _ = _jetmoe_read(hf_moa.router, hf_moa)
    w = hf_moa.input_linear.weight
    moa = RoutedLinear(router, TorchDispatcher(), w.shape[1]).to(w.dtype)
    copy_into(moa.map_in.w_EDO, w.transpose(1, 2))
    copy_into(moa.map_out.w_EDO, hf_moa.output_linear.weight.transpose(1, 2))
    copy_into(moa.bias_D, hf_moa.bias)
    return moa.train(hf_moa.training)


def _grad_pairs(hf: nn.Module, moa: RoutedLinear) -> list[tuple[Tensor, Tensor]]:
    """(HF's gradient, moeblocks' in HF's layout) for every weight of the MoA."""
    hf_moa = hf.experts
    return [
        (hf_moa.input_linear.weight.grad, moa.map_in.w_EDO.grad.transpose(1, 2)),
        (hf_moa.output_linear.weight.grad, moa.map_out.w_EDO.grad.transpose(1, 2)),
        (hf_moa.bias.grad, moa.bias_D.grad),
        (hf_moa.router.layer.weight.grad, moa.router.gate_weight.grad),
    ]


def _inputs(block: nn.Module, dtype: torch.dtype, skew: bool) -> Tensor:
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(1), dtype=dtype)
    if skew:  # most tokens pick the same experts along one router row: others get none
        w = block.experts.router.layer.weight[3].detach().to(dtype)
        x = 0.1 * x + 4 * w / w.norm()
    return x


def _check(errs: list[float], dtype: torch.dtype) -> None:
    # TOL: HF index_adds the K slots expert by expert, moeblocks sums each token's K.
    assert max(errs) <= TOL[dtype], errs


@pytest.mark.parametrize(
    ("skew", "dtype"),
    [(False, torch.float32), (False, torch.float64), (True, torch.float64)],
    ids=["plain-fp32", "plain-fp64", "skewed-fp64"],
)
def test_map_and_reduce_match_jetmoe_moa(skew: bool, dtype: torch.dtype) -> None:
    hf = _fresh(dtype)
    moa = _moa(hf.experts)
    x = _inputs(hf, dtype, skew)
    x_hf, x_mb = x.clone().requires_grad_(), x.clone().requires_grad_()
    q_hf, logits, topo = hf.experts.map(x_hf)
    slots, routing, layout = moa.map(x_mb.reshape(-1, D))
    # The same F.linear, cast to float32 as HF does: bit for bit.
    torch.testing.assert_close(routing.scores, logits, rtol=0, atol=0)
    errs = [_rel(slots.view(B, S, K, -1), q_hf)]
    # A nonlinearity per slot stands for the attention between map and reduce.
    out_hf = hf.experts.reduce(torch.tanh(q_hf), topo)
    out_mb = moa.reduce(torch.tanh(slots), routing, layout).view(B, S, D)
    errs.append(_rel(out_mb, out_hf))
    g = torch.randn(B, S, D, generator=torch.Generator().manual_seed(2), dtype=dtype)
    (out_hf * g).sum().backward()
    (out_mb * g).sum().backward()
    errs.append(_rel(x_mb.grad, x_hf.grad))
    # Experts that got no token have zero gradient on both sides: floor the norm at 1.
    errs += [_rel(got, want, floor=1.0) for want, got in _grad_pairs(hf, moa)]
    _check(errs, dtype)
    if skew:
        assert (torch.bincount(routing.experts.reshape(-1), minlength=E) == 0).any()


def _attend(hf: nn.Module, moa: RoutedLinear, kv_DW: Tensor, x: Tensor, mask: Tensor) -> Tensor:
    """JetMoE's attention around the routed maps, written out (HF's rotary helper)."""
    from transformers.models.jetmoe.modeling_jetmoe import (
        JetMoeRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    slots, routing, layout = moa.map(x.reshape(-1, D))
    q = slots.view(B, S, K * KVH, HD).transpose(1, 2)  # K·KVH heads of HD
    k, v = (x @ kv_DW).chunk(2, dim=-1)
    k, v = (t.reshape(B, S, KVH, HD).transpose(1, 2) for t in (k, v))
    cos, sin = JetMoeRotaryEmbedding(hf.config)(x, torch.arange(S)[None].expand(B, S))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = k.repeat(1, K, 1, 1), v.repeat(1, K, 1, 1)  # tiled per slot, not interleaved
    scores = q @ k.transpose(2, 3) * HD**-0.5 + mask
    attn = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    attn = attn.transpose(1, 2).reshape(B * S, K, KVH * HD)
    return moa.reduce(attn, routing, layout).view(B, S, D)


@pytest.mark.parametrize(
    ("skew", "dtype", "training"),
    [
        (False, torch.float32, False),
        (False, torch.float64, False),
        (True, torch.float64, False),
        (False, torch.float64, True),  # attention_dropout is 0: training is deterministic
    ],
    ids=["plain-fp32", "plain-fp64", "skewed-fp64", "training-fp64"],
)
def test_routed_maps_around_attention_match_jetmoe_attention(
    skew: bool, dtype: torch.dtype, training: bool
) -> None:
    from transformers.models.jetmoe.modeling_jetmoe import JetMoeRotaryEmbedding

    hf = _fresh(dtype).train(training)
    moa = _moa(hf.experts)
    kv_DW = hf.kv_proj.weight.detach().t().clone().requires_grad_()
    x = _inputs(hf, dtype, skew)
    x_hf, x_mb = x.clone().requires_grad_(), x.clone().requires_grad_()
    causal = torch.full((S, S), float("-inf"), dtype=dtype).triu(1)[None, None]
    pos = JetMoeRotaryEmbedding(hf.config)(x, torch.arange(S)[None].expand(B, S))
    out_hf, _, logits = hf(x_hf, attention_mask=causal, position_embeddings=pos)
    out_mb = _attend(hf, moa, kv_DW, x_mb, causal)
    errs = [_rel(out_mb, out_hf)]
    torch.testing.assert_close(moa.router(x.reshape(-1, D)).scores, logits, rtol=0, atol=0)
    g = torch.randn(B, S, D, generator=torch.Generator().manual_seed(2), dtype=dtype)
    (out_hf * g).sum().backward()
    (out_mb * g).sum().backward()
    errs.append(_rel(x_mb.grad, x_hf.grad))
    errs += [_rel(got, want, floor=1.0) for want, got in _grad_pairs(hf, moa)]
    errs.append(_rel(kv_DW.grad.t(), hf.kv_proj.weight.grad, floor=1.0))
    _check(errs, dtype)
