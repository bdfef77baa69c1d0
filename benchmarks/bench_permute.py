"""How fast are the Triton permute / unpermute kernels against the torch reference?

Legend: T tokens, E experts, K experts per token, N = T·K slots, R grouped rows, D dim.

For each (T, D, E, K) the script times, for ``TritonDispatcher`` and ``TorchDispatcher``:
the index build alone, ``permute`` forward (index build + gather) and backward, and
``unpermute`` forward (weighted combine) and backward (gradients of the expert outputs
and of the weights). It reports the median time, the achieved bandwidth (the bytes each
step must read and write at least, divided by the time) and that bandwidth as a fraction
of a plain ``copy_`` of a large tensor measured in the same run.

On a machine without CUDA it runs a tiny grid through Triton's interpreter to check the
script end to end; those numbers are labelled as interpreter timings, not performance.

Usage::

    python benchmarks/bench_permute.py            # full grid on a GPU
    python benchmarks/bench_permute.py --quick    # tiny grid (CPU interpreter or GPU)
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Must precede the first import of the kernels: Triton reads it when decorating.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moeblocks.dispatch import TorchDispatcher
from moeblocks.routing import Routing
from moeblocks.triton_dispatch import TritonDispatcher

RESULTS = Path(__file__).resolve().parent / "results"
INTERPRETER_LABEL = "interpreter, not performance numbers"

# (T, D, E, K). The full grid: tokens 4k-64k, hidden 1024-7168, experts 8-256, k 1-8.
FULL_GRID = [
    (T, D, E, K)
    for T in (4096, 16384, 65536)
    for D in (1024, 4096, 7168)
    for E, K in ((8, 1), (8, 2), (64, 8), (256, 8))
]
QUICK_GPU_GRID = [(4096, 1024, 8, 2), (4096, 4096, 64, 8), (16384, 7168, 256, 8)]
QUICK_CPU_GRID = [(64, 96, 8, 1), (64, 96, 8, 2), (128, 200, 64, 8)]


@dataclass(frozen=True)
class Row:
    """One timed step of one backend at one grid point."""

    step: str
    backend: str
    T: int
    D: int
    E: int
    K: int
    median_ms: float
    bytes_moved: int
    gb_per_s: float
    frac_copy_bw: float
    speedup_vs_torch: float


def _timer(device: torch.device) -> Callable[[Callable[[], object], int, int], list[float]]:
    """A function that runs ``fn`` ``warmup + reps`` times and returns the reps' seconds."""

    def on_cuda(fn: Callable[[], object], warmup: int, reps: int) -> list[float]:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return times

    def on_cpu(fn: Callable[[], object], warmup: int, reps: int) -> list[float]:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times

    return on_cuda if device.type == "cuda" else on_cpu


def copy_bandwidth(device: torch.device, timer, warmup: int, reps: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write) on a large tensor."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 24)  # 512 MiB / 32 MiB of bf16
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = statistics.median(timer(lambda: dst.copy_(src), warmup, reps))
    return 2 * src.numel() * src.element_size() / seconds


def _routing(T: int, E: int, K: int, device: torch.device) -> Routing:
    gen = torch.Generator(device=device).manual_seed(0)
    scores_TE = torch.randn(T, E, device=device, generator=gen)
    probs_TE = scores_TE.softmax(-1)
    top_TK, experts_TK = probs_TE.topk(K, dim=-1)
    return Routing(scores_TE, probs_TE, experts_TK, top_TK / top_TK.sum(-1, keepdim=True))


def bytes_per_step(T: int, D: int, K: int, R: int, item: int) -> dict[str, int]:
    """The least each step must move: every tensor it touches read or written once.

    ``item`` is the element size of the activations; indices are int64, weights fp32.
    A token row gathered K times counts once, as a cache would serve the repeats.
    """
    N = T * K
    index = 8 * N + 8 * N + 8 * R  # read expert ids, write row_of_slot and slot_of_row
    return {
        "index": index,
        "permute_fwd": index + T * D * item + R * D * item,
        "permute_bwd": 8 * N + N * D * item + T * D * item,  # sum K rows per token
        "unpermute_fwd": 8 * N + 4 * N + N * D * item + T * D * item,
        # read grad_out, y, weights and both indices; write grad_y and grad_w
        "unpermute_bwd": T * D * item + N * D * item + 4 * N + 8 * (N + R) + R * D * item + 4 * N,
    }


def _steps(backend: str, E: int, x: torch.Tensor, routing: Routing) -> tuple[dict, int]:
    """The five timed steps of one backend, as closures over prepared inputs, and R."""
    if backend == "triton":
        from moeblocks import kernels

        dispatcher, build = TritonDispatcher(), kernels.build_index
    else:
        from moeblocks.dispatch import build_layout

        dispatcher, build = TorchDispatcher(), build_layout
    grouped, layout = dispatcher.permute(x, routing)
    y = grouped.detach().requires_grad_()
    w = routing.weights.detach().requires_grad_()
    out = dispatcher.unpermute(y, layout, w)
    g_grouped, g_out = torch.randn_like(grouped), torch.randn_like(out)
    steps = {
        "index": lambda: build(routing.experts, E),
        "permute_fwd": lambda: dispatcher.permute(x, routing),
        "permute_bwd": lambda: torch.autograd.grad(grouped, x, g_grouped, retain_graph=True),
        "unpermute_fwd": lambda: dispatcher.unpermute(y, layout, w),
        "unpermute_bwd": lambda: torch.autograd.grad(out, (y, w), g_out, retain_graph=True),
    }
    return steps, grouped.shape[0]


def bench_point(
    T: int, D: int, E: int, K: int, device: torch.device, timer, warmup: int, reps: int
):
    """Median seconds per (step, backend) at one grid point, and R."""
    routing = _routing(T, E, K, device)
    x = torch.randn(T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    seconds: dict[tuple[str, str], float] = {}
    for backend in ("triton", "torch"):
        steps, R = _steps(backend, E, x, routing)
        for step, fn in steps.items():
            seconds[(step, backend)] = statistics.median(timer(fn, warmup, reps))
    return seconds, R


def run(grid, device: torch.device, warmup: int, reps: int) -> tuple[list[Row], float]:
    timer = _timer(device)
    copy_bw = copy_bandwidth(device, timer, warmup, reps)
    rows = []
    for T, D, E, K in grid:
        seconds, R = bench_point(T, D, E, K, device, timer, warmup, reps)
        moved = bytes_per_step(T, D, K, R, item=2)
        for (step, backend), sec in sorted(
            seconds.items(), key=lambda kv: list(moved).index(kv[0][0])
        ):
            bw = moved[step] / sec
            rows.append(
                Row(
                    step=step,
                    backend=backend,
                    T=T,
                    D=D,
                    E=E,
                    K=K,
                    median_ms=sec * 1e3,
                    bytes_moved=moved[step],
                    gb_per_s=bw / 1e9,
                    frac_copy_bw=bw / copy_bw,
                    speedup_vs_torch=seconds[(step, "torch")] / sec,
                )
            )
        print(f"  done T={T} D={D} E={E} K={K}", flush=True)
    return rows, copy_bw


def render(rows: list[Row], copy_bw: float, device_name: str, label: str) -> str:
    head = [
        f"# Permute / unpermute: Triton vs torch reference ({label})",
        "",
        f"Device: {device_name}. bf16 activations, fp32 weights, pad_to=1. Median of the "
        "timed repetitions. Bandwidth = least bytes read + written / time; "
        f"copy bandwidth measured in the same run: {copy_bw / 1e9:.2f} GB/s. "
        "Speedup = torch time / this backend's time.",
        "",
    ]
    if label == INTERPRETER_LABEL:
        head += [
            "**These time Triton's CPU interpreter (a Python loop per program) against "
            "PyTorch on the CPU: they check that the benchmark runs end to end and say "
            "nothing about GPU performance.**",
            "",
        ]
    head += [
        "| step | backend | T | D | E | K | median ms | GB/s | of copy BW | speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    body = [
        f"| {r.step} | {r.backend} | {r.T} | {r.D} | {r.E} | {r.K} | {r.median_ms:.3f} | "
        f"{r.gb_per_s:.3f} | {r.frac_copy_bw:.1%} | {r.speedup_vs_torch:.2f}x |"
        for r in rows
    ]
    return "\n".join(head + body) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny grid, for a smoke run")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per step")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for CSV + markdown")
    args = parser.parse_args()

    if torch.cuda.is_available():
        device = torch.device("cuda")
        device_name = torch.cuda.get_device_name()
        grid = QUICK_GPU_GRID if args.quick else FULL_GRID
        label, stem = "GPU", "permute_cuda" + ("_quick" if args.quick else "")
        warmup, reps = 3, args.reps or 20
    else:
        device = torch.device("cpu")
        device_name = "CPU through the Triton interpreter (TRITON_INTERPRET=1)"
        if not args.quick:
            parser.error("no CUDA device: only --quick runs, through the Triton interpreter")
        grid, label, stem = QUICK_CPU_GRID, INTERPRETER_LABEL, "permute_cpu_interpreter"
        warmup, reps = 1, args.reps or 3

    print(f"{device_name}: {len(grid)} grid points ({label})")
    rows, copy_bw = run(grid, device, warmup, reps)
    table = render(rows, copy_bw, device_name, label)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(table)
    with open(args.out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*Row.__dataclass_fields__, "label"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**asdict(r), "label": label})
    print(f"wrote {args.out / stem}.md and .csv")


if __name__ == "__main__":
    main()
