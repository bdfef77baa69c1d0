"""Training throughput of the SRA transformer: cosine-routed MoE against a dense model.

Question: what does routing cost per training step of the reference model? For each
preset (``tiny``, ``small``) one full training step (forward, cross-entropy + aux
losses, backward, grad clipping, AdamW) is timed for

- ``moe k=K``: the preset's cosine-routed MoE at k = ``k_final`` (end of the curriculum)
  and at k = ``k_start`` (its beginning);
- ``dense``: the same transformer whose FFN is one SwiGLU of width ``k_final · d_expert``,
  so its active parameters per token equal the MoE's at ``k_final``.

Steps of all variants are interleaved round by round in one process, so a load change
on a shared machine hits them alike; times are medians. Tokens are random ids (the
tokeniser and data pipeline are not what is measured). Goal: MoE step time within 1.3×
of dense on CPU.

Usage: python benchmarks/bench_train.py [--presets tiny small] [--rounds 5] [--warmup 2]
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

RESULTS = Path(__file__).resolve().parent / "results"


def bench_preset(name: str, rounds: int, warmup: int) -> list[dict[str, object]]:
    """Median step time of every variant of one preset, interleaved."""
    cfg = preset(name)
    variants = {
        f"moe k={cfg.k_final}": make_step(cfg, cfg.k_final),
        f"moe k={cfg.k_start}": make_step(cfg, cfg.k_start),
        "dense": make_step(cfg.replace(ffn="dense"), None),
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(warmup + rounds):
        for v, step in variants.items():
            t0 = time.perf_counter()
            step()
            if r >= warmup:
                times[v].append(time.perf_counter() - t0)
    tokens = cfg.batch_size * cfg.seq_len
    dense = statistics.median(times["dense"])
    rows = []
    for v, ts in times.items():
        med = statistics.median(ts)
        rows.append({"preset": name, "variant": v, "ms": 1000 * med, "tok_s": tokens / med,
                     "ratio": med / dense, "tokens": tokens})  # fmt: skip
    return rows


def main() -> None:
    """Run the benchmark, print the table and write it to benchmarks/results/."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--out", default=str(RESULTS / "train_cpu.md"))
    args = parser.parse_args()

    rows = [row for name in args.presets for row in bench_preset(name, args.rounds, args.warmup)]
    header = "| preset | variant | tokens/step | step (ms) | tokens/s | step time / dense |"
    lines = [header, "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['variant']} | {r['tokens']} | {r['ms']:.0f} | "
            f"{r['tok_s']:.0f} | {r['ratio']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)

    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores ({cpu_name()}), "
        f"{torch.get_num_threads()} intra-op threads, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f} at the end (the machine is shared), "
        f"{datetime.date.today().isoformat()}"
    )
    configs = "; ".join(
        f"{p}: d {c.d_model}, {c.n_layers} layers, {c.num_experts} experts × d_ff {c.d_expert}, "
        f"dense FFN width {c.dense_width}, batch {c.batch_size}×{c.seq_len}, vocab {c.vocab_size}"
        for p, c in ((p, preset(p)) for p in args.presets)
    )
    text = (
        "# SRA training throughput on CPU: cosine-routed MoE vs dense\n\n"
        f"Machine: {machine}.\n\n"
        f"Configs: {configs}. One step = forward, CE + aux losses, backward, clip, AdamW; "
        f"median of {args.rounds} interleaved rounds after {args.warmup} warm-up rounds; "
        "random token ids. `dense` has the active parameters of `moe k=k_final`.\n\n"
        f"Command: `python benchmarks/bench_train.py --presets {' '.join(args.presets)} "
        f"--rounds {args.rounds} --warmup {args.warmup}`\n\n{table}\n"
    )
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
