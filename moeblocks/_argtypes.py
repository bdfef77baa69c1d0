"""``argparse`` value types shared by the command-line modules."""

from __future__ import annotations

import argparse

__all__ = ["non_negative_float", "positive_int", "probability"]


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
