"""Does ``routing-zoo --jobs 2`` (two runs at once, one thread each) beat one process on 2 threads?

Question: for the tiny models of the routing zoo on a 2-core machine, what wall time does
a zoo plan take with ``--jobs 2`` (each run in its own process on one CPU thread)
against ``--jobs 1`` with the process on 2 threads? Each measurement trains and
measures the same plan (families x seeds, few steps) from scratch in a fresh folder;
the two settings alternate round by round, so a load change on a shared machine hits
both alike. The table gives each round's wall time and the median ratio to ``--jobs 1``.

Usage: python benchmarks/bench_zoo_jobs.py [--steps 40] [--rounds 2]
    [--families cosine mixtral] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _machine import cpu_name

from moeblocks.sra.routing_zoo import routing_zoo, zoo_base

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {"jobs 1, 2 threads": (1, 2), "jobs 2, 1 thread each": (2, 1)}


def one(jobs: int, threads: int, args: argparse.Namespace) -> float:
    """Wall seconds of one zoo plan from scratch with ``jobs`` processes."""
    torch.set_num_threads(threads)  # --jobs 1 trains in this process
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        routing_zoo(Path(tmp), zoo_base("tiny", args.steps), seeds=args.seeds,
                    families=args.families, max_tokens=args.max_tokens, jobs=jobs,
                    progress=False)  # fmt: skip
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--families", nargs="+", default=["cosine", "mixtral"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--max-tokens", type=int, default=2048)
    args = p.parse_args()
    walls: dict[str, list[float]] = {s: [] for s in SETTINGS}
    for _ in range(args.rounds):
        for name, (jobs, threads) in SETTINGS.items():
            walls[name].append(one(jobs, threads, args))
            print(f"{name}: {walls[name][-1]:.1f} s", flush=True)
    base = statistics.median(walls["jobs 1, 2 threads"])
    runs = len(args.families) * len(args.seeds)
    lines = [
        "# Routing zoo: --jobs 2 against one process on 2 threads",
        "",
        f"Command: `python benchmarks/bench_zoo_jobs.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs ({cpu_name()}), torch "
        f"{torch.__version__}, {datetime.date.today().isoformat()}. Plan: {runs} runs "
        f"({', '.join(args.families)} x seeds {' '.join(map(str, args.seeds))}) of "
        f"{args.steps} steps at `tiny`, each trained and measured from scratch.",
        "",
        "| setting | wall per round (s) | median (s) | median / jobs 1 |",
        "|---|---|---:|---:|",
    ]
    for name, ws in walls.items():
        med = statistics.median(ws)
        each = " / ".join(f"{w:.1f}" for w in ws)
        lines.append(f"| {name} | {each} | {med:.1f} | {med / base:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / "zoo_jobs_cpu.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
