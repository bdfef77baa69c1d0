"""Capacity(renormalize=True): GShard / NLLB-MoE normalise the gates after dropping.

A float64 per-token reference of the published rule (queues take every first choice
before any second choice; a kept copy's weight is ``w_j · Σ_i w_i / Σ_kept w_i``), the
no-drop identity, the argument check, and a whole layer over hypothesis-drawn shapes
against a per-token loop over the experts.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeblocks as mb


def _reference(experts: torch.Tensor, weights: torch.Tensor, E: int, C: int) -> torch.Tensor:
    """The weights after capacity C, token by token (float64)."""
    T, K = experts.shape
    seen = [0] * E
    kept = [[False] * K for _ in range(T)]
    for j in range(K):  # rank first, then token order: a dropped copy still takes a place
        for t in range(T):
            e = int(experts[t, j])
            kept[t][j] = seen[e] < C
            seen[e] += 1
    out = torch.zeros(T, K, dtype=torch.float64)
    for t in range(T):
        w = [float(v) for v in weights[t]]
        kept_sum = sum(v for v, k in zip(w, kept[t], strict=True) if k)
        for j in range(K):
            if kept[t][j]:
                out[t, j] = w[j] * sum(w) / kept_sum
    return out


def _router(D: int, E: int, K: int, seed: int) -> mb.Router:
    torch.manual_seed(seed)
    return mb.Router(mb.LinearScorer(D, E), K, weights=mb.WeightPolicy("always", scale=0.8))


def test_renormalize_matches_the_published_rule() -> None:
    router = _router(4, 4, 2, 0).double()
    x = torch.randn(12, 4, dtype=torch.float64)
    x[:8] = x[:8] * 0.1 + 3 * router.gate_weight[1].detach()  # most tokens want expert 1
    routing = router(x)
    capped = mb.Capacity(limit=3, renormalize=True)(routing)
    assert int(capped.num_dropped) > 0, "the skewed input should overflow expert 1"
    ref = _reference(routing.experts, routing.weights.detach(), 4, 3)
    # float64: one product and one quotient per weight, a few ulps.
    torch.testing.assert_close(capped.weights.detach(), ref, rtol=1e-14, atol=1e-15)
    # A token that lost its second copy keeps its whole weight (0.8) on the first.
    lost_one = capped.dropped.sum(-1) == 1
    assert lost_one.any()
    # float64: w_1 · (w_1 + w_2) / w_1 rounds to within a few ulps of 0.8.
    torch.testing.assert_close(
        capped.weights[lost_one].sum(-1).detach(),
        torch.full((int(lost_one.sum()),), 0.8, dtype=torch.float64),
    )


def test_nothing_dropped_leaves_the_weights_bit_for_bit() -> None:
    router = _router(4, 4, 2, 1)
    routing = router(torch.randn(6, 4))
    plain = mb.Capacity(limit=6)(routing)
    renorm = mb.Capacity(limit=6, renormalize=True)(routing)
    assert int(renorm.num_dropped) == 0
    assert torch.equal(renorm.weights, plain.weights)


def test_renormalize_must_be_a_bool() -> None:
    # (Under the test suite's runtime type checker the annotation catches it first.)
    with pytest.raises(TypeError, match="renormalize"):
        mb.Capacity(limit=2, renormalize=1)  # type: ignore[arg-type]


@settings(max_examples=25)
@given(
    T=st.integers(0, 10),
    E=st.integers(2, 6),
    K=st.integers(1, 3),
    C=st.integers(0, 4),
    double=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_layer_with_renormalized_capacity_matches_a_per_token_loop(
    T: int, E: int, K: int, C: int, double: bool, seed: int
) -> None:
    K = min(K, E)
    D, H = 5, 3
    dtype = torch.float64 if double else torch.float32
    router = _router(D, E, K, seed)
    layer = mb.MoELayer(
        router,
        mb.TorchDispatcher(),
        mb.MLPExperts(E, D, H, activation="relu", bias=True),
        capacity=mb.Capacity(limit=C, renormalize=True),
    ).to(dtype)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    res = layer(x)
    routing = router(x)
    weights = _reference(routing.experts, routing.weights.detach().double(), E, C)
    bank = layer.experts
    expected = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for j in range(K):
            e = int(routing.experts[t, j])
            h = torch.relu(x[t].double() @ bank.w_in_EDF[e].double() + bank.b_in_EF[e].double())
            expected[t] += weights[t, j] * (h @ bank.w_out_EFD[e].double() + bank.b_out_ED[e])
    # float32: the layer runs the experts in float32 (~1e-7 relative per product);
    # float64: reordered sums only.
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(res.out.double().detach(), expected, rtol=tol, atol=tol)
    assert torch.equal(res.routing.dropped, weights.eq(0) & routing.weights.ne(0))
