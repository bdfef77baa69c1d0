"""WeightPolicy's p-norm (DBRX) and floored sum (ERNIE-4.5) renormalisations.

``weights = scale · gates / max(‖gates‖_p + eps, min_sum)``: a float64 per-token
reference written from that formula, the argument checks, the dynamic-k path, and a
router on each option against a per-token reference over hypothesis-drawn shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeblocks as mb


def _reference(gates: torch.Tensor, p: float, min_sum: float, eps: float, scale: float):
    rows = []
    for row in gates.tolist():
        norm = sum(abs(g) ** p for g in row) ** (1 / p)
        denom = max(norm + eps, min_sum)
        rows.append([scale * g / denom for g in row])
    return torch.tensor(rows, dtype=torch.float64).view_as(gates)


@pytest.mark.parametrize(
    ("p", "min_sum"), [(1.0, 0.0), (2.0, 0.0), (3.5, 0.0), (1.0, 0.7), (2.0, 0.4)]
)
def test_weights_match_the_formula(p: float, min_sum: float) -> None:
    # Sums 0.46..1.18, 2-norms 0.28..0.69: each floor binds for some tokens only.
    gates = torch.rand(7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / 2
    policy = mb.WeightPolicy("always", scale=1.5, eps=1e-3, p=p, min_sum=min_sum)
    got = policy(gates)
    # float64: one power sum per token, a few ulps apart from the loop's order.
    torch.testing.assert_close(
        got, _reference(gates, p, min_sum, 1e-3, 1.5), rtol=1e-13, atol=1e-15
    )
    if min_sum:
        floored = torch.linalg.vector_norm(gates, ord=p, dim=-1) + 1e-3 < min_sum
        assert floored.any(), "the floor should bind for some tokens"
        assert (~floored).any(), "the floor should leave some tokens alone"


def test_defaults_keep_the_plain_sum_bitwise() -> None:
    gates = torch.rand(5, 4, generator=torch.Generator().manual_seed(1))
    got = mb.WeightPolicy("always", p=1.0, min_sum=0.0)(gates)
    assert torch.equal(got, gates / gates.sum(-1, keepdim=True))


def test_the_floor_and_the_norm_apply_to_real_slots_only() -> None:
    gates = torch.tensor([[0.2, 0.1, 0.5], [0.3, 0.0, 0.0]], dtype=torch.float64)
    slots = torch.tensor([[True, True, False], [False, False, False]])
    got = mb.WeightPolicy("always", p=2.0, min_sum=0.5)(gates, slots)
    want = torch.tensor([[0.2 / 0.5, 0.1 / 0.5, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)  # float64, one division
    got = mb.WeightPolicy("always", p=2.0)(gates, slots)
    torch.testing.assert_close(got[0, :2], gates[0, :2] / gates[0, :2].norm(), rtol=1e-15, atol=0)


@pytest.mark.parametrize("p", [0.0, -1.0, math.inf, math.nan])
def test_bad_p_is_refused(p: object) -> None:
    with pytest.raises(ValueError, match="p must be a finite number > 0"):
        mb.WeightPolicy("always", p=p)  # type: ignore[arg-type]


@pytest.mark.parametrize("min_sum", [-0.1, math.inf, math.nan])
def test_bad_min_sum_is_refused(min_sum: object) -> None:
    with pytest.raises(ValueError, match="min_sum must be a finite number >= 0"):
        mb.WeightPolicy("always", min_sum=min_sum)  # type: ignore[arg-type]


@settings(max_examples=25)
@given(
    T=st.integers(0, 5),
    E=st.integers(1, 6),
    K=st.integers(1, 3),
    p=st.sampled_from([1.0, 2.0, 3.0]),
    min_sum=st.sampled_from([0.0, 0.3, 0.8]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_a_router_with_the_options_matches_a_per_token_reference(
    T: int, E: int, K: int, p: float, min_sum: float, dtype: torch.dtype, seed: int
) -> None:
    K = min(K, E)
    torch.manual_seed(seed)
    weights = mb.WeightPolicy("always", p=p, min_sum=min_sum)
    router = mb.Router(mb.LinearScorer(4, E), K, weights=weights).to(dtype)
    x = torch.randn(T, 4, dtype=dtype)
    routing = router(x)
    assert routing.weights.shape == (T, K)
    for t in range(T):
        probs = torch.softmax(routing.scores[t].detach().double(), -1)
        top = sorted(range(E), key=lambda e: -probs[e].item())[:K]
        assert sorted(routing.experts[t].tolist()) == sorted(top)
        chosen = probs[routing.experts[t]].unsqueeze(0)
        want = _reference(chosen, p, min_sum, 0.0, 1.0)[0]
        # float32 rows: softmax and norm rounding (~1e-7); float64: ulps.
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(routing.weights[t].detach().double(), want, rtol=tol, atol=tol)
