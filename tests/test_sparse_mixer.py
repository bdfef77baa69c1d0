"""SparseMixer-v2 (PhiMoE's router): a selection that gives its own gates.

A float64 per-token loop written from the published rule (Liu et al. 2024, GRIN: slot
by slot, candidates within a relative margin of the best remaining logit, the gate a
softmax over the candidates; in training a Gumbel sample, a 1 or 1/3 factor and the
gradient of the unscaled gate). For training mode the reference draws the same random
numbers in the same order from the same seed (the rule's draws are part of its
definition), then loops over tokens. Plus argument checks and hypothesis compositions
over shapes, k, E and dtypes.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeblocks as mb
from moeblocks.gating import GatedSelection, SparseMixer

# The published code computes its factors in float32 (0.3333 + 0.6667 · kept), then
# casts them to the logits' dtype: 1 and 0.3333 rounded to float32.
ONE, THIRD = 1.0, float(torch.tensor(0.3333, dtype=torch.float32))


def _draws(T: int, E: int, k: int, dtype: torch.dtype, seed: int) -> list[tuple]:
    """The rule's random numbers per slot: (exponential [T, E], uniform [T, 1])."""
    torch.manual_seed(seed)
    out = []
    for slot in range(k):
        expo = torch.empty(T, E, dtype=dtype).exponential_()
        uniform = torch.rand(T, 1, dtype=dtype)
        if slot > 0:
            uniform = uniform.uniform_()
        out.append((expo, uniform))
    return out


def _reference(logits: torch.Tensor, k: int, eps: float, draws: list | None):
    """Per token, per slot: (expert, gate, d gate / d logits, factor), Python floats."""
    T, E = logits.shape
    result = []
    for t in range(T):
        s = logits[t].tolist()
        chosen: list[int] = []
        row = []
        for slot in range(k):
            left = [e for e in range(E) if e not in chosen]
            m = max(s[e] for e in left)
            cand = [e for e in left if (m - s[e]) / max(abs(s[e]), m) <= 2 * eps]
            z = sum(math.exp(s[e] - m) for e in cand)
            p = {e: math.exp(s[e] - m) / z for e in cand}
            best = max(cand, key=lambda e: s[e])
            if draws is None:
                pick, factor = best, 1.0
            else:
                expo, uniform = draws[slot]
                pick = max(cand, key=lambda e: s[e] - math.log(expo[t, e].item()))
                top = max(cand, key=lambda e: p[e])
                factor = ONE if pick == top or uniform[t, 0].item() > 0.75 else THIRD
            grad = [p[pick] * ((e == pick) - p[e]) if e in cand else 0.0 for e in range(E)]
            row.append((pick, p[pick] * factor, grad, factor))
            chosen.append(pick)
        result.append(row)
    return result


def _check(logits: torch.Tensor, k: int, eps: float, training: bool, seed: int) -> None:
    T, E = logits.shape
    draws = _draws(T, E, k, logits.dtype, seed) if training else None
    leaf = logits.clone().requires_grad_()
    torch.manual_seed(seed)
    experts, gates = SparseMixer(eps).choose(leaf, k, training)
    ref = _reference(logits, k, eps, draws)
    for t in range(T):
        assert experts[t].tolist() == [slot[0] for slot in ref[t]]
    want = torch.tensor([[slot[1] for slot in row] for row in ref], dtype=torch.float64)
    # Softmax over a few candidates: float64 rounding apart (float32 inputs: ~1e-7).
    tol = 1e-12 if logits.dtype == torch.float64 else 1e-6
    torch.testing.assert_close(gates.double().reshape(T, k), want.reshape(T, k), rtol=tol, atol=tol)
    for t in range(T):
        for j in range(k):
            (grad,) = torch.autograd.grad(gates[t, j], leaf, retain_graph=True)
            want_grad = torch.tensor(ref[t][j][2], dtype=torch.float64)
            torch.testing.assert_close(grad[t].double(), want_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
def test_sparse_mixer_matches_the_published_rule(training: bool) -> None:
    # Logits 0.6-2.5 apart: with eps 0.2 some experts are candidates, others not.
    logits = torch.randn(12, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _check(logits * 2, 2, 0.2, training, seed=3)
    m = logits.max(-1, keepdim=True).values * 2
    margin = (m - logits * 2) / (logits * 2).abs().clamp(min=m)
    assert ((margin > 0) & (margin <= 0.4)).any(), "some runner-up should be a candidate"
    assert (margin > 0.4).any(), "some expert should be masked out"


def test_training_samples_and_scales_some_gates_by_a_third() -> None:
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _check(logits, 2, 0.5, training=True, seed=0)
    torch.manual_seed(0)
    experts, _ = SparseMixer(0.5).choose(logits, 2, training=True)
    eval_experts, _ = SparseMixer(0.5).choose(logits, 2, training=False)
    assert not torch.equal(experts, eval_experts), "training mode samples, eval takes the best"
    ref = _reference(logits, 2, 0.5, _draws(64, 8, 2, torch.float64, 0))
    assert {slot[3] for row in ref for slot in row} == {ONE, THIRD}


def test_the_router_takes_the_selections_gates() -> None:
    torch.manual_seed(0)
    router = mb.Router(
        mb.LinearScorer(4, 6),
        2,
        scoring="softmax_topk",
        selection=SparseMixer(0.3),
        weights=mb.WeightPolicy("never"),
    ).double()
    assert isinstance(router.selection, GatedSelection)
    x = torch.randn(9, 4, dtype=torch.float64)
    routing = router.eval()(x)
    experts, gates = SparseMixer(0.3).choose(routing.scores, 2, training=False)
    assert torch.equal(routing.experts, experts)
    assert torch.equal(routing.weights, gates)
    torch.testing.assert_close(routing.probs, routing.scores.softmax(-1), rtol=0, atol=0)


def test_the_router_refuses_a_probability_key() -> None:
    with pytest.raises(ValueError, match="reads the selection key as logits"):
        mb.Router(mb.LinearScorer(4, 6), 2, selection=SparseMixer())
    with pytest.raises(ValueError, match="would change the gates"):
        mb.Router(
            mb.LinearScorer(4, 6),
            2,
            scoring="softmax_topk",
            selection=SparseMixer(),
            balancer=mb.BiasBalancer(6),
        )


@pytest.mark.parametrize("eps", [-0.1, math.inf, math.nan])
def test_bad_eps_is_refused(eps: float) -> None:
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        SparseMixer(eps)


def test_k_beyond_the_experts_is_refused() -> None:
    with pytest.raises(ValueError, match="k reaches 4 but there are only 3 experts"):
        SparseMixer().check(3, 4)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\]"):
        SparseMixer().choose(torch.zeros(2, 3), 4, training=False)


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(0, 5),
    E=st.integers(1, 6),
    K=st.integers(1, 3),
    eps=st.sampled_from([0.0, 0.05, 0.5]),
    training=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_compositions_match_the_per_token_rule(
    T: int, E: int, K: int, eps: float, training: bool, dtype: torch.dtype, seed: int
) -> None:
    K = min(K, E)
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 3
    _check(logits, K, eps, training, seed)
    router = mb.Router(
        mb.LinearScorer(4, E), K, scoring="softmax_topk", selection=SparseMixer(eps)
    ).to(dtype)
    routing = router.train(training)(torch.randn(T, 4, dtype=dtype))
    assert routing.experts.shape == routing.weights.shape == (T, K)
    for t in range(T):
        assert len(set(routing.experts[t].tolist())) == K, "a slot repeats an expert"
