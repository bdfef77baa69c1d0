"""Expert-parallel MoE layer on CPU with gloo: where does the time go for 1, 2, 4 ranks?

Legend: P ranks, T tokens per rank, D model dim, F expert hidden dim, E experts, K top-k.

Weak scaling: every rank routes T tokens, so each rank's experts see about T·K rows
whatever P is. One forward is split into the dispatcher's stages, each timed on every
rank between barriers (so a stage's time is its own, not a wait for a slower rank):

    route     router scores, softmax, top-k
    permute   local permute (group own slots by global expert) + regroup received rows
    counts    all-to-all of per-expert counts, and reading the splits on the host
    exchange  the two all-to-alls of token rows (there and back)
    experts   the local expert bank (E / P experts)
    combine   ungroup, then weight and sum the K copies per token

``fwd`` and ``fwd+bwd`` time the whole expert-parallel layer call without barriers;
``plain`` is the same P processes each running the plain MoELayer (TorchDispatcher, all
E experts, no communication) on its T tokens, interleaved with the expert-parallel calls
so both see the same core contention. The engines of
:func:`~moeblocks.distributed.parallelize` run a forward and backward of the same layer:

    fsdp+ep   EP over the P ranks, FSDP2 over the rest (the router; each rank's expert
              shard is whole, its data-parallel complement being one rank)
    fsdp      FSDP2 alone: every parameter sharded over the P ranks and gathered for
              each forward and backward; every rank runs all E experts on its tokens

The baseline is ``plain fwd`` at P = 1, one
process, measured in the same run. Every number is the fastest of the iterations (the
least disturbed by other work on a shared machine), of the slowest rank, in milliseconds.

    python benchmarks/bench_ep.py                 # P = 1 2 4, writes results/ep_cpu_gloo.md
    python benchmarks/bench_ep.py --ranks 1 2 --tokens 256
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moeblocks as mb
from moeblocks.distributed import (
    AllToAllDispatcher,
    ParallelConfig,
    all_to_all_rows,
    expert_parallelize,
    parallelize,
)

PHASES = ("route", "permute", "counts", "exchange", "experts", "combine")
ENGINES = ("fsdp+ep fwd+bwd", "fsdp fwd+bwd")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Config:
    tokens: int = 1024  # T per rank
    dim: int = 128  # D
    hidden: int = 256  # F
    experts: int = 8  # E
    k: int = 2  # K
    warmup: int = 3
    iters: int = 30


def build_layer(cfg: Config) -> mb.MoELayer:
    torch.manual_seed(0)  # identical full layer on every rank
    router = mb.Router(mb.LinearScorer(cfg.dim, cfg.experts), schedule=cfg.k)
    bank = mb.SwiGLUExperts(cfg.experts, cfg.dim, cfg.hidden)
    return mb.MoELayer(router, mb.TorchDispatcher(), bank)


def staged_forward(layer: mb.MoELayer, x_TD: torch.Tensor) -> dict[str, float]:
    """The layer's forward, stage by stage as AllToAllDispatcher runs it: seconds per stage."""
    times: dict[str, float] = {}
    d = layer.dispatcher
    assert isinstance(d, AllToAllDispatcher)

    def stage(name: str, fn: Callable[[], object]) -> object:
        dist.barrier()
        start = time.perf_counter()
        out = fn()
        times[name] = times.get(name, 0.0) + time.perf_counter() - start
        return out

    routing = stage("route", lambda: layer.router(x_TD))
    send_ND, send_layout = stage("permute", lambda: d.local.permute(x_TD, routing))

    def counts() -> tuple[torch.Tensor, list[list[int]]]:
        recv_PL = d.exchange_counts(send_layout.group_sizes)
        sends = send_layout.group_sizes.view(d.group_size, -1).sum(1)
        return recv_PL, torch.stack([sends, recv_PL.sum(1)]).tolist()

    recv_counts_PL, (send_splits, recv_splits) = stage("counts", counts)
    recv_MD = stage("exchange", lambda: all_to_all_rows(send_ND, recv_splits, send_splits, d.group))
    grouped_MD, layout = stage("permute", lambda: d.group_by_local_expert(recv_MD, recv_counts_PL))
    out_MD = stage("experts", lambda: layer.experts(grouped_MD, layout.group_sizes))
    ungrouped_MD = stage("combine", lambda: out_MD[layout.row_of_slot])
    back_ND = stage(
        "exchange", lambda: all_to_all_rows(ungrouped_MD, send_splits, recv_splits, d.group)
    )
    stage("combine", lambda: d.local.unpermute(back_ND, send_layout, routing.weights))
    return times


def timed(fns: dict[str, Callable[[], object]], cfg: Config) -> dict[str, float]:
    """Fastest seconds of each function; iterations interleave them so they share the noise."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(cfg.warmup + cfg.iters):
        for name, fn in fns.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            if i >= cfg.warmup:
                samples[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in samples.items()}


def rank_main(rank: int, world: int, port: int, cfg: Config, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(cfg.tokens, cfg.dim, generator=gen)
        plain = build_layer(cfg)
        layer = expert_parallelize(build_layer(cfg))
        x_grad = x.clone().requires_grad_(True)
        fsdp_ep = parallelize(build_layer(cfg), ParallelConfig(engine="fsdp", ep_size=world))
        fsdp = parallelize(build_layer(cfg), ParallelConfig(engine="fsdp", ep_size=1))
        stages: list[dict[str, float]] = []
        row = timed(
            {
                "plain fwd": lambda: plain(x),
                "fwd": lambda: layer(x),
                "plain fwd+bwd": lambda: plain(x_grad).out.sum().backward(),
                "fwd+bwd": lambda: layer(x_grad).out.sum().backward(),
                "fsdp+ep fwd+bwd": lambda: fsdp_ep(x_grad).out.sum().backward(),
                "fsdp fwd+bwd": lambda: fsdp(x_grad).out.sum().backward(),
                "staged": lambda: stages.append(staged_forward(layer, x)),
            },
            cfg,
        )
        del row["staged"]
        row |= {p: min(t[p] for t in stages[cfg.warmup :]) for p in PHASES}
        rows: list[dict[str, float] | None] = [None] * world if rank == 0 else []
        dist.gather_object(row, rows if rank == 0 else None, dst=0)
        if rank == 0:
            slowest = {key: max(r[key] for r in rows if r) for key in row}
            Path(out_path).write_text(json.dumps(slowest))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, cfg: Config) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        mp.spawn(rank_main, args=(world, free_port(), cfg, out), nprocs=world)
        return json.loads(Path(out).read_text())


def table(results: dict[int, dict[str, float]]) -> str:
    base = results[1]["plain fwd"]
    keys = (*PHASES, "fwd", "plain fwd", "fwd+bwd", "plain fwd+bwd", *ENGINES)
    head = ["P", *keys, "fwd / plain fwd", "fwd / baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for world, r in sorted(results.items()):
        cells = [str(world), *(f"{1e3 * r[k]:.2f}" for k in keys)]
        ratios = [f"{r['fwd'] / r['plain fwd']:.2f}x", f"{r['fwd'] / base:.2f}x"]
        lines.append("| " + " | ".join([*cells, *ratios]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tokens", type=int, default=Config.tokens, help="T per rank")
    parser.add_argument("--out", type=Path, default=RESULTS / "ep_cpu_gloo.md")
    args = parser.parse_args()
    cfg = Config(tokens=args.tokens)
    ranks = sorted(set(args.ranks) | {1})  # P = 1 carries the baseline
    results = {world: run(world, cfg) for world in ranks}
    load = os.getloadavg()
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
        f"(shared: load average {load[0]:.1f} at the end of the run), torch {torch.__version__}, "
        f"gloo over loopback, {datetime.date.today().isoformat()}"
    )
    text = table(results)
    print(machine)
    print(json.dumps(asdict(cfg)))
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Expert parallelism on CPU (gloo): time per MoE forward, by stage\n\n"
        f"Machine: {machine}. One intra-op thread per rank, so P = 4 oversubscribes the "
        "cores. The machine was shared: other processes ran during the measurement, so "
        "treat differences under ~20 % as noise. No GPU (NCCL) numbers: none were "
        "measured (this machine has no GPU).\n\n"
        f"Config: {json.dumps(asdict(cfg))} (T per rank, weak scaling, float32, "
        "SwiGLU experts, linear router). Milliseconds, fastest iteration of the slowest "
        "rank; stages are timed between barriers; `plain` = the same P processes "
        "each running the single-process layer with all experts, no communication; "
        "`fsdp+ep` and `fsdp` = `parallelize` with FSDP2, with and without expert "
        "parallelism over the P ranks (forward and backward, FSDP2's all-gathers and "
        "reduce-scatters included).\n\n"
        f"{text}\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
