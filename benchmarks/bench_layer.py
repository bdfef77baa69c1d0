"""Forward+backward time and peak memory of MoELayer against a dense SwiGLU of equal FLOPs.

Questions: what does routing cost on top of the expert matmuls, what does each
DeepSeek-V3 feature add to a plain MoE layer, and how does the layer compare with
Hugging Face's own Mixtral block?

Variant sets (``--sets``, all by default):

- ``base``: the plain MoE layer ``moe`` (linear router, softmax top-k, SwiGLU bank,
  TorchDispatcher, no aux losses); ``dense``, one dim→hidden SwiGLU on the same T·K rows,
  so it does the same expert FLOPs; ``moe-loop``, the plain layer with the per-expert
  loop backend.
- ``features``: the plain layer plus one DeepSeek-V3 feature each: ``moe-sigmoid``
  (sigmoid scoring), ``moe-group-limited`` (group-limited top-k, ``--groups`` groups of
  which ``--groups-per-token`` per token, with a selection-only BiasBalancer stepped after
  every backward), ``moe-shared`` (one always-on SwiGLU expert of hidden F),
  ``moe-seq-loss`` (SequenceBalanceLoss added to the backward), and ``deepseek-v3`` with
  all of them plus routed scaling 2.5.
- ``hf``: ``transformers``' ``MixtralSparseMoeBlock`` at the same sizes with random
  weights, under its ``"grouped_mm"`` and ``"eager"`` experts implementations (skipped
  when transformers is not importable). Its weights are copied from ``moe``, whose output
  it must reproduce; one traced step checks which expert kernel really runs.

The plain ``moe`` layer always runs: every variant is reported as a ratio to it (and to
``dense`` when that runs). Times are medians over repeats, interleaved in one process.
Peak memory is the rise of the process's peak RSS (``VmHWM``, reset after the build)
during one forward+backward, measured in a fresh subprocess per variant after a warm-up
step at 64 tokens (CPU has no allocator counter like CUDA's).

On a GPU (``--device cuda --dtype bfloat16``) the ``base`` set adds ``moe-triton``, the
plain layer on ``TritonDispatcher``; times are taken between device synchronisations
and the memory column is the rise of ``torch.cuda.max_memory_allocated`` in one step
(in process, after the warm-up). The issue's goal: ``moe-triton`` / ``dense`` ≤ 1.15.

Usage: python benchmarks/bench_layer.py [--tokens 4096 --dim 512 --hidden 256
--experts 64 --k 4 --repeats 15 --sets base features hf --device cpu --dtype float32]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import moeblocks as mb

RESULTS = Path(__file__).resolve().parent / "results"

SETS = {
    "base": ["dense", "moe", "moe-triton", "moe-loop"],
    "features": [
        "moe-sigmoid",
        "moe-group-limited",
        "moe-shared",
        "moe-seq-loss",
        "deepseek-v3",
    ],
    "hf": ["hf-mixtral-grouped_mm", "hf-mixtral-eager"],
}
# The HF experts implementation of each HF variant, and the aten op that proves it ran
# (transformers' loop fallback for grouped_mm is a custom op, so its absence is checked).
HF_IMPL = {"hf-mixtral-grouped_mm": "grouped_mm", "hf-mixtral-eager": "eager"}
HF_PROOF = {"grouped_mm": "aten._grouped_mm", "eager": "aten.index_add_"}
HF_FALLBACK = "transformers.grouped_mm_fallback"


def have_transformers() -> bool:
    """Whether the ``hf`` set can run."""
    return importlib.util.find_spec("transformers") is not None


def moe_layer(
    args: argparse.Namespace,
    *,
    backend: str = "auto",
    scoring: str = "softmax",
    group_limited: bool = False,
    shared: bool = False,
    seq_loss: bool = False,
    weights: mb.WeightPolicy | None = None,
    dispatcher: str = "torch",
) -> mb.MoELayer:
    """The plain layer, with the DeepSeek-V3 features that are switched on."""
    D, H, E, K = args.dim, args.hidden, args.experts, args.k
    selection, balancer = None, None
    if group_limited:
        G = args.groups
        # DeepSeek-V3 scores a group by its best 2 experts; tiny smoke sizes have fewer.
        selection = mb.GroupLimitedTopK(G, args.groups_per_token, min(2, E // G))
        balancer = mb.BiasBalancer(E, rate=1e-3)
    router = mb.Router(
        mb.LinearScorer(D, E),
        schedule=K,
        scoring=scoring,
        selection=selection,
        weights=weights,
        balancer=balancer,
    )
    return mb.MoELayer(
        router,
        mb.make_dispatcher(dispatcher),
        mb.SwiGLUExperts(E, D, H, backend=backend),
        losses={"seq": mb.SequenceBalanceLoss(1e-4)} if seq_loss else None,
        shared=mb.SharedExperts(mb.SwiGLUExperts(1, D, H)) if shared else None,
    )


def moe_variant(variant: str, args: argparse.Namespace) -> mb.MoELayer:
    """The MoELayer of one ``moe*`` or ``deepseek-v3`` variant."""
    if variant == "deepseek-v3":
        return moe_layer(
            args,
            scoring="sigmoid",
            group_limited=True,
            shared=True,
            seq_loss=True,
            weights=mb.WeightPolicy("always", scale=2.5, eps=1e-20),
        )
    options: dict[str, dict] = {
        "moe": {},
        "moe-loop": {"backend": "loop"},
        "moe-triton": {"dispatcher": "triton"},
        "moe-sigmoid": {"scoring": "sigmoid"},
        "moe-group-limited": {"group_limited": True},
        "moe-shared": {"shared": True},
        "moe-seq-loss": {"seq_loss": True},
    }
    return moe_layer(args, **options[variant])


def hf_block(impl: str, args: argparse.Namespace) -> torch.nn.Module:
    """HF's MixtralSparseMoeBlock with the weights of ``moe``, checked to match its output."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=args.dim,
        intermediate_size=args.hidden,
        num_local_experts=args.experts,
        num_experts_per_tok=args.k,
        experts_implementation=impl,
    )
    block = MixtralSparseMoeBlock(config)
    torch.manual_seed(0)
    # Mixtral renormalises its top-k weights even for k = 1 (the plain layer does not).
    ours = moe_layer(args, weights=mb.WeightPolicy("always"))
    with torch.no_grad():  # HF stores every weight as [out, in]
        block.gate.weight.copy_(ours.router.gate_weight)
        block.experts.gate_up_proj.copy_(ours.experts.w_in_EDF2.transpose(1, 2))
        block.experts.down_proj.copy_(ours.experts.w_out_EFD.transpose(1, 2))
        x = torch.randn(2, 8, args.dim)
        # Same float32 math in another summation order (grouped vs per-expert matmuls).
        torch.testing.assert_close(block(x), ours(x).out, rtol=1e-4, atol=1e-5)
    return block


class OpRecorder(TorchDispatchMode):
    """Records the name of every op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def check_hf_impl(variant: str, step: Callable[[], None]) -> str:
    """Run one step under an op recorder; fail unless the requested HF kernel ran."""
    impl = HF_IMPL[variant]
    with OpRecorder() as rec:
        step()
    ran = {op for op in rec.ops if op in (*HF_PROOF.values(), HF_FALLBACK)}
    if HF_PROOF[impl] not in ran or HF_FALLBACK in ran or (impl == "eager" and len(ran) > 1):
        raise RuntimeError(f"{variant}: expected {HF_PROOF[impl]} only, the step ran {sorted(ran)}")
    return f"`{variant}`: experts_implementation={impl!r} ran {', '.join(sorted(ran))}"


def build(variant: str, args: argparse.Namespace) -> Callable[[], None]:
    """Return the step function of one variant; the step runs forward+backward."""
    torch.manual_seed(0)
    T, D, H, K = args.tokens, args.dim, args.hidden, args.k
    like = {"device": getattr(args, "device", "cpu"), "dtype": getattr(torch, args.dtype)}
    if variant == "dense":
        w_in = (torch.randn(D, 2 * H) / D**0.5).to(**like).requires_grad_()
        w_out = (torch.randn(H, D) / H**0.5).to(**like).requires_grad_()
        x = torch.randn(T * K, D, **like, requires_grad=True)

        def step() -> None:
            for t in (w_in, w_out, x):  # as optimizer.zero_grad(set_to_none=True) does
                t.grad = None
            gate, up = (x @ w_in).chunk(2, dim=-1)
            ((F.silu(gate) * up) @ w_out).sum().backward()

        return step
    if variant in HF_IMPL:
        block = hf_block(HF_IMPL[variant], args).to(**like)
        x_hf = torch.randn(1, T, D, **like, requires_grad=True)  # [batch, seq, dim]

        def step() -> None:
            block.zero_grad(set_to_none=True)
            x_hf.grad = None
            block(x_hf).sum().backward()

        return step
    layer = moe_variant(variant, args).to(**like)
    x = torch.randn(T, D, **like, requires_grad=True)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        res = layer(x)
        (res.out.sum() + res.total_aux_loss()).backward()
        mb.step_balancers(layer)  # the bias update of layers with a BiasBalancer

    return step


def peak_rss_mib(variant: str, args: argparse.Namespace) -> float:
    """Peak RSS rise (MiB) of one forward+backward, in a fresh interpreter."""
    code = (
        "import sys, json, argparse\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "import bench_layer as b\n"
        f"args = argparse.Namespace(**{json.dumps(vars(args))})\n"
        # A first step at few tokens pays the one-time costs (lazy library set-up) that
        # would otherwise count towards whichever variant measures them.
        f"warm = b.build({variant!r}, argparse.Namespace(**{{**vars(args), 'tokens': 64}}))\n"
        "warm()\n"
        "del warm\n"
        f"step = b.build({variant!r}, args)\n"
        "b.reset_peak_rss()\n"
        "before = b.current_rss_kib()\n"
        "step()\n"
        "print((b.peak_rss_kib() - before) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def cuda_peak_mib(step: Callable[[], None]) -> float:
    """Rise of the CUDA allocator's peak during one forward+backward (MiB), in process."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (Linux), or None where there is none."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return None


def current_rss_kib() -> int:
    """Current resident set size in KiB (Linux)."""
    rss = _status_kib("VmRSS")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if rss is None else rss


def peak_rss_kib() -> int:
    """This process's peak resident set size in KiB.

    ``VmHWM`` belongs to the process's own address space. ``ru_maxrss`` is no use here:
    Linux carries it over from the parent through fork and exec, so a subprocess
    started by a large benchmark process reports the parent's size as its own peak.
    """
    hwm = _status_kib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if hwm is None else hwm


def reset_peak_rss() -> None:
    """Lower the peak RSS to the current RSS (Linux >= 4.0), so a later peak is the step's."""
    # Where there is no reset, the peak may include the build.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def select_variants(sets: list[str], device: str = "cpu") -> tuple[list[str], list[str]]:
    """The variants to run, in table order, and notes on what was left out."""
    notes = []
    if device != "cuda" and "base" in sets:
        notes.append("moe-triton runs on a GPU only (Triton compiles for CUDA).")
    if "hf" in sets and not have_transformers():
        sets = [s for s in sets if s != "hf"]
        notes.append("transformers is not importable: the hf set was skipped.")
    chosen = {v for s in sets for v in SETS[s]} | {"moe"}
    if device != "cuda":
        chosen.discard("moe-triton")
    order = [v for s in SETS.values() for v in s]
    return [v for v in order if v in chosen], notes


def render(
    variants: list[str],
    median: dict[str, float],
    memory: dict[str, float] | None,
    memory_label: str = "peak RSS rise (MiB)",
) -> tuple[str, str | None]:
    """The main table and, when HF variants ran, the moeblocks-vs-HF table.

    Ratio columns to ``dense`` appear only when it ran, memory columns only when measured.
    """
    columns: list[tuple[str, Callable[[str], str]]] = [
        ("median fwd+bwd (ms)", lambda v: f"{median[v]:.1f}"),
        ("time / moe", lambda v: f"{median[v] / median['moe']:.2f}"),
    ]
    if "dense" in median:
        columns.append(("time / dense", lambda v: f"{median[v] / median['dense']:.2f}"))
    if memory is not None:
        columns += [
            (memory_label, lambda v: f"{memory[v]:.0f}"),
            ("memory / moe", lambda v: f"{memory[v] / memory['moe']:.2f}"),
        ]
        if "dense" in memory:
            columns.append(("memory / dense", lambda v: f"{memory[v] / memory['dense']:.2f}"))
    lines = [
        "| variant | " + " | ".join(name for name, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    lines += ["| " + " | ".join([v, *(cell(v) for _, cell in columns)]) + " |" for v in variants]
    hf = [v for v in variants if v in HF_IMPL]
    if not hf:
        return "\n".join(lines), None
    hf_lines = [
        "| Hugging Face contender | its median fwd+bwd (ms) | moeblocks `moe` (ms) "
        "| moeblocks time / HF time |",
        "|---|---|---|---|",
    ]
    hf_lines += [
        f"| {v} | {median[v]:.1f} | {median['moe']:.1f} | {median['moe'] / median[v]:.2f} |"
        for v in hf
    ]
    return "\n".join(lines), "\n".join(hf_lines)


def main() -> None:
    """Run the benchmark, print the tables and write them to benchmarks/results/."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--groups", type=int, default=8, help="expert groups of moe-group-limited")
    p.add_argument("--groups-per-token", type=int, default=4)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument(
        "--sets", nargs="+", choices=list(SETS), default=list(SETS), help="variant sets to run"
    )
    p.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure peak RSS (one subprocess per variant)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--out", type=Path, default=None, help="default: results/layer_<device>.md")
    args = p.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    out = args.out or RESULTS / f"layer_{args.device}.md"
    variants, notes = select_variants(args.sets, args.device)
    cli_args = argparse.Namespace(
        **{k: v for k, v in vars(args).items() if k not in ("out", "sets", "memory")}
    )
    steps = {v: build(v, cli_args) for v in variants}
    checks = [check_hf_impl(v, steps[v]) for v in variants if v in HF_IMPL]
    for step in steps.values():  # warm-up (on a GPU: also Triton's autotuning)
        step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:  # interleaved so that drift hits every variant alike
            sync()
            t0 = time.perf_counter()
            steps[v]()
            sync()
            times[v].append(time.perf_counter() - t0)
    memory = None
    if args.memory:
        memory = {
            v: cuda_peak_mib(steps[v]) if cuda else peak_rss_mib(v, cli_args) for v in variants
        }
    median = {v: statistics.median(ts) * 1e3 for v, ts in times.items()}
    label = "peak CUDA memory rise (MiB)" if cuda else "peak RSS rise (MiB)"
    table, hf_table = render(variants, median, memory, label)
    versions = f"torch {torch.__version__}"
    if any(v in HF_IMPL for v in variants):
        import transformers

        versions += f", transformers {transformers.__version__}"
    command = (
        f"python benchmarks/bench_layer.py --tokens {args.tokens} --dim {args.dim} "
        f"--hidden {args.hidden} --experts {args.experts} --k {args.k} --groups {args.groups} "
        f"--groups-per-token {args.groups_per_token} --repeats {args.repeats} "
        f"--sets {' '.join(args.sets)} --device {args.device} --dtype {args.dtype}"
    )
    where = (
        f"{torch.cuda.get_device_name()} (CUDA)"
        if cuda
        else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    )
    meta = (
        f"Measured {datetime.date.today()} on {where}, {versions}, {args.dtype}, "
        f"{args.device.upper()}.\n"
        f"tokens={args.tokens} dim={args.dim} hidden={args.hidden} experts={args.experts} "
        f"k={args.k}, groups={args.groups} (groups per token {args.groups_per_token}), "
        f"{args.repeats} repeats.\n"
        f"Command: `{command}`"
    )
    legend = (
        "`moe-*` rows add one DeepSeek-V3 feature each to the plain `moe` layer; "
        "`deepseek-v3` combines sigmoid scoring, group-limited top-k with a selection-only "
        "bias (stepped after each backward), one shared SwiGLU expert of the same hidden size, "
        "the sequence-wise balance loss and routed scaling 2.5."
    )
    body = f"{meta}\n\n{table}\n"
    if any(v in SETS["features"] for v in variants):
        body = f"{meta}\n\n{legend}\n\n{table}\n"
    if hf_table is not None:
        body += (
            "\nHugging Face's `MixtralSparseMoeBlock` with the plain layer's weights (its "
            "output checked equal), per experts implementation:\n\n"
            f"{hf_table}\n"
        )
    if checks or notes:
        body += "\n" + "".join(f"- {line}\n" for line in checks + notes)
    print(table)
    if hf_table is not None:
        print(hf_table)
    print(meta)
    for line in checks + notes:
        print(line)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"MoELayer: routing cost, DeepSeek-V3 features, HF Mixtral ({args.device.upper()})"
    out.write_text(f"# {title}\n\n{body}")


if __name__ == "__main__":
    main()
