"""Auxiliary losses: hand-computed values, masks, corridor and gradient direction."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import moeblocks as mb


def routing_from_probs(probs: list[list[float]], experts: list[list[int]]) -> mb.Routing:
    probs_TE = torch.tensor(probs)
    experts_TK = torch.tensor(experts)
    weights_TK = probs_TE.gather(1, experts_TK)
    return mb.Routing(
        probs_TE.log(), probs_TE, experts_TK, weights_TK / weights_TK.sum(1, keepdim=True)
    )


# Read by no probability-based loss; it has no num_experts, so no E to check records against.
ROUTER = torch.nn.Module()


def test_load_balance_hand_computed() -> None:
    r = routing_from_probs([[0.8, 0.2], [0.6, 0.4]], [[0], [0]])
    # f = [1, 0], P = [0.7, 0.3]: E · Σ f·P = 2 · 0.7.
    assert mb.LoadBalanceLoss()(r).item() == pytest.approx(1.4)
    uniform = routing_from_probs([[0.5, 0.5], [0.5, 0.5]], [[0], [1]])
    assert mb.LoadBalanceLoss()(uniform).item() == pytest.approx(1.0)


def test_load_balance_counts_every_slot_for_k2() -> None:
    r = routing_from_probs([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], [[0, 1], [1, 2]])
    # f = [1, 2, 1] / 4, P = [0.3, 0.45, 0.25]: 3 · (0.075 + 0.225 + 0.0625).
    assert mb.LoadBalanceLoss()(r).item() == pytest.approx(3 * 0.3625)


def test_cv_squared_hand_computed() -> None:
    r = routing_from_probs([[0.8, 0.2], [0.6, 0.4]], [[0], [0]])
    # P = [0.7, 0.3]: population variance 0.04 over mean² 0.25.
    assert mb.CVSquaredLoss()(r).item() == pytest.approx(0.16)


def test_z_loss_hand_computed() -> None:
    scores = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    probs = scores.softmax(-1)
    r = mb.Routing(scores, probs, torch.tensor([[0], [1]]), torch.tensor([[0.5], [0.73]]))
    z = [math.log(2), math.log(math.e + math.e**2)]
    assert mb.ZLoss()(r).item() == pytest.approx((z[0] ** 2 + z[1] ** 2) / 2, rel=1e-6)


def test_bandpass_hand_computed_and_zero_inside_corridor() -> None:
    loss = mb.BandpassLoss(floor=0.1, ceiling=0.4)
    r = routing_from_probs([[0.05, 0.25, 0.25, 0.45]], [[3]])
    # One expert 0.05 below the floor, one 0.05 above the ceiling: 16 · (2 · 0.0025) / 4.
    assert loss(r).item() == pytest.approx(0.02, rel=1e-5)
    inside = routing_from_probs([[0.1, 0.2, 0.3, 0.4]], [[3]])
    assert loss(inside).item() == 0.0


def test_dispersion_hand_computed() -> None:
    router = mb.Router(mb.CosineScorer(4, 3))
    with torch.no_grad():
        router.scorer.anchors_ED.copy_(torch.eye(3, 4))
    r = routing_from_probs([[0.2, 0.3, 0.5]], [[2]])
    assert mb.DispersionLoss(source=router)(r).item() == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        router.scorer.anchors_ED.copy_(
            torch.tensor([[1.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 1.0, 0, 0]])
        )
    # Pairs: cos(a0,a1)=1, the other two 0; mean over the 6 ordered off-diagonal pairs.
    assert mb.DispersionLoss(source=router)(r).item() == pytest.approx(2 / 6)
    # The scorer itself is a source too; an unbound loss and a linear router are refused.
    assert mb.DispersionLoss(source=router.scorer)(r).item() == pytest.approx(2 / 6)
    with pytest.raises(TypeError, match="no anchors to read"):
        mb.DispersionLoss()(r)
    with pytest.raises(TypeError, match="CosineScorer"):
        mb.DispersionLoss(source=ROUTER)


def test_dispersion_borrows_its_source_without_owning_it() -> None:
    router = mb.Router(mb.CosineScorer(4, 3))
    loss = mb.DispersionLoss(source=router)
    assert list(loss.parameters()) == []
    assert loss.state_dict() == {}
    assert loss.source is router
    # A deep copy of a layer copies the borrowed router through the same memo.
    layer = mb.MoELayer(router, mb.TorchDispatcher(), mb.GELUExperts(3, 4, 8), {"d": loss})
    twin = copy.deepcopy(layer)
    assert twin.losses["d"].source is twin.router
    with torch.no_grad():  # all three anchors parallel in the copy only
        twin.router.scorer.anchors_ED.copy_(torch.ones(3, 4))
    r = routing_from_probs([[0.2, 0.3, 0.5]], [[2]])
    assert twin.losses["d"](r).item() == pytest.approx(1.0)
    assert layer.losses["d"](r).item() == pytest.approx(0.0, abs=1e-6)  # orthogonal init


def test_an_unbound_dispersion_loss_reads_the_layers_router() -> None:
    router = mb.Router(mb.CosineScorer(4, 3))
    given = mb.DispersionLoss(weight=0.5)
    layer = mb.MoELayer(router, mb.TorchDispatcher(), mb.GELUExperts(3, 4, 8), {"d": given})
    assert given.source is None  # the user's object is not changed
    assert layer.losses["d"].source is router
    assert layer.losses["d"].weight == 0.5
    res = layer(torch.randn(5, 4))
    torch.testing.assert_close(
        res.aux_losses["d"], 0.5 * mb.DispersionLoss(source=router)(res.routing)
    )


@pytest.mark.parametrize(
    "loss", [mb.ZLoss(), mb.SequenceBalanceLoss()], ids=lambda loss: type(loss).__name__
)
def test_the_01_call_with_the_router_still_works_and_warns(loss: mb.AuxLoss) -> None:
    r = routing_from_probs([[0.2, 0.3, 0.5], [0.5, 0.3, 0.2]], [[2], [0]])
    mask = torch.tensor([True, False])
    with pytest.warns(DeprecationWarning, match=r"loss\(routing, mask\)"):
        old = loss(r, ROUTER, mask)
    torch.testing.assert_close(old, loss(r, mask))
    with pytest.warns(DeprecationWarning, match="deprecated"):
        torch.testing.assert_close(loss(r, ROUTER), loss(r))
    with pytest.raises(TypeError, match=r"takes \(routing, mask=None\)"):
        loss(r, mask, mask)


def test_the_01_dispersion_call_reads_the_router_it_is_given() -> None:
    router = mb.Router(mb.CosineScorer(4, 3))
    r = routing_from_probs([[0.2, 0.3, 0.5]], [[2]])
    with pytest.warns(DeprecationWarning, match="deprecated"):
        old = mb.DispersionLoss()(r, router)
    torch.testing.assert_close(old, mb.DispersionLoss(source=router)(r))


LOSSES = [mb.LoadBalanceLoss(), mb.CVSquaredLoss(), mb.ZLoss(), mb.BandpassLoss(0.2, 0.3)]


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: type(loss).__name__)
def test_mask_equals_dropping_the_padding(loss: mb.AuxLoss) -> None:
    torch.manual_seed(0)
    scores = torch.randn(6, 4)
    probs = scores.softmax(-1)
    w, e = probs.topk(2, dim=-1)
    full = mb.Routing(scores, probs, e, w)
    keep = torch.tensor([True, False, True, True, False, True])
    kept = mb.Routing(scores[keep], probs[keep], e[keep], w[keep])
    torch.testing.assert_close(loss(full, keep), loss(kept))
    assert loss(full, torch.zeros(6, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize(
    "loss", [*LOSSES, mb.DispersionLoss()], ids=lambda loss: type(loss).__name__
)
def test_zero_tokens_give_zero(loss: mb.AuxLoss) -> None:
    router = mb.Router(mb.CosineScorer(4, 3))
    empty = router(torch.zeros(0, 4))
    if isinstance(loss, mb.DispersionLoss):
        loss = loss.bind(router)
    value = loss(empty)
    assert value.shape == ()
    assert torch.isfinite(value)
    if not isinstance(loss, mb.DispersionLoss):
        assert value.item() == 0.0


@pytest.mark.parametrize(
    "loss",
    [mb.LoadBalanceLoss(), mb.CVSquaredLoss(), mb.BandpassLoss(0.2, 0.3)],
    ids=lambda loss: type(loss).__name__,
)
def test_gradient_pushes_under_used_up_and_over_used_down(loss: mb.AuxLoss) -> None:
    torch.manual_seed(0)
    # Expert 0 is over-used, expert 3 under-used; logits are the free parameters.
    logits = (torch.randn(32, 4) * 0.1 + torch.tensor([2.0, 0.5, 0.5, -2.0])).requires_grad_()
    probs = logits.softmax(-1)
    w, e = probs.topk(1, dim=-1)
    before = probs.mean(0).detach()
    loss(mb.Routing(logits, probs, e, w)).backward()
    with torch.no_grad():
        after = (logits - 1.0 * logits.grad).softmax(-1).mean(0)
    assert after[0] < before[0], "over-used expert was not pushed down"
    assert after[3] > before[3], "under-used expert was not pushed up"


def test_loss_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="floor"):
        mb.BandpassLoss(floor=0.5, ceiling=0.1)
    with pytest.raises(ValueError, match="weight"):
        mb.ZLoss(weight=-1.0)
    r = routing_from_probs([[0.5, 0.5]], [[0]])
    with pytest.raises(ValueError, match="mask"):
        mb.CVSquaredLoss()(r, torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: type(loss).__name__)
def test_stats_of_two_batches_add_up_to_the_whole(loss: mb.TokenStatLoss) -> None:
    # What the group-reduced losses of moeblocks.distributed rely on: summing the
    # statistics of two shards and evaluating the formula equals the loss of the union.
    torch.manual_seed(1)
    scores = torch.randn(10, 5)
    probs = scores.softmax(-1)
    w, e = probs.topk(2, dim=-1)
    mask = torch.rand(10) > 0.3
    whole = mb.Routing(scores, probs, e, w)
    halves = [mb.Routing(scores[s], probs[s], e[s], w[s]) for s in (slice(0, 4), slice(4, 10))]
    vector = sum(
        mb.TokenStats.of(h, m).to_vector()
        for h, m in zip(halves, (mask[:4], mask[4:]), strict=True)
    )
    combined = loss.from_stats(mb.TokenStats.from_vector(vector))
    torch.testing.assert_close(combined, loss(whole, mask))
