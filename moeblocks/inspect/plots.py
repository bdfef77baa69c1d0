"""PNG plots of routing inspection results (needs the ``plots`` extra: matplotlib).

Legend: L MoE layers, E experts, C classes, T tokens.

Every function draws one figure with :class:`matplotlib.figure.Figure` (no pyplot, no
global backend state, so it works headless) and writes it to ``path``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from moeblocks._optional import require

__all__ = [
    "plot_anchor_similarity",
    "plot_class_heatmap",
    "plot_k_sweep",
    "plot_routing_map",
    "plot_utilisation",
]


def _figure(**kw: Any) -> Any:
    require("matplotlib", "plots", "moeblocks inspect plots")
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kw)


def plot_utilisation(utilisation_LE: Float[Tensor, "L E"], path: Path) -> Path:
    """Share of routed slots per expert, one panel per layer, experts sorted by share."""
    L, E = utilisation_LE.shape
    fig = _figure(figsize=(6, 1.2 + 1.8 * L))
    axes = fig.subplots(L, 1, squeeze=False)[:, 0]
    for layer, ax in enumerate(axes):
        share = utilisation_LE[layer].sort(descending=True).values
        dead = int((share == 0).sum())
        ax.bar(range(E), share.tolist(), width=1.0)
        ax.axhline(1 / E, color="black", ls="--", lw=1, label="uniform 1/E")
        ax.set_ylabel(f"layer {layer}\nshare")
        ax.set_title(f"layer {layer}: {dead}/{E} dead", fontsize=9)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("experts, sorted by share of routed slots")
    fig.savefig(path, dpi=100)
    return path


def plot_anchor_similarity(sims: Sequence[Float[Tensor, "E E"]], path: Path) -> Path:
    """Heatmap of anchor cosine similarity, one panel per (cosine-routed) layer."""
    n = max(len(sims), 1)
    fig = _figure(figsize=(3.6 * n, 3.4))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for layer, (ax, sim) in enumerate(zip(axes, sims, strict=False)):
        im = ax.imshow(sim.numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title(f"layer {layer}: cos(a_i, a_j)", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
    if sims:
        fig.colorbar(im, ax=list(axes), shrink=0.8)
    fig.savefig(path, dpi=100)
    return path


def plot_class_heatmap(
    npmi_EC: Float[Tensor, "E C"], classes: Sequence[str], path: Path, title: str = ""
) -> Path:
    """Expert × class heatmap of NPMI (red: the expert prefers the class)."""
    E, C = npmi_EC.shape
    fig = _figure(figsize=(1.5 + 0.6 * C, 2.0 + 0.2 * E))
    ax = fig.add_subplot()
    im = ax.imshow(
        torch.nan_to_num(npmi_EC, nan=0.0).numpy(), vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto"
    )
    ax.set_xticks(range(C), list(classes), rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("expert")
    ax.set_title(title or "NPMI(expert, class)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=100)
    return path


def plot_k_sweep(ks: Sequence[int], ppls: Sequence[float], k_train: int, path: Path) -> Path:
    """Validation perplexity against the inference-time k; the training k is marked."""
    fig = _figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    ax.plot(list(ks), list(ppls), "o-")
    if k_train in ks:
        ax.axvline(k_train, color="grey", ls="--", lw=1, label=f"training k = {k_train}")
        ax.legend()
    ax.set_xlabel("experts per token at inference (k)")
    ax.set_ylabel("validation perplexity")
    fig.savefig(path, dpi=100)
    return path


def plot_routing_map(
    top1_LT: Int[Tensor, "L T"], pieces: Sequence[str], path: Path, num_experts: int
) -> Path:
    """Token-by-layer map of one sentence: each cell is the token's top-1 expert."""
    L, T = top1_LT.shape
    fig = _figure(figsize=(1.5 + 0.42 * T, 1.0 + 0.5 * L))
    ax = fig.add_subplot()
    ax.imshow(top1_LT.numpy(), cmap="tab20", vmin=0, vmax=max(num_experts - 1, 1), aspect="auto")
    for layer in range(L):
        for t in range(T):
            ax.text(t, layer, str(int(top1_LT[layer, t])), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(T), [p.replace("Ġ", "␣") for p in pieces], rotation=60, fontsize=7)
    ax.set_yticks(range(L), [f"layer {i}" for i in range(L)])
    ax.set_title("top-1 expert per token and layer", fontsize=9)
    fig.savefig(path, dpi=100)
    return path
