"""How close do the Triton index / permute / unpermute kernels come to a plain copy?

Legend: T tokens, E experts, K experts per token, N = T·K slots, R grouped rows, D dim.

For each (T, D, E, K) and for ``TritonDispatcher`` and ``TorchDispatcher`` the script
times six steps, bf16 activations and fp32 weights, ``pad_to=1``:

- ``index``: the index build alone (``build_index`` / ``build_layout``);
- ``index_graph``: the same replayed from a CUDA graph (GPU only; possible only because
  the Triton build never syncs the host; "-" where capture fails);
- ``permute``: the grouped copy alone, given the index;
- ``permute_bwd``: the gradient of the tokens (sum of the K grouped rows per token);
- ``unpermute_fwd``: the weighted combine;
- ``unpermute_bwd``: the gradients of the expert outputs and of the weights.

Each step's time is set against a ``copy_`` of the same number of bytes (the least the
step must read plus write, counted in :func:`bytes_per_step`), measured in the same run:
"time / copy" is the goal's measure (the issue asks ≤ 1.1 for permute and unpermute at
T=16384, D=4096, E=64, K=4). GPU times come from CUDA events around 10 back-to-back
calls (so Python launch overhead counts when it exceeds the device time); the median of
the repetitions is reported.

On a machine without CUDA it runs a tiny grid through Triton's interpreter to check the
script end to end; those numbers are interpreter timings, not performance.

Usage::

    python benchmarks/bench_permute.py                      # full grid on a GPU
    python benchmarks/bench_permute.py --max-seconds 150    # as much of it as fits
    python benchmarks/bench_permute.py --quick              # tiny grid (CPU or GPU)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Must precede the first import of the kernels: Triton reads it when decorating.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_name

from moeblocks.dispatch import TorchDispatcher, _Permute, build_layout
from moeblocks.routing import Routing
from moeblocks.triton_dispatch import TritonDispatcher

RESULTS = Path(__file__).resolve().parent / "results"
INTERPRETER_LABEL = "interpreter, not performance numbers"
TARGET = (16384, 4096, 64, 4)  # the issue's target shape (T, D, E, K)

# The issue's grid, the target shape first, then the rest from small to large, so that a
# time budget (--max-seconds) still covers the target and a spread of sizes.
_REST = sorted(
    (
        (T, D, E, K)
        for T in (4096, 16384, 65536)
        for D in (2048, 4096, 7168)
        for E in (8, 64, 256)
        for K in (2, 4, 8)
        if (T, D, E, K) != TARGET
    ),
    key=lambda p: (p[0] * p[3] * p[1], p[2]),
)
FULL_GRID = [TARGET, *_REST]
QUICK_GPU_GRID = [TARGET, (4096, 2048, 8, 2), (65536, 7168, 256, 8)]
QUICK_CPU_GRID = [(64, 96, 8, 1), (64, 96, 8, 2), (128, 200, 64, 8)]
STEPS = ["index", "index_graph", "permute", "permute_bwd", "unpermute_fwd", "unpermute_bwd"]
INNER = 10  # calls per timed repetition on a GPU


@dataclass(frozen=True)
class Row:
    """One timed step of one backend at one grid point."""

    step: str
    backend: str
    T: int
    D: int
    E: int
    K: int
    median_us: float
    bytes_moved: int
    gb_per_s: float
    copy_us: float
    time_over_copy: float
    torch_over_this: float


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median seconds per call of ``fn``."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(INNER):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / INNER)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def graphed(fn: Callable[[], object]) -> Callable[[], object] | None:
    """``fn`` captured in a CUDA graph, or None where capture fails (a host sync)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except RuntimeError:
        torch.cuda.synchronize()
        return None


class CopyTimer:
    """Median time of ``dst.copy_(src)`` moving a given number of bytes (read + write)."""

    def __init__(self, device: torch.device, warmup: int, reps: int) -> None:
        self.device, self.warmup, self.reps = device, warmup, reps
        self.cache: dict[int, float] = {}

    def __call__(self, moved: int) -> float:
        if moved not in self.cache:
            src = torch.empty(max(moved // 2, 1), dtype=torch.uint8, device=self.device)
            dst = torch.empty_like(src)
            self.cache[moved] = time_calls(
                lambda: dst.copy_(src), self.device, self.warmup, self.reps
            )
            del src, dst
        return self.cache[moved]


def _routing(T: int, E: int, K: int, device: torch.device) -> Routing:
    gen = torch.Generator(device=device).manual_seed(0)
    scores_TE = torch.randn(T, E, device=device, generator=gen)
    probs_TE = scores_TE.softmax(-1)
    top_TK, experts_TK = probs_TE.topk(K, dim=-1)
    return Routing(scores_TE, probs_TE, experts_TK, top_TK / top_TK.sum(-1, keepdim=True))


def bytes_per_step(T: int, D: int, K: int, R: int, item: int) -> dict[str, int]:
    """The least each step must move: every tensor it touches read or written once.

    ``item`` is the element size of the activations; indices are int64, weights fp32.
    """
    N = T * K
    index = 8 * N + 8 * N + 8 * R  # read the ids, write row_of_slot and slot_of_row
    return {
        "index": index,
        "index_graph": index,
        "permute": 8 * N + T * D * item + R * D * item,  # row_of_slot, x once, grouped
        "permute_bwd": 8 * N + N * D * item + T * D * item,  # K rows per token summed
        "unpermute_fwd": 8 * N + 4 * N + N * D * item + T * D * item,
        # read grad_out once, y and the weights; write grad_y and grad_w
        "unpermute_bwd": 8 * N + T * D * item + N * D * item + 4 * N + R * D * item + 4 * N,
    }


def _steps(backend: str, E: int, x: torch.Tensor, routing: Routing) -> tuple[dict, int]:
    """The timed steps of one backend, as closures over prepared inputs, and R."""
    K = routing.top_k
    if backend == "triton":
        from moeblocks import kernels

        dispatcher = TritonDispatcher()
        build = kernels.build_index

        def gather(layout):
            return kernels.permute(x, layout.row_of_slot, layout.slot_of_row, K)
    else:
        dispatcher = TorchDispatcher()
        build = build_layout

        def gather(layout):
            return _Permute.apply(x, layout.slot_of_row, layout.row_of_slot, K)

    grouped, layout = dispatcher.permute(x, routing)
    y = grouped.detach().requires_grad_()
    w = routing.weights.detach().requires_grad_()
    out = dispatcher.unpermute(y, layout, w)
    g_grouped, g_out = torch.randn_like(grouped), torch.randn_like(out)
    steps = {
        "index": lambda: build(routing.experts, E),
        "permute": lambda: gather(layout),
        "permute_bwd": lambda: torch.autograd.grad(grouped, x, g_grouped, retain_graph=True),
        "unpermute_fwd": lambda: dispatcher.unpermute(y, layout, w),
        "unpermute_bwd": lambda: torch.autograd.grad(out, (y, w), g_out, retain_graph=True),
    }
    if x.device.type == "cuda":
        steps["index_graph"] = graphed(steps["index"])
    return steps, grouped.shape[0]


def bench_point(
    point: tuple[int, int, int, int], device: torch.device, warmup: int, reps: int
) -> tuple[dict[tuple[str, str], float | None], int]:
    """Median seconds per (step, backend) at one grid point (None: not possible), and R."""
    T, D, E, K = point
    routing = _routing(T, E, K, device)
    x = torch.randn(T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    seconds: dict[tuple[str, str], float | None] = {}
    R = T * K
    for backend in ("triton", "torch"):
        steps, R = _steps(backend, E, x, routing)
        for step in STEPS:
            if step not in steps:
                continue
            fn = steps[step]
            seconds[(step, backend)] = None if fn is None else time_calls(fn, device, warmup, reps)
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return seconds, R


def run(
    grid: list, device: torch.device, warmup: int, reps: int, max_seconds: float | None
) -> tuple[list[Row], list[str]]:
    """Time the grid; stop starting new points once ``max_seconds`` have passed."""
    copy = CopyTimer(device, warmup, reps)
    rows, notes = [], []
    began = time.perf_counter()
    for i, (T, D, E, K) in enumerate(grid):
        if max_seconds is not None and time.perf_counter() - began > max_seconds:
            notes.append(
                f"time budget of {max_seconds:.0f} s spent: {len(grid) - i} grid points not run"
            )
            break
        try:
            seconds, R = bench_point((T, D, E, K), device, warmup, reps)
        except torch.cuda.OutOfMemoryError:
            notes.append(f"T={T} D={D} E={E} K={K}: out of device memory, skipped")
            torch.cuda.empty_cache()
            continue
        moved = bytes_per_step(T, D, K, R, item=2)
        for step in STEPS:
            for backend in ("triton", "torch"):
                if (step, backend) not in seconds:
                    continue
                sec = seconds[(step, backend)]
                torch_sec = seconds.get((step, "torch"))
                copy_sec = copy(moved[step])
                nan = float("nan")
                rows.append(
                    Row(
                        step=step,
                        backend=backend,
                        T=T,
                        D=D,
                        E=E,
                        K=K,
                        median_us=nan if sec is None else sec * 1e6,
                        bytes_moved=moved[step],
                        gb_per_s=nan if sec is None else moved[step] / sec / 1e9,
                        copy_us=copy_sec * 1e6,
                        time_over_copy=nan if sec is None else sec / copy_sec,
                        torch_over_this=nan
                        if sec is None or torch_sec is None
                        else torch_sec / sec,
                    )
                )
        print(f"  done T={T} D={D} E={E} K={K}", flush=True)
    return rows, notes


def _cell(value: float, fmt: str) -> str:
    return "-" if value != value else format(value, fmt)  # NaN: not measured


def render(rows: list[Row], meta: list[str], label: str, notes: list[str]) -> str:
    """The markdown page: what was measured where, the table, and the notes."""
    head = [f"# Permute / unpermute kernels against copy_ and the torch reference ({label})", ""]
    head += [*meta, ""]
    if label == INTERPRETER_LABEL:
        head += [
            "**These time Triton's CPU interpreter (a Python loop per program) against "
            "PyTorch on the CPU: they check that the benchmark runs end to end and say "
            "nothing about GPU performance.**",
            "",
        ]
    head += [
        "| step | backend | T | D | E | K | median µs | GB/s | copy µs (same bytes) "
        "| time / copy | torch time / this |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    body = [
        f"| {r.step} | {r.backend} | {r.T} | {r.D} | {r.E} | {r.K} | "
        f"{_cell(r.median_us, '.1f')} | {_cell(r.gb_per_s, '.1f')} | {r.copy_us:.1f} | "
        f"{_cell(r.time_over_copy, '.2f')} | {_cell(r.torch_over_this, '.2f')} |"
        for r in rows
    ]
    tail = [""] + [f"- {n}" for n in notes] if notes else []
    return "\n".join(head + body + tail) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny grid, for a smoke run")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per step")
    parser.add_argument(
        "--max-seconds", type=float, default=None, help="start no new grid point after this"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for CSV + markdown")
    args = parser.parse_args()

    import triton

    if torch.cuda.is_available():
        device = torch.device("cuda")
        device_name = torch.cuda.get_device_name()
        grid = QUICK_GPU_GRID if args.quick else FULL_GRID
        label, stem = "GPU", "permute_cuda" + ("_quick" if args.quick else "")
        warmup, reps = 2, args.reps or 10
    else:
        device = torch.device("cpu")
        device_name = f"{cpu_name()} through the Triton interpreter (TRITON_INTERPRET=1)"
        if not args.quick:
            parser.error("no CUDA device: only --quick runs, through the Triton interpreter")
        grid, label, stem = QUICK_CPU_GRID, INTERPRETER_LABEL, "permute_cpu_interpreter"
        warmup, reps = 1, args.reps or 3

    command = "python benchmarks/bench_permute.py " + " ".join(sys.argv[1:])
    meta = [
        f"Device: {device_name}. Date: {datetime.date.today()}. torch {torch.__version__}, "
        f"triton {triton.__version__}.",
        f"Command: `{command.strip()}`",
        "",
        "bf16 activations, fp32 weights, pad_to=1. Median of the repetitions"
        + (f" (each {INNER} back-to-back calls between CUDA events)" if label == "GPU" else "")
        + ". GB/s = the least bytes the step must read + write / time; copy µs = a "
        "`copy_` of that many bytes in the same run; time / copy ≤ 1.1 is the goal for "
        "permute and unpermute. `index_graph` is the index build replayed from a CUDA graph.",
    ]
    print(f"{device_name}: {len(grid)} grid points ({label})")
    rows, notes = run(grid, device, warmup, reps, args.max_seconds)
    page = render(rows, meta, label, notes)
    print(page)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(page)
    with open(args.out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*Row.__dataclass_fields__, "label", "device"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**asdict(r), "label": label, "device": device_name})
    print(f"wrote {args.out / stem}.md and .csv")


if __name__ == "__main__":
    main()
