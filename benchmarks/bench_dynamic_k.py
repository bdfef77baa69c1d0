"""How much compute does dynamic k save by not dispatching its empty slots?

A dynamic-k selection (``TopP``, ``ExpertChoice``) returns a record ``k_max`` wide whose
``slots`` mark the real slots. ``MoELayer`` dispatches and computes only those. The
baseline is the same layer and the same decisions with every slot dispatched (the
record's ``slots`` dropped: empty slots then run through their expert with weight 0),
which is what a fixed-width router padded with zero weights costs. Both run forward +
backward, interleaved in one process; the table gives median times and their ratio.

Usage: python benchmarks/bench_dynamic_k.py [--tokens 2048 --dim 256 --hidden 512
--experts 16 --k 2 --k-max 8 --repeats 9 --sharpness 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import time
from pathlib import Path

import torch
from _machine import cpu_name

import moeblocks as mb

RESULTS = Path(__file__).resolve().parent / "results"


class AllSlots(torch.nn.Module):
    """A router that returns its inner router's decisions with every slot marked real."""

    def __init__(self, router: mb.Router) -> None:
        super().__init__()
        self.router = router

    @property
    def dim(self) -> int:
        """Token dimension D."""
        return self.router.dim

    @property
    def num_experts(self) -> int:
        """Number of experts E."""
        return self.router.num_experts

    def forward(self, tokens: torch.Tensor, k: int | None = None) -> mb.Routing:
        """The inner routing, ``slots`` dropped (empty slots keep their weight 0)."""
        return dataclasses.replace(self.router(tokens, k), slots=None)


def layers(selection: object, args: argparse.Namespace) -> tuple[mb.MoELayer, mb.MoELayer]:
    """The dynamic layer and its every-slot twin, sharing one router and one bank."""
    torch.manual_seed(0)
    D, E = args.dim, args.experts
    router = mb.Router(mb.LinearScorer(D, E), k=args.k, selection=selection)
    with torch.no_grad():
        # A random router is close to uniform, where top-p takes nearly every expert;
        # trained routers are peaked. --sharpness scales the logits to get there.
        router.scorer.weight_ED.mul_(args.sharpness)
    bank = mb.SwiGLUExperts(E, D, args.hidden)
    losses = {"lb": mb.LoadBalanceLoss()}
    dynamic = mb.MoELayer(router, mb.TorchDispatcher(), bank, losses)
    padded = mb.MoELayer(AllSlots(router), mb.TorchDispatcher(), bank, losses)
    return dynamic, padded


def step_time(layer: mb.MoELayer, x: torch.Tensor) -> float:
    """Seconds of one forward + backward."""
    start = time.perf_counter()
    res = layer(x)
    (res.out.square().mean() + res.total_aux_loss()).backward()
    return time.perf_counter() - start


def measure(name: str, selection: object, args: argparse.Namespace) -> dict[str, object]:
    """Median times of the dynamic layer and its every-slot twin, interleaved."""
    dynamic, padded = layers(selection, args)
    x = torch.randn(args.tokens, args.dim)
    with torch.no_grad():
        r = dynamic.router(x)
        torch.testing.assert_close(dynamic(x).out, padded(x).out, rtol=1e-5, atol=1e-6)
    times: dict[str, list[float]] = {"dynamic": [], "padded": []}
    step_time(dynamic, x), step_time(padded, x)  # warm-up
    for _ in range(args.repeats):
        times["dynamic"].append(step_time(dynamic, x))
        times["padded"].append(step_time(padded, x))
    t_dyn, t_pad = (statistics.median(times[key]) for key in ("dynamic", "padded"))
    return {
        "selection": name,
        "width K": r.top_k,
        "mean k": float(r.k_per_token.float().mean()),
        "real slots": float(r.slots.float().mean()),
        "dynamic ms": 1e3 * t_dyn,
        "all slots ms": 1e3 * t_pad,
        "time ratio": t_dyn / t_pad,
    }


def main() -> None:
    """Measure, print the table and write it to benchmarks/results/dynamic_k_cpu.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--k", type=int, default=2, help="ExpertChoice's mean k")
    parser.add_argument("--k-max", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--sharpness", type=float, default=8.0, help="router logit scale")
    args = parser.parse_args()
    selections = {
        "TopP(p=0.5)": mb.TopP(0.5, 1, args.k_max),
        "TopP(p=0.8)": mb.TopP(0.8, 1, args.k_max),
        f"ExpertChoice(k={args.k})": mb.ExpertChoice(1.0, args.k_max),
    }
    rows = [measure(name, sel, args) for name, sel in selections.items()]
    head = list(rows[0])
    lines = [
        "# Dynamic k: real slots only against every slot dispatched",
        "",
        f"Measured {datetime.date.today()} on {cpu_name()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}, float32, forward + backward, median of "
        f"{args.repeats}: T={args.tokens}, D={args.dim}, F={args.hidden}, "
        f"E={args.experts}, k_max={args.k_max}, router logits x{args.sharpness}. "
        "`real slots` = fraction of the K·T slots that are real; `time ratio` = "
        "dynamic / all slots (below 1: time saved).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dynamic_k_cpu.md").write_text(text)


if __name__ == "__main__":
    main()
