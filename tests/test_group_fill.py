"""GroupLimitedTopK(dropped_fill=...): the key that experts of the dropped groups get.

DeepSeek-V3 fills them with −inf (never chosen); AXK-2 with 0.0, so that where the kept
experts' keys are negative (a negative selection bias) an expert of a dropped group wins
a slot. A per-token float64 reference written from the published rule, a case where the
fill decides, hypothesis compositions in a router, the argument checks, and AXK-2's own
block with such a bias.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeblocks as mb
from moeblocks.hf import from_hf


def _filled(key: list[float], G: int, keep: int, fill: float) -> list[float]:
    """One token's key after the group step: group score = sum of its 2 best keys."""
    size = len(key) // G
    score = [sum(sorted(key[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(G)]
    kept = sorted(range(G), key=lambda g: -score[g])[:keep]
    return [v if e // size in kept else fill for e, v in enumerate(key)]


def _reference(key: list[float], G: int, keep: int, fill: float, k: int) -> list[float]:
    """The filled keys of the k chosen experts, best first.

    Compared as values: the experts of dropped groups tie at the fill, and which of them
    a top-k takes is not part of the rule.
    """
    return sorted(_filled(key, G, keep, fill), reverse=True)[:k]


def test_zero_fill_lets_a_dropped_expert_win() -> None:
    # Groups {0,1} {2,3} {4,5} {6,7}; group 0 is kept (0.9 + -0.5 is the best sum), its
    # expert 1 has a negative key; with k = 2 the second slot goes to a dropped expert.
    key = torch.tensor([[0.9, -0.5, -0.6, -0.7, -0.8, -0.9, -1.0, -1.1]], dtype=torch.float64)
    minus_inf = mb.GroupLimitedTopK(4, 1)(key, 2)
    zero = mb.GroupLimitedTopK(4, 1, dropped_fill=0.0)(key, 2)
    assert set(minus_inf[0].tolist()) == {0, 1}
    assert zero[0, 0].item() == 0
    assert zero[0, 1].item() >= 2
    filled = _filled(key[0].tolist(), 4, 1, 0.0)
    assert [filled[e] for e in zero[0].tolist()] == _reference(key[0].tolist(), 4, 1, 0.0, 2)


def test_a_finite_fill_serves_any_k() -> None:
    with pytest.raises(ValueError, match="hold only 2"):
        mb.GroupLimitedTopK(4, 1).check(8, 3)
    mb.GroupLimitedTopK(4, 1, dropped_fill=0.0).check(8, 8)  # no error
    experts = mb.GroupLimitedTopK(4, 1, dropped_fill=0.0)(torch.randn(3, 8), 8)
    assert (experts.sort(-1).values == torch.arange(8)).all()


@pytest.mark.parametrize("fill", [math.nan, math.inf])
def test_bad_fill_is_refused(fill: object) -> None:
    with pytest.raises(ValueError, match="dropped_fill must be a number below"):
        mb.GroupLimitedTopK(4, 2, dropped_fill=fill)


@settings(max_examples=30)
@given(
    T=st.integers(0, 6),
    G=st.sampled_from([1, 2, 4]),
    size=st.integers(2, 3),
    keep=st.integers(1, 4),
    k=st.integers(1, 12),
    fill=st.sampled_from([0.0, -0.25, -math.inf]),
    seed=st.integers(0, 2**16),
)
def test_a_router_with_a_filled_selection_matches_a_per_token_reference(
    T: int, G: int, size: int, keep: int, k: int, fill: float, seed: int
) -> None:
    E, keep = G * size, min(keep, G)
    k = min(k, E if fill > -math.inf else keep * size)
    torch.manual_seed(seed)
    balancer = mb.BiasBalancer(E, rate=0.0)
    with torch.no_grad():  # a negative bias: some kept keys fall below the fill
        balancer.bias.copy_(torch.randn(E) * 0.5 - 0.4)
    router = mb.Router(
        mb.LinearScorer(5, E),
        k,
        scoring="sigmoid",
        selection=mb.GroupLimitedTopK(G, keep, dropped_fill=fill),
        balancer=balancer,
    ).double()
    x = torch.randn(T, 5, dtype=torch.float64)
    routing = router(x)
    key = torch.sigmoid(routing.scores) + balancer.bias
    for t in range(T):
        filled = _filled(key[t].tolist(), G, keep, fill)
        chosen = [filled[e] for e in routing.experts[t].tolist()]
        assert chosen == _reference(key[t].tolist(), G, keep, fill, k)


def _axk2_block() -> torch.nn.Module:
    import transformers

    config = transformers.AXK2Config(
        hidden_size=16,
        moe_intermediate_size=8,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=1,
        n_shared_experts=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    module = importlib.import_module("transformers.models.axk2.modeling_axk2")
    block = module.AXK2MoE(config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        # In each group one key above 0 and one below: with one kept group and k = 2, the
        # second slot goes to a dropped group's expert at 0, not to the kept negative one.
        bias = torch.tensor([1.0, -2.0] * 4) + 0.1 * torch.rand(8, generator=g)
        block.gate.e_score_correction_bias.copy_(bias)
    return block.eval().double()


def test_axk2_zero_fill_against_its_block() -> None:
    block = _axk2_block()
    layer = from_hf(block)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, _, experts = block.gate(x)
    routing = layer(x).routing
    assert torch.equal(routing.experts.sort(-1).values, experts.sort(-1).values)
    # The best expert is its group's positive one; the other comes from a dropped group
    # (the dropped experts tie at 0: both sides take the same one, by torch.topk).
    assert ((routing.experts[:, 1] // 2) != (routing.experts[:, 0] // 2)).all()
    # fp64 on both sides; the sums run in another order (~1e-16).
    torch.testing.assert_close(layer(x).out, block(x), rtol=1e-10, atol=1e-12)
