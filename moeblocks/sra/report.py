"""Markdown report with plots for a finished run (what ``moeblocks demo`` writes).

Legend: L MoE layers, E experts.

matplotlib is imported inside :func:`write_report` (the optional ``plots`` extra) and
used through ``matplotlib.figure.Figure`` with the Agg canvas, which touches no global
pyplot state and needs no display.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeblocks.sra.durable import atomic_write_text
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


def _plot_loss(records: list[dict[str, Any]], k_switch: int, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.add_subplot()
    train = [r for r in records if "loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train CE")
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation CE")
    if k_switch > 0:
        ax.axvline(k_switch, color="grey", ls="--", lw=1, label="k rises")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    fig.savefig(path, dpi=110)


def _plot_experts(ev: RunEval, path: Path) -> None:
    from matplotlib.figure import Figure

    counts_LE = ev.result.counts.float()
    L, E = counts_LE.shape
    fig = Figure(figsize=(6, 1.2 + 1.8 * L), layout="constrained")
    axes = fig.subplots(L, 1, squeeze=False)[:, 0]
    for layer, ax in enumerate(axes):
        share_E = counts_LE[layer] / counts_LE[layer].sum().clamp(min=1)
        ax.bar(range(E), share_E.sort(descending=True).values.tolist(), width=1.0)
        ax.axhline(1 / E, color="black", ls="--", lw=1, label="uniform 1/E")
        ax.set_ylabel(f"layer {layer}\nshare")
        ax.legend(loc="upper right")
    axes[-1].set_xlabel("experts, sorted by share of routed slots")
    fig.savefig(path, dpi=110)


def write_report(
    out: Path,
    ev: RunEval,
    records: list[dict[str, Any]],
    experts: list[ExpertTokens],
    seconds: float,
) -> Path:
    """Write ``report.md``, ``loss.png`` and (for MoE runs) ``experts.png`` into ``out``.

    Args:
        out: Run folder.
        ev: The run's evaluation.
        records: ``log.jsonl`` records.
        experts: Top tokens of a few experts.
        seconds: Wall time of the run, for the record.

    Returns:
        Path of ``report.md``.
    """
    from moeblocks._optional import require

    require("matplotlib", "plots", "the run report's plots")
    cfg = ev.checkpoint.config
    _plot_loss(records, cfg.k_switch_step if cfg.k_start != cfg.k_final else 0, out / "loss.png")
    parts = [
        "# moeblocks SRA run report",
        "",
        f"{cfg.n_layers} layers, d_model {cfg.d_model}, FFN `{cfg.ffn}` with "
        f"{cfg.num_experts} experts × d_ff {cfg.d_expert}, k {cfg.k_start}→{cfg.k_final} at "
        f"step {cfg.k_switch_step}; {ev.checkpoint.step} steps of {cfg.batch_size}×{cfg.seq_len} "
        f"tokens on `{ev.checkpoint.data}` in {seconds:.0f} s.",
        "",
        "```",
        format_run_eval(ev, cfg.k_final),
        "```",
        "",
        "![loss curve](loss.png)",
    ]
    if len(ev.result.counts):
        _plot_experts(ev, out / "experts.png")
        parts += ["", "## Expert utilisation", "", "![expert utilisation](experts.png)"]
    if experts:
        parts += [
            "",
            "## Tokens routed most often to a few experts",
            "",
            "```",
            format_expert_tokens(experts),
            "```",
        ]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path
