"""Training step time under CPU contention: which OpenMP settings share the CPU best?

Question: how much slower is a training step of the SRA model when 1 or 2 other
CPU-bound processes of the same kind run on the machine, and which threading settings
keep that slowdown small without costing time on an idle machine? For each setting
(environment variables set before torch loads, so libgomp reads them) and each preset,
the step time is measured

- ``idle``: alone;
- ``+1`` / ``+2``: while 1 or 2 competing training processes with the *same* settings
  run full steps in a loop (they are warmed up before the measured process starts).

Every run is a fresh process (libgomp reads ``OMP_*`` / ``GOMP_*`` once, when torch is
imported). A measurement is the median step time over the measured steps after warm-up
steps (at most ``--cap`` seconds of them, at least 3 steps: a collapsed setting needs no
more to show it); tokens are random ids. Each measurement is repeated ``--repeats``
times, every round going through all settings once, and the table gives the median of
the repeats, because on a small shared VM one measurement can be off by 30 %. ``small``
uses batch 4 (not 32) to keep the run short. Ratios are contended / idle step time of
the same setting; the last columns compare with the idle step time of ``default`` (what
a user gets without moeblocks' threading). The ``threads`` column gives the intra-op
thread count each process ended with (``moeblocks`` picks it from the load).

Usage: python benchmarks/bench_contention.py [--presets tiny small] [--settings ...]
       [--steps 12] [--warmup 3] [--repeats 3]
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

# name -> environment for the process (on top of a copy with these variables removed)
SETTINGS: dict[str, dict[str, str]] = {
    "default": {},  # torch's defaults: threads = cores, libgomp spins ~300k iterations
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},  # workers sleep at once when idle
    "spin10k": {"GOMP_SPINCOUNT": "10000"},  # spin briefly, then sleep
    "1thread": {"OMP_NUM_THREADS": "1"},  # no worker threads at all
    "moeblocks": {},  # nothing set; configure_threads() + ThreadTuner, as `moeblocks train`
}
CLEARED = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
SMALL_BATCH = 4


def worker(preset_name: str, steps: int, setting: str) -> None:
    """Run ``steps`` training steps (forever if 0), printing each step's seconds and threads."""
    import torch

    tuner = None
    if setting == "moeblocks":
        from moeblocks.runtime.threads import ThreadTuner, configure_threads

        configure_threads()
        tuner = ThreadTuner()

    from _sra_step import make_step

    from moeblocks.sra.config import preset

    cfg = preset(preset_name)
    if preset_name == "small":
        cfg = cfg.replace(batch_size=SMALL_BATCH)
    step = make_step(cfg, cfg.k_final)
    i = 0
    while steps == 0 or i < steps:
        t0 = time.perf_counter()
        step()
        if tuner is not None:
            tuner.step()  # inside the timed step: its cost counts
        print(f"{time.perf_counter() - t0:.6f} {torch.get_num_threads()}", flush=True)
        i += 1


def _env(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    return {**env, **SETTINGS[setting]}


def _spawn(preset_name: str, steps: int, setting: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, __file__, "--worker", preset_name, str(steps), setting]
    return subprocess.Popen(cmd, env=_env(setting), stdout=subprocess.PIPE, text=True)


def measure(
    preset_name: str,
    setting: str,
    competitors: int,
    steps: int,
    warmup: int,
    settle: float,
    cap: float = float("inf"),
) -> tuple[float, int]:
    """Median step time (s) of one process while ``competitors`` others run, and its threads.

    The process first runs ``warmup`` steps and at least ``settle`` seconds of steps
    (unmeasured), as a training run spends its first seconds: long enough for a
    ThreadTuner to look at the load twice. Measuring stops after ``steps`` steps or
    ``cap`` seconds, whichever comes first, but never before 3 steps.
    """
    others: list[subprocess.Popen[str]] = []
    try:
        for _ in range(competitors):  # one after another, each busy before the next starts
            others.append(_spawn(preset_name, 0, setting))
            assert others[-1].stdout is not None
            others[-1].stdout.readline()
        proc = _spawn(preset_name, 0, setting)
        assert proc.stdout is not None
        start, times, threads = time.perf_counter(), [], 0
        measuring_since = None
        while len(times) < steps:
            seconds, threads_text = proc.stdout.readline().split()
            if len(times) or (warmup <= 0 and time.perf_counter() - start >= settle):
                measuring_since = measuring_since or time.perf_counter() - float(seconds)
                times.append(float(seconds))
                threads = int(threads_text)
                if len(times) >= 3 and time.perf_counter() - measuring_since >= cap:
                    break
            warmup -= 1
        proc.kill()
        proc.wait()
    finally:
        for p in others:
            p.kill()
            p.wait()
    return statistics.median(times), threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=12, help="measured steps (median)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    parser.add_argument(
        "--settle", type=float, default=10.0, help="unmeasured seconds first (at least)"
    )
    parser.add_argument(
        "--cap", type=float, default=60.0, help="measured seconds at most (then >= 3 steps)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds over all settings; median of them"
    )
    parser.add_argument("--out", default=str(RESULTS / "contention_cpu.md"))
    parser.add_argument(
        "--small-settings",
        nargs="+",
        default=["default", "moeblocks"],
        choices=list(SETTINGS),
        help="settings measured for `small` (slow under contention)",
    )
    parser.add_argument("--small-steps", type=int, default=5, help="measured steps of small")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
        return

    start = time.perf_counter()
    header = (
        "| preset | setting | threads | idle (ms) | +1 (ms) | +2 (ms) | +1 / idle | +2 / idle "
        "| idle / default idle | +1 / default idle | +2 / default idle |"
    )
    lines = [header, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    raw: list[str] = []  # every round's median, for the spread
    for name in args.presets:
        small = name == "small"
        steps, warmup = (args.small_steps, 2) if small else (args.steps, args.warmup)
        settings = args.small_settings if small else args.settings
        runs: dict[str, list[list[tuple[float, int]]]] = {s: [[], [], []] for s in settings}
        for r in range(args.repeats):  # a round through every setting, so drift hits all
            for setting in settings:
                for c in (0, 1, 2):
                    got = measure(name, setting, c, steps, warmup, args.settle, args.cap)
                    runs[setting][c].append(got)
                    print(f"{name} {setting} +{c} round {r}: {1000 * got[0]:.0f} ms, "
                          f"{got[1]} threads", flush=True)  # fmt: skip
        med = {s: [statistics.median(t for t, _ in runs[s][c]) for c in (0, 1, 2)] for s in runs}
        base = med["default"][0] if "default" in med else med[settings[0]][0]
        for setting in settings:
            t = med[setting]
            threads = "/".join(
                "-".join(sorted({str(n) for _, n in runs[setting][c]})) for c in (0, 1, 2)
            )
            line = (
                f"| {name} | {setting} | {threads} | {1000 * t[0]:.0f} | {1000 * t[1]:.0f} | "
                f"{1000 * t[2]:.0f} | {t[1] / t[0]:.2f}x | {t[2] / t[0]:.2f}x | "
                f"{t[0] / base:.2f}x | {t[1] / base:.2f}x | {t[2] / base:.2f}x |"
            )
            lines.append(line)
            print(line, flush=True)
            for c in (0, 1, 2):
                ms = " / ".join(f"{1000 * t:.0f}" for t, _ in runs[setting][c])
                raw.append(f"- {name} {setting} {('idle', '+1', '+2')[c]}: {ms} ms")
    table = "\n".join(lines)

    import torch

    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores ({cpu_name()}), "
        f"affinity {len(os.sched_getaffinity(0))} CPUs, torch {torch.__version__} "
        f"(OpenMP: libgomp), {datetime.date.today().isoformat()}"
    )
    settings = "; ".join(
        f"`{k}`: "
        + (
            " ".join(f"{a}={b}" for a, b in v.items())
            or ("nothing set", "configure_threads()")[k == "moeblocks"]
        )
        for k, v in SETTINGS.items()
    )
    command = (
        f"python benchmarks/bench_contention.py --presets {' '.join(args.presets)} "
        f"--settings {' '.join(args.settings)} --steps {args.steps} --warmup {args.warmup} "
        f"--settle {args.settle:g} --cap {args.cap:g} --repeats {args.repeats} "
        f"--small-settings {' '.join(args.small_settings)} --small-steps {args.small_steps}"
    )
    text = (
        "# Training step time under CPU contention\n\n"
        f"Machine: {machine}.\n\n"
        f"Settings (environment before torch loads): {settings}. Each competitor is a "
        "training process of the same preset and setting. One step = forward, CE + aux "
        f"losses, backward, clip, AdamW at k = k_final. A measurement is the median of "
        f"{args.steps} steps (at most {args.cap:g} s of them, at least 3) after "
        f"{args.warmup} warm-up steps and at least {args.settle:g} s (`small`: "
        f"{args.small_steps} steps, at batch {SMALL_BATCH}); the table gives the median of "
        f"{args.repeats} rounds, each round measuring every setting once in fresh "
        "processes (every round's value is listed below the table). `moeblocks` calls "
        "`configure_threads()` at start and `ThreadTuner.step()` after every step, as "
        "`moeblocks train` sets its threads (the commands' allocator setting, "
        "`configure_malloc()`, is left out here: `bench_malloc.py` measures it). "
        "Competitors start first, each picks its threads from the "
        "load it finds and looks again every few seconds. "
        "`threads`: the intra-op threads each measured process ended with, idle / +1 / +2. "
        "The first ratios compare each setting with itself idle; the last three with "
        "`default` idle.\n\n"
        f"Command: `{command}` ({time.perf_counter() - start:.0f} s)\n\n{table}\n\n"
        "Every round (ms):\n\n" + "\n".join(raw) + "\n"
    )
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
