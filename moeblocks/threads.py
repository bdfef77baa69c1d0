"""Deprecated: moved to :mod:`moeblocks.runtime.threads` (this path goes in the next release)."""

from moeblocks.runtime._deprecated import warn_moved
from moeblocks.runtime.threads import (
    ThreadTuner,
    available_cpus,
    busy_cpus,
    cgroup_cpu_limit,
    configure_threads,
    default_threads,
)

__all__ = [
    "ThreadTuner",
    "available_cpus",
    "busy_cpus",
    "cgroup_cpu_limit",
    "configure_threads",
    "default_threads",
]

warn_moved("moeblocks.threads", "moeblocks.runtime.threads")
