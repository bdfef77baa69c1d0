"""Peak memory per rank: the paper-shaped SRA model built on ``meta`` and sharded, vs eager.

Legend: W ranks (2, gloo over loopback), L layers.

Each mode runs in two fresh rank processes. ``eager`` builds the whole model on every
rank (the only way before issue 28), then ``parallelize`` shards it with FSDP2. ``meta``
builds it on the ``meta`` device and ``parallelize`` shards it before any weight exists,
then each rank allocates and initialises its own shards (one module's tensors in full at
a time). Reported per rank: the growth of peak resident memory (``ru_maxrss``) from just
before building to just after ``parallelize`` (after a warm-up on the tiny preset, so the
growth is tensors, not code), in MiB, against the full model's bytes and the rank's
shard; the ratio is meta / eager, measured in the same run.

    python benchmarks/bench_meta_init.py              # L = 4: the paper model, 290 M params
    python benchmarks/bench_meta_init.py --layers 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

RANK = """
import json, os, resource, sys
import torch, torch.distributed as dist
from moeblocks.distributed import ParallelConfig, local_shard, parallelize
from moeblocks.sra.config import PRESETS
from moeblocks.sra.model import SRATransformer
dist.init_process_group("gloo")
mode, layers, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def build(cfg):
    if mode == "meta":
        with torch.device("meta"):
            return SRATransformer(cfg)
    return SRATransformer(cfg)
# Warm-up on the tiny preset: loads the code paths (meta kernels, DTensor, FSDP2), so
# the growth below is tensors, not code.
parallelize(build(PRESETS["tiny"]), ParallelConfig(blocks="blocks"))
cfg = PRESETS["paper"].replace(n_layers=layers)
torch.manual_seed(19)
before = peak()
model = build(cfg)
parallelize(model, ParallelConfig(blocks="blocks"))
grown = peak() - before
full = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
shard = sum(local_shard(p).numel() * p.element_size() for p in model.parameters()) / 2**20
row = {"grown": grown, "full": full, "shard": shard}
with open(f"{out}.{dist.get_rank()}", "w") as f:
    json.dump(row, f)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(mode: str, layers: int, world: int = 2) -> list[dict[str, float]]:
    """Peak-memory growth of every rank for one mode, in fresh processes."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row")
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", RANK, mode, str(layers), out], env={**env, "RANK": str(r)}
            )
            for r in range(world)
        ]
        if any(p.wait() for p in procs):
            raise RuntimeError(f"a rank of mode {mode!r} failed")
        return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS / "meta_init_cpu_gloo.md")
    args = parser.parse_args()
    rows = {mode: run(mode, args.layers) for mode in ("eager", "meta")}
    lines = [
        "| rank | full model (MiB) | shard (MiB) | eager: peak growth (MiB) "
        "| meta: peak growth (MiB) | meta / eager |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r, (e, m) in enumerate(zip(rows["eager"], rows["meta"], strict=True)):
        lines.append(
            f"| {r} | {e['full']:.0f} | {m['shard']:.0f} | {e['grown']:.0f} | "
            f"{m['grown']:.0f} | {m['grown'] / e['grown']:.2f}x |"
        )
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"python {platform.python_version()}, {datetime.date.today().isoformat()}, "
        f"this process's own peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB"
    )
    text = "\n".join(lines)
    print(machine)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Building the paper-shaped SRA model: meta + sharded vs eager, peak memory per rank\n\n"
        f"Machine: {machine}. Two gloo ranks on the CPU, FSDP2 (`parallelize`, one unit per "
        f"block), the `paper` preset with {args.layers} layers, float32. Peak resident "
        "memory growth from just before building the model to just after `parallelize`, after a "
        "warm-up on the `tiny` preset (so it counts tensors, not code). At its peak a meta "
        "rank holds its shards plus one module's own tensors in full (an expert bank, 268 "
        "MiB); an eager rank holds the whole model.\n\n"
        f"{text}\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
