"""What the kernels' machine code for H100 and A100 says, compiled on a machine without a GPU.

Legend: T tokens, E experts, K experts per token, N = T·K slots, R grouped rows, D dim.

Compiles every kernel at T=16384, D=4096, K=4, E=64 in bf16 (with fp32 routing weights)
for sm_90a and sm_80 through :mod:`moeblocks.kernels._static` (each kernel's own
launch-time binder, every tile its autotuner may pick), and writes one row per kernel
and target: the bytes one call must move, the copy-bound time at 3.35 TB/s (H100 SXM
HBM3), registers, spills, theoretical occupancy and the widest global access. The
"traffic ratio" is the bytes the compiled tiles move (the row indices and weights are
re-read once per column piece) over the least bytes; 1.00 means the kernel is bound by
the same DRAM traffic as a copy of its rows. Measured times are gpu_check.sh's job.

Usage::

    python benchmarks/kernels_static.py       # writes benchmarks/results/kernels_static.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

from _machine import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
T, D, K, E = 16384, 4096, 4, 64
N = T * K
ROW = 2  # bf16 bytes
INDEX = 8  # int64 row_of_slot / slot_of_row
WEIGHT = 4  # fp32 routing weights and weight gradients
PEAK = 3.35e12  # H100 SXM HBM3, bytes per second
ARCHS = {90: "sm_90a (H100)", 80: "sm_80 (A100)"}


def least_bytes() -> dict[str, tuple[int, str]]:
    """Bytes one call must read + write, per kernel, with the formula shown in the table."""
    rows = T * D * ROW
    grouped = N * D * ROW
    return {
        "index._count": (N * INDEX + 64 * (E + 1) * 4, "ids + block counts"),
        "index._scan": (2 * 128 * (E + 1) * 8, "block counts in, starts out"),
        "index._place": (N * INDEX * 3, "ids in, both index maps out"),
        "permute": (rows + grouped + N * INDEX, "x once, N rows out, row_of_slot"),
        "unpermute": (grouped + rows + N * (INDEX + WEIGHT), "N rows in, x out, index, w"),
        "unpermute_backward": (
            rows + 2 * grouped + N * (INDEX + 2 * WEIGHT),
            "g once, y in, grad_y out, index, w, grad_w",
        ),
        "slot_dot": (rows + grouped + N * (INDEX + WEIGHT), "a once, b rows in, dots out"),
    }


def pieces(kernel: str, variant: str) -> int:
    """Column pieces per row of the compiled tile (each re-reads the index and weights)."""
    if "x" not in variant or kernel.startswith("index"):
        return 1
    cols = int(variant.split("x")[1].split("/")[0])
    return -(-D // cols)


def compile_stats() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    shape = f"{T},{D},{K},{E}"
    command = [sys.executable, "-m", "moeblocks.kernels._static", "--shape", shape]
    out = subprocess.run(
        [*command, "--dtypes", "bf16"], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def render(stats: list[dict]) -> list[str]:
    least = least_bytes()
    lines = [
        "| kernel | target | tiles | bytes / call (least) | copy-bound µs at 3.35 TB/s "
        "| traffic ratio | registers | spills (B) | occupancy | widest ld / st (bits) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for kernel, (nbytes, formula) in least.items():
        for arch, target in ARCHS.items():
            mine = [s for s in stats if s["kernel"] == kernel and s["arch"] == arch]
            if not mine:
                continue
            # Weighted where the op takes weights in the layer (unpermute); plain permute.
            pick = [s for s in mine if s["variant"].endswith("weights")] or mine
            if kernel == "permute":
                pick = [s for s in mine if s["variant"].endswith("plain")] or mine
            extra = max(pieces(kernel, s["variant"]) for s in pick) - 1
            index_bytes = N * (INDEX + WEIGHT) if kernel != "permute" else N * INDEX
            ratio = (nbytes + extra * index_bytes) / nbytes
            regs = sorted({s["registers"] for s in pick})
            lines.append(
                f"| {kernel} | {target} | {len(pick)} | {nbytes / 1e6:.1f} MB ({formula}) "
                f"| {nbytes / PEAK * 1e6:.1f} | {ratio:.3f} | {regs[0]}–{regs[-1]} "
                f"| {max(s['spill_bytes'] for s in pick)} "
                f"| {min(s['occupancy'] for s in pick):.0%} "
                f"| {min(s['load_bits'] for s in pick)} / {min(s['store_bits'] for s in pick)} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "kernels_static.md")
    args = parser.parse_args()
    import triton

    stats = compile_stats()
    page = [
        "# Kernels' machine code for H100 and A100, compiled without a GPU",
        "",
        f"Machine: {cpu_name()} (no GPU; Triton compiles for the targets ahead of time). "
        f"Date: {datetime.date.today()}. triton {triton.__version__}.",
        "Command: `python benchmarks/kernels_static.py`",
        "",
        f"T={T}, D={D}, K={K}, E={E}; bf16 rows, fp32 routing weights, int64 index, "
        "pad_to=1. One row per kernel and target over the tiles its autotuner may pick "
        "(permute without weights, as the dispatcher calls it; unpermute with weights): "
        "registers per thread (range), spills = stack + local bytes per thread, "
        "occupancy = resident warps / 64 (the lowest), widest global load / store. "
        "Traffic ratio = bytes the tile moves (index and weights re-read per column "
        "piece) / the least bytes. Times are estimates, not measurements.",
        "",
        *render(stats),
        "",
    ]
    text = "\n".join(page)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
