"""Progress output of long commands: a tqdm bar on a terminal, plain lines elsewhere.

A tqdm bar redraws itself with carriage returns; on a terminal that reads well, but
captured in a file or a CI log the whole run becomes one long line (the demo's log was
one 30 kB line). So :func:`start_progress` gives a tqdm bar only when the stream is a
terminal (and tqdm is installed); otherwise a :class:`LineProgress`, which prints a
plain, complete line each time another tenth of the work is done, or when 30 s passed
without a line, and once more when it closes.

This module imports nothing from the blocks (a side floor, like the runtime helpers), and
tqdm only inside :func:`start_progress`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

__all__ = ["LineProgress", "Progress", "start_progress"]

LINE_EVERY_S = 30.0  # seconds without a line after which LineProgress prints one anyway
LINE_STEPS = 10  # LineProgress prints a line each time another 1/LINE_STEPS is done


@runtime_checkable
class TextStream(Protocol):
    """Where progress goes: ``sys.stderr``, a file opened for text, ``io.StringIO``."""

    def write(self, text: str, /) -> int:
        """Write ``text``; return the characters written."""
        ...

    def flush(self) -> None:
        """Push what was written to its destination."""
        ...


@runtime_checkable
class Progress(Protocol):
    """What long commands call on a progress display (a tqdm bar or plain lines)."""

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done."""

    def set_description_str(self, desc: str) -> None:
        """Name what is being done now (shown before the count)."""

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        """Show ``text`` after the count (e.g. the current loss) from now on."""

    def write(self, text: str) -> None:
        """Print a message line without breaking the display."""

    def close(self) -> None:
        """End the display."""


class LineProgress:
    """Plain progress lines: ``desc: n/total unit (p %), elapsed s[, postfix]``.

    A line is printed each time the count passes another ``1/LINE_STEPS`` of ``total``,
    or on an update ``LINE_EVERY_S`` seconds or more after the previous line, and at
    :meth:`close` if the last count was not shown yet. No carriage returns, so a log has
    at most ``LINE_STEPS + 1`` lines per display plus one per 30 s and per message.

    Args:
        total: Units of the whole job (at least 1 is assumed).
        desc: What is being done (the start of each line).
        unit: Name of one unit, e.g. ``"step"``.
        initial: Units already done (a resumed run).
        stream: Where lines go (default: ``sys.stderr`` at the time of each line).
        clock: Seconds, monotonic (a parameter so that tests can drive time).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        initial: int = 0,
        stream: TextStream | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total < 0 or initial < 0:
            raise ValueError(f"total and initial must be >= 0, got {total} and {initial}")
        self.total, self.desc, self.unit = max(total, 1), desc, unit
        self.n = self.shown = initial
        self.postfix = ""
        self._stream, self._clock = stream, clock
        self._start = self._last = clock()
        self._closed = False

    def _tenth(self, n: int) -> int:
        return n * LINE_STEPS // self.total

    def _print(self, text: str) -> None:
        print(text, file=self._stream or sys.stderr, flush=True)

    def _line(self) -> None:
        now = self._clock()
        pct, seconds = math.floor(100 * self.n / self.total), now - self._start
        text = f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct} %), {seconds:.0f} s"
        self._print(text + (f", {self.postfix}" if self.postfix else ""))
        self.shown, self._last = self.n, now

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units; print a line when another tenth is done or 30 s passed."""
        self.n += n
        due = self._tenth(self.n) > self._tenth(self.shown)
        if due or self._clock() - self._last >= LINE_EVERY_S:
            self._line()

    def set_description_str(self, desc: str) -> None:
        """Start the following lines with ``desc``."""
        self.desc = desc

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        """End the following lines with ``text`` (``refresh`` is tqdm's; lines ignore it)."""
        self.postfix = text

    def write(self, text: str) -> None:
        """Print ``text`` as a line of its own."""
        self._print(text)

    def close(self) -> None:
        """Print the final count if no line showed it yet (once)."""
        if not self._closed and self.n != self.shown:
            self._line()
        self._closed = True


class _Silent:
    """The display of ``enabled=False``: counts nothing and prints only messages."""

    def __init__(self, stream: TextStream | None) -> None:
        self._stream = stream

    def update(self, n: int = 1) -> None:
        pass

    def set_description_str(self, desc: str) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def write(self, text: str) -> None:
        print(text, file=self._stream or sys.stderr, flush=True)

    def close(self) -> None:
        pass


class _TqdmBar:
    """A tqdm bar behind the :class:`Progress` protocol (messages go to its stream)."""

    def __init__(self, bar: Any, stream: TextStream) -> None:
        self._bar, self._stream = bar, stream

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set_description_str(self, desc: str) -> None:
        self._bar.set_description_str(desc)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self._bar.set_postfix_str(text, refresh=refresh)

    def write(self, text: str) -> None:
        self._bar.write(text, file=self._stream)

    def close(self) -> None:
        self._bar.close()


def _is_terminal(stream: TextStream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        return False


def start_progress(
    total: int,
    desc: str,
    enabled: bool = True,
    unit: str = "it",
    initial: int = 0,
    leave: bool = True,
    stream: TextStream | None = None,
) -> Progress:
    """A progress display on ``stream``: tqdm on a terminal, plain lines elsewhere.

    Args:
        total: Units of the whole job.
        desc: What is being done.
        enabled: False gives a display that shows no progress (messages still print).
        unit: Name of one unit, e.g. ``"step"``.
        initial: Units already done (a resumed run).
        leave: Keep the tqdm bar on the terminal when it closes (lines always stay).
        stream: Where the display goes (default ``sys.stderr``).

    Returns:
        The progress display, a tqdm bar when ``stream`` is a terminal and tqdm is
        installed, else a :class:`LineProgress` (a line every tenth or 30 s).
    """
    out = sys.stderr if stream is None else stream
    if not enabled:
        return _Silent(stream)
    if _is_terminal(out):
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional (the sra extra): lines serve a terminal too
            pass
        else:
            bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                       dynamic_ncols=True, file=out)  # fmt: skip
            return _TqdmBar(bar, out)
    return LineProgress(total, desc, unit=unit, initial=initial, stream=stream)
