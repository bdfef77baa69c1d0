"""Anchor–token traces and the anchor similarity matrix of cosine routers.

Legend: T tokens, E experts, K experts per token, L MoE layers.

For a :class:`~moeblocks.CosineScorer` the routing record already holds
``scores = |τ| · cos(x_t, a_e)``, so the cosine of every token to every anchor is
``scores / |τ|``: a trace needs only the records and each layer's temperature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from moeblocks.layer import MoELayer
from moeblocks.routers import CosineScorer
from moeblocks.routing import Routing

__all__ = [
    "AnchorTrace",
    "anchor_similarity",
    "anchor_traces",
    "format_trace",
    "layer_temperatures",
]


def anchor_similarity(anchors: CosineScorer | Float[Tensor, "E D"]) -> Float[Tensor, "E E"]:
    """Cosine similarity of every pair of anchors, ``cos(a_i, a_j)``, in [-1, 1].

    Args:
        anchors: The ``[E, D]`` anchors (e.g. ``router.anchors``) or a cosine scorer.

    The diagonal is 1; an orthogonal init gives 0 off the diagonal (for E <= D).
    """
    a = anchors.anchors_ED if isinstance(anchors, CosineScorer) else anchors
    a_ED = F.normalize(a.detach().float(), dim=-1, eps=CosineScorer.eps)
    return (a_ED @ a_ED.t()).cpu()


def layer_temperatures(model: nn.Module) -> list[float | None]:
    """``|τ|`` of every MoE layer's cosine scorer in module order (None: not cosine)."""
    out: list[float | None] = []
    for m in model.modules():
        if isinstance(m, MoELayer):
            tau = getattr(m.router, "temperature", None)
            out.append(None if tau is None else abs(float(tau.detach())))
    return out


@dataclass(frozen=True)
class AnchorTrace:
    """Per token and layer: chosen experts, their weights, and the score to every anchor.

    Attributes:
        experts: Per layer, the K chosen experts of each token.
        weights: Per layer, their combine weights.
        cosine: Per layer, ``cos(x_t, a_e)`` for every anchor (in [-1, 1]) where the
            layer's router is cosine; else the raw router score (logit).
        is_cosine: Per layer, whether ``cosine`` holds cosines (True) or raw scores.
    """

    experts: tuple[Int[Tensor, "T K"], ...]
    weights: tuple[Float[Tensor, "T K"], ...]
    cosine: tuple[Float[Tensor, "T E"], ...]
    is_cosine: tuple[bool, ...]


def anchor_traces(routings: Sequence[Routing], temperatures: Sequence[float | None]) -> AnchorTrace:
    """Trace the tokens of one forward pass through every layer.

    Args:
        routings: One record per layer (e.g. ``SRAOutput.routings`` for one sentence).
        temperatures: ``|τ|`` per layer from :func:`layer_temperatures` (None for a
            non-cosine router: its raw scores are reported).
    """
    if len(routings) != len(temperatures):
        raise ValueError(
            f"temperatures must have one entry per layer ({len(routings)}), got {len(temperatures)}"
        )
    cos = tuple(
        r.scores.detach().float().cpu() / (tau if tau else 1.0)
        for r, tau in zip(routings, temperatures, strict=True)
    )
    return AnchorTrace(
        tuple(r.experts.detach().cpu() for r in routings),
        tuple(r.weights.detach().float().cpu() for r in routings),
        cos,
        tuple(t is not None for t in temperatures),
    )


def format_trace(trace: AnchorTrace, pieces: Sequence[str], best: int = 3) -> str:
    """Plain-text table: per token and layer, chosen experts with weights and top anchors.

    Args:
        trace: The trace.
        pieces: Text of every token, for the first column.
        best: How many highest-scoring anchors to list per token and layer.
    """
    lines = []
    for t, piece in enumerate(pieces):
        cells = []
        for layer, (ex, w, cos) in enumerate(
            zip(trace.experts, trace.weights, trace.cosine, strict=True)
        ):
            chosen = ",".join(f"{int(e)}:{float(x):.2f}" for e, x in zip(ex[t], w[t], strict=True))
            vals, idx = cos[t].topk(min(best, cos.shape[1]))
            near = ",".join(f"{int(i)}({float(v):+.2f})" for i, v in zip(idx, vals, strict=True))
            cells.append(f"L{layer} [{chosen}] near {near}")
        lines.append(f"{piece!r:>14}  " + "  |  ".join(cells))
    return "\n".join(lines)
