"""Training step time of the SRA decoder with each family's routing (``SRAConfig.ffn``).

Question: at equal experts, top-k and active parameters, what does each family's
routing cost per training step, relative to SRA's cosine routing? For one preset
(default ``tiny``) one full training step (forward, cross-entropy + aux losses,
backward, grad clipping, AdamW, the bias balancers' update) is timed for every ffn of
``ROUTING_ZOO`` and the dense FFN of equal active size. SRA's cosine router runs at
``k_final`` (the end of its curriculum); a family at its own fixed k.

Steps of all variants are interleaved round by round in one process, so a load change
on a shared machine hits them alike; times are medians. Tokens are random ids.

Usage: python benchmarks/bench_routing_presets.py [--preset tiny] [--rounds 5] [--warmup 2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from _machine import cpu_name
from _sra_step import make_step

from moeblocks.sra.config import preset
from moeblocks.sra.routing_presets import ROUTING_ZOO, widths

RESULTS = Path(__file__).resolve().parent / "results"


def bench(name: str, rounds: int, warmup: int) -> list[dict[str, object]]:
    """Median step time of every ffn at preset ``name``, interleaved, against cosine."""
    cfg = preset(name)
    steps = {
        ffn: make_step(cfg.replace(ffn=ffn), cfg.k_final if ffn == "cosine" else None)
        for ffn in (*ROUTING_ZOO, "dense")
    }
    times: dict[str, list[float]] = {v: [] for v in steps}
    for r in range(warmup + rounds):
        for v, step in steps.items():
            t0 = time.perf_counter()
            step()
            if r >= warmup:
                times[v].append(time.perf_counter() - t0)
    tokens = cfg.batch_size * cfg.seq_len
    base = statistics.median(times["cosine"])
    rows = []
    for v, ts in times.items():
        med = statistics.median(ts)
        shape = "dense" if v == "dense" else str(widths(cfg.replace(ffn=v)))
        rows.append({"ffn": v, "shape": shape, "ms": 1000 * med, "tok_s": tokens / med,
                     "ratio": med / base})  # fmt: skip
    return rows


def main() -> None:
    """Run the benchmark, print the table and write it to benchmarks/results/."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--out", default=str(RESULTS / "routing_presets_cpu.md"))
    args = parser.parse_args()

    rows = bench(args.preset, args.rounds, args.warmup)
    lines = ["| ffn | routed k, widths | step (ms) | tokens/s | step time / cosine |"]
    lines.append("|---|---|---:|---:|---:|")
    for r in rows:
        lines.append(
            f"| {r['ffn']} | {r['shape']} | {r['ms']:.0f} | {r['tok_s']:.0f} | {r['ratio']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    cfg = preset(args.preset)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores ({cpu_name()}), "
        f"{torch.get_num_threads()} intra-op threads, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f} at the end (the machine is shared), "
        f"{datetime.date.today().isoformat()}"
    )
    text = (
        "# SRA training step time on CPU with each family's routing\n\n"
        f"Machine: {machine}.\n\n"
        f"Config: `{args.preset}` (d {cfg.d_model}, {cfg.n_layers} layers, "
        f"{cfg.num_experts} experts, K {cfg.k_final}, F {cfg.d_expert}, {cfg.expert} experts, "
        f"batch {cfg.batch_size}×{cfg.seq_len}). One step = forward, CE + aux losses, "
        "backward, clip, AdamW, bias balancers; median of "
        f"{args.rounds} interleaved rounds after {args.warmup} warm-up rounds; random "
        "token ids. Every ffn has the active parameters of `cosine` at k_final "
        "(docs/sra.md, Routing presets).\n\n"
        f"Command: `python benchmarks/bench_routing_presets.py --preset {args.preset} "
        f"--rounds {args.rounds} --warmup {args.warmup}`\n\n{table}\n"
    )
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
