"""Scorers and the router: which experts each token goes to, and with what weight.

Legend: T tokens, D model dim, E experts, K experts per token.

A scorer maps tokens to one score per expert. The :class:`Router` turns scores into a
:class:`~moeblocks.routing.Routing` through the parts in :mod:`moeblocks.gating`; by
default (SRA) a softmax over *all* experts (so K=1 still trains the scorer), top-k on the
probabilities, and combine weights renormalised for K > 1. :class:`~moeblocks.MoELayer`
accepts any module that satisfies :class:`RouterProtocol`.
"""

from __future__ import annotations

import copy
import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from moeblocks._checks import check_float, check_tokens
from moeblocks.balancing import BiasBalancer
from moeblocks.gating import (
    DynamicSelection,
    GatedSelection,
    Selection,
    TopK,
    WeightPolicy,
    check_scoring,
    gates,
    score_probs,
    selection_key,
)
from moeblocks.routing import Routing
from moeblocks.schedules import ConstantK, KSchedule

__all__ = [
    "CosineScorer",
    "InspectableRouter",
    "LinearScorer",
    "ProductKeyScorer",
    "Router",
    "RouterProtocol",
    "Scorer",
]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


@runtime_checkable
class Scorer(Protocol):
    """Maps tokens to scores (float32, or float64 for float64 tokens), one per expert."""

    dim: int
    """Token dimension D."""
    num_experts: int
    """Number of experts E (columns of the scores)."""

    def __call__(self, tokens: Float[Tensor, "T D"]) -> Float[Tensor, "T E"]:
        """Score every token against every expert."""
        ...


class LinearScorer(nn.Module):
    """Linear gate: ``scores = tokens @ Wᵀ (+ b)``, returned in at least float32.

    Args:
        dim: Token dimension D.
        num_experts: Number of experts E.
        bias: Add a learnable per-expert bias to the scores (GPT-OSS's router bias).
        compute_dtype: ``"input"`` runs the matmul in the tokens' dtype (Mixtral, Qwen,
            GPT-OSS); ``"float32"`` casts tokens and weight to float32 first (DeepSeek-V3
            keeps its gate in float32 even in a bf16 model).
        init_std: Normal std of the weight (0.02 in GPT-2-style recipes); None keeps
            ``nn.Linear``'s default (Kaiming uniform).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        bias: bool = False,
        compute_dtype: str = "input",
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        self.dim = _check_positive_int("dim", dim)
        self.num_experts = _check_positive_int("num_experts", num_experts)
        if compute_dtype not in ("input", "float32"):
            raise ValueError(f"compute_dtype must be 'input' or 'float32', got {compute_dtype!r}")
        self.compute_dtype = compute_dtype
        if init_std is not None and not (math.isfinite(init_std) and init_std > 0):
            raise ValueError(f"init_std must be None or a finite number > 0, got {init_std!r}")
        self.init_std = init_std
        self.weight_ED = nn.Parameter(torch.empty(num_experts, dim))
        self.bias_E = nn.Parameter(torch.empty(num_experts)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the weight (see ``init_std``) and zero the bias, in place."""
        with torch.no_grad():
            if self.init_std is None:
                nn.init.kaiming_uniform_(self.weight_ED, a=math.sqrt(5))
            else:
                nn.init.normal_(self.weight_ED, 0.0, self.init_std)
            if self.bias_E is not None:
                self.bias_E.zero_()

    def forward(self, tokens: Float[Tensor, "T D"]) -> Float[Tensor, "T E"]:
        """Score tokens; float32 results, or float64 for float64 tokens."""
        check_tokens(tokens, self.dim)
        dtype = torch.float32 if self.compute_dtype == "float32" else tokens.dtype
        bias = None if self.bias_E is None else self.bias_E.to(dtype)
        scores_TE = F.linear(tokens.to(dtype), self.weight_ED.to(dtype), bias)
        return scores_TE.to(torch.promote_types(scores_TE.dtype, torch.float32))

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, bias={self.bias_E is not None}, "
            f"compute_dtype={self.compute_dtype!r}"
        )


class CosineScorer(nn.Module):
    """SRA's Chamber of Semantic Resonance: ``scores = |τ| · cos(x, a_e)``.

    Every expert owns a learnable anchor ``a_e``; a token's score for expert ``e`` is its
    cosine similarity to that anchor times one learnable temperature τ. Both sides are
    L2-normalised in float32 with eps 1e-8, so every score lies in ``[-|τ|, |τ|]``.

    Args:
        dim: Token dimension D.
        num_experts: Number of experts E.
        init: Anchor initialisation: ``"orthogonal"`` (rows as orthogonal as E and D
            allow), ``"kaiming"`` (uniform), or ``"batch"`` (the anchors are seeded from
            the L2-normalised hidden states of the first training batch; with fewer
            tokens than experts the remaining anchors keep an orthogonal init). A seeding
            batch with NaN or inf raises ``ValueError`` and leaves the anchors unseeded.
        temperature: Initial value of τ.
    """

    eps = 1e-8

    def __init__(
        self,
        dim: int,
        num_experts: int,
        init: str = "orthogonal",
        temperature: float = 10.0,
    ) -> None:
        super().__init__()
        self.dim = _check_positive_int("dim", dim)
        self.num_experts = _check_positive_int("num_experts", num_experts)
        if init not in ("orthogonal", "kaiming", "batch"):
            raise ValueError(f"init must be 'orthogonal', 'kaiming' or 'batch', got {init!r}")
        if not math.isfinite(temperature) or temperature == 0:
            raise ValueError(f"temperature must be finite and non-zero, got {temperature!r}")
        self.init = init
        self.initial_temperature = float(temperature)
        self.anchors_ED = nn.Parameter(torch.empty(num_experts, dim))
        self.temperature = nn.Parameter(torch.empty(()))
        # Persistent so a resumed run does not re-seed its anchors.
        self.register_buffer("seeded", torch.empty((), dtype=torch.bool))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the anchors (see ``init``) and τ; ``init="batch"`` waits for a batch."""
        with torch.no_grad():
            if self.init == "kaiming":
                nn.init.kaiming_uniform_(self.anchors_ED, a=math.sqrt(5))
            else:
                nn.init.orthogonal_(self.anchors_ED)
            self.temperature.fill_(self.initial_temperature)
            self.seeded.fill_(self.init != "batch")
        self._seeded = self.init != "batch"

    @torch.no_grad()
    def _seed_from_batch(self, tokens: Float[Tensor, "T D"]) -> None:
        n = min(tokens.shape[0], self.num_experts)
        if n == 0:
            return
        # One host sync, once per model: NaN anchors would never recover.
        if not bool(torch.isfinite(tokens).all()):
            raise ValueError(
                "tokens hold NaN or inf, so they cannot seed the anchors (init='batch'); "
                "the scorer stays unseeded until a batch of finite tokens arrives"
            )
        pick = torch.randperm(tokens.shape[0], device=tokens.device)[:n]
        self.anchors_ED[:n] = F.normalize(tokens[pick].float(), dim=-1, eps=self.eps).to(
            self.anchors_ED.dtype
        )
        self.seeded.fill_(True)
        self._seeded = True

    @property
    def anchors(self) -> Float[Tensor, "E D"]:
        """The anchors ``a[E, D]`` (the parameter itself, not a copy)."""
        return self.anchors_ED

    @property
    def needs_seed(self) -> bool:
        """True until the anchors of ``init="batch"`` are seeded from a training batch."""
        return not self._seeded

    def seed_from(self, tokens: Float[Tensor, "T D"]) -> None:
        """Seed the anchors (``init="batch"``, not yet seeded) from these tokens only.

        :class:`~moeblocks.MoELayer` calls it with the real tokens of a masked batch, so
        padding never becomes an anchor. Does nothing once seeded.
        """
        check_tokens(tokens, self.dim)
        if not self._seeded:
            self._seed_from_batch(tokens)

    def forward(self, tokens: Float[Tensor, "T D"]) -> Float[Tensor, "T E"]:
        """Score tokens by temperature-scaled cosine similarity to the anchors.

        Raises:
            ValueError: If ``tokens`` is not ``[T, dim]``, or (``init="batch"``, first
                training call) holds NaN or inf: seeding reads the batch on the host
                once, on every device.
        """
        check_tokens(tokens, self.dim)
        if not self._seeded and self.training:
            self._seed_from_batch(tokens)
        x_TD = F.normalize(tokens.float(), dim=-1, eps=self.eps)
        a_ED = F.normalize(self.anchors_ED.float(), dim=-1, eps=self.eps)
        return self.temperature.float().abs() * (x_TD @ a_ED.t())

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._seeded = bool(self.seeded)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"dim={self.dim}, num_experts={self.num_experts}, init={self.init!r}"


@runtime_checkable
class RouterProtocol(Protocol):
    """What :class:`~moeblocks.MoELayer` needs of a router: any ``nn.Module`` with these.

    ``router(tokens, k=None)`` returns a :class:`~moeblocks.routing.Routing`; ``k=None``
    means the router's own choice of k.

    Optional, read with a default when absent: ``needs_seed`` (bool) and
    ``seed_from(tokens)``, for a router whose parameters are seeded from the first
    training batch; the layer passes the real tokens of a masked batch to ``seed_from``
    (padding never seeds). Everything else a reader may take from a router is named by
    :class:`InspectableRouter`; nothing reads a router's parts past these two protocols.
    """

    dim: int
    """Token dimension D; the layer checks it against the expert bank's."""
    num_experts: int
    """Number of experts E the router chooses from."""

    def __call__(self, tokens: Float[Tensor, "T D"], k: int | None = None) -> Routing:
        """Route tokens: ``k`` experts each (``None``: the router's schedule)."""
        ...


@runtime_checkable
class InspectableRouter(RouterProtocol, Protocol):
    """A router whose scoring parameters losses, inspection and ``hf/`` may read.

    Each member is the parameter itself (not a copy), or None where the router's scorer
    has no such part, so a converter can copy weights in and out of it in place.

    Attributes:
        anchors: ``[E, D]`` anchors of a cosine scorer (:class:`DispersionLoss`,
            anchor similarity in inspection).
        temperature: The 0-dim temperature τ of a cosine scorer (anchor traces).
        gate_weight: ``[E, D]`` weight of a linear scorer (Hugging Face conversion).
        gate_bias: ``[E]`` bias of a linear scorer.
        compute_dtype: ``"input"`` when the scores are computed in the tokens' dtype
            (Hugging Face returns its router logits in that dtype), else ``"float32"``.
    """

    @property
    def anchors(self) -> Float[Tensor, "E D"] | None:
        """Anchors of a cosine scorer."""
        ...

    @property
    def temperature(self) -> Float[Tensor, ""] | None:
        """Temperature of a cosine scorer."""
        ...

    @property
    def gate_weight(self) -> Float[Tensor, "E D"] | None:
        """Weight of a linear scorer."""
        ...

    @property
    def gate_bias(self) -> Float[Tensor, " E"] | None:
        """Bias of a linear scorer."""
        ...

    @property
    def compute_dtype(self) -> str:
        """``"input"`` or ``"float32"``."""
        ...


def _check_gated(selection: object, scoring: str, balancer: object) -> None:
    """A selection that gives its own gates reads the key as logits, unbiased."""
    if not isinstance(selection, GatedSelection):
        return
    logit_keyed = ("softmax_topk", "sigmoid_logits")
    if scoring not in logit_keyed:
        raise ValueError(
            f"selection {type(selection).__name__} reads the selection key as logits: "
            f"use scoring in {logit_keyed}, got {scoring!r}"
        )
    if balancer is not None:
        raise ValueError(
            f"selection {type(selection).__name__} computes its gates from the key, so a "
            "selection-only bias (balancer) would change the gates: give no balancer"
        )


def _schedule(schedule: KSchedule | int | None, k: int | None) -> KSchedule:
    """The router's schedule from ``schedule=`` or its spelling ``k=`` (default k = 1)."""
    if k is not None and schedule is not None:
        raise ValueError(
            f"give the router either k={k!r} (a constant k) or schedule={schedule!r}, not both"
        )
    schedule = (1 if k is None else k) if schedule is None else schedule
    if isinstance(schedule, int) and not isinstance(schedule, bool):
        return ConstantK(schedule)
    if not isinstance(schedule, KSchedule):
        raise TypeError(f"schedule must be a KSchedule or an int, got {type(schedule).__name__}")
    return schedule


class Router(nn.Module):
    """The stock router: scorer → scoring function → selection → weight policy.

    ``forward`` scores the tokens, applies the scoring function (see
    :mod:`moeblocks.gating`), adds the balancer's selection-only bias to the selection
    key, chooses k experts per token and turns their gates into combine weights. The
    defaults are SRA's: softmax over all experts, plain top-k, renormalise for k > 1.

    Args:
        scorer: Any :class:`Scorer` (``LinearScorer``, ``CosineScorer``, ...).
        schedule: A :class:`~moeblocks.schedules.KSchedule`, or an int for a constant k
            (default 1).
        noise_std: Standard deviation of Gaussian noise added to the scores, in training
            mode only (0 disables it). ``Routing.scores`` records the clean scores;
            ``probs`` and the choice use the noisy ones.
        scoring: One of :data:`~moeblocks.gating.SCORINGS` (``"softmax"``,
            ``"sigmoid"``, ``"softmax_topk"``, ``"sigmoid_logits"``, ``"sqrt_softplus"``).
        selection: :class:`~moeblocks.gating.TopK` (default) or
            :class:`~moeblocks.gating.GroupLimitedTopK`; or a dynamic k
            (:class:`~moeblocks.gating.TopP`, :class:`~moeblocks.gating.ExpertChoice`),
            whose record marks its real slots in ``Routing.slots``; or a selection that
            gives its own gates (:class:`~moeblocks.gating.SparseMixer`, with
            ``scoring="softmax_topk"``); or :class:`~moeblocks.gating.HashSelection`,
            fed by ``token_ids``.
        weights: The :class:`~moeblocks.gating.WeightPolicy` (default: renormalise for
            k > 1, no scaling).
        balancer: A :class:`~moeblocks.balancing.BiasBalancer` whose bias is added to
            the selection key (not to the weights); in training mode the router reports
            each decision's loads to it.
        jitter: Multiplicative input jitter (Switch): in training mode the scorer sees
            ``tokens · u`` with ``u ~ U[1 − jitter, 1 + jitter]`` per element; the
            experts still see the clean tokens. In ``[0, 1)``.
        routing_dtype: Dtype the scoring function runs in; None takes the scores' dtype
            promoted to at least float32 (float64 stays float64); ``torch.float32`` pins
            it (Mixtral and Qwen route in float32 even in a float64 model).
        k: A constant k, the same as ``schedule=k``; give one or the other.
    """

    def __init__(
        self,
        scorer: Scorer,
        schedule: KSchedule | int | None = None,
        noise_std: float = 0.0,
        *,
        scoring: str = "softmax",
        selection: Selection | DynamicSelection | None = None,
        weights: WeightPolicy | None = None,
        balancer: BiasBalancer | None = None,
        jitter: float = 0.0,
        routing_dtype: torch.dtype | None = None,
        k: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(scorer, nn.Module) or not isinstance(scorer, Scorer):
            raise TypeError(
                f"scorer must be an nn.Module with dim, num_experts and forward(tokens), "
                f"got {type(scorer).__name__}"
            )
        schedule = _schedule(schedule, k)
        if schedule.max_k > scorer.num_experts:
            raise ValueError(
                f"schedule reaches k={schedule.max_k} but the scorer has only "
                f"{scorer.num_experts} experts"
            )
        if not (noise_std >= 0 and math.isfinite(noise_std)):
            raise ValueError(f"noise_std must be a finite float >= 0, got {noise_std!r}")
        selection = TopK() if selection is None else selection
        if not isinstance(selection, (Selection, DynamicSelection)):
            raise TypeError(
                f"selection must implement check() and __call__(key, k) (or select(key, k) "
                f"for a dynamic k), got {type(selection).__name__}"
            )
        selection.check(scorer.num_experts, schedule.max_k)
        _check_gated(selection, scoring, balancer)
        weights = WeightPolicy() if weights is None else weights
        if not isinstance(weights, WeightPolicy):
            raise TypeError(f"weights must be a WeightPolicy, got {type(weights).__name__}")
        if balancer is not None:
            if not isinstance(balancer, BiasBalancer):
                raise TypeError(f"balancer must be a BiasBalancer, got {type(balancer).__name__}")
            if balancer.num_experts != scorer.num_experts:
                raise ValueError(
                    f"balancer has {balancer.num_experts} experts, the scorer {scorer.num_experts}"
                )
        if not (isinstance(jitter, (int, float)) and 0 <= jitter < 1):
            raise ValueError(f"jitter must be a number in [0, 1), got {jitter!r}")
        if routing_dtype is not None and routing_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"routing_dtype must be None, torch.float32 or torch.float64, got {routing_dtype}"
            )
        self.scorer = scorer
        self.schedule = schedule
        self.noise_std = float(noise_std)
        self.scoring = check_scoring(scoring)
        self.selection = selection
        self.weights = weights
        self.balancer = balancer
        self.jitter = float(jitter)
        self.routing_dtype = routing_dtype

    @property
    def dim(self) -> int:
        """Token dimension D."""
        return self.scorer.dim

    @property
    def num_experts(self) -> int:
        """Number of experts E."""
        return self.scorer.num_experts

    def _scorer_part(self, name: str) -> Tensor | None:
        part = getattr(self.scorer, name, None)
        return part if isinstance(part, Tensor) else None

    @property
    def anchors(self) -> Float[Tensor, "E D"] | None:
        """The scorer's anchors ``[E, D]`` (a cosine scorer), else None."""
        return self._scorer_part("anchors_ED")

    @property
    def temperature(self) -> Float[Tensor, ""] | None:
        """The scorer's temperature τ (a cosine scorer), else None."""
        return self._scorer_part("temperature")

    @property
    def gate_weight(self) -> Float[Tensor, "E D"] | None:
        """The scorer's weight ``[E, D]`` (a linear scorer), else None."""
        return self._scorer_part("weight_ED")

    @property
    def gate_bias(self) -> Float[Tensor, " E"] | None:
        """The scorer's bias ``[E]`` (a linear scorer with a bias), else None."""
        return self._scorer_part("bias_E")

    @property
    def compute_dtype(self) -> str:
        """``"input"`` if the scorer computes in the tokens' dtype, else ``"float32"``."""
        return getattr(self.scorer, "compute_dtype", "float32")

    @property
    def needs_seed(self) -> bool:
        """True while the scorer waits for its first batch (``init="batch"``)."""
        return bool(getattr(self.scorer, "needs_seed", False))

    def seed_from(self, tokens: Float[Tensor, "T D"]) -> None:
        """Seed the scorer from these (real) tokens, if it waits for a batch."""
        if self.needs_seed:
            self.scorer.seed_from(tokens)

    def with_parts(
        self, *, scorer: Scorer | None = None, selection: Selection | None = None
    ) -> Router:
        """A router that shares every part of this one except those given.

        Nothing is copied: the schedule, balancer, weight policy and (unless replaced)
        the scorer are the same objects, so the new router's parameters are this one's.
        Interventions use it to edit the scores or the choice without a hook here.

        Raises:
            ValueError: If the new scorer has another dim or expert count, or the new
                selection cannot serve this router's experts and k.
        """
        twin = copy.copy(self)
        # Its own registry of parts, so that replacing one leaves this router alone.
        twin._modules = dict(self._modules)
        if scorer is not None:
            if (scorer.dim, scorer.num_experts) != (self.dim, self.num_experts):
                raise ValueError(
                    f"scorer must have dim={self.dim} and num_experts={self.num_experts}, "
                    f"got dim={scorer.dim} and num_experts={scorer.num_experts}"
                )
            twin.scorer = scorer
        if selection is not None:
            selection.check(self.num_experts, self.schedule.max_k)
            twin.selection = selection
        return twin

    def check_k(self, k: int) -> int:
        """Validate an explicit k against the number of experts and the selection."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise ValueError(f"k must be an int in [1, {self.num_experts}], got {k!r}")
        self.selection.check(self.num_experts, k)
        return k

    def score(
        self, tokens: Float[Tensor, "T D"]
    ) -> tuple[Float[Tensor, "T E"], Float[Tensor, "T E"]]:
        """``(scores, logits)``: the clean scores and the ones the decision uses.

        They differ only in training mode, by the jitter (which perturbs both) and the
        additive noise (logits only).

        Raises:
            ValueError: If ``tokens`` is not ``[T, dim]``, or the scorer returns scores
                of another shape than ``[T, num_experts]``.
            TypeError: If ``tokens`` is not a floating-point tensor.
        """
        check_tokens(tokens, self.dim)
        if self.training and self.jitter > 0:
            tokens = tokens * torch.empty_like(tokens).uniform_(1 - self.jitter, 1 + self.jitter)
        scores_TE = self.scorer(tokens)
        expected = (tokens.shape[0], self.num_experts)
        if not isinstance(scores_TE, Tensor) or tuple(scores_TE.shape) != expected:
            got = (
                tuple(scores_TE.shape)
                if isinstance(scores_TE, Tensor)
                else type(scores_TE).__name__
            )
            raise ValueError(f"the scorer must return scores of shape {expected}, got {got}")
        dtype = self.routing_dtype or torch.promote_types(scores_TE.dtype, torch.float32)
        scores_TE = scores_TE.to(dtype)
        if self.training and self.noise_std > 0:
            return scores_TE, scores_TE + self.noise_std * torch.randn_like(scores_TE)
        return scores_TE, scores_TE

    def decide(
        self,
        scores: Float[Tensor, "T E"],
        logits: Float[Tensor, "T E"],
        k: int,
        *,
        token_ids: Int[Tensor, " T"] | None = None,
    ) -> Routing:
        """The routing decision for given logits (``scores`` is only recorded).

        Args:
            scores: Clean scores, stored in the record.
            logits: The scores the decision uses (noisy in training).
            k: Experts per token (already validated).
            token_ids: Each token's id, for a selection that routes by id
                (:class:`~moeblocks.gating.HashSelection`); other selections ignore it.

        Raises:
            ValueError: If ``scores`` and ``logits`` are not both ``[T, num_experts]``.
        """
        check_float(scores, "scores", 2)
        check_float(logits, "logits", 2)
        if logits.shape[1] != self.num_experts or scores.shape != logits.shape:
            raise ValueError(
                f"scores and logits must both have shape [T, {self.num_experts}], got "
                f"{tuple(scores.shape)} and {tuple(logits.shape)}"
            )
        probs_TE = score_probs(self.scoring, logits)
        key_TE = selection_key(self.scoring, logits, probs_TE)
        if self.balancer is not None:
            key_TE = key_TE + self.balancer.bias.to(key_TE.dtype)
        slots_TK = gates_TK = None
        if isinstance(self.selection, GatedSelection):  # its gates are its own (SparseMixer)
            experts_TK, gates_TK = self.selection.choose(key_TE, k, self.training)
        elif isinstance(self.selection, DynamicSelection):
            experts_TK, slots_TK = self.selection.select(key_TE, k)
        elif getattr(self.selection, "needs_token_ids", False):
            experts_TK = self.selection(key_TE, k, token_ids=token_ids)
        else:
            experts_TK = self.selection(key_TE, k)
        if gates_TK is None:
            gates_TK = gates(self.scoring, logits, probs_TE, experts_TK)
        weights_TK = self.weights(gates_TK, slots_TK)
        if self.balancer is not None and self.training:
            # Only real slots are load (a [N, 1] record: one sync, on the dynamic path).
            seen = experts_TK if slots_TK is None else experts_TK[slots_TK].unsqueeze(1)
            self.balancer.observe(seen)
        return Routing(scores, probs_TE, experts_TK, weights_TK, slots=slots_TK)

    def forward(
        self,
        tokens: Float[Tensor, "T D"],
        k: int | None = None,
        *,
        token_ids: Int[Tensor, " T"] | None = None,
    ) -> Routing:
        """Route tokens.

        Args:
            tokens: Token vectors.
            k: Experts per token; ``None`` takes the schedule's current k. An explicit k
                serves inference-time k-sweeps.
            token_ids: Each token's id in the vocabulary, for a selection that routes by
                id (:class:`~moeblocks.gating.HashSelection`); ignored by the others.

        Returns:
            The :class:`Routing` record.

        Raises:
            ValueError: If ``tokens`` is not ``[T, dim]`` or ``k`` is out of range.
            TypeError: If ``tokens`` is not a floating-point tensor.
        """
        k = self.schedule.k if k is None else self.check_k(k)
        scores_TE, logits_TE = self.score(tokens)
        return self.decide(scores_TE, logits_TE, k, token_ids=token_ids)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return (
            f"scoring={self.scoring!r}, selection={self.selection}, weights={self.weights}, "
            f"noise_std={self.noise_std}, jitter={self.jitter}"
        )


_PAIRINGS = ("token", "batch")


class ProductKeyScorer(nn.Module):
    """Product-key scores over ``n²`` experts from ``2n`` key logits (Lample et al. 2019).

    A linear map gives each token ``2n`` key logits, two halves ``a`` and ``b`` of ``n``;
    expert ``e = i·n + j`` scores ``a_i + b_j``, so E = n² experts cost 2n dot products
    (Doge's many tiny experts). With ``pairing="token"`` the halves are a token's own.
    With ``pairing="batch"`` the batch's ``[T, 2n]`` key logits are read as ``[2, T, n]``
    (halves ``a = keys[0]``, ``b = keys[1]``), as Doge computes them: token t then gets
    key logits of tokens ⌊t/2⌋ and ⌊(T+t)/2⌋, so its score depends on the batch
    (kept so that Doge's checkpoints route as they were trained).

    Args:
        dim: Token dimension D.
        num_keys: Keys per half, n; there are n² experts.
        pairing: ``"token"`` or ``"batch"`` (see above).
    """

    def __init__(self, dim: int, num_keys: int, pairing: str = "token") -> None:
        super().__init__()
        self.dim = _check_positive_int("dim", dim)
        self.num_keys = _check_positive_int("num_keys", num_keys)
        if pairing not in _PAIRINGS:
            raise ValueError(f"pairing must be one of {_PAIRINGS}, got {pairing!r}")
        self.pairing = pairing
        self.num_experts = num_keys * num_keys
        self.weight_KD = nn.Parameter(torch.empty(2 * num_keys, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform key weights (``nn.Linear``'s default), in place."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight_KD, a=math.sqrt(5))

    @property
    def compute_dtype(self) -> str:
        """The key logits are computed in the tokens' dtype."""
        return "input"

    def key_logits(self, tokens: Float[Tensor, "T D"]) -> Float[Tensor, "T K2"]:
        """The ``[T, 2n]`` key logits, in the tokens' dtype."""
        check_tokens(tokens, self.dim)
        return F.linear(tokens, self.weight_KD.to(tokens.dtype))

    def forward(self, tokens: Float[Tensor, "T D"]) -> Float[Tensor, "T E"]:
        """``scores[t, i·n + j] = a_i + b_j``; float32 results, or float64 for float64 tokens."""
        keys = self.key_logits(tokens)
        T, n = keys.shape[0], self.num_keys
        if self.pairing == "token":
            a_Tn, b_Tn = keys[:, :n], keys[:, n:]
        else:
            a_Tn, b_Tn = keys.reshape(2, T, n).unbind(0)
        scores_TE = (a_Tn.unsqueeze(-1) + b_Tn.unsqueeze(-2)).reshape(T, n * n)
        return scores_TE.to(torch.promote_types(scores_TE.dtype, torch.float32))

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"dim={self.dim}, num_keys={self.num_keys}, pairing={self.pairing!r}"
