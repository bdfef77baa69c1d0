"""The first-hour mistakes of issue 32 get a clear message (or just work).

A list where the losses' dict belongs, ``k=`` where the router takes ``schedule=``, and
a k curriculum that the training loop never steps (``step_schedules`` steps them all).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import moeblocks as mb


def _layer(schedule: mb.KSchedule | int = 2, **kw) -> mb.MoELayer:  # type: ignore[no-untyped-def]
    router = mb.Router(mb.LinearScorer(8, 4), schedule=schedule)
    return mb.MoELayer(router, mb.TorchDispatcher(), mb.GELUExperts(4, 8, 16), **kw)


def test_losses_as_a_list_says_what_was_expected() -> None:
    from moeblocks.layer import _check_losses

    # The test run's jaxtyping hook rejects the annotation first (a TypeError too), so
    # the layer's own message is checked on its check.
    with pytest.raises(TypeError, match=r"losses must be a mapping of names to AuxLoss.*got list"):
        _check_losses([mb.LoadBalanceLoss(), mb.ZLoss()])
    with pytest.raises(TypeError, match=r"losses must be a mapping.*got ZLoss"):
        _check_losses(mb.ZLoss())
    with pytest.raises(TypeError):
        _layer(losses=[mb.ZLoss()])
    assert list(_layer(losses={"z": mb.ZLoss()}).losses) == ["z"]


def test_router_takes_k_as_a_constant_schedule() -> None:
    router = mb.Router(mb.LinearScorer(8, 4), k=2)
    assert isinstance(router.schedule, mb.ConstantK)
    assert router(torch.randn(3, 8)).top_k == 2
    assert mb.Router(mb.LinearScorer(8, 4)).schedule.k == 1  # the default is still k = 1
    with pytest.raises(ValueError, match=r"either k=2 \(a constant k\) or schedule=3, not both"):
        mb.Router(mb.LinearScorer(8, 4), schedule=3, k=2)
    with pytest.raises(ValueError, match="only 4 experts"):
        mb.Router(mb.LinearScorer(8, 4), k=5)


def test_step_schedules_steps_every_schedule_of_a_model() -> None:
    model = torch.nn.Sequential(_layer(mb.StepK({0: 1, 10: 2})), _layer(mb.StepK({0: 2, 5: 3})))
    assert mb.step_schedules(model, 10) == 2
    assert [layer.router.schedule.k for layer in model] == [2, 3]
    assert mb.step_schedules(torch.nn.Linear(2, 2), 3) == 0
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        mb.step_schedules(model, -1)
    with pytest.raises(TypeError, match="model"):  # the layer's or the test hook's message
        mb.step_schedules([model], 1)  # type: ignore[arg-type]


def _train_forwards(layer: mb.MoELayer, n: int) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n):
            layer(torch.randn(2, 8))
    return [w for w in caught if "never stepped" in str(w.message)]


def test_an_unstepped_curriculum_warns_once() -> None:
    layer = _layer(mb.StepK({0: 1, 5: 2}))
    assert _train_forwards(layer, 4) == []  # before the first milestone: nothing yet
    (warning,) = _train_forwards(layer, 10)  # once, at the 5th training forward
    assert "k is still 1 (it changes at step 5)" in str(warning.message)
    assert "step_schedules(model, step)" in str(warning.message)
    assert warning.category is UserWarning


@pytest.mark.parametrize(
    "setup",
    [
        lambda layer: mb.step_schedules(layer, 0),  # stepped, even if only to step 0
        lambda layer: layer.load_state_dict(layer.state_dict()),  # a resumed run
        lambda layer: layer.eval(),  # inference does not step
    ],
)
def test_no_warning_when_stepped_loaded_or_evaluating(setup) -> None:  # type: ignore[no-untyped-def]
    layer = _layer(mb.StepK({0: 1, 2: 2}))
    setup(layer)
    assert _train_forwards(layer, 5) == []


def test_no_warning_for_constant_k_or_an_explicit_k() -> None:
    assert _train_forwards(_layer(2), 20) == []
    assert _train_forwards(_layer(mb.StepK({0: 2, 3: 2})), 20) == []  # k never changes
    layer = _layer(mb.StepK({0: 1, 2: 2}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            layer(torch.randn(2, 8), k=2)  # an explicit k does not read the schedule
    assert not caught
