"""Run a short script on two gloo ranks in fresh interpreters (for group-reduction tests).

Each rank runs :data:`PREAMBLE` and then ``code``, with ``RANK``, ``WORLD_SIZE`` and the
rendezvous variables set and its output path as ``sys.argv[1]``; the script saves what
the test checks there. The preamble checks shapes as the test run does (the jaxtyping
hook; ``shape_checks=False`` leaves it out, for ranks that ``torch.compile``, which
cannot trace it), imports ``torch``, ``dist`` and ``mb``, sets ``rank`` and joins the
gloo group.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(world: int) -> dict[str, str]:
    """The environment of ``world`` ranks on loopback (set ``RANK`` per rank), as torchrun's."""
    return {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "GLOO_SOCKET_IFNAME": "lo",
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
    }


def run_ranks(
    code: str, workdir: Path, world: int = 2, timeout: float = 600, *, shape_checks: bool = True
) -> list[Path]:
    """Run ``code`` on ``world`` ranks; return each rank's output path once all succeed."""
    preamble = PREAMBLE if shape_checks else PREAMBLE.removeprefix(SHAPE_CHECKS)
    env = rank_env(world)
    outs = [workdir / f"rank{r}.pt" for r in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", preamble + code, str(outs[r])],
            env={**env, "RANK": str(r)},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    try:
        logs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * world, "\n".join(logs)
    return outs
