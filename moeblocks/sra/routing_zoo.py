"""The routing zoo: every MoE routing family in one decoder, side by side over seeds.

Legend: T tokens, E experts, L MoE layers, C word classes, W windows, S window length,
n seeds.

:func:`routing_zoo` (``moeblocks experiment routing-zoo``) trains the reference decoder
once per routing family (:func:`zoo_families`: the MoE presets and a dense FFN of equal
active size) at every seed, on the same data in the same batch order, so that only the
routing differs. Each (family, seed) trains in its own run folder
``out/<family>-s<seed>`` with its ``log.jsonl``; a rerun skips the runs that finished
and resumes one that stopped part-way. Every trained run is measured once, into
``zoo-measure.json`` in its folder, and the table is computed from those files and the
logs (:func:`read_zoo_run`), so it can be rebuilt from the folders alone.

Per family, every column is the mean ± half-width of the 95 % Student-t interval over
the seeds (:func:`~moeblocks.sra.experiments.confidence_interval`); per-layer values are
averaged over the L MoE layers:

- *val. perplexity*: ``exp`` of the mean next-token loss on the validation split, at
  the k the run ended training with (``k_final``; 1 for Switch and Llama 4, which
  route top-1). The routing statistics below use the same k.
- *dead experts %*: experts that receive no routed validation slot, % of L·E.
- *max/mean load*: ``E · max_e u_e`` with u the experts' share of routed validation
  slots (1 = perfectly balanced).
- *load CV²*: ``Var_e(c_e) / mean_e(c_e)²`` of the slot counts c (population variance).
- *router entropy*: mean per-token entropy of the router probabilities normalised to
  sum to 1 (sigmoid scores do not sum to 1 by themselves), nats.
- *class purity*: ``Σ_e max_c n_ec / Σ_ec n_ec`` of the top-1 experts and the word
  classes of sentences of the synthetic language (:data:`~moeblocks.sra.data.WORD_CLASSES`).
- *sense gap*: the mean Jaccard overlap of the target's top-k expert sets in the
  ``same-sense`` pairs of the ``english-senses`` probe minus that of its
  ``different-sense`` pairs (:func:`~moeblocks.inspect.probe.run_condition_probe`).
- *train tok/s*: the last ``tok_per_s`` of the run's ``log.jsonl``.
- *dropped %*: the mean of the log's ``dropped`` fraction, for the families with a
  capacity limit (:func:`~moeblocks.sra.routing_presets.composition`; – for the others).

:func:`compare_to_reference` says which differences from the SRA cosine row lie outside
the 95 % interval: the interval of the per-seed differences (paired by seed: both runs
of a seed see the same batches) either excludes zero or not.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from moeblocks.inspect.collect import RoutingSet, collect_routing, sra_forward
from moeblocks.inspect.metrics import class_counts, expert_counts, purity, routing_entropy
from moeblocks.inspect.probe import BUILTIN_PROBES, run_condition_probe
from moeblocks.inspect.report import token_classes, word_ids_from_pieces
from moeblocks.routing import Routing
from moeblocks.runtime.durable import atomic_write_text
from moeblocks.runtime.errors import UsageError
from moeblocks.runtime.progress import start_progress
from moeblocks.sra.config import SRAConfig, preset
from moeblocks.sra.data import WORD_CLASSES, data_spec, eval_windows, synthetic_text
from moeblocks.sra.experiments import (
    CellSummary,
    confidence_interval,
    format_ablation,
    format_cell,
    load_validation,
    summarise_ablation,
)
from moeblocks.sra.rundir import MARKER, run_summary

__all__ = [
    "DENSE",
    "MEASURE_FILE",
    "REFERENCE",
    "TINY_STEPS",
    "ZOO_METRICS",
    "Difference",
    "ZooRun",
    "compare_to_reference",
    "family_config",
    "format_differences",
    "load_zoo",
    "measure_run",
    "read_zoo_run",
    "routing_zoo",
    "write_zoo",
    "zoo_base",
    "zoo_families",
]

DENSE = "dense"
"""The baseline: one dense MLP of ``k_final · d_expert`` hidden units (equal active size)."""
REFERENCE = "cosine"
"""The row every other family is compared with: SRA's cosine router."""
MEASURE_FILE = "zoo-measure.json"
"""Each run folder's measurement, written once (a rerun reads it back)."""
TINY_STEPS = 200
"""Default steps at the ``tiny`` preset: 27 runs fit 45 minutes on 2 shared cores."""

# Metric attribute -> (column title, format), in table order.
ZOO_METRICS: dict[str, tuple[str, str]] = {
    "ppl": ("val. perplexity", ".2f"),
    "dead_pct": ("dead experts %", ".1f"),
    "max_share": ("max/mean load", ".2f"),
    "cv2": ("load CV²", ".3f"),
    "entropy": ("router entropy", ".2f"),
    "purity": ("class purity", ".3f"),
    "sense_gap": ("sense gap", "+.3f"),
    "tok_per_s": ("train tok/s", ".0f"),
    "dropped_pct": ("dropped %", ".2f"),
}
# The measured metrics (zoo-measure.json); the rest come from the training log.
_MEASURED = ("ppl", "dead_pct", "max_share", "cv2", "entropy", "purity", "sense_gap")
_PURITY_SENTENCES = 400  # synthetic sentences (~4k words) for the class purity
_PROBE_PERMUTATIONS = 100  # the probe's p-value is not reported, only the gap


def zoo_families() -> tuple[str, ...]:
    """Every family the zoo trains by default: the MoE routing presets, then ``dense``."""
    from moeblocks.sra.routing_presets import ROUTING_ZOO

    return (*ROUTING_ZOO, DENSE)


@dataclass(frozen=True)
class ZooRun:
    """One trained (family, seed) and its measurements (NaN where a metric has no value).

    Attributes:
        family: A name of :func:`zoo_families`.
        seed: Run seed.
        ppl: Validation perplexity at the training k.
        dead_pct: Experts with no routed validation slot, % of L·E.
        max_share: ``E · max_e u_e`` (max over mean slot share), averaged over layers.
        cv2: CV² of the experts' slot counts, averaged over layers.
        entropy: Mean per-token router entropy (probabilities normalised to sum 1), nats.
        purity: Class purity of the top-1 experts on the synthetic language, in [1/C, 1].
        sense_gap: Same-sense minus different-sense Jaccard of the sense probe, in [-1, 1].
        tok_per_s: Training throughput, tokens per second (the log's last value).
        dropped_pct: Routed copies dropped by a capacity limit, % (the log's mean; NaN
            for a family without one).
        train_seconds: Training time implied by the log (steps · B · S / tok_per_s).
    """

    family: str
    seed: int
    ppl: float
    dead_pct: float
    max_share: float
    cv2: float
    entropy: float
    purity: float
    sense_gap: float
    tok_per_s: float
    dropped_pct: float
    train_seconds: float


def zoo_base(name: str = "tiny", steps: int | None = None) -> SRAConfig:
    """The config every family starts from: a preset, evaluated only at the end.

    ``tiny`` trains :data:`TINY_STEPS` steps unless ``steps`` is given; other presets
    keep their own. The zoo measures every run itself, so the trainer's periodic
    validation passes are turned off (``eval_every=0``) and its final one reads only
    2048 tokens (``eval_tokens``; the log's ``val_loss``, not the table's perplexity).
    """
    cfg = preset(name)
    default = TINY_STEPS if name == "tiny" else cfg.steps
    return cfg.replace(steps=steps or default, eval_every=0, eval_tokens=2048)


def family_config(base: SRAConfig, family: str, seed: int) -> SRAConfig:
    """``base`` with the FFN of ``family`` (dense: no balance loss) and ``seed``."""
    if family == DENSE:
        return base.replace(ffn=DENSE, balance="none", seed=seed)
    return base.replace(ffn=family, seed=seed)


def _check_plan(families: Sequence[str] | None, seeds: Sequence[int]) -> list[str]:
    known = zoo_families()
    names = list(known) if families is None else list(families)
    unknown = [f for f in names if f not in known]
    if unknown or not names:
        raise UsageError(f"families must be some of {', '.join(known)}; got {unknown or 'none'}")
    if len(set(names)) != len(names):
        raise UsageError(f"families must not repeat, got {names}")
    if not seeds:
        raise UsageError("seeds: the zoo needs at least one seed (two or more for intervals)")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad or len(set(seeds)) != len(seeds):
        raise UsageError(f"seeds must be distinct ints >= 0, got {list(seeds)}")
    return names


# --- training and measuring one run ------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """One (family, seed) of the plan; picklable, for ``--jobs`` worker processes."""

    family: str
    seed: int
    config: SRAConfig
    data: str
    run: Path
    device: str
    max_tokens: int


def _state(job: _Job) -> str:
    """``"fresh"``, ``"resume"`` or ``"done"``: what training the run folder still needs.

    Raises:
        UsageError: When the folder holds a run of other settings or other data (a
            rerun must not mix them into one table), or checkpoints none of which
            verifies.
    """
    from moeblocks.sra.checkpoint import CheckpointError, find_checkpoint

    if not (job.run / MARKER).is_file():
        return "fresh"
    try:
        ckpt = find_checkpoint(job.run)
    except CheckpointError as err:
        raise UsageError(f"{err}; delete {job.run} to retrain it") from None
    if ckpt is None:  # stopped before its first checkpoint: nothing to keep
        return "fresh"
    changed = ckpt.config.differences(job.config)
    if ckpt.data != data_spec(job.data):
        changed.append(f"data ({ckpt.data})")
    if changed:
        raise UsageError(
            f"{job.run} holds a run with other settings ({', '.join(changed)}); "
            "use another --out, or delete the folder to retrain it"
        )
    return "done" if ckpt.step >= job.config.steps else "resume"


def _run_job(job: _Job, threads: int | None = None) -> None:
    """Train (or finish) one run unless it is done, then measure it unless measured."""
    from moeblocks.sra.train import train

    if threads is not None:  # a --jobs worker: one process per run, `threads` each
        torch.set_num_threads(threads)
    state = _state(job)
    path = job.run / MEASURE_FILE
    if state != "done":
        path.unlink(missing_ok=True)  # it measured other weights
        train(job.config, job.data, job.run, device=job.device, progress=False,
              resume=state == "resume", overwrite=state == "fresh")  # fmt: skip
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("step") == job.config.steps and saved.get("max_tokens") == job.max_tokens:
            return
    metrics = measure_run(job.run, job.max_tokens, job.data, job.device)
    blob = {"step": job.config.steps, "max_tokens": job.max_tokens,
            "tokens_per_step": job.config.batch_size * job.config.seq_len,
            "metrics": metrics}  # fmt: skip
    atomic_write_text(path, json.dumps(blob, indent=1, allow_nan=True) + "\n")


def _layer_loads(r: Routing) -> tuple[float, float, float]:
    """Dead experts, max/mean slot share and CV² of the slot counts of one layer."""
    c_E = expert_counts(r).double()
    mean = c_E.mean().clamp_min(1e-12)
    cv2 = ((c_E - c_E.mean()) ** 2).mean() / mean**2  # population variance over E
    return float((c_E == 0).sum()), float(c_E.max() / mean), float(cv2)


def _entropy(r: Routing) -> float:
    """Router entropy of ``probs`` normalised to sum 1 per token (sigmoid scores do not)."""
    p_TE = r.probs.double()
    q_TE = p_TE / p_TE.sum(-1, keepdim=True).clamp_min(1e-30)
    return routing_entropy(dataclasses.replace(r, probs=q_TE.to(r.probs.dtype)))


def _routing_metrics(rs: RoutingSet, num_experts: int) -> dict[str, float]:
    L = len(rs.layers)
    loads = [_layer_loads(r) for r in rs.layers]
    return {
        "dead_pct": 100 * sum(d for d, _, _ in loads) / (L * num_experts),
        "max_share": sum(m for _, m, _ in loads) / L,
        "cv2": sum(c for _, _, c in loads) / L,
        "entropy": sum(_entropy(r) for r in rs.layers) / L,
    }


def _class_purity(forward: Any, tok: Any, seq_len: int, batch_size: int, max_tokens: int) -> float:
    """Top-1 class purity over sentences of the synthetic language, mean over layers."""
    from moeblocks.sra.tokenizer import encode

    ids = torch.from_numpy(encode(tok, synthetic_text(_PURITY_SENTENCES, seed=12))).long()
    x_WS, _ = eval_windows(ids, seq_len, max_tokens)
    rs = collect_routing(forward, x_WS.split(batch_size))
    pieces = [tok.id_to_token(i) or "" for i in rs.token_ids.tolist()]
    cls_T: Int[Tensor, " T"]
    cls_T, names = token_classes(pieces, word_ids_from_pieces(pieces), WORD_CLASSES)
    values = [purity(class_counts(r, cls_T, len(names)))[1] for r in rs.layers]
    return sum(values) / len(values)


def _sense_gap(forward: Any, tok: Any) -> float:
    """Same-sense minus different-sense mean Jaccard of the sense probe, mean over layers.

    NaN when the tokeniser merges a probe word with its neighbours (the probe cannot
    locate it).
    """
    from moeblocks.sra.tokenizer import encode

    def enc(s: str) -> list[int]:
        return encode(tok, s).tolist()

    items = BUILTIN_PROBES["english-senses"]
    try:
        tests = run_condition_probe(
            forward, enc, items, "same-sense", "different-sense", _PROBE_PERMUTATIONS
        )
    except ValueError:
        return math.nan
    return sum(t.mean_first - t.mean_second for t in tests) / len(tests)


@torch.no_grad()
def measure_run(run: Path, max_tokens: int, data: str, device: str = "cpu") -> dict[str, float]:
    """The measured metrics of one trained run (see the module docstring).

    Args:
        run: The run folder.
        max_tokens: Validation tokens for perplexity and the routing statistics (and at
            most as many tokens of the synthetic language for the class purity).
        data: The corpus spec the run trained on.
        device: Where to run the model.

    Returns:
        ``ppl``, ``dead_pct``, ``max_share``, ``cv2``, ``entropy``, ``purity`` and
        ``sense_gap``; all but ``ppl`` are NaN for a dense run.
    """
    from moeblocks.sra.evaluate import evaluate
    from moeblocks.sra.routing_presets import trained_k

    model, tok, ckpt, tokens = load_validation(run, data)
    model.to(device).eval()
    cfg = ckpt.config
    k = trained_k(cfg)  # a family's own k: Switch and Llama 4 route top-1
    ppl = evaluate(model, tokens, cfg.batch_size, max_tokens, k=k).ppl
    if not model.moe_layers:
        return {"ppl": ppl, **dict.fromkeys(_MEASURED[1:], math.nan)}
    forward = sra_forward(model, k=k)
    x_WS, _ = eval_windows(tokens, cfg.seq_len, max_tokens)
    rs = collect_routing(forward, x_WS.split(cfg.batch_size))
    return {
        "ppl": ppl,
        **_routing_metrics(rs, cfg.num_experts),
        "purity": _class_purity(forward, tok, cfg.seq_len, cfg.batch_size, max_tokens),
        "sense_gap": _sense_gap(forward, tok),
    }


def _has_capacity(family: str) -> bool:
    """Whether the family's layer drops tokens over a capacity (its composition says so)."""
    from moeblocks.sra.routing_presets import composition

    return not composition(family)["capacity"].startswith("none")


def _mean_dropped(records: Iterable[dict[str, Any]]) -> float:
    """Mean of the log's ``dropped`` fractions (a number or one per layer), as %."""
    values = []
    for r in records:
        d = r.get("dropped")
        if isinstance(d, list) and d:
            values.append(sum(d) / len(d))
        elif isinstance(d, int | float) and not isinstance(d, bool):
            values.append(float(d))
    return 100 * sum(values) / len(values) if values else math.nan


def read_zoo_run(run: Path, family: str, seed: int) -> ZooRun:
    """A run's row of the table, from its ``zoo-measure.json`` and ``log.jsonl``.

    Raises:
        UsageError: When the run has no measurement or no throughput in its log.
    """
    path = run / MEASURE_FILE
    if not path.is_file():
        raise UsageError(f"{run} has no {MEASURE_FILE}: it was not measured yet")
    blob = json.loads(path.read_text(encoding="utf-8"))
    metrics = {m: float(blob["metrics"][m]) for m in _MEASURED}
    train = run_summary(run)["train"]
    speeds = [r["tok_per_s"] for r in train if "tok_per_s" in r]
    if not speeds:
        raise UsageError(f"{run / 'log.jsonl'} records no tok_per_s: is the log complete?")
    tokens = blob["step"] * blob["tokens_per_step"]
    tok_per_s = float(speeds[-1])
    dropped = _mean_dropped(train) if _has_capacity(family) else math.nan
    return ZooRun(family, seed, **metrics, tok_per_s=tok_per_s, dropped_pct=dropped,
                  train_seconds=tokens / tok_per_s)  # fmt: skip


# --- comparing with the reference row ------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """A family's difference from the reference in one metric, paired by seed.

    Attributes:
        family: The family compared.
        metric: A key of :data:`ZOO_METRICS`.
        diff: Mean and 95 % t-interval of ``family − reference`` over the seeds both
            have a finite value at.
        outside: The interval excludes 0 (the difference holds at 95 %); False when it
            contains 0 or has fewer than 2 seeds.
    """

    family: str
    metric: str
    diff: CellSummary
    outside: bool


def compare_to_reference(
    runs: Sequence[ZooRun], metrics: Sequence[str], reference: str = REFERENCE
) -> list[Difference]:
    """Every other family against ``reference``, per metric (family order kept).

    The per-seed differences ``x_family(s) − x_reference(s)`` get a t-interval
    (:func:`~moeblocks.sra.experiments.confidence_interval`); seeds where either value
    is NaN (a dense run has no routing) are left out.
    """
    by = {(r.family, r.seed): r for r in runs}
    ref_seeds = [s for f, s in by if f == reference]
    out = []
    for family in dict.fromkeys(r.family for r in runs):
        if family == reference:
            continue
        for m in metrics:
            pairs = [(by[family, s], by[reference, s]) for s in ref_seeds if (family, s) in by]
            c = confidence_interval([getattr(a, m) - getattr(b, m) for a, b in pairs])
            holds = c.n >= 2 and math.isfinite(c.half_width) and abs(c.mean) > c.half_width
            out.append(Difference(family, m, c, holds))
    return out


def format_differences(runs: Sequence[ZooRun], reference: str = REFERENCE) -> str:
    """Markdown: per metric, which differences from ``reference`` hold at 95 % and which not."""
    if reference not in {r.family for r in runs}:
        return f"No `{reference}` runs: nothing to compare with."
    diffs = compare_to_reference(runs, list(ZOO_METRICS), reference)
    lines = []
    for m, (title, fmt) in ZOO_METRICS.items():
        mine = [d for d in diffs if d.metric == m and d.diff.n]
        if not mine:
            continue
        fmt_d = fmt if fmt.startswith("+") else "+" + fmt

        def show(d: Difference, fmt_d: str = fmt_d) -> str:
            return f"{d.family} {format_cell(d.diff, fmt_d)}"

        holds = [show(d) for d in mine if d.outside]
        not_ = [show(d) for d in mine if not d.outside]
        lines.append(
            f"- **{title}**: outside the interval: {', '.join(holds) or 'none'}; "
            f"within it: {', '.join(not_) or 'none'}."
        )
    return "\n".join(lines)


# --- the experiment -------------------------------------------------------------------


def _execute(plan: Sequence[_Job], jobs: int, bar: Any) -> None:
    """Run the plan in this process, or in ``jobs`` worker processes of one thread each."""
    if jobs == 1:
        for job in plan:
            bar.set_postfix_str(f"{job.family}, seed {job.seed}")
            _run_job(job)
            bar.update()
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: a forked child would inherit the parent's OpenMP thread pool.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_run_job, job, 1): job for job in plan}
        for done in as_completed(futures):
            done.result()  # re-raises a worker's error here
            job = futures[done]
            bar.set_postfix_str(f"{job.family}, seed {job.seed} done")
            bar.update()


def routing_zoo(
    out: Path,
    base: SRAConfig | str = "tiny",
    seeds: Sequence[int] = (0, 1, 2),
    data: str = "pydoc",
    families: Sequence[str] | None = None,
    max_tokens: int = 16384,
    device: str = "cpu",
    jobs: int = 1,
    progress: bool = True,
    command: str = "",
) -> list[ZooRun]:
    """Train and measure every family at every seed, then write the table and figure.

    Runs go to ``out/<family>-s<seed>``; finished and measured runs are skipped, a run
    that stopped part-way resumes from its newest checkpoint.

    Args:
        out: Folder for the runs and the results.
        base: The config every family starts from, or a preset name (see :func:`zoo_base`).
        seeds: Distinct run seeds >= 0 (2 or more for intervals).
        data: Corpus spec.
        families: Names of :func:`zoo_families` (default: all of them).
        max_tokens: Validation tokens per measurement.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        jobs: Runs trained at once, each in its own process with one CPU thread (1: in
            this process, with its thread setting).
        progress: A progress bar over the runs (on stderr).
        command: The command line, recorded with the results.

    Returns:
        One :class:`ZooRun` per (seed, family), seeds outermost.

    Raises:
        UsageError: For an unknown or repeated family, no seeds, negative or repeated
            seeds, ``jobs`` < 1, or a run folder that holds a run of other settings.
    """
    cfg0 = zoo_base(base) if isinstance(base, str) else base
    names = _check_plan(families, seeds)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UsageError(f"jobs must be an int >= 1, got {jobs!r}")
    out = Path(out)
    plan = [
        _Job(f, s, family_config(cfg0, f, s), data, out / f"{f}-s{s}", device, max_tokens)
        for s in seeds
        for f in names
    ]
    for job in plan:
        _state(job)  # refuse a folder of other settings before anything trains
    start = time.perf_counter()
    bar = start_progress(len(plan), "routing zoo", progress, unit="run")
    try:
        _execute(plan, jobs, bar)
    finally:
        bar.close()
    wall = time.perf_counter() - start
    runs = [read_zoo_run(job.run, job.family, job.seed) for job in plan]
    write_zoo(out, runs, cfg0, data, command, wall, jobs)
    return runs


def write_zoo(
    out: Path,
    runs: Sequence[ZooRun],
    base: SRAConfig,
    data: str,
    command: str,
    wall_seconds: float = math.nan,
    jobs: int = 1,
) -> None:
    """Write ``routing_zoo.md`` (table and differences), ``.csv``, ``.json`` and ``.png``.

    The figure shows perplexity, dead experts, max/mean load, router entropy, class
    purity and the sense gap; the table holds every metric.
    """
    import platform

    train_min = sum(r.train_seconds for r in runs) / 60
    config = json.dumps(base.to_dict(), sort_keys=True, indent=1)
    text = (
        "# Routing zoo\n\n"
        f"Command: `{command or 'moeblocks experiment routing-zoo'}`\n\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}. Data: {data}. {len(runs)} runs of "
        f"{base.steps} steps, {train_min:.1f} min of training (summed over runs); this "
        f"call took {wall_seconds / 60:.1f} min with {jobs} job(s).\n\n"
        f"{format_ablation(runs, ZOO_METRICS, key='family')}\n\n"
        "Each cell: mean ± half-width of the 95 % t-interval over seeds (see "
        "`moeblocks.sra.routing_zoo` for every column's definition).\n\n"
        f"## Differences from `{REFERENCE}` at 95 %\n\n"
        "Per-seed difference family − cosine (paired by seed), its mean ± 95 % "
        "t-interval; *outside* means the interval excludes 0.\n\n"
        f"{format_differences(runs)}\n\n"
        "Base config (each family changes only `ffn`; dense also sets `balance` to none):\n\n"
        f"```json\n{config}\n```\n"
    )
    atomic_write_text(out / "routing_zoo.md", text)
    fields = list(ZooRun.__dataclass_fields__)
    csv = [",".join(fields)] + [",".join(str(getattr(r, f)) for f in fields) for r in runs]
    atomic_write_text(out / "routing_zoo.csv", "\n".join(csv) + "\n")
    blob = {"command": command, "data": data, "base": base.to_dict(),
            "runs": [asdict(r) for r in runs]}  # fmt: skip
    atomic_write_text(out / "routing_zoo.json", json.dumps(blob, indent=1, allow_nan=True) + "\n")
    _plot(runs, out / "routing_zoo.png")


# The figure's panels: one row of panels stays readable up to about six.
_FIGURE_METRICS = ("ppl", "dead_pct", "max_share", "entropy", "purity", "sense_gap")


def _plot(runs: Sequence[ZooRun], path: Path) -> Path:
    """Per headline metric, each family's mean and 95 % interval (matplotlib)."""
    from moeblocks.inspect.plots import plot_ablation

    summary = summarise_ablation(runs, ZOO_METRICS, key="family")
    rows = [{"name": f, **cells} for f, cells in summary.items()]
    titles = {m: title for m, (title, _) in ZOO_METRICS.items()}
    return plot_ablation(rows, path, _FIGURE_METRICS, titles)


def load_zoo(path: Path) -> tuple[list[ZooRun], SRAConfig, str, str]:
    """Read back a ``routing_zoo.json``: the runs, base config, data spec and command."""
    blob = json.loads(Path(path).read_text(encoding="utf-8"))
    runs = [ZooRun(**r) for r in blob["runs"]]
    return runs, SRAConfig.from_dict(blob["base"]), blob["data"], blob["command"]
