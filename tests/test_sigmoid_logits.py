"""The ``"sigmoid_logits"`` scoring (Kolibri): choose by logits + selection bias, gate by sigmoid.

A float64 per-token reference (a Python sort of each token's keys) for the choice and
the combine weights, over hypothesis-drawn shapes, biases and weight policies, and the
case that tells it apart from ``"sigmoid"`` (where the bias is added to the sigmoids).
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeblocks as mb
from moeblocks.gating import SCORINGS


def _router(E: int, K: int, bias: list[float], renormalize: str) -> mb.Router:
    balancer = mb.BiasBalancer(E, rate=0.0)
    balancer.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return mb.Router(
        mb.LinearScorer(4, E),
        K,
        scoring="sigmoid_logits",
        weights=mb.WeightPolicy(renormalize),
        balancer=balancer,
        routing_dtype=torch.float64,
    )


def _reference(
    logits: list[float], bias: list[float], K: int, renormalize: str
) -> tuple[list[int], list[float]]:
    order = sorted(range(len(logits)), key=lambda e: -(logits[e] + bias[e]))[:K]
    gates = [1 / (1 + math.exp(-logits[e])) for e in order]
    if renormalize == "always" or (renormalize == "k>1" and K > 1):
        total = sum(gates)
        gates = [g / total for g in gates]
    return order, gates


def test_sigmoid_logits_is_a_scoring() -> None:
    assert "sigmoid_logits" in SCORINGS


def test_bias_on_the_logits_differs_from_bias_on_the_sigmoids() -> None:
    logits = torch.tensor([[5.0, 0.0]], dtype=torch.float64)
    router = _router(2, 1, [0.0, 0.6], "never")
    # logits + bias = [5.0, 0.6]: expert 0; sigmoid + bias = [0.993, 1.1]: expert 1.
    assert router.decide(logits, logits, 1).experts.tolist() == [[0]]
    sigmoid = mb.Router(mb.LinearScorer(4, 2), 1, scoring="sigmoid", balancer=router.balancer)
    assert sigmoid.decide(logits, logits, 1).experts.tolist() == [[1]]


@settings(max_examples=40)
@given(
    T=st.integers(0, 5),
    E=st.integers(1, 6),
    K=st.integers(1, 3),
    renormalize=st.sampled_from(["always", "k>1", "never"]),
    seed=st.integers(0, 2**16),
)
def test_sigmoid_logits_matches_a_per_token_reference(
    T: int, E: int, K: int, renormalize: str, seed: int
) -> None:
    K = min(K, E)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64) * 3
    bias = (torch.randn(E, generator=g) * 2).tolist()
    router = _router(E, K, bias, renormalize)
    routing = router.decide(logits, logits, K)
    torch.testing.assert_close(routing.probs, torch.sigmoid(logits))
    for t in range(T):
        order, gates = _reference(logits[t].tolist(), router.balancer.bias.tolist(), K, renormalize)
        assert routing.experts[t].tolist() == order
        # float64 sums of at most 3 terms.
        torch.testing.assert_close(
            routing.weights[t], torch.tensor(gates, dtype=torch.float64), rtol=1e-12, atol=1e-15
        )
