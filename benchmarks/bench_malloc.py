"""Training step time with glibc's default malloc settings and with configure_malloc().

Question: what do the page faults of a CPU training step cost, and does keeping freed
memory in the process (:func:`moeblocks.runtime.malloc.configure_malloc`, which the
``moeblocks`` commands call) remove that cost? For each preset and thread count, fresh
processes alternate between the two settings for ``--rounds`` rounds; each process
times ``--steps`` full training steps (forward, CE + aux losses, backward, clip, AdamW)
after warm-up steps and counts its minor page faults. The table gives the median over
rounds of each process's median step time, the ratio ``configure_malloc / default``
and the faults per step.

Usage: python benchmarks/bench_malloc.py [--presets tiny] [--threads 1 2] [--rounds 4]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _machine import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
CLEARED = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
SETTINGS = ("default", "configure_malloc")


def worker(preset_name: str, threads: int, setting: str, steps: int, warmup: int) -> None:
    """Print the median step seconds and the minor page faults per step."""
    if setting == "configure_malloc":
        from moeblocks.runtime.malloc import configure_malloc

        if not configure_malloc():
            raise SystemExit("configure_malloc() changed nothing on this machine")
    import resource

    import torch
    from _sra_step import make_step

    from moeblocks.sra.config import preset

    torch.set_num_threads(threads)
    cfg = preset(preset_name)
    step = make_step(cfg, cfg.k_final)
    times = []
    faults0 = 0
    for i in range(warmup + steps):
        if i == warmup:
            faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    print(f"{statistics.median(times[warmup:]):.6f} {faults / steps:.1f}")


def measure(preset_name: str, threads: int, setting: str, steps: int, warmup: int) -> list[float]:
    """[median step seconds, faults per step] of one fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    cmd = [sys.executable, __file__, "--worker", preset_name, str(threads), setting]
    cmd += [str(steps), str(warmup)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return [float(v) for v in out.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=4, help="fresh processes per setting")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per process")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured steps first")
    parser.add_argument("--out", default=str(RESULTS / "malloc_cpu.md"))
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, threads, setting, steps, warmup = args.worker
        worker(name, int(threads), setting, int(steps), int(warmup))
        return

    start = time.perf_counter()
    lines = [
        "| preset | threads | default (ms) | configure_malloc (ms) | ratio "
        "| faults/step default | faults/step configure_malloc |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    raw = []
    for name in args.presets:
        for threads in args.threads:
            got: dict[str, list[list[float]]] = {s: [] for s in SETTINGS}
            for _ in range(args.rounds):  # alternate, so drift hits both settings
                for setting in SETTINGS:
                    got[setting].append(measure(name, threads, setting, args.steps, args.warmup))
            ms = {s: 1000 * statistics.median(r[0] for r in got[s]) for s in SETTINGS}
            faults = {s: statistics.median(r[1] for r in got[s]) for s in SETTINGS}
            line = (
                f"| {name} | {threads} | {ms['default']:.0f} | {ms['configure_malloc']:.0f} | "
                f"{ms['configure_malloc'] / ms['default']:.2f}x | {faults['default']:.0f} | "
                f"{faults['configure_malloc']:.0f} |"
            )
            lines.append(line)
            print(line, flush=True)
            for s in SETTINGS:
                each = " / ".join(f"{1000 * r[0]:.0f}" for r in got[s])
                raw.append(f"- {name}, {threads} thread(s), {s}: {each} ms")

    import torch

    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores ({cpu_name()}), "
        f"{platform.libc_ver()[0]} {platform.libc_ver()[1]}, torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}"
    )
    command = (
        f"python benchmarks/bench_malloc.py --presets {' '.join(args.presets)} "
        f"--threads {' '.join(map(str, args.threads))} --rounds {args.rounds} "
        f"--steps {args.steps} --warmup {args.warmup}"
    )
    text = (
        "# Training step time and glibc's malloc settings\n\n"
        f"Machine: {machine}.\n\n"
        + (__doc__ or "").split("\n\n")[1]
        + f"\n\nCommand: `{command}` ({time.perf_counter() - start:.0f} s)\n\n"
        + "\n".join(lines)
        + "\n\nEvery process's median step:\n\n"
        + "\n".join(raw)
        + "\n"
    )
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
