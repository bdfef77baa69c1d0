"""The parts of a decoder-inline MoE (Gemma-4): NormedScorer, ScaledExperts, NormedExperts,
and a layer that feeds its routed experts normalised tokens (``routed_input_norm``).

Each against a float64 per-token reference written from its formula, then the whole
composition (normalising router, scaled routed experts on normalised tokens, a dense
branch norm → expert → norm, norms on the routed sum and on the output) against a
per-token loop over hypothesis-drawn shapes, k, dtypes and experts left without token.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import moeblocks as mb
from moeblocks.gating import NormedScorer


def _rms(x_D: Tensor, w_D: Tensor | None, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(mean(x²) + eps) · w``, one token, float64."""
    x_D = x_D.detach().double()
    inv = 1 / math.sqrt(float((x_D * x_D).mean()) + eps)
    return x_D * inv * (1.0 if w_D is None else w_D.detach().double())


def _expert(bank: mb.SwiGLUExperts, e: int, x_D: Tensor) -> Tensor:
    """``(act(x W_gate) ⊙ x W_up) W_out`` of expert ``e`` on one token, float64."""
    F = bank.hidden
    h = x_D.double() @ bank.w_in_EDF2[e].detach().double()
    act = {
        "silu": torch.nn.functional.silu,
        "gelu_tanh": lambda v: (
            0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
        ),
    }[bank.activation.activation]
    return (act(h[:F]) * h[F:]) @ bank.w_out_EFD[e].detach().double()


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # ones (norm weights, scales) would hide a missed multiply
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + 0.2)
    return module


def test_normed_scorer_matches_the_formula() -> None:
    inner = mb.LinearScorer(6, 4).double()
    scorer = _randomise(
        NormedScorer(inner, mb.RMSNorm(6, weight_dtype="input", compute_dtype=None), 0.5), 0
    )
    scorer = scorer.double()
    x = torch.randn(5, 6, dtype=torch.float64) * 3
    expected = torch.stack([inner.weight_ED @ (_rms(t, scorer.norm.weight) * 0.5) for t in x])
    # float64 throughout: a few ulps between torch's reductions and the loop.
    torch.testing.assert_close(scorer(x), expected, rtol=1e-12, atol=1e-12)
    assert scorer.weight_ED is inner.weight_ED
    assert scorer.bias_E is None
    assert (scorer.dim, scorer.num_experts, scorer.compute_dtype) == (6, 4, "input")
    router = mb.Router(scorer, 2)
    assert router.gate_weight is inner.weight_ED  # what to_hf and inspection read


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: NormedScorer(torch.nn.Linear(3, 2), mb.RMSNorm(3)), TypeError, "scorer must"),
        (lambda: NormedScorer(mb.LinearScorer(3, 2), mb.RMSNorm(3), 0.0), ValueError, "scale"),
        (lambda: NormedScorer(mb.LinearScorer(3, 2), mb.RMSNorm(3), math.inf), ValueError, "scale"),
        (lambda: mb.ScaledExperts(torch.nn.Linear(3, 3)), TypeError, "bank"),
        (
            lambda: mb.NormedExperts(mb.SwiGLUExperts(2, 3, 4), None, input_norm=torch.tanh),
            TypeError,
            "input_norm",
        ),
        (lambda: mb.NormedExperts(mb.SwiGLUExperts(2, 3, 4), None), ValueError, "got neither"),
    ],
)
def test_parts_reject_bad_arguments(build, error: type, match: str) -> None:
    # The part's own check, or beartype's in front of it when the tests run with the hook.
    with pytest.raises(error, match=match):
        build()


def _layer(E: int, K: int, D: int, seed: int) -> mb.MoELayer:
    torch.manual_seed(seed)
    norm = mb.RMSNorm(D, weight_dtype="input", inverse_root="pow")
    scorer = NormedScorer(mb.LinearScorer(D, E), norm, D**-0.5)
    dense = mb.NormedExperts(
        mb.SwiGLUExperts(1, D, 3, activation=mb.GLU("gelu_tanh")),
        mb.RMSNorm(D, inverse_root="pow"),
        input_norm=mb.RMSNorm(D, inverse_root="pow"),
    )
    routed = mb.SwiGLUExperts(E, D, 4, activation=mb.GLU("gelu_tanh"))
    layer = mb.MoELayer(
        mb.Router(scorer, K, weights=mb.WeightPolicy("always")),
        mb.TorchDispatcher(),
        mb.ScaledExperts(routed, per_expert=True),
        shared=mb.SharedExperts(dense),
        routed_input_norm=mb.RMSNorm(D),
        routed_norm=mb.RMSNorm(D),
        out_norm=mb.RMSNorm(D, weight_dtype="input"),
    )
    return _randomise(layer, seed)


def _reference(layer: mb.MoELayer, x: Tensor, experts: Tensor, weights: Tensor) -> Tensor:
    """The composition for each token, from the formulas, in float64."""
    bank = layer.experts.bank
    dense = layer.shared.experts
    out = []
    for t, x_D in enumerate(x):
        x_in = _rms(x_D, layer.routed_input_norm.weight)
        routed = sum(
            weights[t, j].double() * layer.experts.scale[e].double() * _expert(bank, e, x_in)
            for j, e in enumerate(experts[t].tolist())
        )
        routed = _rms(routed, layer.routed_norm.weight)
        branch = _expert(dense.experts, 0, _rms(x_D, dense.input_norm.weight))
        branch = _rms(branch, dense.norm.weight)
        out.append(_rms(routed + branch, layer.out_norm.weight))
    return torch.stack(out) if out else torch.zeros(0, x.shape[1], dtype=torch.float64)


def _router_reference(layer: mb.MoELayer, x: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """Experts and renormalised softmax weights per token, float64."""
    scorer = layer.router.scorer
    experts, weights = [], []
    for x_D in x:
        logits = scorer.scorer.weight_ED.double() @ (_rms(x_D, scorer.norm.weight) * scorer.scale)
        probs = torch.softmax(logits, -1)
        top = probs.topk(K)
        experts.append(top.indices)
        weights.append(top.values / top.values.sum())
    if not experts:
        return torch.zeros(0, K, dtype=torch.long), torch.zeros(0, K, dtype=torch.float64)
    return torch.stack(experts), torch.stack(weights)


@settings(max_examples=20, deadline=None)
@given(
    T=st.integers(0, 6),
    E=st.integers(1, 5),
    K=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    skew=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_decoder_inline_composition_matches_a_per_token_reference(
    T: int, E: int, K: int, dtype: torch.dtype, skew: bool, seed: int
) -> None:
    K, D = min(K, E), 6
    layer = _layer(E, K, D, seed).to(dtype)
    x = torch.randn(T, D, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    if skew:  # most tokens along one router row: experts left without token
        w = layer.router.scorer.scorer.weight_ED[0].detach()
        x = 0.1 * x + 4 * w / w.norm()
    moe = layer(x)
    experts, weights = _router_reference(layer, x, K)
    # The choice compared as sets (ties aside, the order of equal keys is free).
    assert torch.equal(moe.routing.experts.sort(-1).values, experts.sort(-1).values)
    order = moe.routing.experts.argsort(-1)
    ref_order = experts.argsort(-1)
    # float32 routing (its default dtype) against float64.
    torch.testing.assert_close(
        moe.routing.weights.gather(1, order).double(),
        weights.gather(1, ref_order),
        rtol=1e-5,
        atol=1e-6,
    )
    expected = _reference(layer, x, moe.routing.experts, moe.routing.weights)
    # The norms compute in float32 in either dtype (as Gemma-4's): float32 rounding through
    # five norms and the expert sums.
    torch.testing.assert_close(moe.out.double(), expected, rtol=1e-4, atol=1e-5)


def test_scaled_experts_scale_each_experts_rows() -> None:
    bank = _randomise(mb.ScaledExperts(mb.SwiGLUExperts(3, 4, 5), per_expert=True), 1).double()
    rows = torch.randn(6, 4, dtype=torch.float64)
    sizes = torch.tensor([2, 0, 4])  # expert 1 has no row
    out = bank(rows, sizes)
    owner = [0, 0, 2, 2, 2, 2]
    expected = torch.stack(
        [bank.scale[e] * _expert(bank.bank, e, r) for e, r in zip(owner, rows, strict=True)]
    )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)  # float64, a few ulps
    out.sum().backward()
    assert bank.scale.grad[1] == 0, "an expert without rows gets no gradient"


def test_normed_experts_hand_each_norm_the_rows_expert_ids() -> None:
    # Per-expert norms in and out: a row normalised with another expert's scale fails.
    E, D = 3, 4
    inner = mb.SwiGLUExperts(E, D, 5).double()
    out_norm = _randomise(mb.RMSNorm(D, num_experts=E, compute_dtype=None), 2).double()
    in_norm = _randomise(mb.RMSNorm(D, num_experts=E, compute_dtype=None), 3).double()
    bank = mb.NormedExperts(inner, out_norm, input_norm=in_norm)
    rows = torch.randn(6, D, dtype=torch.float64)
    sizes = torch.tensor([1, 0, 5])  # expert 1 has no row
    owner = [0, 2, 2, 2, 2, 2]
    expected = torch.stack(
        [
            _rms(_expert(inner, e, _rms(r, in_norm.weight[e])), out_norm.weight[e])
            for e, r in zip(owner, rows, strict=True)
        ]
    )
    torch.testing.assert_close(bank(rows, sizes), expected, rtol=1e-12, atol=1e-12)  # float64
    only_out = mb.NormedExperts(inner, out_norm)
    torch.testing.assert_close(
        only_out(rows, sizes),
        torch.stack(
            [
                _rms(_expert(inner, e, r), out_norm.weight[e])
                for e, r in zip(owner, rows, strict=True)
            ]
        ),
        rtol=1e-12,
        atol=1e-12,
    )


def test_scaled_experts_scalar_and_per_expert_shapes() -> None:
    bank = mb.SwiGLUExperts(3, 4, 5)
    assert mb.ScaledExperts(bank).scale.shape == ()
    assert mb.ScaledExperts(bank, 0.5, per_expert=True).scale.shape == (3,)
    assert torch.equal(mb.ScaledExperts(bank, 0.5, per_expert=True).scale, torch.full((3,), 0.5))
