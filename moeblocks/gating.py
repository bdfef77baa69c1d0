"""The parts a router is composed from: scoring function, selection, weight policy.

Legend: T tokens, E experts, K experts per token, G expert groups.

A router turns raw scores (logits) into a :class:`~moeblocks.routing.Routing` in three
independent steps:

1.  **Scoring function** (by name) maps logits to per-expert probabilities ``probs``,
    the *selection key* the experts are chosen by, and the raw *gates* of the chosen
    ones:

    | name | ``probs`` | selection key | gates of the K chosen experts |
    |---|---|---|---|
    | ``"softmax"`` | softmax over all E | ``probs`` | ``probs`` of the chosen |
    | ``"sigmoid"`` | ``sigmoid(logits)`` | ``probs`` | ``probs`` of the chosen |
    | ``"softmax_topk"`` | softmax over all E | ``logits`` | softmax over the K chosen logits |
    | ``"sigmoid_logits"`` | ``sigmoid(logits)`` | ``logits`` | ``probs`` of the chosen |
    | ``"sqrt_softplus"`` | ``sqrt(softplus(logits))`` | ``probs`` | ``probs`` of the chosen |

    (Mixtral, Qwen-MoE, OLMoE and SRA use ``"softmax"``; DeepSeek-V3 and Llama-4
    ``"sigmoid"``; GPT-OSS ``"softmax_topk"``; Kolibri ``"sigmoid_logits"``, which differs
    from ``"sigmoid"`` only when a selection bias is added: to the logits, not to the
    sigmoids; DeepSeek-V4 ``"sqrt_softplus"``.) A selection-only bias (see
    :class:`~moeblocks.balancing.BiasBalancer`) is added to the key, never to the gates.

2.  **Selection** picks K experts per token from the key: :class:`TopK`, or
    :class:`GroupLimitedTopK` (DeepSeek-V3: first the best groups, then top-k inside
    them). A :class:`DynamicSelection` gives each token its own number of experts and
    marks which of the K slots are real: :class:`TopP` (experts until their mass
    reaches p) and :class:`ExpertChoice` (each expert takes its best tokens).
    :class:`HashSelection` ignores the key: a fixed table maps each token id to its
    experts (the router is then given ``token_ids``).

3.  **Weight policy** turns the gates into combine weights: :class:`WeightPolicy`
    (renormalise always, only for K > 1, or never; then multiply by a routed scaling
    factor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from moeblocks._checks import check_expert_ids, check_float, check_index, value_checks

__all__ = [
    "SCORINGS",
    "AlwaysOnTopK",
    "DynamicSelection",
    "ExpertChoice",
    "GatedSelection",
    "GroupLimitedTopK",
    "HashSelection",
    "NormedScorer",
    "ScaledScorer",
    "Selection",
    "SoftCappedScorer",
    "SparseMixer",
    "TopK",
    "TopP",
    "WeightPolicy",
    "check_scoring",
    "gates",
    "score_probs",
    "selection_key",
]

SCORINGS = ("softmax", "sigmoid", "softmax_topk", "sigmoid_logits", "sqrt_softplus")
"""The scoring-function names a :class:`~moeblocks.Router` accepts."""


def check_scoring(scoring: str) -> str:
    """Validate a scoring-function name."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    return scoring


def score_probs(scoring: str, logits: Float[Tensor, "T E"]) -> Float[Tensor, "T E"]:
    """``probs`` of the :class:`~moeblocks.routing.Routing` record for this scoring."""
    check_scoring(scoring)
    if scoring in ("sigmoid", "sigmoid_logits"):
        return torch.sigmoid(logits)
    if scoring == "sqrt_softplus":  # DeepSeek-V4: unbounded above, no sum to 1
        return torch.nn.functional.softplus(logits).sqrt()
    return torch.softmax(logits, dim=-1)


def selection_key(
    scoring: str, logits: Float[Tensor, "T E"], probs: Float[Tensor, "T E"]
) -> Float[Tensor, "T E"]:
    """What the experts are chosen by, before any selection-only bias."""
    check_scoring(scoring)
    # softmax_topk ranks raw logits (as GPT-OSS does); the softmax is monotone, but two
    # distinct large logits can round to one probability.
    return logits if scoring in ("softmax_topk", "sigmoid_logits") else probs


def gates(
    scoring: str,
    logits: Float[Tensor, "T E"],
    probs: Float[Tensor, "T E"],
    experts: Int[Tensor, "T K"],
) -> Float[Tensor, "T K"]:
    """Raw gate values of the chosen experts, before the weight policy."""
    check_scoring(scoring)
    if experts.ndim != 2 or experts.shape[0] != logits.shape[0]:
        raise ValueError(
            f"experts must have shape [T, K] with the T = {logits.shape[0]} of logits, "
            f"got {tuple(experts.shape)}"
        )
    if scoring == "softmax_topk":
        return torch.softmax(logits.gather(1, experts), dim=-1)
    return probs.gather(1, experts)


@runtime_checkable
class Selection(Protocol):
    """Chooses K experts per token from a selection key, best first."""

    def check(self, num_experts: int, max_k: int) -> None:
        """Raise ``ValueError`` when this selection cannot serve E experts and k up to max_k."""
        ...

    def __call__(self, key: Float[Tensor, "T E"], k: int) -> Int[Tensor, "T K"]:
        """Indices of the chosen experts, in descending order of ``key``."""
        ...


def _check_k(k: object, num_experts: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"k must be an int in [1, {num_experts}] (E of key), got {k!r}")


@dataclass(frozen=True)
class TopK:
    """Plain top-k: the K experts with the largest key."""

    def check(self, num_experts: int, max_k: int) -> None:
        """Any k in [1, E] works."""
        if max_k > num_experts:
            raise ValueError(f"k reaches {max_k} but there are only {num_experts} experts")

    def __call__(self, key: Float[Tensor, "T E"], k: int) -> Int[Tensor, "T K"]:
        """``key.topk(k)``, sorted."""
        check_float(key, "key", 2)
        _check_k(k, key.shape[1])
        return key.topk(k, dim=-1).indices


@dataclass(frozen=True)
class GroupLimitedTopK:
    """Group-limited top-k (DeepSeek-V3's node-limited routing).

    The E experts form ``num_groups`` contiguous groups of ``E / num_groups``. A group's
    score is the sum of its ``group_score_k`` largest keys; each token keeps its
    ``groups_per_token`` best groups and takes plain top-k among their experts.

    Args:
        num_groups: Number of expert groups G (``n_group``); must divide E.
        groups_per_token: Groups each token may use (``topk_group``), in [1, G].
        group_score_k: Keys summed per group (2 in DeepSeek-V3).
        dropped_fill: The key the experts of the dropped groups get before the top-k.
            ``-inf`` (default) never chooses them. AXK-2 fills with ``0.0``: where the
            keys of the kept experts can be negative (a negative selection bias), an
            expert of a dropped group can then win a slot, and any k up to E is served.
    """

    num_groups: int
    groups_per_token: int
    group_score_k: int = 2
    dropped_fill: float = -math.inf

    def __post_init__(self) -> None:
        for name in ("num_groups", "groups_per_token", "group_score_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.groups_per_token > self.num_groups:
            raise ValueError(
                f"groups_per_token ({self.groups_per_token}) must be <= num_groups "
                f"({self.num_groups})"
            )
        fill = self.dropped_fill
        if isinstance(fill, bool) or not isinstance(fill, (int, float)) or not fill < math.inf:
            raise ValueError(f"dropped_fill must be a number below +inf (not NaN), got {fill!r}")

    def check(self, num_experts: int, max_k: int) -> None:
        """Check that E splits into equal groups that can serve k up to ``max_k``."""
        if num_experts % self.num_groups:
            raise ValueError(
                f"num_groups ({self.num_groups}) must divide the number of experts ({num_experts})"
            )
        size = num_experts // self.num_groups
        if self.group_score_k > size:
            raise ValueError(
                f"group_score_k ({self.group_score_k}) exceeds the group size ({size})"
            )
        if self.dropped_fill == -math.inf and max_k > self.groups_per_token * size:
            raise ValueError(
                f"k reaches {max_k} but {self.groups_per_token} groups of {size} experts "
                f"hold only {self.groups_per_token * size}"
            )

    def __call__(self, key: Float[Tensor, "T E"], k: int) -> Int[Tensor, "T K"]:
        """Top-k inside each token's best groups.

        Raises:
            ValueError: If ``key`` is not ``[T, E]`` with E a multiple of ``num_groups``
                (and groups of at least ``group_score_k``), or (with the ``-inf`` fill)
                ``k`` exceeds the experts of ``groups_per_token`` groups.
        """
        check_float(key, "key", 2)
        _check_k(k, key.shape[1])
        try:
            self.check(key.shape[1], k)
        except ValueError as error:
            raise ValueError(f"key of shape {tuple(key.shape)}: {error}") from None
        T, E = key.shape
        G = self.num_groups
        key_TGS = key.view(T, G, E // G)
        group_TG = key_TGS.topk(self.group_score_k, dim=-1).values.sum(-1)
        keep_TG = group_TG.topk(self.groups_per_token, dim=-1).indices
        allowed_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, keep_TG, True)
        allowed_TE = allowed_TG.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
        return key.masked_fill(~allowed_TE, self.dropped_fill).topk(k, dim=-1).indices


@runtime_checkable
class DynamicSelection(Protocol):
    """Chooses a varying number of experts per token: K slots, of which some are real."""

    def check(self, num_experts: int, max_k: int) -> None:
        """Raise ``ValueError`` when this selection cannot serve E experts and k up to max_k."""
        ...

    def select(
        self, key: Float[Tensor, "T E"], k: int
    ) -> tuple[Int[Tensor, "T K"], Bool[Tensor, "T K"]]:
        """Expert ids (real slots first, best first) and the mask of real slots.

        ``k`` is the router's k (for :class:`ExpertChoice`, the mean experts per token
        that sizes each expert's capacity). Empty slots hold a valid expert id.
        """
        ...


def _check_width(name: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")


@dataclass(frozen=True)
class TopP:
    """Top-p routing: each token takes experts, best first, until their mass reaches p.

    The mass is the key normalised per token (the probabilities, for softmax scoring):
    a token takes the smallest number of experts whose mass is at least ``p``, then
    clamped to ``[k_min, k_max]``. The record is ``k_max`` wide; slots past a token's
    count are empty. The router's k is not used.

    Args:
        p: Mass threshold in (0, 1].
        k_min: Fewest experts per token, >= 1.
        k_max: Most experts per token (the width K); None: all E.
    """

    p: float
    k_min: int = 1
    k_max: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.p, (int, float)) and 0 < self.p <= 1):
            raise ValueError(f"p must be a number in (0, 1], got {self.p!r}")
        _check_width("k_min", self.k_min)
        _check_width("k_max", self.k_max)
        if self.k_max is not None and self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) must be <= k_max ({self.k_max})")

    def check(self, num_experts: int, max_k: int) -> None:
        """``k_min`` and ``k_max`` must not exceed E."""
        if max(self.k_min, self.k_max or 1) > num_experts:
            raise ValueError(
                f"TopP(k_min={self.k_min}, k_max={self.k_max}) exceeds the {num_experts} experts"
            )

    def select(
        self, key: Float[Tensor, "T E"], k: int
    ) -> tuple[Int[Tensor, "T K"], Bool[Tensor, "T K"]]:
        """The best experts of each token until their mass reaches ``p``.

        Raises:
            ValueError: If ``key`` is not ``[T, E]`` or (on CPU) holds a negative value.
        """
        check_float(key, "key", 2)
        self.check(key.shape[1], 1)
        if value_checks(key, False) and key.numel() and bool(key.min() < 0):
            raise ValueError("TopP needs a non-negative key (softmax or sigmoid scoring)")
        width = key.shape[1] if self.k_max is None else self.k_max
        # Float64 cumulative mass: the threshold test must not flip with summation order.
        sorted_TE, order_TE = key.double().sort(dim=-1, descending=True, stable=True)
        mass_TE = sorted_TE / sorted_TE.sum(-1, keepdim=True).clamp(min=1e-300)
        before_TE = mass_TE.cumsum(-1) - mass_TE  # mass of the better experts
        count_T = (before_TE < self.p).sum(-1).clamp(self.k_min, width)
        slots_TK = torch.arange(width, device=key.device) < count_T.unsqueeze(-1)
        return order_TE[:, :width], slots_TK


@dataclass(frozen=True)
class ExpertChoice:
    """Expert-choice routing (Zhou et al. 2022): each expert takes its best tokens.

    Every expert takes the ``C = ceil(capacity_factor · T · k / E)`` tokens with the
    largest key for it (``k`` is the router's k: the mean experts per token), so a token
    gets 0..E experts. The record is ``k_max`` wide, a token's experts best first; a
    token chosen by more than ``k_max`` experts keeps its best ``k_max``. The choice ranks
    the tokens of the whole batch: in a causal model a token's experts depend on later
    tokens.

    Args:
        capacity_factor: Multiplies the capacity, > 0.
        k_max: Most experts per token (the width K); None: all E.
    """

    capacity_factor: float = 1.0
    k_max: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.capacity_factor, (int, float)) and self.capacity_factor > 0):
            raise ValueError(f"capacity_factor must be a number > 0, got {self.capacity_factor!r}")
        _check_width("k_max", self.k_max)

    def check(self, num_experts: int, max_k: int) -> None:
        """``k_max`` must not exceed E; any k in [1, E] sizes the capacity."""
        if (self.k_max or 1) > num_experts or max_k > num_experts:
            raise ValueError(
                f"ExpertChoice(k_max={self.k_max}) with k up to {max_k} exceeds the "
                f"{num_experts} experts"
            )

    def capacity(self, num_tokens: int, k: int, num_experts: int) -> int:
        """Tokens each expert takes: ``min(T, ceil(capacity_factor · T · k / E))``."""
        return min(num_tokens, math.ceil(self.capacity_factor * num_tokens * k / num_experts))

    def select(
        self, key: Float[Tensor, "T E"], k: int
    ) -> tuple[Int[Tensor, "T K"], Bool[Tensor, "T K"]]:
        """Each expert's top-C tokens, regrouped per token."""
        check_float(key, "key", 2)
        _check_k(k, key.shape[1])
        T, E = key.shape
        width = E if self.k_max is None else self.k_max
        C = self.capacity(T, k, E)
        chosen_TE = torch.zeros_like(key, dtype=torch.bool)
        if C:
            top_CE = key.topk(C, dim=0).indices  # per expert, its C best tokens
            chosen_TE.scatter_(0, top_CE, True)
        # Per token: chosen experts first, by key; -inf sorts the others last.
        ranked_TE = key.masked_fill(~chosen_TE, -math.inf)
        order_TE = ranked_TE.sort(dim=-1, descending=True, stable=True).indices[:, :width]
        return order_TE, chosen_TE.gather(1, order_TE)


_RENORMALIZE = ("always", "k>1", "never")


@dataclass(frozen=True)
class WeightPolicy:
    """How the gates of the chosen experts become combine weights.

    ``weights = scale · gates / max(Σ_j gates_j + eps, min_sum)`` when renormalising,
    else ``scale · gates``. With ``p`` other than 1 the sum becomes the p-norm
    ``(Σ_j gates_j^p)^(1/p)`` (the gates are non-negative).

    Args:
        renormalize: ``"always"`` (Mixtral, and DeepSeek-V3 / Qwen with
            ``norm_topk_prob``; with K = 1 the weight is exactly 1 and the router gets
            no gradient through it), ``"k>1"`` (SRA: K = 1 keeps the raw probability so
            the router still learns) or ``"never"`` (Qwen2-MoE, OLMoE, Switch, GPT-OSS,
            whose softmax over the top-k already sums to 1).
        scale: Routed scaling factor applied after renormalising (DeepSeek-V3's
            ``routed_scaling_factor``, 2.5 there).
        eps: Added to the denominator (DeepSeek-V3 uses 1e-20).
        p: Renormalise by the p-norm of the gates instead of their sum (DBRX's
            ``moe_normalize_expert_weights``); finite, > 0. 1 is the sum.
        min_sum: Floor of the denominator (ERNIE-4.5's ``moe_norm_min``): a token whose
            gates sum to less keeps them divided by ``min_sum``; finite, >= 0.
    """

    renormalize: str = "k>1"
    scale: float = 1.0
    eps: float = 0.0
    p: float = 1.0
    min_sum: float = 0.0

    def __post_init__(self) -> None:
        if self.renormalize not in _RENORMALIZE:
            raise ValueError(f"renormalize must be one of {_RENORMALIZE}, got {self.renormalize!r}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {self.scale!r}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")
        if not (isinstance(self.p, (int, float)) and math.isfinite(self.p) and self.p > 0):
            raise ValueError(f"p must be a finite number > 0, got {self.p!r}")
        if not (isinstance(self.min_sum, (int, float)) and math.isfinite(self.min_sum)):
            raise ValueError(f"min_sum must be a finite number >= 0, got {self.min_sum!r}")
        if self.min_sum < 0:
            raise ValueError(f"min_sum must be a finite number >= 0, got {self.min_sum!r}")

    def __call__(
        self, gates: Float[Tensor, "T K"], slots: Bool[Tensor, "T K"] | None = None
    ) -> Float[Tensor, "T K"]:
        """Combine weights from the chosen experts' gates (``[T, K]``, floating).

        With ``slots`` (dynamic k), empty slots weigh 0, renormalising sums the real
        slots only, and ``"k>1"`` renormalises the tokens with more than one real slot.
        """
        check_float(gates, "gates", 2)
        K = gates.shape[1]
        if slots is not None:
            gates = self._renormalise_real(gates.masked_fill(~slots, 0), slots)
        elif self.renormalize == "always" or (self.renormalize == "k>1" and K > 1):
            gates = gates / self._denominator(gates)
        return gates * self.scale if self.scale != 1.0 else gates

    def _denominator(self, gates: Float[Tensor, "T K"]) -> Float[Tensor, "T 1"]:
        """``max(Σ gates + eps, min_sum)``, with the p-norm for the sum when p != 1."""
        if self.p == 1.0:
            total_T1 = gates.sum(dim=-1, keepdim=True)
        else:
            total_T1 = torch.linalg.vector_norm(gates, ord=self.p, dim=-1, keepdim=True)
        total_T1 = total_T1 + self.eps
        return total_T1.clamp(min=self.min_sum) if self.min_sum > 0 else total_T1

    def _renormalise_real(
        self, gates: Float[Tensor, "T K"], slots: Bool[Tensor, "T K"]
    ) -> Float[Tensor, "T K"]:
        if self.renormalize == "never":
            return gates
        # +1 where a token has no real slot: 0 / 1, not 0 / 0 (and no NaN gradient).
        empty_T1 = ~slots.any(dim=-1, keepdim=True)
        normed = gates / (self._denominator(gates) + empty_T1)
        if self.renormalize == "always":
            return normed
        return torch.where(slots.sum(-1, keepdim=True) > 1, normed, gates)


class _WrappedScorer(nn.Module):
    """What a scorer wrapped around another passes through; not public.

    It holds the wrapped scorer (``self.scorer``, which keeps its weights) and reads its
    ``dim``, ``num_experts``, ``weight_ED`` and ``bias_E`` (so a router reads them as its
    ``gate_weight`` / ``gate_bias``).
    """

    def __init__(self, scorer: nn.Module) -> None:
        super().__init__()
        if not isinstance(scorer, nn.Module) or not hasattr(scorer, "num_experts"):
            raise TypeError(f"scorer must be a scorer module, got {type(scorer).__name__}")
        self.scorer = scorer

    @property
    def dim(self) -> int:
        """Token dimension D."""
        return self.scorer.dim

    @property
    def num_experts(self) -> int:
        """Number of experts E."""
        return self.scorer.num_experts

    @property
    def weight_ED(self) -> Tensor | None:
        """The wrapped scorer's weight ``[E, D]`` if it has one (``Router.gate_weight``)."""
        return getattr(self.scorer, "weight_ED", None)

    @property
    def bias_E(self) -> Tensor | None:
        """The wrapped scorer's bias ``[E]`` if it has one (``Router.gate_bias``)."""
        return getattr(self.scorer, "bias_E", None)


class SoftCappedScorer(_WrappedScorer):
    """Logit soft-capping around any scorer: ``cap · tanh(scores / cap)`` (Laguna).

    The capped scores are what the router records and routes on. The cap runs in
    ``dtype`` (float32 as Laguna's router, whatever the model dtype). No parameters of its
    own: the wrapped scorer keeps its weights (``self.scorer``).

    Args:
        scorer: Any scorer (``tokens [T, D] -> scores [T, E]``, with ``dim`` and
            ``num_experts``).
        cap: The soft cap, finite and > 0.
        dtype: Dtype of the capping (None: the scores' dtype).
    """

    def __init__(self, scorer: nn.Module, cap: float, dtype: torch.dtype | None = None) -> None:
        super().__init__(scorer)
        if not (isinstance(cap, (int, float)) and math.isfinite(cap) and cap > 0):
            raise ValueError(f"cap must be a finite number > 0, got {cap!r}")
        self.cap = float(cap)
        self.dtype = dtype

    @property
    def compute_dtype(self) -> str:
        """``"float32"`` when the cap runs in float32 (what a router logit tap reads)."""
        return "float32" if self.dtype == torch.float32 else "input"

    def forward(self, tokens: Float[Tensor, "T D"]) -> Float[Tensor, "T E"]:
        """``cap · tanh(scorer(tokens) / cap)``."""
        scores_TE = self.scorer(tokens)
        if self.dtype is not None:
            scores_TE = scores_TE.to(self.dtype)
        return torch.tanh(scores_TE / self.cap) * self.cap

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"cap={self.cap}, dtype={self.dtype}"


@runtime_checkable
class GatedSelection(Protocol):
    """A selection that gives the gates of its choice too (their rule is its own).

    :class:`~moeblocks.Router` calls :meth:`choose` instead of the scoring function's
    gates, with the selection key (the logits, for ``"softmax_topk"`` scoring) and its
    own training flag.
    """

    def check(self, num_experts: int, max_k: int) -> None:
        """Raise ``ValueError`` when this selection cannot serve E experts and k up to max_k."""
        ...

    def choose(
        self, key: Float[Tensor, "T E"], k: int, training: bool
    ) -> tuple[Int[Tensor, "T K"], Float[Tensor, "T K"]]:
        """The chosen experts, in slot order, and their gates."""
        ...


@dataclass(frozen=True)
class SparseMixer:
    """SparseMixer-v2 (PhiMoE; Liu et al. 2024, GRIN): one expert per slot, masked softmax.

    Slot by slot, over the logits ``s`` of the experts not chosen yet, with ``m`` their
    maximum: expert ``e`` stays a candidate when ``(m − s_e) / max(|s_e|, m) ≤ 2·eps``.
    The gate of the slot is the softmax over the candidates at the chosen expert. In eval
    mode the chosen expert is the best one (``m``'s); in training mode it is sampled from
    that softmax (Gumbel-max), the gate is multiplied by 1 when the sample is the best
    candidate or with probability 1/4, else by 1/3 (``0.3333``), and the gradient is
    that of the unscaled gate (Heun's third-order estimate, as in the published code).
    The random draws follow the published code in order and shape, so a seeded run
    reproduces it: per slot, an exponential sample ``[T, E]`` and a uniform ``[T, 1]``
    (drawn twice from the second slot on, the first draw discarded, as published).

    Pair it with ``scoring="softmax_topk"`` and no balancer: it reads the selection key
    as the logits, and its gates come from them (the router refuses anything else).

    Args:
        eps: The candidate margin (``router_jitter_noise`` of PhiMoE), finite, >= 0.
    """

    eps: float = 0.01

    def __post_init__(self) -> None:
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")

    def check(self, num_experts: int, max_k: int) -> None:
        """Any k in [1, E] works."""
        if max_k > num_experts:
            raise ValueError(f"k reaches {max_k} but there are only {num_experts} experts")

    def __call__(self, key: Float[Tensor, "T E"], k: int) -> Int[Tensor, "T K"]:
        """The eval-mode choice alone (the :class:`Selection` protocol)."""
        return self.choose(key, k, training=False)[0]

    def choose(
        self, key: Float[Tensor, "T E"], k: int, training: bool
    ) -> tuple[Int[Tensor, "T K"], Float[Tensor, "T K"]]:
        """Experts and gates, slot by slot (see the class doc)."""
        check_float(key, "key", 2)
        _check_k(k, key.shape[1])
        experts, gates_ = [], []
        remaining_TE = key
        for slot in range(k):
            expert_T1, gate_T1 = self._slot(key, remaining_TE, slot, training)
            experts.append(expert_T1)
            gates_.append(gate_T1)
            remaining_TE = remaining_TE.scatter(-1, expert_T1, -math.inf)
        return torch.cat(experts, dim=-1), torch.cat(gates_, dim=-1)

    def _slot(
        self, logits_TE: Tensor, remaining_TE: Tensor, slot: int, training: bool
    ) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            top_T1, best_T1 = remaining_TE.max(dim=-1, keepdim=True)
            factor_TE = logits_TE.abs().clamp(min=top_T1)
            dropped_TE = ((top_T1 - logits_TE) / factor_TE) > 2 * self.eps
        masked_TE = remaining_TE.masked_fill(dropped_TE, -math.inf)
        if training:
            gumbel_TE = -torch.empty_like(masked_TE).exponential_().log()
            best_T1 = (masked_TE + gumbel_TE).max(dim=-1)[1].unsqueeze(-1)
        probs_TE = torch.softmax(masked_TE, dim=-1)
        gate_T1 = probs_TE.gather(-1, best_T1)
        if not training:
            return best_T1, gate_T1
        top_index_T1 = probs_TE.max(dim=-1, keepdim=True)[1]
        uniform_T1 = torch.rand_like(gate_T1)
        if slot > 0:
            uniform_T1 = uniform_T1.uniform_()  # a second draw, as published
        kept_T1 = torch.logical_or(best_T1 == top_index_T1, uniform_T1 > 0.75)
        # 1 -> 1.0, 0 -> 0.3333, computed as the published code does (bit for bit).
        factor_T1 = torch.add(0.3333, kept_T1, alpha=0.6667).type_as(probs_TE)
        # The value is gate · factor; the gradient is the unscaled gate's.
        return best_T1, gate_T1.detach() * factor_T1 + (gate_T1 - gate_T1.detach())


@dataclass(frozen=True)
class AlwaysOnTopK:
    """Top-k among the first E − S experts, then the last S for every token.

    The last ``num_always`` experts are always-on experts that the router weighs together
    with the routed ones (Inkling's shared experts): each token's record lists its k best
    routed experts, then the S always-on ones, so it is k + S wide and a renormalising
    :class:`WeightPolicy` spreads one total weight over all k + S. A selection bias on the
    always-on experts changes nothing.

    Args:
        num_always: Number S of always-on experts, the last S ids, >= 1.
    """

    num_always: int

    def __post_init__(self) -> None:
        if isinstance(self.num_always, bool) or not (
            isinstance(self.num_always, int) and self.num_always >= 1
        ):
            raise ValueError(f"num_always must be an int >= 1, got {self.num_always!r}")

    def check(self, num_experts: int, max_k: int) -> None:
        """At least one routed expert, and k up to ``max_k`` among the E − S routed."""
        routed = num_experts - self.num_always
        if routed < 1:
            raise ValueError(
                f"num_always ({self.num_always}) must leave a routed expert among the {num_experts}"
            )
        if max_k > routed:
            raise ValueError(f"k reaches {max_k} but there are only {routed} routed experts")

    def __call__(self, key: Float[Tensor, "T E"], k: int) -> Int[Tensor, "T K"]:
        """The k best routed experts by ``key`` (sorted), then the S always-on ids."""
        check_float(key, "key", 2)
        _check_k(k, key.shape[1])
        try:
            self.check(key.shape[1], k)
        except ValueError as error:
            raise ValueError(f"key of shape {tuple(key.shape)}: {error}") from None
        T, E = key.shape
        routed = E - self.num_always
        chosen_TK = key[:, :routed].topk(k, dim=-1).indices
        always_TS = torch.arange(routed, E, device=key.device).expand(T, self.num_always)
        return torch.cat([chosen_TK, always_TS], dim=1)


class HashSelection(nn.Module):
    """Hash routing: a fixed table maps each token id to its K experts.

    Hash Layers (Roller et al., 2021) and DeepSeek-V4's first MoE layers choose the
    experts of a token by its id in the vocabulary, not by its scores: row ``v`` of
    ``table_VK`` lists the K experts of token id ``v``. The scores still give the gates.
    The router passes the ids (``Router(tokens, token_ids=...)``; a
    :class:`~moeblocks.MoELayer` takes ``token_ids=`` in the input's leading shape). The
    table is a buffer (saved, moved with the module, never trained); its default spreads
    the ids round-robin, ``table[v, j] = (v · K + j) mod E``.

    Args:
        vocab_size: Number of token ids V (rows of the table).
        k: Experts per token K (columns); the router's k must equal it.
        num_experts: Number of experts E the ids in the table index.
    """

    needs_token_ids = True
    """The router passes ``token_ids`` to this selection."""

    def __init__(self, vocab_size: int, k: int, num_experts: int) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("k", k), ("num_experts", num_experts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if k > num_experts:
            raise ValueError(f"k ({k}) must be <= num_experts ({num_experts})")
        self.num_experts = num_experts
        self.register_buffer("table_VK", torch.empty(vocab_size, k, dtype=torch.long))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fill the table round-robin (no random draw), in place."""
        V, K = self.table_VK.shape
        ids = torch.arange(V * K, device=self.table_VK.device).view(V, K)
        self.table_VK.copy_(ids % self.num_experts)

    def check(self, num_experts: int, max_k: int) -> None:
        """The router's E must be the table's, and its k the table's width."""
        K = self.table_VK.shape[1]
        if num_experts != self.num_experts or max_k != K:
            raise ValueError(
                f"HashSelection holds {K} of {self.num_experts} experts per token id; the "
                f"router has {num_experts} experts and k up to {max_k}"
            )

    def forward(
        self, key: Float[Tensor, "T E"], k: int, token_ids: Int[Tensor, " T"] | None = None
    ) -> Int[Tensor, "T K"]:
        """The table's rows for ``token_ids`` (``key`` gives only T and the device).

        Raises:
            ValueError: Without ``token_ids``, with ids of another length than ``key``'s
                T, or (on CPU) with ids outside ``[0, V)`` or table entries outside
                ``[0, E)``.
            TypeError: If ``token_ids`` is not an integer tensor.
        """
        check_float(key, "key", 2)
        self.check(key.shape[1], k)
        if token_ids is None:
            raise ValueError(
                "HashSelection routes by token id: pass token_ids (MoELayer(x, token_ids=ids))"
            )
        check_index(token_ids, "token_ids", 1)
        if token_ids.shape[0] != key.shape[0]:
            raise ValueError(
                f"token_ids must have shape [{key.shape[0]}] (one per token), "
                f"got {tuple(token_ids.shape)}"
            )
        V = self.table_VK.shape[0]
        if token_ids.numel() and value_checks(token_ids, False):
            low, high = torch.aminmax(token_ids)
            if bool((low < 0) | (high >= V)):
                raise ValueError(
                    f"token_ids must be in [0, {V}) (the table's vocab_size), got values in "
                    f"[{int(low)}, {int(high)}]"
                )
        check_expert_ids(self.table_VK, self.num_experts, False, "HashSelection.table_VK")
        return self.table_VK.index_select(0, token_ids.long())

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        V, K = self.table_VK.shape
        return f"vocab_size={V}, k={K}, num_experts={self.num_experts}"


class ScaledScorer(_WrappedScorer):
    """A constant factor on any scorer's logits: ``scale · scorer(tokens)`` (MuseSpark).

    The scaled scores are what the router records and routes on. The product runs in
    ``dtype`` (None: the scores' dtype). No parameters of its own: the wrapped scorer keeps
    its weights, which ``weight_ED`` / ``bias_E`` pass through (so a router reads them as
    its ``gate_weight`` / ``gate_bias``).

    Args:
        scorer: Any scorer (``tokens [T, D] -> scores [T, E]``, with ``dim`` and
            ``num_experts``).
        scale: The factor, finite and non-zero.
        dtype: Dtype of the product (None: the scores' dtype).
    """

    def __init__(self, scorer: nn.Module, scale: float, dtype: torch.dtype | None = None) -> None:
        super().__init__(scorer)
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale != 0):
            raise ValueError(f"scale must be a finite non-zero number, got {scale!r}")
        self.scale = float(scale)
        self.dtype = dtype

    @property
    def compute_dtype(self) -> str:
        """The wrapped scorer's, or ``"float32"`` when the product runs in float32."""
        inner = getattr(self.scorer, "compute_dtype", "float32")
        return "float32" if self.dtype == torch.float32 else inner

    def forward(self, tokens: Float[Tensor, "T D"]) -> Float[Tensor, "T E"]:
        """``scale · scorer(tokens)``."""
        scores_TE = self.scorer(tokens)
        if self.dtype is not None:
            scores_TE = scores_TE.to(self.dtype)
        return scores_TE * self.scale

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"scale={self.scale}, dtype={self.dtype}"


class NormedScorer(_WrappedScorer):
    """A scorer that normalises its input first: ``scorer(norm(tokens) · scale)``.

    Gemma-4's router RMS-normalises the tokens with its own learnable scale and multiplies
    by ``D^-1/2`` before its projection (``norm`` a :class:`~moeblocks.norms.RMSNorm`
    with that weight, ``scale = D ** -0.5``). The norm's parameters are the router's
    (``self.norm``); the wrapped scorer keeps its weights (``self.scorer``), and
    ``weight_ED`` / ``bias_E`` read through to it.

    Args:
        scorer: Any scorer (``tokens [T, D] -> scores [T, E]``, with ``dim`` and
            ``num_experts``).
        norm: A module ``[T, D] -> [T, D]`` applied to the tokens.
        scale: A constant multiplying the normalised tokens, finite and > 0.
    """

    def __init__(self, scorer: nn.Module, norm: nn.Module, scale: float = 1.0) -> None:
        super().__init__(scorer)
        if not isinstance(norm, nn.Module):
            raise TypeError(f"norm must be an nn.Module, got {type(norm).__name__}")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.norm = norm
        self.scale = float(scale)

    @property
    def compute_dtype(self) -> str:
        """The wrapped scorer's compute dtype (``"input"`` or ``"float32"``)."""
        return getattr(self.scorer, "compute_dtype", "float32")

    def forward(self, tokens: Float[Tensor, "T D"]) -> Float[Tensor, "T E"]:
        """``scorer(norm(tokens) · scale)``."""
        normed_TD = self.norm(tokens)
        if self.scale != 1.0:
            normed_TD = normed_TD * self.scale
        return self.scorer(normed_TD)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"scale={self.scale}"
