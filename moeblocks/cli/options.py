"""What the ``moeblocks`` commands share: ``argparse`` value types and common options.

An option that several commands take is declared here once (its flag, default and
help), so ``--device`` or ``--quiet`` read the same in every command.
"""

from __future__ import annotations

import argparse

__all__ = [
    "RAW",
    "add_device",
    "add_max_tokens",
    "add_plot_format",
    "add_quiet",
    "add_threads",
    "non_negative_float",
    "positive_int",
    "probability",
]


def positive_int(text: str) -> int:
    """An ``argparse`` type: an int >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return n


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def non_negative_float(text: str) -> float:
    """An ``argparse`` type: a finite number >= 0."""
    x = _number(text)
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return x


def probability(text: str) -> float:
    """An ``argparse`` type: a number in (0, 1]."""
    x = _number(text)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return x


# --- options several commands share, declared once ---------------------------------------

RAW = argparse.RawDescriptionHelpFormatter


def add_device(parser: argparse.ArgumentParser) -> None:
    """``--device``: where the model runs (see :func:`moeblocks.runtime.device.resolve_device`)."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")


def add_quiet(parser: argparse.ArgumentParser, what: str = "no progress bar") -> None:
    """``--quiet``: no progress output on stderr."""
    parser.add_argument("--quiet", action="store_true", help=what)


def add_plot_format(parser: argparse.ArgumentParser, default_help: str = "png") -> None:
    """``--format``: the plots' file format."""
    parser.add_argument(
        "--format",
        default="png",
        choices=["png", "svg", "pdf"],
        help=f"plot format (default: {default_help})",
    )


def add_max_tokens(parser: argparse.ArgumentParser, default: int | None, help: str) -> None:
    """``--max-tokens N``: how many evaluation tokens to read."""
    parser.add_argument("--max-tokens", type=positive_int, default=default, metavar="N", help=help)


def add_threads(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: CPU threads (see :func:`moeblocks.runtime.threads.configure_threads`)."""
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="CPU threads (default: OMP_NUM_THREADS, else the usable CPUs not kept busy "
        "by other processes)",
    )
