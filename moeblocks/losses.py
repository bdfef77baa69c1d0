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
from dataclasses import dataclass
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
    "TokenStatLoss",
    "TokenStats",
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


def _token_weights(routing: Routing, mask: Tensor | None) -> Tensor:
    """Per-token float weights: 1 for a real token, 0 for padding."""
    T = routing.num_tokens
    if mask is None:
        return routing.probs.new_ones(T)
    if mask.shape != (T,) or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor of shape [{T}], got {mask.dtype} {tuple(mask.shape)}"
        )
    return mask.to(routing.probs.dtype)


@dataclass(frozen=True)
class TokenStats:
    """Sums over the real tokens of a batch: all that the token-statistic losses read.

    Sums (not means) so that statistics of several batches or ranks combine by adding
    them (:meth:`to_vector` / :meth:`from_vector`), after which every loss evaluates its
    formula on the combined means exactly as on one batch.

    Attributes:
        prob_sum: ``Σ_t probs[t, e]`` (differentiable).
        slot_sum: ``Σ_t (slots of t routed to e) / K``; sums to the number of real tokens.
        z2_sum: ``Σ_t logsumexp(scores[t])²`` (differentiable).
        num_tokens: The number of real tokens, as a float tensor.
    """

    prob_sum: Float[Tensor, " E"]
    slot_sum: Float[Tensor, " E"]
    z2_sum: Float[Tensor, ""]
    num_tokens: Float[Tensor, ""]

    @classmethod
    def of(cls, routing: Routing, mask: Bool[Tensor, " T"] | None = None) -> TokenStats:
        """The statistics of one routing record; ``mask`` is True for real tokens."""
        m_T = _token_weights(routing, mask)
        # Each token's K experts are distinct, so the scatter writes each cell once.
        slots_TE = torch.zeros_like(routing.probs).scatter_(1, routing.experts, 1.0)
        z2_T = torch.logsumexp(routing.scores, dim=-1).square()
        return cls(m_T @ routing.probs, (m_T @ slots_TE) / routing.top_k, m_T @ z2_T, m_T.sum())

    def to_vector(self) -> Float[Tensor, " S"]:
        """All statistics in one vector of ``2E + 2`` numbers, e.g. for one all-reduce."""
        return torch.cat(
            [self.prob_sum, self.slot_sum, self.z2_sum.view(1), self.num_tokens.view(1)]
        )

    @classmethod
    def from_vector(cls, vector: Float[Tensor, " S"]) -> TokenStats:
        """Inverse of :meth:`to_vector`."""
        E = (vector.shape[0] - 2) // 2
        return cls(vector[:E], vector[E : 2 * E], vector[2 * E], vector[2 * E + 1])

    def _n(self) -> Tensor:
        # Clamped so that an all-padding batch gives zero, not NaN.
        return self.num_tokens.clamp(min=1.0)

    @property
    def mean_probs(self) -> Float[Tensor, " E"]:
        """``P_e``, the mean router probability of each expert (0 with no real token)."""
        return self.prob_sum / self._n()

    @property
    def slot_fractions(self) -> Float[Tensor, " E"]:
        """``f_e``, the fraction of routed slots that go to each expert."""
        return self.slot_sum / self._n()

    @property
    def mean_z2(self) -> Float[Tensor, ""]:
        """Mean squared logsumexp of the scores."""
        return self.z2_sum / self._n()


def mean_expert_probs(
    routing: Routing, mask: Bool[Tensor, " T"] | None = None
) -> Float[Tensor, " E"]:
    """``P_e``: the mean router probability of each expert over the real tokens."""
    m_T = _token_weights(routing, mask)
    return (m_T @ routing.probs) / m_T.sum().clamp(min=1.0)


class _Loss(nn.Module):
    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = _check_weight(weight)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"weight={self.weight}"


class TokenStatLoss(_Loss):
    """Base of the losses that are a function of :class:`TokenStats` alone.

    ``forward(routing, router, mask)`` is ``from_stats(TokenStats.of(routing, mask))``;
    wrappers that combine statistics across batches or ranks call :meth:`from_stats`
    on the combined statistics.
    """

    def from_stats(self, stats: TokenStats) -> Float[Tensor, ""]:
        """The unweighted loss of these statistics."""
        raise NotImplementedError

    def forward(
        self, routing: Routing, router: nn.Module, mask: Bool[Tensor, " T"] | None = None
    ) -> Float[Tensor, ""]:
        """The unweighted loss."""
        return self.from_stats(TokenStats.of(routing, mask))


class LoadBalanceLoss(TokenStatLoss):
    """Switch Transformer load balance: ``E · Σ_e f_e · P_e``.

    ``f_e`` is the fraction of the real tokens' K·T routed slots that go to expert ``e``
    (not differentiable), ``P_e`` the mean router probability. It equals 1 when routing
    is perfectly uniform and grows to E when one expert takes everything.
    """

    def __init__(self, weight: float = 0.01) -> None:
        super().__init__(weight)

    def from_stats(self, stats: TokenStats) -> Float[Tensor, ""]:
        """``E · Σ_e f_e · P_e``."""
        E = stats.prob_sum.shape[0]
        return E * (stats.slot_fractions * stats.mean_probs).sum()


class CVSquaredLoss(TokenStatLoss):
    """SRA's balance loss, the squared coefficient of variation ``Var(P) / mean(P)²``.

    ``Var`` is the population variance over experts. Zero for uniform ``P``; at most
    E − 1 when one expert takes all probability.
    """

    def __init__(self, weight: float = 0.01) -> None:
        super().__init__(weight)

    def from_stats(self, stats: TokenStats) -> Float[Tensor, ""]:
        """``Var(P) / mean(P)²`` (0 for one expert)."""
        P_E = stats.mean_probs
        if P_E.numel() == 1:
            return P_E.sum() * 0
        # With no real token P is all zeros: the clamp keeps the result 0, not NaN.
        return P_E.var(unbiased=False) / P_E.mean().square().clamp(min=1e-12)


class ZLoss(TokenStatLoss):
    """ST-MoE router z-loss: ``mean_t logsumexp(scores_t)²`` over real tokens.

    Keeps router logits small, which keeps the softmax numerically stable.
    """

    def __init__(self, weight: float = 0.001) -> None:
        super().__init__(weight)

    def from_stats(self, stats: TokenStats) -> Float[Tensor, ""]:
        """The mean squared logsumexp."""
        return stats.mean_z2


class BandpassLoss(TokenStatLoss):
    """SRA's corridor on expert usage: ``E² · mean_e(relu(floor − P_e)² + relu(P_e − ceiling)²)``.

    Zero while every expert's mean probability stays inside ``[floor, ceiling]``; pushes
    under-used experts up and over-used ones down. The E² factor keeps the scale of the
    gradient comparable across expert counts. SRA uses floor 0.0005, ceiling 0.0040 for
    256 experts (uniform usage is 1/256 ≈ 0.0039) with weight 0.4. With no real token
    the loss is 0.

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

    def from_stats(self, stats: TokenStats) -> Float[Tensor, ""]:
        """The corridor penalty of ``P``."""
        P_E = stats.mean_probs
        below_E = F.relu(self.floor - P_E).square()
        above_E = F.relu(P_E - self.ceiling).square()
        # With no real token there is no usage to judge (P would read as all zeros).
        has_tokens = (stats.num_tokens > 0).to(P_E.dtype)
        return has_tokens * P_E.shape[0] ** 2 * (below_E + above_E).mean()

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
