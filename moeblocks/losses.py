"""Auxiliary routing losses, each a function of a :class:`~moeblocks.routing.Routing`.

Legend: T tokens, E experts, K experts per token.

Every loss takes ``(routing, router, mask)`` and returns an *unweighted* scalar;
:class:`~moeblocks.MoELayer` multiplies it by the loss's ``weight``. ``mask`` is a
boolean ``[T]`` tensor, True for real tokens: padding is left out of every statistic.
With no real token a loss is zero (and still part of the graph). Statistics below use
``P_e``, the mean router probability of expert ``e`` over the real tokens.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn

from moeblocks.routers import CosineScorer
from moeblocks.routing import Routing

__all__ = [
    "AuxLoss",
    "BandpassLoss",
    "CVSquaredLoss",
    "DispersionLoss",
    "LoadBalanceLoss",
    "ZLoss",
    "mean_expert_probs",
]


@runtime_checkable
class AuxLoss(Protocol):
    """An auxiliary loss: ``(routing, router, mask) -> scalar``, with a ``weight``."""

    weight: float

    def __call__(
        self, routing: Routing, router: nn.Module, mask: Bool[Tensor, " T"] | None = None
    ) -> Float[Tensor, ""]:
        """The unweighted loss value."""
        ...


def _check_weight(weight: float) -> float:
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    return float(weight)


def _token_weights(routing: Routing, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-token float weights (1 real, 0 padding) and their sum, clamped to >= 1."""
    T = routing.num_tokens
    if mask is None:
        m_T = routing.probs.new_ones(T)
    else:
        if mask.shape != (T,) or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor of shape [{T}], got {mask.dtype} {tuple(mask.shape)}"
            )
        m_T = mask.to(routing.probs.dtype)
    # Clamped so that an all-padding batch gives zero, not NaN.
    return m_T, m_T.sum().clamp(min=1.0)


def mean_expert_probs(
    routing: Routing, mask: Bool[Tensor, " T"] | None = None
) -> Float[Tensor, " E"]:
    """``P_e``: the mean router probability of each expert over the real tokens."""
    m_T, n = _token_weights(routing, mask)
    return (m_T @ routing.probs) / n


class _Loss(nn.Module):
    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = _check_weight(weight)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"weight={self.weight}"


class LoadBalanceLoss(_Loss):
    """Switch Transformer load balance: ``E · Σ_e f_e · P_e``.

    ``f_e`` is the fraction of the real tokens' K·T routed slots that go to expert ``e``
    (not differentiable), ``P_e`` the mean router probability. It equals 1 when routing
    is perfectly uniform and grows to E when one expert takes everything.
    """

    def __init__(self, weight: float = 0.01) -> None:
        super().__init__(weight)

    def forward(
        self, routing: Routing, router: nn.Module, mask: Bool[Tensor, " T"] | None = None
    ) -> Float[Tensor, ""]:
        """The unweighted loss."""
        m_T, n = _token_weights(routing, mask)
        E = routing.num_experts
        one_hot_TE = F.one_hot(routing.experts, E).to(m_T.dtype).sum(dim=1)
        f_E = (m_T @ one_hot_TE) / (n * routing.top_k)
        P_E = (m_T @ routing.probs) / n
        return E * (f_E * P_E).sum()


class CVSquaredLoss(_Loss):
    """SRA's balance loss, the squared coefficient of variation ``Var(P) / mean(P)²``.

    ``Var`` is the population variance over experts. Zero for uniform ``P``; at most
    E − 1 when one expert takes all probability.
    """

    def __init__(self, weight: float = 0.01) -> None:
        super().__init__(weight)

    def forward(
        self, routing: Routing, router: nn.Module, mask: Bool[Tensor, " T"] | None = None
    ) -> Float[Tensor, ""]:
        """The unweighted loss."""
        P_E = mean_expert_probs(routing, mask)
        mean = P_E.mean()
        # With no real token P is all zeros: the clamp keeps the result 0, not NaN.
        return (
            P_E.var(unbiased=False) / mean.square().clamp(min=1e-12)
            if P_E.numel() > 1
            else P_E.sum() * 0
        )


class ZLoss(_Loss):
    """ST-MoE router z-loss: ``mean_t logsumexp(scores_t)²`` over real tokens.

    Keeps router logits small, which keeps the softmax numerically stable.
    """

    def __init__(self, weight: float = 0.001) -> None:
        super().__init__(weight)

    def forward(
        self, routing: Routing, router: nn.Module, mask: Bool[Tensor, " T"] | None = None
    ) -> Float[Tensor, ""]:
        """The unweighted loss."""
        m_T, n = _token_weights(routing, mask)
        z_T = torch.logsumexp(routing.scores, dim=-1)
        return (m_T * z_T.square()).sum() / n


class BandpassLoss(_Loss):
    """SRA's corridor on expert usage: ``E² · mean_e(relu(floor − P_e)² + relu(P_e − ceiling)²)``.

    Zero while every expert's mean probability stays inside ``[floor, ceiling]``; pushes
    under-used experts up and over-used ones down. The E² factor keeps the scale of the
    gradient comparable across expert counts. SRA uses floor 0.0005, ceiling 0.0040 for
    256 experts (uniform usage is 1/256 ≈ 0.0039) with weight 0.4.

    Args:
        floor: Lowest mean probability an expert may have without penalty, in [0, 1].
        ceiling: Highest, in [floor, 1].
        weight: Multiplier applied by the layer.
    """

    def __init__(self, floor: float = 0.0005, ceiling: float = 0.0040, weight: float = 0.4) -> None:
        super().__init__(weight)
        if not 0.0 <= floor <= ceiling <= 1.0:
            raise ValueError(
                f"need 0 <= floor <= ceiling <= 1, got floor={floor!r}, ceiling={ceiling!r}"
            )
        self.floor = float(floor)
        self.ceiling = float(ceiling)

    def forward(
        self, routing: Routing, router: nn.Module, mask: Bool[Tensor, " T"] | None = None
    ) -> Float[Tensor, ""]:
        """The unweighted loss."""
        m_T, n = _token_weights(routing, mask)
        P_E = (m_T @ routing.probs) / n
        below_E = F.relu(self.floor - P_E).square()
        above_E = F.relu(P_E - self.ceiling).square()
        # With no real token there is no usage to judge (P would read as all zeros).
        has_tokens = (m_T.sum() > 0).to(P_E.dtype)
        return has_tokens * routing.num_experts**2 * (below_E + above_E).mean()

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"floor={self.floor}, ceiling={self.ceiling}, weight={self.weight}"


class DispersionLoss(_Loss):
    """Mean off-diagonal cosine similarity of the anchors: ``Σ_{e≠f} cos(a_e, a_f) / (E(E−1))``.

    Pushes anchors apart so experts cover different directions. Needs a router whose
    scorer is a :class:`~moeblocks.routers.CosineScorer`; zero for a single expert. The
    mask is accepted for a uniform signature and has no effect.
    """

    def __init__(self, weight: float = 0.01) -> None:
        super().__init__(weight)

    def forward(
        self, routing: Routing, router: nn.Module, mask: Bool[Tensor, " T"] | None = None
    ) -> Float[Tensor, ""]:
        """The unweighted loss."""
        scorer = getattr(router, "scorer", None)
        if not isinstance(scorer, CosineScorer):
            raise TypeError(
                "DispersionLoss needs a router with a CosineScorer, got scorer "
                f"{type(scorer).__name__}"
            )
        a_ED = F.normalize(scorer.anchors_ED.float(), dim=-1, eps=CosineScorer.eps)
        E = a_ED.shape[0]
        if E == 1:
            return a_ED.sum() * 0
        sim_EE = a_ED @ a_ED.t()
        return (sim_EE.sum() - sim_EE.diagonal().sum()) / (E * (E - 1))
