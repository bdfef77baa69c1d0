"""The last bad inputs of the battery: each is refused by name, or warned about once.

Legend: T tokens, D model dim, E experts, K experts per token.

Two used to crash deep inside ``scatter``/``gather`` (a loss given a ``Routing`` whose
fields disagree), the rest passed silently: a record for another router, a statistics
vector of the wrong length, a scorer given where a router belongs, NaN weights in a
checkpoint, NaN or inf tokens with ``check_finite`` off. Records whose fields disagree
cannot be built under the test run's jaxtyping hook (the dataclass checks its fields), so
:func:`raw_routing` sets them past ``__init__``, as a user without the hook builds them.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import moeblocks as mb
from moeblocks._checks import warn_non_finite
from moeblocks.losses import mean_expert_probs
from moeblocks.routing import check_routing

D, E = 8, 4


def raw_routing(experts: Tensor, num_experts: int = E, num_tokens: int | None = None) -> mb.Routing:
    """A ``Routing`` built without its ``__init__`` (no shape check): fields as given."""
    T = experts.shape[0] if num_tokens is None else num_tokens
    scores = torch.randn(T, num_experts, generator=torch.Generator().manual_seed(0))
    fields = {
        "scores": scores,
        "probs": scores.softmax(-1),
        "experts": experts,
        "weights": torch.full(experts.shape, 1.0 / experts.shape[1]),
        "dropped": None,
        "batch_shape": None,
    }
    routing = object.__new__(mb.Routing)
    for name, value in fields.items():
        object.__setattr__(routing, name, value)
    return routing


LOSSES: dict[str, Callable[[mb.Routing], object]] = {
    "load balance": lambda r: mb.LoadBalanceLoss()(r),
    "cv2": lambda r: mb.CVSquaredLoss()(r),
    "z": lambda r: mb.ZLoss()(r),
    "bandpass": lambda r: mb.BandpassLoss()(r),
    "sequence balance": lambda r: mb.SequenceBalanceLoss()(r),
    "token stats": lambda r: mb.TokenStats.of(r),
    "mean expert probs": lambda r: mean_expert_probs(r),
}


@pytest.mark.parametrize("loss", list(LOSSES), ids=list(LOSSES))
def test_expert_id_past_probs_is_named(loss: str) -> None:
    routing = raw_routing(torch.tensor([[0, 1], [2, E]]))  # id E: one past the last expert
    with pytest.raises(ValueError, match=rf"routing.experts must hold expert ids in \[0, {E}\)"):
        LOSSES[loss](routing)


@pytest.mark.parametrize("loss", list(LOSSES), ids=list(LOSSES))
def test_token_counts_that_disagree_are_named(loss: str) -> None:
    routing = raw_routing(torch.tensor([[0], [1], [2]]), num_tokens=5)  # probs [5, E]
    with pytest.raises(ValueError, match=r"routing.experts and routing.weights .* T=5"):
        LOSSES[loss](routing)


def test_a_record_for_another_router_is_named_by_the_dispersion_loss() -> None:
    # Losses are functions of the record (issue 28): the E a record must have is known
    # where a router is. DispersionLoss reads its source's anchors; the layer, below.
    router = mb.Router(mb.CosineScorer(D, E))
    routing = raw_routing(torch.tensor([[0], [5]]), num_experts=6)  # consistent, for E=6
    with pytest.raises(ValueError, match=rf"routing is for 6 experts .* expected {E}"):
        mb.DispersionLoss(source=router)(routing)


class _OtherRouter(nn.Module):
    """Router-shaped, but its records are for 6 experts while it says E."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = mb.Router(mb.LinearScorer(D, 6))
        self.dim, self.num_experts = D, E

    def forward(self, tokens: Tensor, k: int | None = None) -> mb.Routing:
        return self.inner(tokens, k=k)


def test_a_record_for_another_router_is_named_by_the_layer() -> None:
    layer = mb.MoELayer(_OtherRouter(), mb.TorchDispatcher(), _bank(), {"z": mb.ZLoss()})
    with pytest.raises(
        ValueError, match=rf"Routing for 3 tokens and 6 experts, expected 3 tokens and {E}"
    ):
        layer(torch.randn(3, D))


def test_consistent_records_pass_and_give_the_loss() -> None:
    # The check must not refuse what it should take: ids up to E - 1, any router of E.
    routing = raw_routing(torch.tensor([[0, 3], [2, 1]]))
    assert check_routing(routing, E) is routing
    expected = mb.LoadBalanceLoss().from_stats(mb.TokenStats.of(routing))
    assert torch.equal(mb.LoadBalanceLoss()(routing), expected)


def test_check_routing_refuses_what_is_not_a_record() -> None:
    with pytest.raises(TypeError, match=r"routing must be a Routing, got dict"):
        check_routing({"experts": torch.zeros(2, 1)})


# --- TokenStats vectors ----------------------------------------------------------------


def test_stats_vector_of_the_wrong_length_is_refused() -> None:
    good = mb.TokenStats.of(raw_routing(torch.tensor([[0], [1]]))).to_vector()  # 2E+3 = 11
    assert mb.TokenStats.from_vector(good, num_experts=E).prob_sum.shape == (E,)
    with pytest.raises(ValueError, match=r"\[2E \+ 3\] = \[13\] for num_experts=5 .* got \(11,\)"):
        mb.TokenStats.from_vector(good, num_experts=5)
    # The test run's shape hook refuses an integer vector first; reach the library's check.
    from_vector = inspect.unwrap(mb.TokenStats.from_vector)
    with pytest.raises(TypeError, match=r"vector must be a floating-point tensor"):
        from_vector(mb.TokenStats, torch.zeros(11, dtype=torch.long))


def test_stats_of_different_expert_counts_do_not_add() -> None:
    four = mb.TokenStats.of(raw_routing(torch.tensor([[0], [1]])))
    six = mb.TokenStats.of(raw_routing(torch.tensor([[0], [5]]), num_experts=6))
    with pytest.raises(ValueError, match=r"other must be TokenStats of the same 4 experts, got 6"):
        four + six


# --- the layer's router ----------------------------------------------------------------


def _bank() -> mb.MLPExperts:
    return mb.MLPExperts(E, D, 16)


def test_a_scorer_is_not_taken_for_a_router() -> None:
    with pytest.raises(TypeError, match=r"router must be .* got LinearScorer \(a scorer\?"):
        mb.MoELayer(mb.LinearScorer(D, E), mb.TorchDispatcher(), _bank())


class _OwnRouter(nn.Module):
    """A router that is not the stock Router: the layer takes it by its call's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = mb.Router(mb.LinearScorer(D, E))
        self.dim, self.num_experts = D, E

    def forward(self, tokens: Tensor, k: int | None = None) -> mb.Routing:
        return self.inner(tokens, k=k)


def test_any_router_shaped_module_is_taken() -> None:
    layer = mb.MoELayer(_OwnRouter(), mb.TorchDispatcher(), _bank())
    assert layer(torch.randn(3, D)).out.shape == (3, D)


# --- non-finite values -----------------------------------------------------------------


def _layer(check_finite: bool = False) -> mb.MoELayer:
    torch.manual_seed(0)
    losses = {"balance": mb.LoadBalanceLoss(), "z": mb.ZLoss()}
    return mb.MoELayer(
        mb.Router(mb.LinearScorer(D, E), 2), mb.TorchDispatcher(), _bank(), losses, check_finite
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_token_warns_once_naming_the_layer(bad: float) -> None:
    layer = _layer()
    x = torch.randn(2, 5, D)
    x[1, 3, 2] = bad
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # once per layer by the layer's own flag
        layer(x)
        layer(x)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert f"MoELayer(dim={D}, num_experts={E}) at 0x{id(layer):x}" in messages[0]
    assert "losses ['balance', 'z']" in messages[0]
    assert "NaN or inf" in messages[0]


def test_finite_tokens_do_not_warn_and_check_finite_raises() -> None:
    x = torch.randn(2, 5, D)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _layer()(x)
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"x contains NaN or inf \(check_finite=True\)"):
        _layer(check_finite=True)(x)


def test_warn_non_finite_reads_host_values_and_names_the_place() -> None:
    # The SRA trainer's hook: the aux values it has on the host for logging.
    assert not warn_non_finite({"z": torch.tensor(1.0)}, "MoE block 0")
    with pytest.warns(RuntimeWarning, match=r"MoE block 3: its aux losses are NaN or inf"):
        assert warn_non_finite({"z": torch.tensor(math.inf)}, "MoE block 3")


def test_sra_loader_refuses_nan_router_weights(tmp_path: Path) -> None:
    from safetensors.torch import save_model

    from moeblocks.sra.checkpoint import Checkpoint, CheckpointError, load_weights
    from moeblocks.sra.config import preset
    from moeblocks.sra.model import SRATransformer

    config = preset("tiny")
    torch.manual_seed(0)
    model = SRATransformer(config)
    ckpt = Checkpoint(path=tmp_path, step=1, config=config, data="synthetic")
    save_model(model, str(tmp_path / "model.safetensors"))
    load_weights(SRATransformer(config), ckpt, config)  # finite weights load
    name = next(n for n, _ in model.named_parameters() if "router" in n)
    with torch.no_grad():
        model.get_parameter(name).view(-1)[0] = float("nan")
    save_model(model, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"holds NaN or inf weights \({name}"):
        load_weights(SRATransformer(config), ckpt, config)
