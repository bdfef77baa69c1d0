"""Experiments on the reference SRA model: the class knock-out and the routing ablation.

Legend: B batch, S sequence length, T tokens, E experts, C word classes, K experts per
token, L MoE layers.

Both train SRA models, so they live on the SRA side; :mod:`moeblocks.inspect` only reads
the trained models' routing records.

- :func:`class_knockout` trains a tiny one-layer SRA model (k = 1) on the synthetic
  language of :mod:`moeblocks.sra.data` with one token per word, finds for every word
  class the expert that receives most of its tokens (its *owner*), knocks that expert
  out (:func:`~moeblocks.inspect.knockout`: its tokens are rerouted) and measures the
  next-token loss on positions whose input word is of that class and on all others.
- :func:`routing_ablation` is the SRA paper's comparison (``moeblocks experiment
  routing-ablation``): cosine vs linear router, bandpass balance on vs off, and a dense
  FFN of equal active parameters, over several seeds; every cell is a mean with its
  95 % confidence interval (Student's t over seeds).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from moeblocks.inspect.collect import collect_routing, sra_forward
from moeblocks.inspect.interventions import knockout
from moeblocks.inspect.metrics import (
    class_counts,
    purity,
    router_saturation,
    subtoken_coherence,
    summarise_layer,
)
from moeblocks.runtime.errors import UsageError
from moeblocks.runtime.progress import start_progress
from moeblocks.sra.config import SRAConfig, preset
from moeblocks.sra.data import WORD_CLASSES, batch_at, synthetic_text
from moeblocks.sra.model import SRATransformer

__all__ = [
    "ABLATION_VARIANTS",
    "METRICS",
    "AblationRun",
    "CellSummary",
    "ClassKnockout",
    "class_knockout",
    "confidence_interval",
    "format_ablation",
    "format_cell",
    "format_class_knockout",
    "load_ablation",
    "load_validation",
    "plot_ablation_runs",
    "routing_ablation",
    "summarise_ablation",
    "word_level_corpus",
    "write_ablation",
]


def word_level_corpus(num_sentences: int, seed: int) -> tuple[Tensor, Tensor, list[str]]:
    """The synthetic language as one token per word.

    Returns:
        Token ids ``[N]``, the class index of every token ``[N]``, and the class names.
    """
    words = sorted(WORD_CLASSES)
    classes = sorted(set(WORD_CLASSES.values()))
    vocab = {w: i for i, w in enumerate(words)}
    cls_of = torch.tensor([classes.index(WORD_CLASSES[w]) for w in words])
    ids = torch.tensor([vocab[w] for w in synthetic_text(num_sentences, seed).split()])
    return ids, cls_of[ids], classes


@dataclass(frozen=True)
class ClassKnockout:
    """Loss change when each class's owner expert is knocked out.

    Attributes:
        classes: Class names.
        owner: Per class, the expert receiving most of its tokens (top-1).
        owner_share: Per class, the fraction of its tokens that go to the owner.
        base_loss: Per class, mean next-token loss (nats) at positions whose input word
            has that class, without intervention.
        delta_own: Per class, the increase of that loss when its owner is knocked out.
        delta_other: Per class, the increase of the loss at all *other* positions.
        purity: Overall class purity of the experts (top-1), in [0, 1].
    """

    classes: list[str]
    owner: list[int]
    owner_share: list[float]
    base_loss: list[float]
    delta_own: list[float]
    delta_other: list[float]
    purity: float


def _position_losses(model: torch.nn.Module, x_BS: Tensor, y_BS: Tensor) -> Tensor:
    logits = model(x_BS).logits
    return F.cross_entropy(logits.flatten(0, 1), y_BS.flatten(), reduction="none")


def class_knockout(
    steps: int = 150, num_experts: int = 8, seed: int = 0, threads: int | None = 1
) -> ClassKnockout:
    """Train the tiny model and knock out each class's owner expert.

    Args:
        steps: AdamW steps of batch 32 × 32 tokens.
        num_experts: E.
        seed: Seed of the init and the batch order.
        threads: ``torch.set_num_threads`` for the call (None: leave as is); one thread
            is fastest for this tiny model on a shared CPU.
    """
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        train_ids, _, classes = word_level_corpus(3000, seed=11)
        val_ids, val_cls, _ = word_level_corpus(300, seed=12)
        cfg = SRAConfig(
            vocab_size=257, seq_len=32, d_model=32, n_layers=1, n_heads=2,
            num_experts=num_experts, d_expert=32, k_start=1, k_final=1, balance="cv",
            balance_weight=0.05, steps=steps,
        )  # fmt: skip
        model = SRATransformer(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        for step in range(steps):
            x_BS, y_BS = batch_at(train_ids, step, 32, cfg.seq_len, seed)
            out = model(x_BS)
            loss = F.cross_entropy(out.logits.flatten(0, 1), y_BS.flatten())
            opt.zero_grad(set_to_none=True)
            (loss + out.total_aux_loss()).backward()
            opt.step()
        model.eval()
        S = cfg.seq_len
        W = (len(val_ids) - 1) // S
        x_WS = val_ids[: W * S].view(W, S)
        y_WS = val_ids[1 : W * S + 1].view(W, S)
        cls_T: Int[Tensor, " T"] = val_cls[: W * S]
        with torch.no_grad():
            rs = collect_routing(sra_forward(model), [x_WS])
            counts_EC = class_counts(rs.layers[0], cls_T, len(classes))
            base_T = _position_losses(model, x_WS, y_WS)
            owner, share, base, d_own, d_other = [], [], [], [], []
            layer = model.moe_layers[0]
            for c in range(len(classes)):
                e = int(counts_EC[:, c].argmax())
                with knockout(layer, e):
                    ko_T = _position_losses(model, x_WS, y_WS)
                own = cls_T == c
                owner.append(e)
                share.append((counts_EC[e, c] / counts_EC[:, c].sum()).item())
                base.append(base_T[own].mean().item())
                d_own.append((ko_T[own] - base_T[own]).mean().item())
                d_other.append((ko_T[~own] - base_T[~own]).mean().item())
        return ClassKnockout(classes, owner, share, base, d_own, d_other, purity(counts_EC)[1])
    finally:
        torch.set_num_threads(old_threads)


def format_class_knockout(res: ClassKnockout) -> str:
    """Plain-text table of :func:`class_knockout`'s result."""
    lines = [
        f"class purity of experts (top-1): {res.purity:.3f}",
        "class          owner  share   loss   Δloss own   Δloss others",
    ]
    for i, name in enumerate(res.classes):
        lines.append(
            f"{name:<14} {res.owner[i]:5d}  {res.owner_share[i]:5.2f}  {res.base_loss[i]:5.2f}"
            f"   {res.delta_own[i]:+9.3f}   {res.delta_other[i]:+12.3f}"
        )
    return "\n".join(lines)


# --- the routing ablation -----------------------------------------------------------

# Variant name -> config changes. "dense" keeps k_final · d_expert hidden units, the
# active width of the MoE variants (SRAConfig.dense_width).
ABLATION_VARIANTS: dict[str, dict[str, str]] = {
    "cosine+bandpass": {"ffn": "cosine", "balance": "bandpass"},
    "cosine-nobalance": {"ffn": "cosine", "balance": "none"},
    "linear+bandpass": {"ffn": "linear", "balance": "bandpass"},
    "linear-nobalance": {"ffn": "linear", "balance": "none"},
    "dense": {"ffn": "dense", "balance": "none"},
}

# Metric field -> (column title, format). Higher ppl is worse; the k gain is the
# perplexity at the training k minus the one at k + 1 (positive = a free gain).
METRICS: dict[str, tuple[str, str]] = {
    "ppl": ("val. perplexity", ".2f"),
    "k_gain": ("ppl gain at k+1", "+.2f"),
    "dead_pct": ("dead experts %", ".1f"),
    "saturation": ("saturation", ".3f"),
    "coherence": ("coherence", ".3f"),
}

# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (then ~normal).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


@dataclass(frozen=True)
class AblationRun:
    """Measurements of one trained variant at one seed.

    Attributes:
        variant: A key of :data:`ABLATION_VARIANTS`.
        seed: Run seed.
        ppl: Validation perplexity at the training k (``k_final``).
        k_gain: ``ppl`` minus the perplexity at ``k_final + 1`` (NaN for dense).
        dead_pct: Experts that received no validation token, % of all (NaN for dense).
        saturation: Mean top-1 router probability over layers (NaN for dense).
        coherence: Subtoken top-1 agreement over layers, in [0, 1] (NaN for dense).
        coherence_baseline: Its shuffled baseline.
        seconds: Training wall time.
    """

    variant: str
    seed: int
    ppl: float
    k_gain: float
    dead_pct: float
    saturation: float
    coherence: float
    coherence_baseline: float
    seconds: float


@dataclass(frozen=True)
class CellSummary:
    """One table cell: a metric of a variant over seeds.

    Attributes:
        mean: Mean over the seeds (NaN when no seed has a value).
        half_width: Half-width of the 95 % confidence interval (t over n - 1 degrees of
            freedom); NaN for n < 2.
        n: Seeds with a finite value.
    """

    mean: float
    half_width: float
    n: int


def confidence_interval(values: Sequence[float]) -> CellSummary:
    """Mean and 95 % t-interval half-width of the finite ``values``."""
    xs = [v for v in values if math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return CellSummary(math.nan, math.nan, 0)
    mean = sum(xs) / n
    if n < 2:
        return CellSummary(mean, math.nan, n)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.960
    return CellSummary(mean, t * sd / math.sqrt(n), n)


def summarise_ablation(
    runs: Sequence[Any], metrics: Mapping[str, Any] = METRICS, key: str = "variant"
) -> dict[str, dict[str, CellSummary]]:
    """Variant -> metric -> :class:`CellSummary`, variants in first-seen order.

    Args:
        runs: Measured runs (:class:`AblationRun`, or any record with the ``key`` and
            ``metrics`` attributes, e.g. the routing zoo's runs).
        metrics: The metric attributes to summarise (their order is kept).
        key: The attribute naming a row (``"variant"``; the zoo's ``"family"``).
    """
    variants = list(dict.fromkeys(getattr(r, key) for r in runs))
    return {
        v: {
            m: confidence_interval([getattr(r, m) for r in runs if getattr(r, key) == v])
            for m in metrics
        }
        for v in variants
    }


def format_cell(c: CellSummary, fmt: str) -> str:
    """A table cell: ``mean ± half-width`` in ``fmt``, the mean alone for n = 1, – for n = 0."""
    if c.n == 0:
        return "–"
    if math.isnan(c.half_width):
        return format(c.mean, fmt)
    return f"{format(c.mean, fmt)} ± {format(c.half_width, fmt.lstrip('+'))}"


def format_ablation(
    runs: Sequence[Any], metrics: Mapping[str, tuple[str, str]] = METRICS, key: str = "variant"
) -> str:
    """Markdown table: one row per variant, mean ± 95 % interval per metric, seeds n.

    ``metrics`` maps an attribute to its ``(column title, format)``; ``key`` names the
    attribute of a row (see :func:`summarise_ablation`).
    """
    summary = summarise_ablation(runs, metrics, key)
    head = [key, *(title for title, _ in metrics.values()), "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, cells in summary.items():
        n = max(c.n for c in cells.values())
        row = [variant, *(format_cell(cells[m], fmt) for m, (_, fmt) in metrics.items()), str(n)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def load_validation(run: Path, data: str) -> tuple[SRATransformer, Any, Any, Tensor]:
    """A trained run's model, tokeniser, checkpoint and validation tokens ``[N]``."""
    from moeblocks.sra.evaluate import load_run, run_corpus
    from moeblocks.sra.tokencache import encode_split

    model, tok, ckpt = load_run(run, data=data)
    tokens = torch.from_numpy(encode_split(tok, run_corpus(ckpt), "valid")).long()
    return model, tok, ckpt, tokens


@torch.no_grad()
def _measure(run: Path, max_tokens: int, data: str) -> dict[str, float]:
    from moeblocks.inspect.report import word_ids_from_pieces
    from moeblocks.sra.data import eval_windows
    from moeblocks.sra.evaluate import evaluate

    model, tok, ckpt, tokens = load_validation(run, data)
    cfg = ckpt.config
    ppl = evaluate(model, tokens, cfg.batch_size, max_tokens, k=cfg.k_final).ppl
    nan = math.nan
    if not model.moe_layers:
        return {"ppl": ppl, "k_gain": nan, "dead_pct": nan, "saturation": nan,
                "coherence": nan, "coherence_baseline": nan}  # fmt: skip
    k_up = min(cfg.k_final + 1, cfg.num_experts)
    ppl_up = evaluate(model, tokens, cfg.batch_size, max_tokens, k=k_up).ppl
    model.eval()
    x_WS, _ = eval_windows(tokens, cfg.seq_len, max_tokens)
    rs = collect_routing(sra_forward(model, k=cfg.k_final), x_WS.split(cfg.batch_size))
    words = word_ids_from_pieces([tok.id_to_token(i) or "" for i in rs.token_ids.tolist()])
    dead = sum(len(summarise_layer(r).dead) for r in rs.layers)
    coh = [subtoken_coherence(r, words) for r in rs.layers]
    L = len(rs.layers)
    return {
        "ppl": ppl,
        "k_gain": ppl - ppl_up,
        "dead_pct": 100 * dead / (L * cfg.num_experts),
        "saturation": sum(router_saturation(r) for r in rs.layers) / L,
        "coherence": sum(c.top1_agreement for c in coh) / L,
        "coherence_baseline": sum(c.baseline_top1 for c in coh) / L,
    }


def routing_ablation(
    out: Path,
    base: SRAConfig | str = "tiny",
    seeds: Sequence[int] = (0, 1, 2),
    data: str = "pydoc",
    variants: Sequence[str] | None = None,
    max_tokens: int = 16384,
    device: str = "cpu",
    progress: bool = True,
    command: str = "",
) -> list[AblationRun]:
    """Train and measure every variant at every seed; runs go to ``out/<variant>-s<seed>``.

    Args:
        out: Folder for the runs and the results.
        base: The config (or preset name) every variant starts from.
        seeds: Run seeds (at least 2 for an interval; the paper's comparison used 3).
        data: Corpus spec.
        variants: Keys of :data:`ABLATION_VARIANTS` (default: all).
        max_tokens: Validation tokens per measurement.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        progress: A progress bar over the runs (on stderr).
        command: The command line, recorded with the results.

    Writes ``ablation.md`` (the table, with the command), ``ablation.csv`` and
    ``ablation.json`` (one entry per run) and the chart ``ablation.png`` (matplotlib).

    Raises:
        UsageError: For an unknown variant or an empty seed list.
    """
    from moeblocks.sra.train import train

    cfg0 = preset(base) if isinstance(base, str) else base
    names = list(ABLATION_VARIANTS) if variants is None else list(variants)
    unknown = [v for v in names if v not in ABLATION_VARIANTS]
    if unknown:
        raise UsageError(f"unknown variants {unknown}; expected some of {list(ABLATION_VARIANTS)}")
    if not seeds:
        raise UsageError("routing_ablation needs at least one seed")
    out = Path(out)
    plan = [(v, s) for s in seeds for v in names]
    runs: list[AblationRun] = []
    bar = start_progress(len(plan), "routing ablation", progress, unit="run")
    for variant, seed in plan:
        bar.set_postfix_str(f"{variant}, seed {seed}")
        cfg = cfg0.replace(**ABLATION_VARIANTS[variant], seed=seed)
        run = out / f"{variant.replace('+', '-')}-s{seed}"
        start = time.perf_counter()
        train(cfg, data, run, device=device, progress=False, overwrite=True)
        seconds = time.perf_counter() - start
        runs.append(AblationRun(variant, seed, **_measure(run, max_tokens, data), seconds=seconds))
        bar.update()
    bar.close()
    write_ablation(out, runs, cfg0, data, command)
    return runs


def write_ablation(
    out: Path, runs: Sequence[AblationRun], base: SRAConfig, data: str, command: str
) -> None:
    """Write the table (markdown), the runs (CSV, JSON) and the chart of an ablation."""
    import platform

    from moeblocks.runtime.durable import atomic_write_text

    seconds = sum(r.seconds for r in runs)
    config = json.dumps(base.to_dict(), sort_keys=True, indent=1)
    text = (
        "# Routing ablation\n\n"
        f"Command: `{command or 'moeblocks experiment routing-ablation'}`\n\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}. Data: {data}. {len(runs)} runs, "
        f"{seconds / 60:.1f} min of training.\n\n"
        f"{format_ablation(runs)}\n\n"
        "Each cell: mean ± half-width of the 95 % t-interval over seeds. Perplexity at the "
        "training k; the k+1 gain is that perplexity minus the one at k+1 (positive: running "
        "more experts at inference helps); dead experts received no validation token; "
        "saturation is the mean top-1 router probability; coherence the top-1 agreement "
        "of adjacent pieces of one word.\n\n"
        "Base config (each variant changes only `ffn` and `balance`, see "
        "`moeblocks.sra.experiments.ABLATION_VARIANTS`):\n\n"
        f"```json\n{config}\n```\n"
    )
    atomic_write_text(out / "ablation.md", text)
    fields = list(AblationRun.__dataclass_fields__)
    csv = [",".join(fields)]
    csv += [",".join(str(getattr(r, f)) for f in fields) for r in runs]
    atomic_write_text(out / "ablation.csv", "\n".join(csv) + "\n")
    blob = {"command": command, "data": data, "base": base.to_dict(),
            "runs": [asdict(r) for r in runs]}  # fmt: skip
    atomic_write_text(out / "ablation.json", json.dumps(blob, indent=1, allow_nan=True) + "\n")
    plot_ablation_runs(runs, out / "ablation.png")


def plot_ablation_runs(runs: Sequence[AblationRun], path: Path) -> Path:
    """Chart of an ablation: per metric, each variant's mean and 95 % interval."""
    from moeblocks.inspect.plots import plot_ablation

    rows = [{"name": v, **cells} for v, cells in summarise_ablation(runs).items()]
    titles = {m: title for m, (title, _) in METRICS.items()}
    return plot_ablation(rows, path, list(METRICS), titles)


def load_ablation(path: Path) -> tuple[list[AblationRun], SRAConfig, str, str]:
    """Read back an ``ablation.json``: the runs, base config, data spec and command."""
    blob = json.loads(Path(path).read_text(encoding="utf-8"))
    runs = [AblationRun(**r) for r in blob["runs"]]
    return runs, SRAConfig.from_dict(blob["base"]), blob["data"], blob["command"]
