"""Auxiliary routing losses, each a function of a :class:`~moeblocks.routing.Routing`.

Legend: T tokens, E experts, K experts per token.

Every loss takes ``(routing, mask=None)`` and returns an *unweighted* scalar;
:class:`~moeblocks.MoELayer` multiplies it by the loss's ``weight``. A loss that needs
module state (:class:`DispersionLoss` reads the anchors) is given its source at
construction and borrows it: the source is not registered as a submodule, so the loss
owns no parameter and its ``state_dict`` stays empty. The form
``(routing, router, mask)`` of moeblocks 0.1 still works for one release, with a
``DeprecationWarning``. ``mask`` is a
boolean ``[T]`` tensor, True for real tokens: padding is left out of every statistic.
Padding is excluded with ``torch.where``, never by multiplying by the mask (``0 · NaN``
is NaN), so NaN or inf in a padding token cannot reach a loss value or the gradient a
loss sends back into the routing record: that gradient is exactly zero on padding rows.
With no real token a loss is zero (and still part of the graph). Statistics below use
``P_e``, the mean router probability of expert ``e`` over the real tokens.

The balance losses built on ``P`` (:class:`LoadBalanceLoss`, :class:`CVSquaredLoss`,
:class:`BandpassLoss`) assume ``probs`` is a distribution over the experts, as with the
``"softmax"`` and ``"softmax_topk"`` scoring functions. With ``"sigmoid"`` scoring the
rows do not sum to 1 and these losses can be lowered by shrinking every score rather than
by balancing; use :class:`SequenceBalanceLoss` (which normalises per token) or a
:class:`~moeblocks.balancing.BiasBalancer` there.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias, runtime_checkable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn

from moeblocks.routers import CosineScorer
from moeblocks.routing import Routing, check_routing

__all__ = [
    "AuxLoss",
    "BandpassLoss",
    "CVSquaredLoss",
    "DispersionLoss",
    "LoadBalanceLoss",
    "SequenceBalanceLoss",
    "TokenStatLoss",
    "TokenStats",
    "ZLoss",
    "mean_expert_probs",
]


@runtime_checkable
class AuxLoss(Protocol):
    """An auxiliary loss: ``(routing, mask=None) -> scalar``, with a ``weight``."""

    weight: float
    """Factor the layer multiplies the value by before it reports it."""

    def __call__(
        self, routing: Routing, mask: Bool[Tensor, " T"] | None = None
    ) -> Float[Tensor, ""]:
        """The unweighted loss value."""
        ...


# The second argument of a loss call: the mask, or (deprecated, one release) the router
# of the 0.1 form ``(routing, router, mask)``.
MaskArg: TypeAlias = Bool[Tensor, " T"] | nn.Module | None


def _is_legacy(mask: object) -> bool:
    return mask is not None and not isinstance(mask, Tensor)


def _mask_of(mask: MaskArg, legacy: tuple[Tensor | None, ...]) -> Tensor | None:
    """The mask of a loss call, accepting the deprecated ``(routing, router, mask)``."""
    if not _is_legacy(mask):
        if legacy:
            raise TypeError(f"a loss takes (routing, mask=None), got {2 + len(legacy)} arguments")
        return mask  # type: ignore[return-value]
    if len(legacy) > 1:
        raise TypeError(f"a loss takes (routing, mask=None), got {2 + len(legacy)} arguments")
    warnings.warn(
        "loss(routing, router, mask) is deprecated and will be removed in the next "
        "release; call loss(routing, mask) (a DispersionLoss takes its anchors' source "
        "at construction)",
        DeprecationWarning,
        stacklevel=5,
    )
    return legacy[0] if legacy else None


def _check_weight(weight: float) -> float:
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    return float(weight)


def _check_mask(routing: Routing, mask: Tensor | None) -> Tensor | None:
    """``mask`` if it is a bool ``[T]`` tensor on the routing's device; None stays None."""
    if mask is None:
        return None
    T = routing.num_tokens
    if not isinstance(mask, Tensor) or mask.shape != (T,) or mask.dtype != torch.bool:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else repr(mask)
        raise ValueError(f"mask must be a bool tensor of shape [{T}], got {got}")
    if mask.device != routing.probs.device:
        raise ValueError(
            f"mask is on {mask.device} but routing.probs is on {routing.probs.device}; "
            "expected both on the same device"
        )
    return mask


def _real_rows(values: Tensor, mask: Tensor | None) -> Tensor:
    """``values`` (``[T]`` or ``[T, E]``) with the rows of padding tokens set to 0.

    A ``where``, not a product with the mask: NaN or inf in a padding row must not reach
    the result (``0 · NaN`` is NaN), and its gradient there is exactly zero.
    """
    if mask is None:
        return values
    keep = mask if values.ndim == 1 else mask.unsqueeze(-1)
    return torch.where(keep, values, 0.0)


def _routed_TE(routing: Routing) -> Tensor:
    """1 where token t has a real slot on expert e, else 0, in the probabilities' dtype.

    A token's experts are distinct, so each cell gets at most one slot; the empty slots
    of a dynamic-k record (``routing.slots``) add 0.
    """
    zeros_TE = torch.zeros_like(routing.probs)
    if routing.slots is None:
        return zeros_TE.scatter_(1, routing.experts, 1.0)
    return zeros_TE.scatter_add_(1, routing.experts, routing.slots.to(zeros_TE.dtype))


def _num_real(routing: Routing, mask: Tensor | None) -> Tensor:
    """The number of real tokens, as a scalar tensor of the probabilities' dtype."""
    probs = routing.probs
    if mask is None:
        # A sum, not new_tensor(float(T)): stays symbolic under torch.compile.
        return probs.new_ones(routing.num_tokens).sum()
    return mask.sum().to(probs.dtype)


@dataclass(frozen=True)
class TokenStats:
    """Sums over the real tokens of a batch: all that the token-statistic losses read.

    Sums (not means) so that statistics of several batches or ranks combine by adding
    them (:meth:`to_vector` / :meth:`from_vector`), after which every loss evaluates its
    formula on the combined means exactly as on one batch.

    Attributes:
        prob_sum: ``Σ_t probs[t, e]`` (differentiable).
        slot_count: ``Σ_t (slots of t routed to e)``: routed slots per expert; sums to
            ``k_sum``. Empty slots of a dynamic-k record count nowhere.
        z2_sum: ``Σ_t logsumexp(scores[t])²`` (differentiable).
        num_tokens: The number of real tokens, as a float tensor.
        k_sum: ``Σ_t K_t``, the real routed slots of the real tokens (K·T for a
            constant K).
    """

    prob_sum: Float[Tensor, " E"]
    slot_count: Float[Tensor, " E"]
    z2_sum: Float[Tensor, ""]
    num_tokens: Float[Tensor, ""]
    k_sum: Float[Tensor, ""]

    @classmethod
    def of(
        cls,
        routing: Routing,
        mask: Bool[Tensor, " T"] | None = None,
        *,
        num_experts: int | None = None,
    ) -> TokenStats:
        """The statistics of one routing record; ``mask`` is True for real tokens.

        Padding rows are replaced by zeros before any arithmetic, so NaN or inf there
        changes neither the sums nor their gradients.

        Raises:
            ValueError: If the record's fields disagree (see
                :func:`~moeblocks.routing.check_routing`), or it is not for
                ``num_experts`` experts when that is given.
        """
        routing = check_routing(routing, num_experts)
        mask = _check_mask(routing, mask)
        probs_TE = _real_rows(routing.probs, mask)
        slots_TE = _routed_TE(routing)
        # Zeroed scores keep logsumexp finite on padding rows; the rows are then dropped.
        z2_T = _real_rows(torch.logsumexp(_real_rows(routing.scores, mask), dim=-1).square(), mask)
        n = _num_real(routing, mask)
        slots_E = _real_rows(slots_TE, mask).sum(0)
        k_sum = n * routing.top_k if routing.slots is None else slots_E.sum()
        return cls(probs_TE.sum(0), slots_E, z2_T.sum(), n, k_sum)

    @classmethod
    def pooled(
        cls,
        routings: Sequence[Routing],
        # "_T": each record has its own token count, so the runtime shape check must
        # not bind one T across the masks.
        masks: Sequence[Bool[Tensor, " _T"] | None] | None = None,
    ) -> TokenStats:
        """Statistics of several records added up (layers of one model, micro-batches).

        Hugging Face's load-balance loss pools its statistics over all layers this way
        (see :class:`LoadBalanceLoss`).
        """
        if not routings:
            raise ValueError("routings must hold at least one Routing record")
        masks = [None] * len(routings) if masks is None else list(masks)
        if len(masks) != len(routings):
            raise ValueError(f"got {len(masks)} masks for {len(routings)} routing records")
        total = cls.of(routings[0], masks[0])
        for routing, mask in zip(routings[1:], masks[1:], strict=True):
            total = total + cls.of(routing, mask)
        return total

    def __add__(self, other: TokenStats) -> TokenStats:
        """Statistics of the union of both token sets (of the same E experts)."""
        if not isinstance(other, TokenStats):
            return NotImplemented
        E = self.prob_sum.shape[0]
        if other.prob_sum.shape[0] != E:
            raise ValueError(
                f"other must be TokenStats of the same {E} experts, got {other.prob_sum.shape[0]}"
            )
        return TokenStats.from_vector(self.to_vector() + other.to_vector(), num_experts=E)

    def to_vector(self) -> Float[Tensor, " S"]:
        """All statistics in one vector of ``2E + 3`` numbers, e.g. for one all-reduce."""
        return torch.cat(
            [
                self.prob_sum,
                self.slot_count,
                self.z2_sum.view(1),
                self.num_tokens.view(1),
                self.k_sum.view(1),
            ]
        )

    @classmethod
    def from_vector(
        cls, vector: Float[Tensor, " S"], *, num_experts: int | None = None
    ) -> TokenStats:
        """Inverse of :meth:`to_vector`.

        Args:
            vector: ``2E + 3`` floats, as :meth:`to_vector` lays them out.
            num_experts: The E the statistics must be of. Give it whenever it is known:
                a vector of another length is then refused, where without it any odd
                length >= 5 reads as *some* E.

        Raises:
            TypeError: If ``vector`` is not a floating-point tensor.
            ValueError: If its shape is not ``[2E + 3]`` (for ``num_experts`` when given).
        """
        if not isinstance(vector, Tensor) or not vector.is_floating_point():
            got = vector.dtype if isinstance(vector, Tensor) else type(vector).__name__
            raise TypeError(f"vector must be a floating-point tensor (from to_vector), got {got}")
        if num_experts is not None:
            want = 2 * num_experts + 3
            if vector.shape != (want,):
                raise ValueError(
                    f"vector must have shape [2E + 3] = [{want}] for num_experts={num_experts} "
                    f"(from to_vector), got {tuple(vector.shape)}"
                )
        if vector.ndim != 1 or vector.shape[0] < 5 or (vector.shape[0] - 3) % 2:
            raise ValueError(
                f"vector must have shape [2E + 3] with E >= 1 (from to_vector), "
                f"got {tuple(vector.shape)}"
            )
        E = (vector.shape[0] - 3) // 2
        return cls(
            vector[:E], vector[E : 2 * E], vector[2 * E], vector[2 * E + 1], vector[2 * E + 2]
        )

    def _n(self) -> Tensor:
        # Clamped so that an all-padding batch gives zero, not NaN.
        return self.num_tokens.clamp(min=1.0)

    @property
    def mean_probs(self) -> Float[Tensor, " E"]:
        """``P_e``, the mean router probability of each expert (0 with no real token)."""
        return self.prob_sum / self._n()

    @property
    def slot_fractions(self) -> Float[Tensor, " E"]:
        """``f_e``, the fraction of routed slots that go to each expert (sums to 1)."""
        return self.slot_count / self.k_sum.clamp(min=1.0)

    @property
    def token_fractions(self) -> Float[Tensor, " E"]:
        """The fraction of real tokens that chose each expert (sums to the mean K)."""
        return self.slot_count / self._n()

    @property
    def mean_z2(self) -> Float[Tensor, ""]:
        """Mean squared logsumexp of the scores."""
        return self.z2_sum / self._n()


def mean_expert_probs(
    routing: Routing, mask: Bool[Tensor, " T"] | None = None
) -> Float[Tensor, " E"]:
    """``P_e``: the mean router probability of each expert over the real tokens."""
    mask = _check_mask(check_routing(routing), mask)
    return _real_rows(routing.probs, mask).sum(0) / _num_real(routing, mask).clamp(min=1.0)


class _Loss(nn.Module):
    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = _check_weight(weight)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"weight={self.weight}"


class TokenStatLoss(_Loss):
    """Base of the losses that are a function of :class:`TokenStats` alone.

    ``forward(routing, mask)`` is ``from_stats(TokenStats.of(routing, mask))``;
    wrappers that combine statistics across batches or ranks call :meth:`from_stats`
    on the combined statistics.
    """

    def from_stats(self, stats: TokenStats) -> Float[Tensor, ""]:
        """The unweighted loss of these statistics."""
        raise NotImplementedError

    def forward(
        self, routing: Routing, mask: MaskArg = None, *legacy: Bool[Tensor, " T"] | None
    ) -> Float[Tensor, ""]:
        """The unweighted loss.

        Raises:
            ValueError: If the record's fields disagree (see
                :func:`~moeblocks.routing.check_routing`).
        """
        return self.from_stats(TokenStats.of(routing, _mask_of(mask, legacy)))


class LoadBalanceLoss(TokenStatLoss):
    """Switch Transformer load balance: ``E · Σ_e f_e · P_e``.

    ``P_e`` is the mean router probability of expert ``e`` (differentiable). ``f_e``
    (not differentiable) counts the routed slots of expert ``e`` over the real tokens:

    - ``fractions="slots"`` (default): the fraction of the K·T slots, so ``Σ f = 1``; the
      loss is 1 for perfectly uniform routing and grows to E when one expert takes all.
    - ``fractions="tokens"``: the fraction of tokens that chose ``e``, so ``Σ f = K``
      (Hugging Face's ``load_balancing_loss_func``: K times the default). Evaluated on
      ``TokenStats.pooled`` over all layers it reproduces HF's ``aux_loss``.

    With a process ``group`` the counts behind ``f`` are summed over the group while
    ``P`` stays local: the global-batch balance loss of Qwen (each rank balances towards
    the global load, not its own micro-batch).

    Args:
        weight: Multiplier applied by the layer.
        fractions: ``"slots"`` or ``"tokens"``, see above.
        group: Process group for global-batch ``f``; None keeps it local.
    """

    def __init__(
        self,
        weight: float = 0.01,
        fractions: str = "slots",
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(weight)
        if fractions not in ("slots", "tokens"):
            raise ValueError(f"fractions must be 'slots' or 'tokens', got {fractions!r}")
        self.fractions = fractions
        self.group = group

    def from_stats(self, stats: TokenStats) -> Float[Tensor, ""]:
        """``E · Σ_e f_e · P_e``."""
        E = stats.prob_sum.shape[0]
        counts = stats
        if self.group is not None:
            vector = stats.to_vector().detach().clone()
            dist.all_reduce(vector, group=self.group)
            counts = TokenStats.from_vector(vector, num_experts=E)
        f_E = counts.token_fractions if self.fractions == "tokens" else counts.slot_fractions
        return E * (f_E.detach() * stats.mean_probs).sum()

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"weight={self.weight}, fractions={self.fractions!r}"


class SequenceBalanceLoss(_Loss):
    """DeepSeek-V3's sequence-wise balance loss, averaged over sequences.

    Per sequence of S real tokens, with ``s'`` the router probabilities normalised to sum
    to 1 per token (sigmoid scores do not):

    ``L = Σ_e f_e · P_e``, ``f_e = E / (K · S) · Σ_t 1[e chosen by t]``,
    ``P_e = (1/S) · Σ_t s'[t, e]``

    (1 for perfectly uniform routing). Sequences come from ``Routing.batch_shape`` (the
    last leading dim of the layer input); without it all tokens form one sequence.
    Sequences with no real token are left out; with none at all the loss is 0.
    """

    def __init__(self, weight: float = 1e-4) -> None:
        super().__init__(weight)

    def forward(
        self, routing: Routing, mask: MaskArg = None, *legacy: Bool[Tensor, " T"] | None
    ) -> Float[Tensor, ""]:
        """The unweighted loss.

        Raises:
            ValueError: If ``routing.batch_shape`` does not cover the routing's T tokens,
                ``mask`` is not a bool ``[T]`` tensor on the routing's device, or the
                record's fields disagree (or are for another E than ``router``'s).
        """
        routing = check_routing(routing)
        mask = _check_mask(routing, _mask_of(mask, legacy))
        B, S = routing.sequences()
        if routing.num_tokens != B * S:
            raise ValueError(
                f"routing.batch_shape {routing.batch_shape} does not cover the routing's "
                f"{routing.num_tokens} tokens; expected leading dims whose product is T"
            )
        E, K = routing.num_experts, routing.top_k
        # Padding rows become 0 first (their normalised row is then 0 / tiny = 0).
        probs = _real_rows(routing.probs, mask)
        s_TE = probs / probs.sum(-1, keepdim=True).clamp(min=torch.finfo(probs.dtype).tiny)
        slots_TE = _real_rows(_routed_TE(routing), mask)
        if mask is None:
            n_B = probs.new_ones(B, S).sum(1)
        else:
            n_B = mask.view(B, S).sum(1).to(probs.dtype)
        n_B1 = n_B.clamp(min=1).unsqueeze(-1)
        P_BE = s_TE.view(B, S, E).sum(1) / n_B1
        slots_BE = slots_TE.view(B, S, E).sum(1)
        # Real slots per sequence: K·n for a fixed k, the sum of the record's for dynamic k.
        k_B1 = K * n_B1 if routing.slots is None else slots_BE.sum(-1, keepdim=True).clamp(min=1)
        f_BE = slots_BE * E / k_B1
        per_seq_B = (f_BE * P_BE).sum(-1)
        has_B = n_B > 0
        return _real_rows(per_seq_B, has_B).sum() / has_B.sum().clamp(min=1)


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
        penalty = P_E.shape[0] ** 2 * (below_E + above_E).mean()
        return torch.where(stats.num_tokens > 0, penalty, 0.0)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"floor={self.floor}, ceiling={self.ceiling}, weight={self.weight}"


class _Borrowed:
    """Holds a module without registering it, so the holder owns none of its state.

    A plain object, not a closure: ``copy.deepcopy`` of a model copies it through the
    same memo as the model, so a copied loss borrows from the copied module.
    """

    def __init__(self, module: object) -> None:
        self.module = module


def _anchors_of(source: object) -> Tensor:
    anchors = getattr(source, "anchors", None)
    if not isinstance(anchors, Tensor) or anchors.ndim != 2:
        raise TypeError(
            "DispersionLoss needs a source whose `anchors` is an [E, D] tensor (a Router "
            f"with a CosineScorer, or the CosineScorer), got {type(source).__name__} with "
            f"anchors={type(anchors).__name__}"
        )
    return anchors


class DispersionLoss(_Loss):
    """Mean off-diagonal cosine similarity of the anchors: ``Σ_{e≠f} cos(a_e, a_f) / (E(E−1))``.

    Pushes anchors apart so experts cover different directions; zero for a single
    expert. The routing record and the mask are accepted for a uniform signature and
    have no effect.

    Args:
        weight: Multiplier applied by the layer.
        source: Where the anchors are read at every call: any object whose ``anchors``
            is an ``[E, D]`` tensor (a :class:`~moeblocks.Router` with a
            :class:`~moeblocks.CosineScorer`, or the scorer itself). Borrowed, not
            owned: it is not registered as a submodule, so the loss has no parameters
            and an empty ``state_dict``. None: an :class:`~moeblocks.MoELayer` binds a
            copy of this loss to its router at construction.
    """

    def __init__(self, weight: float = 0.01, source: object | None = None) -> None:
        super().__init__(weight)
        if source is not None:
            _anchors_of(source)
        self._source = None if source is None else _Borrowed(source)

    @property
    def source(self) -> object | None:
        """The borrowed object the anchors are read from (None: not bound yet)."""
        return None if self._source is None else self._source.module

    def bind(self, source: object) -> DispersionLoss:
        """A new loss of the same weight that reads its anchors from ``source``."""
        return DispersionLoss(self.weight, source)

    def forward(
        self, routing: Routing, mask: MaskArg = None, *legacy: Bool[Tensor, " T"] | None
    ) -> Float[Tensor, ""]:
        """The unweighted loss.

        Raises:
            TypeError: If the loss has no source (and is not called in the deprecated
                form that passes the router).
        """
        source = self.source
        if _is_legacy(mask):
            source = mask if source is None else source
            _mask_of(mask, legacy)
        if source is None:
            raise TypeError(
                "DispersionLoss has no anchors to read: give source= (the router or its "
                "CosineScorer) at construction, or use it inside an MoELayer"
            )
        a_ED = F.normalize(_anchors_of(source).float(), dim=-1, eps=CosineScorer.eps)
        check_routing(routing, a_ED.shape[0])  # a record for the anchors' E experts
        E = a_ED.shape[0]
        if E == 1:
            return a_ED.sum() * 0
        sim_EE = a_ED @ a_ED.t()
        return (sim_EE.sum() - sim_EE.diagonal().sum()) / (E * (E - 1))
