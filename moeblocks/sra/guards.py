"""Stopping a training run without losing work: stop signals and the non-finite guard.

:class:`StopSignals` turns the first SIGINT (Ctrl-C), SIGTERM (``kill``, a scheduler's
pre-emption, torchrun shutting down) or SIGUSR1 (SLURM's ``--signal`` warning) into a
flag the loop checks between steps: it finishes the step, saves a checkpoint and raises
:class:`Interrupted`. A second signal stops at once, without saving.

:class:`NonFiniteGuard` looks at every step's loss and gradient norm. A step where one is
NaN or infinite is skipped: no optimizer step, so the weights and AdamW moments stay
those of the last good step, and no checkpoint is written while such a streak lasts.
After ``patience`` skipped steps in a row it raises :class:`DivergedError`; the checkpoints
saved before are left in place.
"""

from __future__ import annotations

import math
import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["DivergedError", "Interrupted", "NonFiniteGuard", "StopSignals"]

# SIGUSR1 does not exist on Windows.
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name)
)


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal, after saving a checkpoint.

    A ``KeyboardInterrupt``, so code that handles Ctrl-C handles it.

    Attributes:
        signum: The signal that asked to stop; the CLI exits with ``128 + signum``.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class DivergedError(RuntimeError):
    """Training stopped after too many non-finite steps in a row; good checkpoints stay."""


class StopSignals:
    """Defers the first stop signal to the end of the step (handlers: main thread only).

    Attributes:
        signum: The first stop signal received, or None.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise Interrupted(signum)
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()


class NonFiniteGuard:
    """Decides whether a step's update is applied, and when a run has diverged.

    Args:
        patience: Skipped steps in a row after which :meth:`check` raises
            :class:`DivergedError`.

    Attributes:
        streak: Skipped steps in a row so far (0 after a good step).
        skipped: Skipped steps over the run.
    """

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.streak = 0
        self.skipped = 0

    def check(self, step: int, loss: float, aux: float, grad_norm: float) -> str | None:
        """Why step ``step`` must be skipped (a one-line reason), or None to apply it.

        Args:
            step: The step (0-based) whose values these are.
            loss: Its cross-entropy.
            aux: Its weighted aux loss.
            grad_norm: Its global gradient norm before clipping.

        Raises:
            DivergedError: When this is the ``patience``-th skipped step in a row.
        """
        bad = [
            f"{name} {value}"
            for name, value in (("loss", loss), ("aux loss", aux), ("gradient norm", grad_norm))
            if not math.isfinite(value)
        ]
        if not bad:
            self.streak = 0
            return None
        self.streak += 1
        self.skipped += 1
        reason = "non-finite " + ", ".join(bad)
        if self.streak >= self.patience:
            first = step + 1 - self.streak
            raise DivergedError(
                f"training diverged: steps {first}-{step} in a row had a {reason} "
                f"(max_skipped_steps {self.patience})"
            )
        return reason
