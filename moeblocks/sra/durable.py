"""Deprecated: moved to :mod:`moeblocks.runtime.durable` (this path goes in the next release)."""

from moeblocks.runtime._deprecated import warn_moved
from moeblocks.runtime.durable import (
    atomic_write,
    atomic_write_text,
    fsync_dir,
    fsync_file,
    sha256_file,
)

__all__ = ["atomic_write", "atomic_write_text", "fsync_dir", "fsync_file", "sha256_file"]

warn_moved("moeblocks.sra.durable", "moeblocks.runtime.durable")
