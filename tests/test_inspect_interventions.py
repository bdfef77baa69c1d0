"""Interventions change exactly what they say, and knocking out a class's owner expert
hurts that class far more than the others (tiny model trained on the synthetic corpus)."""

from __future__ import annotations

import pytest
import torch

import moeblocks as mb
from moeblocks import inspect as mi

T, D, E = 24, 16, 6


def make_layer(k: int = 2, seed: int = 0) -> mb.MoELayer:
    torch.manual_seed(seed)
    router = mb.Router(mb.CosineScorer(D, E), k)
    return mb.MoELayer(router, mb.TorchDispatcher(), mb.SwiGLUExperts(E, D, 8)).eval()


def same_routing(a: mb.Routing, b: mb.Routing, rows=slice(None)) -> None:
    for name in ("scores", "probs", "experts", "weights"):
        torch.testing.assert_close(getattr(a, name)[rows], getattr(b, name)[rows], rtol=0, atol=0)


@torch.no_grad()
def test_no_edit_is_identity_and_parameters_are_shared():
    layer, x = make_layer(), torch.randn(T, D)
    edited = mi.EditedRouter(layer.router)
    same_routing(edited(x), layer.router(x))
    assert edited.base is layer.router  # wrapped, not copied
    assert edited.schedule is layer.router.schedule
    assert [id(p) for p in edited.parameters()] == [id(p) for p in layer.router.parameters()]


def test_the_core_router_has_no_intervention_hook():
    import inspect

    # token_ids feed a HashSelection (routing by token id): an input, not an edit.
    assert list(inspect.signature(mb.Router.decide).parameters) == [
        "self",
        "scores",
        "logits",
        "k",
        "token_ids",
    ]


@torch.no_grad()
def test_with_parts_shares_the_rest_and_leaves_the_router_alone():
    layer, x = make_layer(), torch.randn(T, D)
    router = layer.router
    twin = router.with_parts(selection=mb.TopK())
    assert twin.scorer is router.scorer
    assert twin.schedule is router.schedule
    same_routing(twin(x), router(x))
    other = mb.CosineScorer(D, E)
    assert router.with_parts(scorer=other).scorer is other
    assert router.scorer is not other
    with pytest.raises(ValueError, match="num_experts"):
        router.with_parts(scorer=mb.CosineScorer(D, E + 1))


@torch.no_grad()
def test_forbid_selected_tokens_only():
    layer, x = make_layer(), torch.randn(T, D)
    base = layer.router(x)
    sel = torch.zeros(T, dtype=torch.bool)
    sel[::2] = True
    top = int(base.experts[0, 0])
    r = mi.EditedRouter(layer.router, forbid=[top, 5], tokens=sel)(x)
    assert not torch.isin(r.experts[sel], torch.tensor([top, 5])).any()
    assert (r.probs[sel][:, [top, 5]] == 0).all()
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(T))  # renormalised over the rest
    torch.testing.assert_close(r.probs, torch.softmax(r.scores, -1))
    same_routing(r, base, rows=~sel)  # unselected tokens: exactly the original routing
    # Selected tokens get the original order with the forbidden experts removed.
    keep = ~torch.isin(base.probs.argsort(-1, descending=True), torch.tensor([top, 5]))
    expect = base.probs.argsort(-1, descending=True)[keep].view(T, E - 2)[:, :2]
    assert torch.equal(r.experts[sel], expect[sel])


@torch.no_grad()
def test_force_k1_and_partial_force_k2():
    layer, x = make_layer(k=1), torch.randn(T, D)
    r = mi.EditedRouter(layer.router, force=[3])(x)
    assert (r.experts == 3).all()
    assert torch.allclose(r.weights, torch.ones(T, 1))
    layer2 = make_layer(k=2)
    base = layer2.router(x)
    r2 = mi.EditedRouter(layer2.router, force=[4])(x)
    assert (r2.experts == 4).any(-1).all()
    torch.testing.assert_close(r2.weights.sum(-1), torch.ones(T))
    # The other slot is the most probable non-forced expert, as before the edit.
    p = base.probs.clone()
    p[:, 4] = -1
    other = p.argmax(-1)
    assert ((r2.experts == other[:, None]).any(-1)).all()
    assert (r2.weights[:, 0] >= r2.weights[:, 1]).all()  # still ordered by probability
    same_routing(mb.Routing(r2.scores, r2.probs, base.experts, base.weights), base)  # probs kept


@torch.no_grad()
def test_k_override_beats_call_k():
    layer, x = make_layer(k=1), torch.randn(T, D)
    r = mi.EditedRouter(layer.router, k=3)(x, k=1)
    same_routing(r, layer.router(x, k=3))


def test_edit_errors():
    layer = make_layer()
    with pytest.raises(ValueError, match="disjoint"):
        mi.EditedRouter(layer.router, forbid=[1], force=[1])
    with pytest.raises(ValueError, match="at least one"):
        mi.EditedRouter(layer.router, forbid=range(E))
    with pytest.raises(ValueError, match=r"forbid must hold expert indices in \[0, 6\)"):
        mi.EditedRouter(layer.router, forbid=[6])
    with pytest.raises(ValueError, match="fewer than k=2"):
        mi.EditedRouter(layer.router, forbid=range(E - 1))(torch.randn(3, D))
    edited = mi.EditedRouter(layer.router, forbid=[0], tokens=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="tokens mask has 5 entries"):
        edited(torch.randn(3, D))


@torch.no_grad()
def test_knockout_and_restore():
    layer, x = make_layer(), torch.randn(2, T // 2, D)
    before = layer(x)
    busiest = int(torch.bincount(before.routing.experts.flatten(), minlength=E).argmax())
    with mi.knockout(layer, busiest) as edited:
        ko = edited(x)
        assert isinstance(edited.router, mi.EditedRouter)
    assert int((ko.routing.experts == busiest).sum()) == 0
    assert not torch.allclose(ko.out, before.out)
    assert type(layer.router) is mb.Router  # restored
    torch.testing.assert_close(layer(x).out, before.out, rtol=0, atol=0)
    with pytest.raises(RuntimeError), mi.intervene(layer, k=1):
        raise RuntimeError
    assert type(layer.router) is mb.Router  # restored after an error too


@torch.no_grad()
def test_scale_one_expert_scales_exactly_its_tokens():
    layer, x = make_layer(k=1), torch.randn(T, D)
    before = layer(x)
    e = int(before.routing.experts[0, 0])
    with mi.intervene(layer, scales={e: 0.5}):
        scaled = layer(x)
        assert isinstance(layer.experts, mi.ScaledExperts)
    same_routing(scaled.routing, before.routing)  # routing untouched
    mine = before.routing.experts[:, 0] == e
    # Linear in the expert's output: rows of expert e halve, the others are unchanged.
    torch.testing.assert_close(scaled.out[mine], 0.5 * before.out[mine])
    torch.testing.assert_close(scaled.out[~mine], before.out[~mine], rtol=0, atol=0)
    with mi.intervene(layer, scales={e: 0.0}):
        assert (layer(x).out[mine] == 0).all()


def test_token_mask():
    ids = torch.tensor([[1, 2, 3], [3, 4, 1]])
    assert mi.token_mask(ids, [1, 3]).tolist() == [True, False, True, True, False, True]


@pytest.mark.slow
def test_knocking_out_a_class_owner_hurts_that_class():
    from moeblocks.sra.experiments import class_knockout

    res = class_knockout(steps=150, seed=0)
    # Classes an expert clearly owns (>= 90 % of their tokens): knocking the owner out
    # must raise that class's loss by a lot, and far more than everyone else's.
    owned = [i for i, s in enumerate(res.owner_share) if s >= 0.9]
    assert owned, res
    ratios = [res.delta_own[i] / max(res.delta_other[i], 0.01) for i in owned]
    best = owned[max(range(len(owned)), key=ratios.__getitem__)]
    assert res.delta_own[best] > 0.1, res
    assert max(ratios) > 5, res
    assert res.purity > 0.5
