"""Wall time of ``moeblocks demo`` while other CPU-bound jobs run on the machine.

Question: does the demo finish in under 5 minutes with two other CPU-bound jobs
running, and which jobs make it slow? Each scenario starts its competitors first, lets
them run for ``--head-start`` seconds, then times ``moeblocks demo`` (the whole command,
as a user runs it: start-up, training, evaluation, report) with the defaults (no
``--threads``, no ``OMP_*`` variables), and stops the competitors when the demo ends:

- ``alone``: nothing else runs;
- ``issue``: the case issue 21 reported: two demos at once while ``moeblocks train``
  (tiny preset, run long) trains; both demos are timed;
- ``2 busy loops``: two single-threaded pure-Python busy loops;
- ``2 torch trainers``: two ``tiny`` training loops with torch's default threads (one
  OpenMP thread per core, spin-waiting), from ``bench_contention.py``'s worker: the
  greediest neighbours a demo is likely to meet.

Usage: python benchmarks/bench_demo_contention.py [--scenarios alone issue ...]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import cpu_name

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CLEARED = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
MOEBLOCKS = [sys.executable, "-m", "moeblocks.cli"]
BUSY_LOOP = [sys.executable, "-c", "while True: pass"]
TORCH_TRAINER = [sys.executable, str(HERE / "bench_contention.py"), "--worker", "tiny", "0"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in CLEARED}


def _competitors(scenario: str, work: Path) -> list[list[str]]:
    if scenario == "alone":
        return []
    if scenario == "issue":
        long_run = ["train", "--preset", "tiny", "--steps", "100000", "--quiet"]
        return [[*MOEBLOCKS, *long_run, "--out", str(work / "train")]]
    if scenario == "2 busy loops":
        return [BUSY_LOOP, BUSY_LOOP]
    if scenario == "2 torch trainers":
        return [[*TORCH_TRAINER, "default"], [*TORCH_TRAINER, "default"]]
    raise ValueError(f"unknown scenario {scenario!r}")


def run_scenario(scenario: str, head_start: float) -> list[float]:
    """Wall seconds of each timed demo of ``scenario``."""
    work = Path(tempfile.mkdtemp(prefix="demo-contention-"))
    others = [
        subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for cmd in _competitors(scenario, work)
    ]
    try:
        if others:
            time.sleep(head_start)
        demos = 2 if scenario == "issue" else 1
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                [*MOEBLOCKS, "demo", "--quiet", "--out", str(work / f"demo{i}")],
                env=_env(),
                stdout=subprocess.DEVNULL,
            )
            for i in range(demos)
        ]
        walls = []
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError(f"moeblocks demo failed ({scenario}): exit {p.returncode}")
            walls.append(time.perf_counter() - start)
        return walls
    finally:
        for p in others:
            p.kill()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    scenarios = ["alone", "issue", "2 busy loops", "2 torch trainers"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=scenarios, choices=scenarios)
    parser.add_argument(
        "--head-start", type=float, default=10.0, help="seconds the competitors run first"
    )
    parser.add_argument("--out", default=str(RESULTS / "demo_contention_cpu.md"))
    args = parser.parse_args()

    start = time.perf_counter()
    lines = ["| other jobs | demo wall (s) |", "|---|---:|"]
    for scenario in args.scenarios:
        walls = run_scenario(scenario, args.head_start)
        line = f"| {scenario} | {' / '.join(f'{w:.0f}' for w in walls)} |"
        lines.append(line)
        print(line, flush=True)

    import torch

    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores ({cpu_name()}), "
        f"affinity {len(os.sched_getaffinity(0))} CPUs, torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}"
    )
    quoted = " ".join(f"'{s}'" if " " in s else s for s in args.scenarios)
    command = (
        f"python benchmarks/bench_demo_contention.py --scenarios {quoted} "
        f"--head-start {args.head_start:g}"
    )
    doc = (__doc__ or "").split("\n\n")
    text = (
        "# `moeblocks demo` under CPU contention\n\n"
        f"Machine: {machine}.\n\n"
        + "\n\n".join(doc[1:3])
        + f"\n\nCommand: `{command}` ({time.perf_counter() - start:.0f} s)\n\n"
        + "\n".join(lines)
        + "\n"
    )
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
