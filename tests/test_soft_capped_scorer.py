"""SoftCappedScorer (Laguna's router): ``cap · tanh(scores / cap)`` around any scorer.

A float64 element-wise reference, the float32 capping option, the argument checks, and
a router built on it against a per-token reference over hypothesis-drawn shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeblocks as mb
from moeblocks.gating import SoftCappedScorer


def _reference(scores: torch.Tensor, cap: float) -> torch.Tensor:
    values = [cap * math.tanh(v / cap) for v in scores.reshape(-1).tolist()]
    return torch.tensor(values, dtype=scores.dtype).view_as(scores)


def test_soft_cap_matches_the_formula() -> None:
    torch.manual_seed(0)
    inner = mb.LinearScorer(5, 4).double()
    scorer = SoftCappedScorer(inner, 1.5)
    x = torch.randn(6, 5, dtype=torch.float64) * 3
    got = scorer(x)
    # float64: torch's tanh and math.tanh agree to a few ulps.
    torch.testing.assert_close(got, _reference(inner(x), 1.5), rtol=1e-13, atol=1e-14)
    assert got.abs().max() < 1.5
    assert (inner(x).abs() > 1.5).any(), "some scores should be bent by the cap"
    assert (scorer.dim, scorer.num_experts) == (5, 4)


def test_soft_cap_in_float32() -> None:
    inner = mb.LinearScorer(3, 2).double()
    scorer = SoftCappedScorer(inner, 2.0, torch.float32)
    out = scorer(torch.randn(4, 3, dtype=torch.float64))
    assert out.dtype == torch.float32
    assert scorer.compute_dtype == "float32"


@pytest.mark.parametrize("cap", [0.0, -1.0, math.inf, math.nan])
def test_soft_cap_rejects_bad_caps(cap: float) -> None:
    with pytest.raises(ValueError, match="cap must be a finite number > 0"):
        SoftCappedScorer(mb.LinearScorer(3, 2), cap)


@settings(max_examples=25)
@given(
    T=st.integers(0, 5),
    E=st.integers(1, 6),
    K=st.integers(1, 3),
    cap=st.floats(0.1, 5.0),
    seed=st.integers(0, 2**16),
)
def test_a_router_on_capped_scores_matches_a_per_token_reference(
    T: int, E: int, K: int, cap: float, seed: int
) -> None:
    K = min(K, E)
    torch.manual_seed(seed)
    inner = mb.LinearScorer(4, E).double()
    router = mb.Router(SoftCappedScorer(inner, cap), K, scoring="sigmoid").double()
    x = torch.randn(T, 4, dtype=torch.float64) * 3
    routing = router(x)
    capped = _reference(inner(x).detach(), cap)
    # float64, one tanh each.
    torch.testing.assert_close(routing.scores.detach(), capped, rtol=1e-12, atol=1e-13)
    for t in range(T):
        probs = [1 / (1 + math.exp(-v)) for v in capped[t].tolist()]
        order = sorted(range(E), key=lambda e: -probs[e])[:K]
        assert sorted(routing.experts[t].tolist()) == sorted(order)


def test_a_router_reads_the_wrapped_weight_through_the_cap() -> None:
    # Router.gate_weight (what hf/ writes Laguna's router weight from) is the inner
    # scorer's parameter itself, not a copy.
    inner = mb.LinearScorer(3, 2, bias=True)
    router = mb.Router(SoftCappedScorer(inner, 2.0), 1)
    assert router.gate_weight is inner.weight_ED
    assert router.gate_bias is inner.bias_E
