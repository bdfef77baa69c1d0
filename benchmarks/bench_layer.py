"""Forward+backward time and peak memory of MoELayer against a dense SwiGLU of equal FLOPs.

Question: what does routing cost on top of the expert matmuls? The MoE layer (linear
router, SwiGLU bank, TorchDispatcher, no aux losses) runs T tokens with top-k; the dense
baseline sends the same T·K rows through one dim→hidden SwiGLU, so both do the same
expert FLOPs. A third row runs the MoE layer with the per-expert loop backend.

Times are medians over repeats, interleaved in one process. Peak memory is the rise of
the process's peak RSS during one forward+backward, measured in a fresh subprocess per
variant (CPU has no allocator counter like CUDA's).

Usage: python benchmarks/bench_layer.py [--tokens 4096 --dim 512 --hidden 256
--experts 64 --k 4 --repeats 15]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import moeblocks as mb

RESULTS = Path(__file__).resolve().parent / "results"


def build(variant: str, args: argparse.Namespace):
    """Return (step function) for one variant; the step runs forward+backward."""
    torch.manual_seed(0)
    T, D, H, E, K = args.tokens, args.dim, args.hidden, args.experts, args.k
    if variant == "dense":
        w_in = (torch.randn(D, 2 * H) / D**0.5).requires_grad_()
        w_out = (torch.randn(H, D) / H**0.5).requires_grad_()
        x = torch.randn(T * K, D, requires_grad=True)

        def step() -> None:
            for t in (w_in, w_out, x):  # as optimizer.zero_grad(set_to_none=True) does
                t.grad = None
            gate, up = (x @ w_in).chunk(2, dim=-1)
            ((F.silu(gate) * up) @ w_out).sum().backward()

        return step
    backend = "loop" if variant == "moe-loop" else "auto"
    layer = mb.MoELayer(
        mb.Router(mb.LinearScorer(D, E), schedule=K),
        mb.TorchDispatcher(),
        mb.SwiGLUExperts(E, D, H, backend=backend),
    )
    x = torch.randn(T, D, requires_grad=True)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).out.sum().backward()

    return step


def peak_rss_mib(variant: str, args: argparse.Namespace) -> float:
    """Peak RSS rise (MiB) of one forward+backward, in a fresh interpreter."""
    code = (
        "import resource, sys, json, argparse\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "import bench_layer as b\n"
        f"args = argparse.Namespace(**{json.dumps(vars(args))})\n"
        f"step = b.build({variant!r}, args)\n"
        "before = b.current_rss_kib()\n"
        "step()\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def current_rss_kib() -> int:
    """Current resident set size in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    """Run the benchmark, print the table and write it to benchmarks/results/."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path, default=RESULTS / "layer_cpu.md")
    args = p.parse_args()
    variants = ["dense", "moe", "moe-loop"]
    steps = {v: build(v, args) for v in variants}
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:  # interleaved so that drift hits every variant alike
            t0 = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - t0)
    cli_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "out"})
    memory = {v: peak_rss_mib(v, cli_args) for v in variants}
    median = {v: statistics.median(ts) * 1e3 for v, ts in times.items()}
    rows = [
        (v, median[v], median[v] / median["dense"], memory[v], memory[v] / memory["dense"])
        for v in variants
    ]
    header = (
        "| variant | median fwd+bwd (ms) | time / dense | peak RSS rise (MiB) | memory / dense |"
    )
    lines = [header, "|---|---|---|---|---|"]
    lines += [f"| {v} | {t:.1f} | {tr:.2f} | {m:.0f} | {mr:.2f} |" for v, t, tr, m, mr in rows]
    meta = (
        f"Measured {datetime.date.today()} on {platform.processor() or platform.machine()} "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}, float32, CPU.\n"
        f"tokens={args.tokens} dim={args.dim} hidden={args.hidden} experts={args.experts} "
        f"k={args.k}, {args.repeats} repeats.\n"
        f"Command: `python benchmarks/bench_layer.py`"
    )
    table = "\n".join(lines)
    print(table)
    print(meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"# MoELayer vs dense SwiGLU (CPU)\n\n{meta}\n\n{table}\n")


if __name__ == "__main__":
    main()
