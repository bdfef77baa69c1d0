"""Markdown report with plots for a finished run (what ``moeblocks demo`` writes).

Legend: L MoE layers, E experts.

The report is ``RUN/reports/demo.md`` beside ``eval.json`` (layout: see
:mod:`moeblocks.sra.evaluate`). The plots come from :mod:`moeblocks.inspect.plots`,
which imports matplotlib (the optional ``plots`` extra) inside its functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeblocks.runtime.durable import atomic_write_text
from moeblocks.sra.evaluate import RunEval, format_run_eval

__all__ = ["ExpertTokens", "write_report"]


@dataclass(frozen=True)
class ExpertTokens:
    """The tokens routed most often to one expert.

    Attributes:
        layer: MoE layer index.
        expert: Expert index.
        share: Fraction of the layer's routed slots this expert received.
        tokens: ``(token text, count)`` pairs, most frequent first.
    """

    layer: int
    expert: int
    share: float
    tokens: list[tuple[str, int]]


def format_expert_tokens(rows: list[ExpertTokens]) -> str:
    """One line per expert: ``layer/expert (share): 'tok'×count ...``."""
    return "\n".join(
        f"  layer {r.layer} expert {r.expert:3d} ({100 * r.share:4.1f}% of slots): "
        + "  ".join(f"{t!r}×{c}" for t, c in r.tokens)
        for r in rows
    )


def write_report(
    out: Path,
    ev: RunEval,
    records: list[dict[str, Any]],
    experts: list[ExpertTokens],
    seconds: float,
    fmt: str = "png",
) -> Path:
    """Write ``demo.md`` and its plots into the run's report folder ``out/reports``.

    Plots: ``training-*`` from the log (:func:`moeblocks.inspect.report.write_training_figures`)
    and, for MoE runs, ``eval-utilisation`` (share of routed slots per expert over the
    evaluation) and ``eval-k-sweep``.

    Args:
        out: Run folder.
        ev: The run's evaluation.
        records: ``log.jsonl`` records.
        experts: Top tokens of a few experts.
        seconds: Wall time of the run, for the record.
        fmt: Plot format: ``png`` (150 dpi), ``svg`` or ``pdf``.

    Returns:
        Path of ``demo.md``.
    """
    from moeblocks._optional import require
    from moeblocks.inspect import plots
    from moeblocks.inspect.report import write_training_figures
    from moeblocks.sra.evaluate import report_dir

    require("matplotlib", "plots", "the run report's plots")
    cfg = ev.checkpoint.config
    folder = report_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    parts = [
        "# moeblocks SRA run report",
        "",
        f"{cfg.n_layers} layers, d_model {cfg.d_model}, FFN `{cfg.ffn}` with "
        f"{cfg.num_experts} experts × d_ff {cfg.d_expert}, k {cfg.k_start}→{cfg.k_final} at "
        f"step {cfg.k_switch_step}; {ev.checkpoint.step} steps of {cfg.batch_size}×{cfg.seq_len} "
        f"tokens on `{ev.checkpoint.data}` in {seconds:.0f} s. The numbers are in `eval.json`.",
        "",
        "```",
        format_run_eval(ev, cfg.k_final),
        "```",
        "",
    ]
    k_switch = cfg.k_switch_step if cfg.k_start != cfg.k_final else None
    for title, name in write_training_figures(records, folder, fmt, cfg.num_experts, k_switch):
        parts += [f"## {title}", "", f"![{title.lower()}]({name})", ""]
    counts_LE = ev.result.counts.float()
    if len(counts_LE):
        share_LE = counts_LE / counts_LE.sum(-1, keepdim=True).clamp(min=1)
        corridor = (cfg.band_floor, cfg.band_ceiling) if cfg.balance == "bandpass" else None
        name = f"eval-utilisation.{fmt}"
        plots.plot_utilisation(share_LE, folder / name, corridor=corridor)
        parts += [f"## Expert utilisation over {ev.result.tokens} validation tokens", "",
                  f"![expert utilisation]({name})", ""]  # fmt: skip
    if ev.sweep:
        name = f"eval-k-sweep.{fmt}"
        plots.plot_k_sweep([s.k or 0 for s in ev.sweep], [s.ppl for s in ev.sweep],
                           cfg.k_final, folder / name, ev.result.tokens)  # fmt: skip
        parts += ["## Inference-time k-sweep", "", f"![k sweep]({name})", ""]
    if experts:
        parts += [
            "## Tokens routed most often to a few experts",
            "",
            "```",
            format_expert_tokens(experts),
            "```",
        ]
    path = folder / "demo.md"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path
