"""Run a short script on gloo ranks in fresh interpreters (for group-reduction tests).

Each rank runs :data:`PREAMBLE`, then ``code``, then :data:`EPILOGUE`, with ``RANK``,
``WORLD_SIZE`` and the rendezvous variables set and its output path as ``sys.argv[1]``;
the script saves what the test checks there. The preamble checks shapes as the test run
does (the jaxtyping hook; ``shape_checks=False`` leaves it out, for ranks that
``torch.compile``, which cannot trace it), imports ``torch``, ``dist`` and ``mb``, sets
``rank`` and joins the gloo group. ``code`` must not shut the group down: the epilogue
does, the same way for every test.

A clean shutdown, which a busy machine needs. Before it, a rank of
``test_group_sums_the_loads_before_the_update`` failed by chance with ``terminate called
without an active exception``: its ``BiasBalancer`` held ``dist.group.WORLD`` in a
module global, so ``destroy_process_group`` left the gloo group (its C++ threads and
connections) to be torn down during interpreter finalisation, in whatever order the
other rank's exit and the store's host (rank 0) allowed. So:

- the rendezvous store lives in the test process, as torchrun's agent holds it, so no
  rank hosts it and none can take it away from the others by exiting first; and the
  port is bound by the store itself, never picked, closed and bound again (another
  process on the machine could take it in between);
- ``code`` runs in a namespace of its own that is cleared before the shutdown, so no
  object of the test (a balancer or a loss holding ``dist.group.WORLD``) keeps the
  group alive past :func:`torch.distributed.destroy_process_group`: its threads are
  joined while the interpreter is whole, not during its finalisation;
- a barrier before the destroy, so no rank tears its connections down while another is
  still in a collective;
- no thread but the main one may be left; the test process joins every rank and stops
  the others as soon as one fails (they would wait in a collective until the timeout).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
SHAPE_CHECKS = """
from jaxtyping import install_import_hook
install_import_hook("moeblocks", "beartype.beartype")
"""
PREAMBLE = (
    SHAPE_CHECKS
    + """
import os, sys
import torch, torch.distributed as dist
import moeblocks as mb
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
"""
)
# Runs the test's code (``_CODE``, set just before) and shuts the group down cleanly.
EPILOGUE = """
import gc, threading
_scope = {"__name__": "__rank__", "torch": torch, "dist": dist, "mb": mb, "sys": sys,
          "os": os, "rank": rank}
exec(compile(_CODE, "<rank code>", "exec"), _scope)
_scope.clear()
del _scope
gc.collect()
dist.barrier()
dist.destroy_process_group()
# A progress bar (the SRA trainer's) starts tqdm's daemon monitor: stop it as tqdm does.
_tqdm = sys.modules.get("tqdm.std")
if _tqdm is not None and _tqdm.tqdm.monitor is not None:
    _tqdm.tqdm.monitor.exit()
_left = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
assert not _left, f"threads left after the shutdown: {_left}"
"""
POLL_S = 0.1


@contextmanager
def agent_store(world: int) -> Iterator[dict[str, str]]:
    """A rendezvous store in this process and the environment of ``world`` ranks.

    As torchrun's: ranks on loopback, ``TORCHELASTIC_USE_AGENT_STORE`` so that every
    rank connects to this store as a client (set ``RANK`` per rank). The store closes
    when the block ends, after the ranks have.
    """
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(minutes=10)
    )
    try:
        yield {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(store.port),
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "GLOO_SOCKET_IFNAME": "lo",
            "WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1",
        }
    finally:
        del store


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Wait for every process; once one fails (or time is up) stop the rest and reap them.

    Returns:
        The exit codes (negative for a signal), in the order of ``procs``.
    """
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            # A failed rank leaves the others waiting in a collective until the timeout.
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
    return [p.returncode for p in procs]


def run_ranks(
    code: str, workdir: Path, world: int = 2, timeout: float = 600, *, shape_checks: bool = True
) -> list[Path]:
    """Run ``code`` on ``world`` ranks; return each rank's output path once all succeed."""
    preamble = PREAMBLE if shape_checks else PREAMBLE.removeprefix(SHAPE_CHECKS)
    script = f"{preamble}\n_CODE = {code!r}\n{EPILOGUE}"
    outs = [workdir / f"rank{r}.pt" for r in range(world)]
    logs = [workdir / f"rank{r}.log" for r in range(world)]
    with agent_store(world) as env:
        procs = []
        for r in range(world):
            with logs[r].open("w") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", script, str(outs[r])],
                        env={**env, "RANK": str(r)},
                        cwd=ROOT,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        codes = wait_all(procs, timeout)
    report = "\n".join(
        f"--- rank {r} (exit {c}):\n{logs[r].read_text()}" for r, c in enumerate(codes)
    )
    assert codes == [0] * world, report
    return outs
