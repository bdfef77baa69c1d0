"""Plots of routing inspection results and training logs (needs the ``plots`` extra).

Legend: L MoE layers, E experts, C classes, T tokens, K experts per token, R log records.

One function per concept, each drawing one figure with
:class:`matplotlib.figure.Figure` (no pyplot, no global backend state, so it works
headless) and writing it to ``path``; the suffix of ``path`` picks the format (``.png``
at 150 dpi, ``.svg``, ``.pdf``). matplotlib is imported inside the functions, so
importing this module costs nothing. The functions read tensors, plain lists and
``log.jsonl`` records only: they know no model.

| function | what it shows |
|---|---|
| `plot_utilisation` | routed-slot share per expert id and layer, mean router prob., corridor |
| `plot_anchor_similarity` | cosine similarity of every pair of anchors |
| `plot_class_heatmap` | NPMI of experts × word classes (NaN in grey) |
| `plot_k_sweep` | perplexity against the inference-time k |
| `plot_routing_map` | one sentence: all K experts of every token and layer |
| `plot_training_curves` | cross-entropy, aux loss, learning rate and k by step |
| `plot_utilisation_history` | per-expert share of slots over training (heat-map) |
| `plot_dead_history` | dead experts over training |
| `plot_entropy_history` | mean router entropy over training |
| `plot_ablation` | mean ± 95 % interval of each metric per variant |

Expert ids are always readable: bars keep expert-id order, and where colour codes an
expert (:func:`expert_colours`) there are at least 68 distinct colours, with the id
written on the cell as well.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from moeblocks._optional import require

__all__ = [
    "FORMATS",
    "expert_colours",
    "plot_ablation",
    "plot_anchor_similarity",
    "plot_class_heatmap",
    "plot_dead_history",
    "plot_entropy_history",
    "plot_k_sweep",
    "plot_routing_map",
    "plot_training_curves",
    "plot_utilisation",
    "plot_utilisation_history",
]

FORMATS = ("png", "svg", "pdf")
"""Figure formats every function writes, chosen by the suffix of ``path``."""

PNG_DPI = 150


def _figure(**kw: Any) -> Any:
    require("matplotlib", "plots", "moeblocks inspect plots")
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kw)


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """``text`` broken into lines that fit ``width_in`` inches at ``fontsize`` points.

    A title wider than its figure is cut off at both edges (constrained layout makes
    room above and below a title, never beside it), so narrow figures wrap theirs.
    """
    # A character of the default sans-serif font averages under 0.6 em wide.
    chars = max(12, int(width_in * 72 / (0.6 * fontsize)))
    return textwrap.fill(text, chars)


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"path must end in one of {FORMATS}, got {path.name!r}")
    fig.savefig(path, dpi=PNG_DPI if fmt == "png" else None, format=fmt)
    return path


def expert_colours(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` RGBA colours, one per expert id; the first 68 are all distinct.

    tab20, tab20b, tab20c and Dark2 (68 qualitative colours); beyond those, hues spaced
    by the golden angle at alternating lightness, so neighbouring ids still differ.
    """
    require("matplotlib", "plots", "moeblocks inspect plots")
    from matplotlib import colormaps
    from matplotlib.colors import hsv_to_rgb

    base: list[tuple[float, float, float, float]] = []
    for name in ("tab20", "tab20b", "tab20c", "Dark2"):
        cmap = colormaps[name]
        base += [tuple(cmap(i)) for i in range(cmap.N)]  # type: ignore[misc]
    out = base[:n]
    for i in range(len(out), n):
        h = (i * 0.618033988749895) % 1.0
        s, v = (0.65, 0.95) if i % 2 else (0.9, 0.7)
        r, g, b = hsv_to_rgb((h, s, v))
        out.append((float(r), float(g), float(b), 1.0))
    return out


def _expert_ticks(ax: Any, E: int) -> None:
    step = 1 if E <= 32 else 2 if E <= 64 else 8 if E <= 256 else 32
    ax.set_xticks(range(0, E, step))
    ax.tick_params(axis="x", labelsize=6 if E > 16 else 8)
    ax.set_xlim(-0.5, E - 0.5)


def plot_utilisation(
    utilisation_LE: Float[Tensor, "L E"],
    path: Path,
    mean_probs_LE: Float[Tensor, "L E"] | None = None,
    corridor: tuple[float, float] | None = None,
) -> Path:
    """Share of routed slots per expert, in expert-id order, one panel per layer.

    Args:
        utilisation_LE: Share of each layer's routed slots per expert (rows sum to 1).
        path: Output file (``.png``, ``.svg`` or ``.pdf``).
        mean_probs_LE: Mean router probability ``P_e`` of every expert (drawn as dots):
            what a bandpass loss constrains.
        corridor: ``(floor, ceiling)`` of the bandpass loss on ``P_e``, drawn as a band.

    Dead experts (no slot) are marked with a red ``x`` on the axis; the dashed line is
    uniform usage 1/E.
    """
    L, E = utilisation_LE.shape
    fig = _figure(figsize=(max(6.0, 0.12 * E + 2), 1.2 + 1.9 * L))
    axes = fig.subplots(L, 1, squeeze=False)[:, 0]
    for layer, ax in enumerate(axes):
        share_E = utilisation_LE[layer].float()
        dead = (share_E == 0).nonzero().flatten().tolist()
        ax.bar(range(E), share_E.tolist(), width=0.85, color="tab:blue", label="share of slots")
        if dead:
            ax.plot(dead, [0] * len(dead), "x", color="tab:red", ms=5, label="dead")
        if mean_probs_LE is not None:
            ax.plot(range(E), mean_probs_LE[layer].tolist(), ".", color="black", ms=3,
                    label="mean router prob. $P_e$")  # fmt: skip
        if corridor is not None:
            lo, hi = corridor
            ax.axhspan(lo, hi, color="tab:green", alpha=0.12, lw=0, zorder=0)
            ax.axhline(lo, color="tab:green", lw=1, label=f"corridor {lo:.4g}–{hi:.4g}")
            ax.axhline(hi, color="tab:green", lw=1)
        ax.axhline(1 / E, color="grey", ls="--", lw=1, label="uniform 1/E")
        ax.set_ylabel(f"layer {layer}\nshare")
        ax.set_title(f"layer {layer}: {len(dead)}/{E} dead", fontsize=9)
        _expert_ticks(ax, E)
    legend: dict[str, Any] = {}
    for ax in axes:  # every label once, whichever layer has it (e.g. "dead")
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, h)
    fig.legend(list(legend.values()), list(legend), loc="outside upper center", fontsize=7,
               ncol=min(len(legend), 3))  # fmt: skip
    axes[-1].set_xlabel("expert id")
    return _save(fig, path)


def plot_anchor_similarity(sims: Sequence[Float[Tensor, "E E"]], path: Path) -> Path:
    """Heatmap of anchor cosine similarity, one panel per (cosine-routed) layer."""
    n = max(len(sims), 1)
    fig = _figure(figsize=(3.6 * n, 3.4))
    axes = fig.subplots(1, n, squeeze=False)[0]
    im = None
    for layer, (ax, sim) in enumerate(zip(axes, sims, strict=False)):
        im = ax.imshow(sim.numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title(f"layer {layer}: cos(a_i, a_j)", fontsize=9)
        ax.set_xlabel("expert id")
        ax.set_ylabel("expert id")
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.8)
    return _save(fig, path)


def _masked(values: Tensor) -> Any:
    import numpy as np

    a = values.detach().float().cpu().numpy()
    return np.ma.masked_invalid(a)


def plot_class_heatmap(
    npmi_EC: Float[Tensor, "E C"], classes: Sequence[str], path: Path, title: str = ""
) -> Path:
    """Expert × class heatmap of NPMI (red: the expert prefers the class).

    NaN cells (an expert or a class with no token) are masked and drawn grey, not as 0.
    """
    from matplotlib import colormaps

    E, C = npmi_EC.shape
    fig = _figure(figsize=(1.8 + 0.6 * C, 2.0 + 0.2 * E))
    ax = fig.add_subplot()
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.8")
    im = ax.imshow(_masked(npmi_EC), vmin=-1, vmax=1, cmap=cmap, aspect="auto")
    ax.set_xticks(range(C), list(classes), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(0, E, 1 if E <= 32 else 4))
    ax.tick_params(axis="y", labelsize=6 if E > 16 else 8)
    ax.set_ylabel("expert id")
    missing = int(torch.isnan(npmi_EC).sum())
    note = f" (grey: no tokens, {missing} cells)" if missing else ""
    ax.set_title((title or "NPMI(expert, class)") + note, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)


def plot_k_sweep(
    ks: Sequence[int],
    ppls: Sequence[float],
    k_train: int,
    path: Path,
    num_tokens: int | None = None,
) -> Path:
    """Validation perplexity against the inference-time k; the training k is marked.

    Args:
        ks: The k values (integer ticks).
        ppls: Perplexity at each k (NaN points are left out).
        k_train: k at the end of training (dashed line).
        path: Output file.
        num_tokens: Tokens the perplexities were measured on (in the title).
    """
    fig = _figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    pts = [(k, p) for k, p in zip(ks, ppls, strict=True) if math.isfinite(p)]
    if pts:
        ax.plot(*zip(*pts, strict=True), "o-")
    if k_train in ks:
        ax.axvline(k_train, color="grey", ls="--", lw=1, label=f"training k = {k_train}")
        ax.legend()
    ax.set_xticks(list(ks))
    ax.set_xlabel("experts per token at inference (k)")
    ax.set_ylabel("validation perplexity")
    if num_tokens is not None:
        ax.set_title(f"over {num_tokens} tokens", fontsize=9)
    return _save(fig, path)


def plot_routing_map(
    experts_LTK: Int[Tensor, "L T K"],
    weights_LTK: Float[Tensor, "L T K"],
    pieces: Sequence[str],
    path: Path,
    num_experts: int,
    word_ids: Int[Tensor, " T"] | None = None,
) -> Path:
    """Token-by-layer map of one sentence with all K experts of every token.

    Each (layer, token) cell is split into K stripes, first choice on top; a stripe's
    colour is its expert's (:func:`expert_colours`), its label ``id`` and its opacity
    the combine weight. Thick vertical lines mark word boundaries (from ``word_ids``,
    -1 for pieces outside words), thin ones every token.
    """
    from matplotlib.patches import Rectangle

    L, T, K = experts_LTK.shape
    colours = expert_colours(num_experts)
    fig = _figure(figsize=(1.6 + 0.48 * T, 0.9 + 0.32 * L * K + 0.3))
    ax = fig.add_subplot()
    for layer in range(L):
        for t in range(T):
            for j in range(K):
                e, w = int(experts_LTK[layer, t, j]), float(weights_LTK[layer, t, j])
                y = layer + j / K  # row `layer` spans [layer, layer + 1), choice 0 on top
                alpha = 0.35 + 0.65 * max(0.0, min(1.0, w))
                ax.add_patch(Rectangle((t - 0.5, y), 1.0, 1.0 / K, facecolor=colours[e],
                                       alpha=alpha, lw=0))  # fmt: skip
                label = str(e) if K <= 2 or T <= 24 else ""
                ax.text(t, y + 0.5 / K, label, ha="center", va="center",
                        fontsize=7 if K <= 2 else 5)  # fmt: skip
    for t in range(1, T):
        new_word = word_ids is not None and (
            int(word_ids[t]) != int(word_ids[t - 1]) or int(word_ids[t]) < 0
        )
        ax.axvline(t - 0.5, color="black", lw=1.6 if new_word else 0.3)
    for layer in range(1, L):
        ax.axhline(layer, color="black", lw=1.2)
    ax.set_xlim(-0.5, T - 0.5)
    ax.set_ylim(L, 0)
    ax.set_xticks(range(T), [_visible(p) for p in pieces], rotation=60, fontsize=7)
    ax.set_yticks([layer + 0.5 for layer in range(L)], [f"layer {i}" for i in range(L)])
    title = f"all {K} experts per token (first choice on top; opacity = weight; thick lines: words)"
    ax.set_title(_wrap(title, float(fig.get_figwidth()), 9.0), fontsize=9)
    return _save(fig, path)


def _visible(piece: str) -> str:
    """A token's text with its spaces and newlines made visible (BPE markers or decoded)."""
    for a, b in (("Ġ", "␣"), (" ", "␣"), ("Ċ", "⏎"), ("\n", "⏎"), ("ĉ", "⇥"), ("\t", "⇥")):
        piece = piece.replace(a, b)
    return piece


# --- training curves from log.jsonl -------------------------------------------------


def _applied(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in records if "skipped" not in r and "step" in r]


def plot_training_curves(
    records: Sequence[Mapping[str, Any]], path: Path, k_switch: int | None = None
) -> Path:
    """Training and validation cross-entropy, aux loss, learning rate and k by step.

    Args:
        records: ``log.jsonl`` records (``step``, ``loss``, ``aux``, ``lr``, ``k`` and,
            on evaluation steps, ``val_loss``); skipped steps are left out.
        path: Output file.
        k_switch: Step at which k rises (a dashed line), None for none.
    """
    recs = _applied(records)
    fig = _figure(figsize=(7, 6))
    axes = fig.subplots(4, 1, sharex=True, height_ratios=[2.2, 1, 1, 0.8])

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
        return [s for s, _ in pts], [float(v) for _, v in pts]

    ax = axes[0]
    ax.plot(*series("loss"), lw=1, label="train CE")
    vs, vl = series("val_loss")
    if vs:
        ax.plot(vs, vl, "o-", ms=3, label="validation CE")
    ax.set_ylabel("CE, nats/token")
    ax.legend(fontsize=8)
    axes[1].plot(*series("aux"), lw=1, color="tab:purple")
    axes[1].set_ylabel("aux loss")
    axes[2].plot(*series("lr"), lw=1, color="tab:orange")
    axes[2].set_ylabel("learning rate")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ks, kv = series("k")
    axes[3].step(ks, kv, where="post", color="tab:green")
    axes[3].set_ylabel("k")
    if kv:
        axes[3].set_yticks(sorted({int(v) for v in kv}))
    for a in axes:
        if k_switch:
            a.axvline(k_switch, color="grey", ls="--", lw=1)
    axes[-1].set_xlabel("step" + (" (dashed: k rises)" if k_switch else ""))
    return _save(fig, path)


def _count_history(records: Sequence[Mapping[str, Any]]) -> tuple[list[int], Tensor]:
    """Steps and per-window expert counts ``[R, L, E]`` of the records that carry them."""
    recs = [r for r in _applied(records) if r.get("expert_counts")]
    if not recs:
        return [], torch.zeros(0, 0, 0)
    return [r["step"] for r in recs], torch.tensor([r["expert_counts"] for r in recs]).float()


def plot_utilisation_history(records: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Heat-map per layer: share of routed slots per expert (y) over training steps (x).

    Reads ``expert_counts`` (per layer, per expert: slots routed since the previous log
    record). Colour is the share times E, so 1 is uniform; black cells got no token.
    """
    steps, counts_RLE = _count_history(records)
    if not steps:
        raise ValueError("records hold no `expert_counts` (a log from before moeblocks 0.3?)")
    R, L, E = counts_RLE.shape
    share_RLE = counts_RLE / counts_RLE.sum(-1, keepdim=True).clamp(min=1) * E
    fig = _figure(figsize=(7, 0.6 + 2.2 * L))
    axes = fig.subplots(L, 1, squeeze=False, sharex=True)[:, 0]
    edges = [steps[0] - (steps[1] - steps[0] if R > 1 else 1), *steps]
    im = None
    for layer, ax in enumerate(axes):
        im = ax.pcolormesh(edges, torch.arange(E + 1).numpy() - 0.5,
                           share_RLE[:, layer].T.numpy(), cmap="magma", vmin=0, vmax=3)  # fmt: skip
        ax.set_ylabel(f"layer {layer}\nexpert id")
    axes[-1].set_xlabel("step")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="share × E (1 = uniform)")
    return _save(fig, path)


def plot_dead_history(records: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Dead experts per layer over training.

    Lines: experts that got no slot in each log window (``expert_counts``, a few training
    batches: noisier than a validation pass); dots: experts dead over the validation
    pass of evaluation steps (``dead``, fractions per layer).
    """
    steps, counts_RLE = _count_history(records)
    evals = [r for r in _applied(records) if isinstance(r.get("dead"), list)]
    fig = _figure(figsize=(6, 3.4))
    ax = fig.add_subplot()
    E = counts_RLE.shape[2] if steps else None
    if steps:
        dead_RL = (counts_RLE == 0).sum(-1)
        for layer in range(dead_RL.shape[1]):
            ax.plot(steps, dead_RL[:, layer].tolist(), lw=1, label=f"layer {layer} (window)")
    for layer in range(len(evals[0]["dead"]) if evals else 0):
        frac = [r["dead"][layer] for r in evals]
        ys = [100 * f for f in frac] if E is None else [f * E for f in frac]
        ax.plot([r["step"] for r in evals], ys, "o", ms=4, label=f"layer {layer} (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("dead experts" if E is not None else "dead experts, %")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_entropy_history(
    records: Sequence[Mapping[str, Any]], path: Path, num_experts: int | None = None
) -> Path:
    """Mean per-token router entropy (nats) per layer over training (``router_entropy``).

    With ``num_experts`` the maximum, ``log E`` (a uniform router), is drawn dashed.
    """
    recs = [r for r in _applied(records) if r.get("router_entropy")]
    if not recs:
        raise ValueError("records hold no `router_entropy` (a log from before moeblocks 0.3?)")
    fig = _figure(figsize=(6, 3.2))
    ax = fig.add_subplot()
    h_RL = torch.tensor([r["router_entropy"] for r in recs], dtype=torch.float64)
    steps = [r["step"] for r in recs]
    for layer in range(h_RL.shape[1]):
        ax.plot(steps, h_RL[:, layer].tolist(), lw=1, label=f"layer {layer}")
    if num_experts:
        ax.axhline(math.log(num_experts), color="grey", ls="--", lw=1, label="log E")
    ax.set_xlabel("step")
    ax.set_ylabel("router entropy, nats")
    ax.legend(fontsize=7)
    return _save(fig, path)


# --- experiments ---------------------------------------------------------------------


def _mean_ci(value: Any) -> tuple[float, float]:
    """``(mean, half-width)`` of a cell: a number, a pair, or an object with ``mean``."""
    if value is None:
        return math.nan, math.nan
    if hasattr(value, "mean") and not isinstance(value, Tensor):
        return float(value.mean), float(getattr(value, "half_width", math.nan))
    if isinstance(value, Sequence) and not isinstance(value, str):
        return float(value[0]), float(value[1]) if len(value) > 1 else math.nan
    return float(value), math.nan


def plot_ablation(
    rows: Sequence[Mapping[str, Any]],
    path: Path,
    metrics: Sequence[str] | None = None,
    titles: Mapping[str, str] | None = None,
) -> Path:
    """One panel per metric: each variant's mean with its 95 % interval as an error bar.

    Args:
        rows: One mapping per variant: ``"name"`` and, per metric, a cell: a
            ``(mean, half_width)`` pair, a bare mean, or an object with ``mean`` and
            ``half_width`` attributes (e.g. ``CellSummary``). NaN means and cells
            that are missing are left out (a dense model has no dead experts); a NaN
            half-width draws the mean without a bar.
        path: Output file.
        metrics: Which keys to draw, in order (default: every key but ``"name"`` of the
            first row).
        titles: Panel title per metric key (default: the key).
    """
    if not rows:
        raise ValueError("rows must hold at least one variant, got none")
    names = [str(r["name"]) for r in rows]
    keys = list(metrics) if metrics is not None else [k for k in rows[0] if k != "name"]
    fig = _figure(figsize=(2.9 * max(len(keys), 1), 0.9 + 0.45 * len(rows)))
    axes = fig.subplots(1, max(len(keys), 1), squeeze=False, sharey=True)[0]
    colours = expert_colours(len(rows))
    for ax, key in zip(axes, keys, strict=False):
        for i, row in enumerate(rows):
            mean, hw = _mean_ci(row.get(key))
            if not math.isfinite(mean):
                ax.text(0.02, i, "–", va="center", transform=ax.get_yaxis_transform())
                continue
            ax.errorbar(mean, i, xerr=hw if math.isfinite(hw) else None, fmt="o",
                        color=colours[i], capsize=3)  # fmt: skip
        ax.set_title((titles or {}).get(key, key), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), names)
    axes[0].set_ylim(len(rows) - 0.5, -0.5)
    fig.suptitle("mean ± 95 % interval over seeds", fontsize=9)
    return _save(fig, path)
