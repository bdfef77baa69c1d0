"""HashSelection and sqrt-softplus scoring (DeepSeek-V4's router parts).

``"sqrt_softplus"`` scoring: ``probs = sqrt(softplus(logits))``, chosen by (probs + a
selection bias), gated by probs. :class:`~moeblocks.HashSelection` (hash routing, Roller
et al. 2021; DeepSeek-V4's first layers): the experts of a token are row ``id`` of a fixed
table, the layer takes ``token_ids=``. Float64 per-token references written from the
formulas, hypothesis compositions (shapes, k, E, vocabulary, empty experts), and the
argument checks.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeblocks as mb
from moeblocks.gating import score_probs
from moeblocks.layer import _flat_ids


def _sqrt_softplus(v: float) -> float:
    return math.sqrt(math.log1p(math.exp(v)))


def test_sqrt_softplus_matches_the_formula() -> None:
    # Up to 18: above 20 torch's softplus returns x itself (as HF's does), 1e-9 off the
    # formula there.
    logits = torch.linspace(-30, 18, 60, dtype=torch.float64).view(3, 20)
    got = score_probs("sqrt_softplus", logits)
    expected = torch.tensor(
        [_sqrt_softplus(v) for v in logits.reshape(-1).tolist()], dtype=torch.float64
    )
    # float64: torch's softplus and log1p(exp) agree to a few ulps.
    torch.testing.assert_close(got, expected.view_as(logits), rtol=1e-13, atol=0)


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(0, 6),
    E=st.integers(1, 6),
    K=st.integers(1, 3),
    scale=st.floats(0.5, 3.0),
    seed=st.integers(0, 2**16),
)
def test_a_sqrt_softplus_router_matches_a_per_token_reference(
    T: int, E: int, K: int, scale: float, seed: int
) -> None:
    K = min(K, E)
    torch.manual_seed(seed)
    balancer = mb.BiasBalancer(E, rate=0.0)
    with torch.no_grad():
        balancer.bias.copy_(torch.randn(E) * 0.3)  # non-zero: it must move the choice only
    router = mb.Router(
        mb.LinearScorer(4, E),
        K,
        scoring="sqrt_softplus",
        weights=mb.WeightPolicy("always", scale=scale, eps=1e-20),
        balancer=balancer,
    ).double()
    x = torch.randn(T, 4, dtype=torch.float64) * 2
    routing = router(x)
    logits = router.scorer(x).detach()
    bias = balancer.bias.double().tolist()
    for t in range(T):
        probs = [_sqrt_softplus(v) for v in logits[t].tolist()]
        chosen = sorted(range(E), key=lambda e: -(probs[e] + bias[e]))[:K]
        assert sorted(routing.experts[t].tolist()) == sorted(chosen)
        total = sum(probs[e] for e in chosen) + 1e-20
        want = {e: scale * probs[e] / total for e in chosen}
        got = dict(zip(routing.experts[t].tolist(), routing.weights[t].tolist(), strict=True))
        for e in chosen:
            # float64, one softplus and a sum of K.
            assert math.isclose(got[e], want[e], rel_tol=1e-12), (t, e)


def test_the_default_table_spreads_ids_round_robin() -> None:
    selection = mb.HashSelection(5, 2, 3)
    assert selection.table_VK.tolist() == [[0, 1], [2, 0], [1, 2], [0, 1], [2, 0]]
    assert "table_VK" in selection.state_dict()


def _reference(layer: mb.MoELayer, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Token by token: the table's experts, sqrt-softplus gates renormalised, SwiGLU."""
    router, bank = layer.router, layer.experts
    table = router.selection.table_VK
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = (router.scorer.weight_ED @ x[t]).tolist()
        chosen = table[int(ids[t])].tolist()
        gates = [_sqrt_softplus(logits[e]) for e in chosen]
        for e, gate in zip(chosen, gates, strict=True):
            gate_up = x[t] @ bank.w_in_EDF2[e]
            g, u = gate_up.chunk(2)
            h = torch.nn.functional.silu(g) * u
            out[t] += gate / (sum(gates) + 1e-20) * (h @ bank.w_out_EFD[e])
    return out


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(0, 6),
    E=st.integers(1, 6),
    K=st.integers(1, 3),
    V=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_a_hash_routed_layer_matches_a_per_token_reference(
    T: int, E: int, K: int, V: int, seed: int
) -> None:
    K = min(K, E)
    torch.manual_seed(seed)
    selection = mb.HashSelection(V, K, E)
    with torch.no_grad():  # a random table, repeats allowed (HF's zero init repeats)
        selection.table_VK.copy_(torch.randint(0, E, (V, K)))
    router = mb.Router(
        mb.LinearScorer(4, E),
        K,
        scoring="sqrt_softplus",
        selection=selection,
        weights=mb.WeightPolicy("always", eps=1e-20),
    )
    layer = mb.MoELayer(router, mb.TorchDispatcher(), mb.SwiGLUExperts(E, 4, 3)).double()
    x = torch.randn(T, 4, dtype=torch.float64)
    ids = torch.randint(0, V, (T,))
    with torch.no_grad():
        res = layer(x, token_ids=ids)
        assert torch.equal(res.routing.experts, selection.table_VK[ids])
        # float64, a handful of products and sums: reordering only.
        torch.testing.assert_close(res.out, _reference(layer, x, ids), rtol=1e-12, atol=1e-12)


def test_token_ids_keep_the_input_shape_and_reach_the_router() -> None:
    torch.manual_seed(0)
    router = mb.Router(mb.LinearScorer(4, 4), 2, selection=mb.HashSelection(8, 2, 4))
    layer = mb.MoELayer(router, mb.TorchDispatcher(), mb.SwiGLUExperts(4, 4, 3))
    x, ids = torch.randn(2, 3, 4), torch.randint(0, 8, (2, 3))
    res = layer(x, token_ids=ids)
    assert res.out.shape == x.shape
    assert torch.equal(res.routing.experts, router.selection.table_VK[ids.reshape(-1)])
    with pytest.raises(ValueError, match=r"token_ids must be an integer tensor of shape \(2, 3\)"):
        _flat_ids(ids.reshape(-1), x)
    with pytest.raises((ValueError, TypeError)):  # TypeError from the test run's shape hook
        layer(x, token_ids=ids.reshape(-1))
    with pytest.raises(ValueError, match="routes by token id: pass token_ids"):
        layer(x)
    with pytest.raises(ValueError, match=r"token_ids must be in \[0, 8\)"):
        layer(x, token_ids=ids + 8)


def test_a_router_without_a_hash_ignores_token_ids() -> None:
    # DeepSeek-V4's decoder hands input_ids to every MoE block, hashed or not.
    torch.manual_seed(0)
    layer = mb.MoELayer(
        mb.Router(mb.LinearScorer(4, 4), 2), mb.TorchDispatcher(), mb.SwiGLUExperts(4, 4, 3)
    )
    x = torch.randn(5, 4)
    assert torch.equal(layer(x, token_ids=torch.arange(5)).out, layer(x).out)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        mb.HashSelection(4, 0, 3)
    with pytest.raises(ValueError, match=r"k \(4\) must be <= num_experts \(3\)"):
        mb.HashSelection(4, 4, 3)
    with pytest.raises(ValueError, match="HashSelection holds 2 of 4 experts per token id"):
        mb.Router(mb.LinearScorer(4, 4), 3, selection=mb.HashSelection(8, 2, 4))
    selection = mb.HashSelection(8, 2, 4)
    with torch.no_grad():
        selection.table_VK[3, 1] = 4
    with pytest.raises(ValueError, match=r"table_VK must hold expert ids in \[0, 4\)"):
        selection(torch.zeros(1, 4), 2, token_ids=torch.tensor([0]))
