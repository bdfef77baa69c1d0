"""Deprecated: moved to :mod:`moeblocks.runtime.malloc` (this path goes in the next release)."""

from moeblocks.runtime._deprecated import warn_moved
from moeblocks.runtime.malloc import (
    configure_malloc,
    malloc_untouched_reason,
)

__all__ = ["configure_malloc", "malloc_untouched_reason"]

warn_moved("moeblocks.malloc", "moeblocks.runtime.malloc")
