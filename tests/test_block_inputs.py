"""The blocks below the layer reject inconsistent inputs, and padding cannot poison a loss.

Every bad input raises ValueError or TypeError with a message that names the argument.
The test run's jaxtyping hook already refuses some wrong shapes before the library sees
them; those cases call the unwrapped function (``inspect.unwrap``) so that they test the
library's own check. Masked (padding) tokens holding NaN or inf leave every aux loss and
its gradient equal to those of the batch without them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch

import moeblocks as mb
from moeblocks._checks import value_checks
from moeblocks.capacity import capacity_positions
from moeblocks.gating import gates
from moeblocks.losses import mean_expert_probs

D, E = 8, 4


def routing_for(experts: list[list[int]], num_experts: int = E) -> mb.Routing:
    experts_TK = torch.tensor(experts, dtype=torch.long).reshape(len(experts), -1)
    T, K = experts_TK.shape
    scores = torch.zeros(T, num_experts)
    return mb.Routing(scores, scores.softmax(-1), experts_TK, torch.full((T, K), 1.0 / K))


def unhooked(fn: Callable[..., object]) -> Callable[..., object]:
    """``fn`` without the test run's shape-checking wrapper, to reach the library's check."""
    return inspect.unwrap(fn)


def _nan_seeded_scorer() -> mb.CosineScorer:
    scorer = mb.CosineScorer(D, E, init="batch").train()
    tokens = torch.randn(6, D)
    tokens[2, 3] = float("nan")
    scorer(tokens)
    return scorer


def _negative_step() -> None:
    schedule = mb.StepK({0: 1, 10: 2})
    state = schedule.state_dict()
    state["step"] = torch.tensor(-3)
    schedule.load_state_dict(state)


def _float_step() -> None:
    state = {"step": torch.tensor(2.5)}
    mb.ConstantK(1).load_state_dict(state)


def _capacity_on_bad_batch_shape() -> None:
    routing = routing_for([[0], [1], [2], [3], [0], [1]])
    routing = mb.Routing(
        routing.scores, routing.probs, routing.experts, routing.weights, batch_shape=(2, 4)
    )
    mb.Capacity(factor=1.0, per="sequence")(routing)


def _sequence_loss_on_bad_batch_shape() -> None:
    routing = routing_for([[0], [1], [2], [3], [0], [1]])
    routing = mb.Routing(
        routing.scores, routing.probs, routing.experts, routing.weights, batch_shape=(4, 4)
    )
    mb.SequenceBalanceLoss()(routing)


class _RouterWithTooManyExperts(torch.nn.Module):
    """Claims E experts but returns a record over E + 1."""

    dim, num_experts = D, E

    def forward(self, tokens: torch.Tensor, k: int | None = None) -> mb.Routing:
        z = torch.zeros(tokens.shape[0], E + 1)
        ids = torch.zeros(tokens.shape[0], 1, dtype=torch.long)
        return mb.Routing(z, z.softmax(-1), ids, torch.ones(tokens.shape[0], 1))


def _layer_with_inconsistent_router() -> None:
    bank = mb.SwiGLUExperts(E, D, 4)
    mb.MoELayer(_RouterWithTooManyExperts(), mb.TorchDispatcher(), bank)(torch.randn(3, D))


ROUTER = mb.Router(mb.LinearScorer(D, E))
BANK = mb.SwiGLUExperts(E, D, 6, backend="loop")
X_3D = torch.randn(3, D)
W_2DD = torch.randn(2, D, 5)

# (call, error type, regex the message must match: it names the argument)
BAD_INPUTS = {
    # grouped_mm: sizes that do not sum to the rows returned uninitialised memory.
    "grouped_mm sizes sum < R, torch backend": (
        lambda: mb.grouped_mm(torch.randn(4, 16), torch.randn(2, 16, 16), torch.tensor([1, 2])),
        ValueError,
        r"group_sizes_E must be >= 0 and sum to R = 4.*summing to 3",
    ),
    "grouped_mm sizes sum > R, loop backend": (
        lambda: mb.grouped_mm(X_3D, W_2DD, torch.tensor([2, 2]), backend="loop"),
        ValueError,
        r"group_sizes_E must be >= 0 and sum to R = 3",
    ),
    "grouped_mm negative size": (
        lambda: mb.grouped_mm(X_3D, W_2DD, torch.tensor([-1, 4]), backend="loop"),
        ValueError,
        r"group_sizes_E must be >= 0",
    ),
    "grouped_mm float sizes": (
        lambda: unhooked(mb.grouped_mm)(X_3D, W_2DD, torch.tensor([1.0, 2.0])),
        TypeError,
        r"group_sizes_E must be an integer tensor",
    ),
    "grouped_mm one size per expert": (
        lambda: unhooked(mb.grouped_mm)(X_3D, W_2DD, torch.tensor([3])),
        ValueError,
        r"group_sizes_E must have shape \[2\]",
    ),
    "grouped_mm inner dims": (
        lambda: unhooked(mb.grouped_mm)(torch.randn(3, 7), W_2DD, torch.tensor([1, 2])),
        ValueError,
        r"x_RI must have shape \[R, 8\]",
    ),
    "grouped_mm dtypes": (
        lambda: mb.grouped_mm(X_3D.double(), W_2DD, torch.tensor([1, 2])),
        TypeError,
        r"x_RI has dtype torch.float64 but w_EIO has torch.float32",
    ),
    "expert bank sizes sum": (
        lambda: BANK(torch.randn(5, D), torch.tensor([1, 1, 1, 1])),
        ValueError,
        r"group_sizes must be >= 0 and sum to the 5 rows of grouped",
    ),
    "expert bank dtype": (
        lambda: BANK(torch.randn(4, D, dtype=torch.float64), torch.tensor([1, 1, 1, 1])),
        TypeError,
        r"grouped has dtype torch.float64",
    ),
    # build_layout accepted ids >= E.
    "build_layout id >= E": (
        lambda: mb.build_layout(torch.tensor([[0], [4]]), num_experts=E),
        ValueError,
        r"experts must hold expert ids in \[0, 4\).*got values in \[0, 4\]",
    ),
    "build_layout negative id": (
        lambda: mb.build_layout(torch.tensor([[0, -1]]), num_experts=E, pad_to=4),
        ValueError,
        r"experts must hold expert ids in \[0, 4\)",
    ),
    "build_layout num_experts": (
        lambda: mb.build_layout(torch.tensor([[0]]), num_experts=0),
        ValueError,
        r"num_experts must be an int >= 1",
    ),
    # TorchDispatcher silently dropped a token when the counts differed.
    "dispatcher token count": (
        lambda: mb.TorchDispatcher().permute(torch.randn(3, D), routing_for([[0], [1]])),
        ValueError,
        r"tokens has 3 rows but routing.experts covers 2 tokens",
    ),
    "dispatcher id >= E": (
        lambda: mb.TorchDispatcher().permute(
            torch.randn(2, D),
            mb.Routing(
                torch.zeros(2, E), torch.zeros(2, E), torch.tensor([[0], [9]]), torch.ones(2, 1)
            ),
        ),
        ValueError,
        r"experts must hold expert ids in \[0, 4\)",
    ),
    "unpermute rows": (
        lambda: mb.TorchDispatcher().unpermute(
            torch.randn(3, D), mb.build_layout(torch.tensor([[0], [1]]), E), torch.ones(2, 1)
        ),
        ValueError,
        r"grouped must have R = 2 rows",
    ),
    "unpermute weights": (
        lambda: mb.TorchDispatcher().unpermute(
            torch.randn(2, D), mb.build_layout(torch.tensor([[0], [1]]), E), torch.ones(3, 1)
        ),
        ValueError,
        r"weights must have shape \[T, K\] with T·K = 2 slots",
    ),
    # A router called with the wrong width crashed inside matmul.
    "router width": (
        lambda: ROUTER(torch.randn(3, D + 1)),
        ValueError,
        r"tokens must have shape \[T, 8\], got \(3, 9\)",
    ),
    "router rank": (
        lambda: unhooked(mb.Router.score)(ROUTER, torch.randn(2, 3, D)),
        ValueError,
        r"tokens must have shape \[T, 8\], got \(2, 3, 8\)",
    ),
    "linear scorer width": (
        lambda: mb.LinearScorer(D, E)(torch.randn(3, 5)),
        ValueError,
        r"tokens must have shape \[T, 8\]",
    ),
    "cosine scorer width": (
        lambda: mb.CosineScorer(D, E)(torch.randn(3, 5)),
        ValueError,
        r"tokens must have shape \[T, 8\]",
    ),
    "router decide logits": (
        lambda: ROUTER.decide(torch.zeros(2, E + 1), torch.zeros(2, E + 1), 1),
        ValueError,
        r"scores and logits must both have shape \[T, 4\]",
    ),
    # Batch-seeded anchors accepted a NaN batch for good.
    "cosine batch seed NaN": (_nan_seeded_scorer, ValueError, r"tokens hold NaN or inf"),
    # StepK.load_state_dict accepted a negative step.
    "schedule negative step": (
        _negative_step,
        ValueError,
        r"state_dict\['step'\] must be a step >= 0, got -3",
    ),
    "schedule float step": (
        _float_step,
        TypeError,
        r"state_dict\['step'\] must be an integer step",
    ),
    # The architecture blocks.
    "balancer id >= E": (
        lambda: mb.BiasBalancer(E).observe(torch.tensor([[1, 4]])),
        ValueError,
        r"experts must hold expert ids in \[0, 4\)",
    ),
    "balancer negative id": (
        lambda: mb.BiasBalancer(E).observe(torch.tensor([[-1]])),
        ValueError,
        r"experts must hold expert ids in \[0, 4\)",
    ),
    "balancer float ids": (
        lambda: unhooked(mb.BiasBalancer.observe)(mb.BiasBalancer(E), torch.tensor([[1.0]])),
        TypeError,
        r"experts must be an integer tensor",
    ),
    "group-limited key width": (
        lambda: mb.GroupLimitedTopK(4, 2)(torch.randn(3, 6), 2),
        ValueError,
        r"key of shape \(3, 6\): num_groups \(4\) must divide",
    ),
    "group-limited k": (
        lambda: mb.GroupLimitedTopK(4, 1)(torch.randn(3, 8), 3),
        ValueError,
        r"key of shape \(3, 8\): k reaches 3",
    ),
    "top-k k > E": (
        lambda: mb.TopK()(torch.randn(3, 4), 5),
        ValueError,
        r"k must be an int in \[1, 4\]",
    ),
    "weight policy gates rank": (
        lambda: unhooked(mb.WeightPolicy.__call__)(mb.WeightPolicy(), torch.rand(3)),
        ValueError,
        r"gates must have 2 dims",
    ),
    "gates scoring name": (
        lambda: gates(
            "softmx", torch.zeros(2, E), torch.zeros(2, E), torch.zeros(2, 1, dtype=torch.long)
        ),
        ValueError,
        r"scoring must be one of",
    ),
    "capacity id >= E": (
        lambda: capacity_positions(torch.tensor([[0], [5]]), E, 1),
        ValueError,
        r"experts must hold expert ids in \[0, 4\)",
    ),
    "capacity groups": (
        lambda: capacity_positions(torch.tensor([[0], [1], [2]]), E, 2),
        ValueError,
        r"num_groups must divide the 3 tokens",
    ),
    "capacity batch_shape": (
        _capacity_on_bad_batch_shape,
        ValueError,
        r"routing.batch_shape \(2, 4\)",
    ),
    "shared experts width": (
        lambda: mb.SharedExperts(mb.SwiGLUExperts(1, D, 4))(torch.randn(3, D - 1)),
        ValueError,
        r"tokens must have shape \[T, 8\]",
    ),
    "GLU halves": (
        lambda: unhooked(mb.GLU.__call__)(mb.GLU(), torch.randn(2, 3), torch.randn(2, 4)),
        ValueError,
        r"gate and up must have one shape, got gate \(2, 3\) and up \(2, 4\)",
    ),
    "clamped SwiGLU halves": (
        lambda: unhooked(mb.ClampedSwiGLU.__call__)(
            mb.ClampedSwiGLU(), torch.randn(2, 3), torch.randn(3)
        ),
        ValueError,
        r"gate and up must have one shape",
    ),
    "layer custom router record": (
        _layer_with_inconsistent_router,
        ValueError,
        r"the router returned a Routing for 3 tokens and 5 experts, expected 3 tokens and 4",
    ),
    # Losses.
    "loss mask device": (
        lambda: mb.ZLoss()(routing_for([[0], [1]]), torch.ones(2, dtype=torch.bool, device="meta")),
        ValueError,
        r"mask is on meta but routing.probs is on cpu",
    ),
    "sequence loss batch_shape": (
        _sequence_loss_on_bad_batch_shape,
        ValueError,
        r"routing.batch_shape \(4, 4\) does not cover",
    ),
    "token stats vector": (
        lambda: mb.TokenStats.from_vector(torch.zeros(6)),
        ValueError,
        r"vector must have shape \[2E \+ 3\]",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_is_rejected_naming_the_argument(case: str) -> None:
    call, error, match = BAD_INPUTS[case]
    with pytest.raises(error, match=match):
        call()


def test_rejected_inputs_change_no_state() -> None:
    scorer = mb.CosineScorer(D, E, init="batch").train()
    anchors = scorer.anchors_ED.detach().clone()
    bad = torch.randn(6, D)
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="tokens hold NaN or inf"):
        scorer(bad)
    assert torch.equal(scorer.anchors_ED, anchors)
    assert not bool(scorer.seeded)
    good = torch.randn(6, D)
    scorer(good)  # the next finite batch seeds the anchors
    assert bool(scorer.seeded)
    assert torch.isfinite(scorer.anchors_ED).all()

    schedule = mb.StepK({0: 1, 10: 2})
    schedule.set_step(12)
    state = schedule.state_dict()
    state["step"] = torch.tensor(-1)
    with pytest.raises(ValueError, match="step"):
        schedule.load_state_dict(state)
    assert schedule.k == 2
    assert int(schedule.step) == 12

    balancer = mb.BiasBalancer(E)
    with pytest.raises(ValueError, match="experts"):
        balancer.observe(torch.tensor([[0, 7]]))
    assert torch.equal(balancer.load, torch.zeros(E))


def test_value_checks_rule() -> None:
    cpu = torch.zeros(1)
    assert value_checks(cpu, sync_checks=False)
    assert value_checks(cpu, sync_checks=True)
    meta = torch.zeros(1, device="meta")  # no values to read
    assert not value_checks(meta, sync_checks=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_value_checks_only_with_sync_checks() -> None:
    ids = torch.tensor([[0], [5]], device="cuda")
    assert not value_checks(ids, sync_checks=False)
    assert value_checks(ids, sync_checks=True)
    with pytest.raises(ValueError, match="experts must hold expert ids"):
        mb.build_layout(ids, 2, sync_checks=True)
    with pytest.raises(ValueError, match="experts must hold expert ids"):
        mb.BiasBalancer(2, sync_checks=True).cuda().observe(ids)
    sizes = torch.tensor([1, 1], device="cuda")
    with pytest.raises(ValueError, match="group_sizes must be"):
        mb.SwiGLUExperts(2, D, 4, sync_checks=True).cuda()(torch.randn(3, D, device="cuda"), sizes)


# --- valid edge cases -----------------------------------------------------------------------


@pytest.mark.parametrize("sync_checks", [False, True])
def test_empty_batches_and_one_expert_still_pass(sync_checks: bool) -> None:
    for num_experts, T in ((1, 0), (1, 3), (3, 0)):
        router = mb.Router(mb.LinearScorer(D, num_experts))
        bank = mb.SwiGLUExperts(num_experts, D, 4, sync_checks=sync_checks)
        losses = {
            "lb": mb.LoadBalanceLoss(),
            "seq": mb.SequenceBalanceLoss(),
            "cv": mb.CVSquaredLoss(),
            "z": mb.ZLoss(),
            "band": mb.BandpassLoss(),
        }
        layer = mb.MoELayer(
            router,
            mb.TorchDispatcher(pad_to=2, sync_checks=sync_checks),
            bank,
            losses,
            capacity=mb.Capacity(factor=1.0, per="sequence", sync_checks=sync_checks),
        )
        x = torch.randn(1, T, D, requires_grad=True)
        mask = torch.zeros(1, T, dtype=torch.bool)
        res = layer(x, mask=mask)
        assert res.out.shape == x.shape
        for name, value in res.aux_losses.items():
            assert torch.isfinite(value), name
        (res.out.sum() + res.total_aux_loss()).backward()
        assert x.grad is not None
        assert torch.isfinite(x.grad).all()
        balancer = mb.BiasBalancer(num_experts, sync_checks=sync_checks)
        balancer.observe(torch.zeros(T, 1, dtype=torch.long))
        assert capacity_positions(
            torch.zeros(T, 1, dtype=torch.long), num_experts, 0 if T == 0 else 1
        ).shape == (T, 1)
    empty = mb.grouped_mm(torch.randn(0, 16), torch.randn(1, 16, 16), torch.tensor([0]))
    assert empty.shape == (0, 16)


# --- padding with NaN or inf cannot reach a loss ----------------------------------------


def _padded_routing(poison: float, T: int = 10, num_experts: int = 5, K: int = 2):
    """A routing with leaf scores/probs, its mask, and the same routing without padding."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(T, num_experts, generator=g, dtype=torch.float64)
    probs = scores.softmax(-1)
    experts = probs.topk(K, dim=-1).indices
    mask = torch.ones(T, dtype=torch.bool)
    mask[[1, 4, 9]] = False
    scores, probs = scores.clone(), probs.clone()
    scores[~mask] = poison
    probs[~mask] = poison
    scores.requires_grad_(True)
    probs.requires_grad_(True)
    weights = torch.full((T, K), 1.0 / K, dtype=torch.float64)
    padded = mb.Routing(scores, probs, experts, weights)
    real = mb.Routing(scores[mask], probs[mask], experts[mask], weights[mask])
    return padded, mask, real


# The padded records route among 5 experts: the losses check them against the router's E.
ROUTER_5 = mb.Router(mb.LinearScorer(D, 5))

LOSSES = {
    "load balance (slots)": mb.LoadBalanceLoss(),
    "load balance (tokens)": mb.LoadBalanceLoss(fractions="tokens"),
    "sequence balance": mb.SequenceBalanceLoss(),
    "cv squared": mb.CVSquaredLoss(),
    "z": mb.ZLoss(),
    "bandpass": mb.BandpassLoss(floor=0.15, ceiling=0.25),
    "mean expert probs": lambda r, mask=None: mean_expert_probs(r, mask).square().sum(),
}


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", list(LOSSES))
def test_padding_nan_or_inf_leaves_losses_and_gradients_unchanged(name: str, poison: float) -> None:
    loss = LOSSES[name]
    padded, mask, real = _padded_routing(poison)
    value = loss(padded, mask)
    grads = torch.autograd.grad(value, [padded.scores, padded.probs], allow_unused=True)
    expected = loss(real)
    expected_grads = torch.autograd.grad(expected, [padded.scores, padded.probs], allow_unused=True)
    assert torch.isfinite(value)
    # float64 throughout; sums over a different number of zero rows may round differently.
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads, strict=True):
        if want is None:  # the loss does not read this field
            assert got is None or torch.equal(got, torch.zeros_like(got))
            continue
        assert got is not None
        assert torch.isfinite(got).all()
        assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))  # exactly zero
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_padding_nan_in_sequences_leaves_sequence_loss_unchanged(poison: float) -> None:
    # Two sequences of five: compare with the same batch whose padding holds finite values.
    padded, mask, _ = _padded_routing(poison)
    clean, _, _ = _padded_routing(0.3)
    seq = mb.SequenceBalanceLoss()
    values, grads = [], []
    for r in (padded, clean):
        r2 = mb.Routing(r.scores, r.probs, r.experts, r.weights, batch_shape=(2, 5))
        values.append(seq(r2, mask))
        grads.append(torch.autograd.grad(values[-1], r.probs)[0])
    assert torch.isfinite(values[0])
    assert torch.equal(values[0], values[1])  # the padding rows are zeroed before any sum
    assert torch.equal(grads[0], grads[1])
    assert torch.equal(grads[0][~mask], torch.zeros_like(grads[0][~mask]))


def test_layer_with_nan_padding_matches_the_batch_without_it() -> None:
    torch.manual_seed(0)
    losses = {
        "lb": mb.LoadBalanceLoss(),
        "cv": mb.CVSquaredLoss(),
        "z": mb.ZLoss(),
        "band": mb.BandpassLoss(floor=0.1, ceiling=0.3),
    }
    router = mb.Router(mb.LinearScorer(D, E), 2)
    layer = mb.MoELayer(router, mb.TorchDispatcher(), mb.SwiGLUExperts(E, D, 6), losses)
    layer = layer.double().eval()
    x = torch.randn(2, 4, D, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True], [True, False, False, True]])
    x = x.masked_fill(~mask.unsqueeze(-1), float("nan")).requires_grad_(True)
    res = layer(x, mask=mask)
    aux = res.total_aux_loss()
    real = x.detach()[mask].requires_grad_(True)
    ref = layer(real.unsqueeze(0))
    ref_aux = ref.total_aux_loss()
    assert torch.isfinite(aux)
    # float64; the real tokens are the same, only the number of zeroed rows differs.
    torch.testing.assert_close(aux, ref_aux, rtol=1e-12, atol=1e-12)
    for name, value in res.aux_losses.items():
        torch.testing.assert_close(value, ref.aux_losses[name], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.out[mask], ref.out[0], rtol=1e-12, atol=1e-12)
    # The aux-loss gradient reaching the real tokens is that of the batch without padding.
    (grad,) = torch.autograd.grad(aux, x)
    (ref_grad,) = torch.autograd.grad(ref_aux, real)
    torch.testing.assert_close(grad[mask], ref_grad, rtol=1e-12, atol=1e-12)
