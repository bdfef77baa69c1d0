"""k schedules: how many experts each token uses at a given training step.

A schedule is a small module whose only state is the current step, kept in a persistent
buffer so that ``state_dict`` round trips (and resumed runs) keep their k. The training
loop moves it: :func:`step_schedules` sets the step of every schedule of a model.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["ConstantK", "KSchedule", "StepK", "step_schedules"]


def _check_k(name: str, k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name} must be an int >= 1, got {k!r}")
    return k


class KSchedule(nn.Module):
    """Base class: maps a training step to the number of experts per token.

    Subclasses implement :meth:`k_at` and :attr:`max_k`. The current step is a persistent
    int64 buffer ``step``; a Python mirror of it avoids a device sync on every forward.
    ``load_state_dict`` refuses a negative or non-integer step (``ValueError`` /
    ``TypeError``) before it changes the schedule.
    """

    step: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("step", torch.empty((), dtype=torch.long))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Move the schedule back to step 0, in place."""
        self.step.zero_()
        self._step = 0
        # For the never-stepped warning only: whether anyone moved the schedule, and how
        # many training forwards used it since construction while nobody did.
        self._stepped = False
        self._unstepped_uses = 0

    def k_at(self, step: int) -> int:
        """The k in force at ``step``."""
        raise NotImplementedError

    @property
    def max_k(self) -> int:
        """The largest k this schedule ever returns."""
        raise NotImplementedError

    @property
    def k(self) -> int:
        """The k in force at the current step."""
        return self.k_at(self._step)

    @property
    def first_change(self) -> int | None:
        """The first step whose k differs from step 0's; None for a constant schedule."""
        return None

    def set_step(self, step: int) -> None:
        """Move the schedule to training step ``step`` (>= 0)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self._step = step
        self._stepped = True
        self.step.fill_(step)

    def note_training_use(self) -> None:
        """Count one training forward; warn once if k should have changed by now.

        A schedule that changes k (``first_change`` is not None) but that nobody has
        stepped keeps the k of step 0 forever. Once it has served ``first_change``
        training forwards (at least one optimizer step each) without a
        :meth:`set_step` or a loaded state, this warns once (``UserWarning``).
        :class:`~moeblocks.layer.MoELayer` calls it in training mode; it is skipped
        under ``torch.compile`` (a Python counter there would recompile every step).
        """
        if self._stepped or torch.compiler.is_compiling():
            return
        change = self.first_change
        if change is None:
            return
        self._unstepped_uses += 1
        if self._unstepped_uses == change:
            warnings.warn(
                f"{type(self).__name__} {self.extra_repr()} has served {change} training "
                f"forwards but was never stepped, so k is still {self.k_at(0)} (it changes "
                f"at step {change}); call moeblocks.step_schedules(model, step) (or "
                "schedule.set_step(step)) in the training loop",
                UserWarning,
                stacklevel=2,
            )

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "step"
        step = state_dict.get(key)
        if isinstance(step, torch.Tensor) and step.numel() == 1:
            if step.is_floating_point() or step.is_complex() or step.dtype == torch.bool:
                raise TypeError(f"state_dict[{key!r}] must be an integer step, got {step.dtype}")
            if int(step) < 0:
                raise ValueError(f"state_dict[{key!r}] must be a step >= 0, got {int(step)}")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._step = int(self.step)
        self._stepped = True


class ConstantK(KSchedule):
    """The same k at every step.

    Args:
        k: Experts per token, >= 1.
    """

    def __init__(self, k: int) -> None:
        super().__init__()
        self._k = _check_k("k", k)

    def k_at(self, step: int) -> int:
        """Always ``k``."""
        return self._k

    @property
    def max_k(self) -> int:
        """``k``."""
        return self._k

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"k={self._k}"


class StepK(KSchedule):
    """A piecewise-constant curriculum, e.g. ``StepK({0: 1, 2000: 4})`` for K=1→4.

    Args:
        milestones: Maps the first step of each phase to its k. Must contain step 0.
    """

    def __init__(self, milestones: Mapping[int, int]) -> None:
        super().__init__()
        if not isinstance(milestones, Mapping) or not milestones:
            raise ValueError(
                f"milestones must be a non-empty mapping step -> k, got {milestones!r}"
            )
        for step, k in milestones.items():
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"milestone steps must be ints >= 0, got {step!r}")
            _check_k(f"milestones[{step}]", k)
        if 0 not in milestones:
            raise ValueError(f"milestones must contain step 0, got steps {sorted(milestones)}")
        self._milestones = sorted(milestones.items())

    def k_at(self, step: int) -> int:
        """The k of the last milestone at or before ``step``."""
        k = self._milestones[0][1]
        for start, phase_k in self._milestones:
            if step >= start:
                k = phase_k
        return k

    @property
    def max_k(self) -> int:
        """The largest k of any phase."""
        return max(k for _, k in self._milestones)

    @property
    def first_change(self) -> int | None:
        """The first milestone whose k differs from step 0's (None if none does)."""
        k0 = self._milestones[0][1]
        return next((start for start, k in self._milestones if k != k0), None)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"milestones={dict(self._milestones)}"


def step_schedules(model: nn.Module, step: int) -> int:
    """Set every k schedule of ``model`` to training step ``step``; returns how many.

    Put it next to :func:`~moeblocks.balancing.step_balancers` in a training loop, with
    the number of optimizer steps taken so far (0 before the first).

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        ValueError: If ``step`` is not an int >= 0.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    schedules = [m for m in model.modules() if isinstance(m, KSchedule)]
    for schedule in schedules:
        schedule.set_step(step)
    return len(schedules)
