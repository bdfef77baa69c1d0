"""CPU threads for training and inference on a machine that other processes share.

torch's CPU kernels run on an OpenMP pool (libgomp in the pip wheels) whose defaults
suit a machine the process has to itself: one thread per core (``os.cpu_count()``, even
where CPU affinity or a container's CPU quota allow fewer) and idle workers that
spin-wait for the next parallel region. Beside other CPU-bound processes, a worker
spinning on a core another process needs burns the time slice the thread it waits for
could have used: on 2 cores a ``tiny`` training step ran 4-60× slower beside one other
training process and 6-110× slower beside two, from run to run
(``benchmarks/results/contention_cpu.md``).

:func:`configure_threads` picks the intra-op thread count, in this order:

1. ``threads``, when given (the ``--threads N`` of the ``moeblocks`` commands);
2. ``OMP_NUM_THREADS``, when set;
3. the CPUs this process may use (:func:`available_cpus`: CPU affinity capped by the
   cgroup CPU quota) minus those other processes keep busy right now
   (:func:`busy_cpus`, from the kernel's count of runnable tasks), at least 1.

On an idle machine that is torch's default, so nothing gets slower; beside other busy
processes it is fewer threads. The count is chosen at the call; a long job that calls
:meth:`ThreadTuner.step` between steps (``moeblocks train`` and ``demo`` do, unless
``--threads`` or ``OMP_NUM_THREADS`` fixed the count) looks again every few seconds, so
a process that started on an idle machine gives a core back within seconds when others
start later, and takes it again when they end. Measured in ``benchmarks/results/contention_cpu.md``.

The OpenMP wait policy is left alone: ``OMP_WAIT_POLICY=PASSIVE`` made the idle step
1.4-1.8× slower in the same measurements, and ``GOMP_SPINCOUNT=10000`` did not help
under contention. Users who want them set them in the environment (libgomp reads them
once, when torch is imported; set later they change nothing).

Nothing here runs on import: the library never changes threads unless asked.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = [
    "ThreadTuner",
    "available_cpus",
    "busy_cpus",
    "cgroup_cpu_limit",
    "configure_threads",
    "default_threads",
]

CGROUP_ROOT = Path("/sys/fs/cgroup")
LOADAVG = Path("/proc/loadavg")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup CPU quota allows (e.g. 1.5), or None when there is no quota.

    Reads cgroup v2 ``cpu.max`` (``"max 100000"`` or ``"150000 100000"``: quota and period
    in microseconds) or, failing that, cgroup v1 ``cpu/cpu.cfs_quota_us`` and
    ``cpu/cpu.cfs_period_us`` (quota ``-1``: none) under ``root``. Files that are missing
    or unreadable count as no quota.
    """
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for sub in ("cpu", "cpu,cpuacct"):
        try:
            quota_us = int((root / sub / "cpu.cfs_quota_us").read_text())
            period_us = int((root / sub / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may actually use: its CPU affinity, capped by the cgroup quota.

    A fractional quota rounds up (1.5 CPUs → 2 threads); the result is at least 1.
    """
    has_affinity = hasattr(os, "sched_getaffinity")  # not on macOS or Windows
    cpus = len(os.sched_getaffinity(0)) if has_affinity else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def own_running(tasks: Path = Path("/proc/self/task")) -> int:
    """This process's threads that are runnable right now (at least 1: the caller).

    Counts the tasks whose ``stat`` state is ``R``; 1 where ``/proc`` does not say.
    """
    running = 0
    try:
        for task in tasks.iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:  # the thread ended while we looked
                continue
            running += stat[stat.rindex(")") + 2 :].startswith("R")
    except OSError:
        return 1
    return max(1, running)


def busy_cpus(samples: int = 10, interval: float = 0.02, loadavg: Path = LOADAVG) -> float | None:
    """Runnable tasks of other processes right now, or None where the kernel does not say.

    The fourth field of ``/proc/loadavg`` (``running/total``) counts the runnable
    threads of the whole machine at this instant; this process's own runnable threads
    (:func:`own_running`: the reader, and OpenMP workers still spinning after the last
    parallel region) are subtracted. The median of ``samples`` readings ``interval``
    seconds apart smooths out short blips. Unlike the load averages it has no
    minute-long lag. It counts the whole machine, so in a container it also sees the
    host's other tasks.
    """
    counts = []
    for i in range(samples):
        try:
            running = loadavg.read_text().split()[3].split("/")[0]
            counts.append(int(running) - own_running())
        except (OSError, IndexError, ValueError):
            return None
        if i + 1 < samples:
            time.sleep(interval)
    return float(max(0, statistics.median(counts)))


def _positive_int(text: str | None) -> int | None:
    try:  # OMP_NUM_THREADS may be a list ("4,2": nested levels); the first is ours
        n = int((text or "").split(",")[0])
    except ValueError:
        return None
    return n if n > 0 else None


def default_threads(
    threads: int | None = None,
    environ: Mapping[str, str] = os.environ,
    cpus: int | None = None,
    busy: float | None = None,
) -> int:
    """The intra-op thread count (see the module docstring for the order).

    Args:
        threads: an explicit count; wins over everything.
        environ: where ``OMP_NUM_THREADS`` is read.
        cpus: CPUs usable (default: :func:`available_cpus`).
        busy: CPUs other processes keep busy (default: measured by :func:`busy_cpus`,
            0 where it cannot tell).

    Raises:
        ValueError: ``threads`` is given and is not a positive integer.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads}")
        return threads
    from_env = _positive_int(environ.get("OMP_NUM_THREADS"))
    if from_env is not None:
        return from_env
    cpus = available_cpus() if cpus is None else cpus
    busy = (busy_cpus() or 0.0) if busy is None else busy
    return max(1, min(cpus, cpus - math.floor(busy + 0.5)))


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads for a shared machine; returns the count.

    Calls ``torch.set_num_threads(default_threads(threads))``. Takes ~0.2 s (it samples
    the machine's load, unless ``threads`` or ``OMP_NUM_THREADS`` decide).

    Args:
        threads: intra-op threads; None: ``OMP_NUM_THREADS``, else the CPUs usable that
            other processes do not keep busy.
    """
    import torch

    n = default_threads(threads)
    torch.set_num_threads(n)
    return n


class ThreadTuner:
    """Re-checks the thread count of a long CPU job as other processes come and go.

    Call :meth:`step` between training steps; every ``every`` seconds it samples the
    load (~50 ms) and, when :func:`default_threads` gives the same new count twice in a
    row (so one blip changes nothing), calls ``torch.set_num_threads``. Only for counts
    that were picked from the load: a user's ``--threads`` or ``OMP_NUM_THREADS`` is
    never overridden (do not create a tuner then).

    Args:
        every: Seconds between looks.
        clock: Time source (seconds), for tests.
    """

    def __init__(self, every: float = 3.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not every > 0:
            raise ValueError(f"every must be > 0 seconds, got {every!r}")
        self.every = every
        self.clock = clock
        self._next = clock() + every
        self._pending: int | None = None

    def step(self) -> int | None:
        """Look at the load if it is time; return the new thread count when it changed."""
        import torch

        now = self.clock()
        if now < self._next:
            return None
        self._next = now + self.every
        wanted = default_threads(environ={}, busy=busy_cpus(samples=5, interval=0.01) or 0.0)
        if wanted == torch.get_num_threads():
            self._pending = None
            return None
        if self._pending != wanted:  # seen once: wait for a second look
            self._pending = wanted
            return None
        self._pending = None
        torch.set_num_threads(wanted)
        return wanted
