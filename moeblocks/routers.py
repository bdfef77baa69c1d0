"""Scorers and the router: which experts each token goes to, and with what weight.

Legend: T tokens, D model dim, E experts, K experts per token.

A scorer maps tokens to one score per expert. The :class:`Router` turns scores into a
:class:`~moeblocks.routing.Routing`: a softmax over *all* experts (so K=1 still trains
the scorer), top-k on the probabilities, and combine weights renormalised for K > 1.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from moeblocks.routing import Routing
from moeblocks.schedules import ConstantK, KSchedule

__all__ = ["CosineScorer", "LinearScorer", "Router", "Scorer"]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


@runtime_checkable
class Scorer(Protocol):
    """Maps tokens to float32 scores, one per expert."""

    dim: int
    num_experts: int

    def __call__(self, tokens: Float[Tensor, "T D"]) -> Float[Tensor, "T E"]:
        """Score every token against every expert."""
        ...


class LinearScorer(nn.Module):
    """Linear gate: ``scores = tokens @ Wᵀ`` (no bias), returned in float32.

    Args:
        dim: Token dimension D.
        num_experts: Number of experts E.
    """

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.dim = _check_positive_int("dim", dim)
        self.num_experts = _check_positive_int("num_experts", num_experts)
        self.weight_ED = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.kaiming_uniform_(self.weight_ED, a=math.sqrt(5))

    def forward(self, tokens: Float[Tensor, "T D"]) -> Float[Tensor, "T E"]:
        """Score tokens; the matmul runs in the input dtype, the result is float32."""
        return (tokens @ self.weight_ED.to(tokens.dtype).t()).float()

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"dim={self.dim}, num_experts={self.num_experts}"


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
            tokens than experts the remaining anchors keep an orthogonal init).
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
        self.anchors_ED = nn.Parameter(torch.empty(num_experts, dim))
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.anchors_ED, a=math.sqrt(5))
        else:
            nn.init.orthogonal_(self.anchors_ED)
        # Persistent so a resumed run does not re-seed its anchors.
        self.register_buffer("seeded", torch.tensor(init != "batch"))
        self._seeded = init != "batch"

    @torch.no_grad()
    def _seed_from_batch(self, tokens: Float[Tensor, "T D"]) -> None:
        n = min(tokens.shape[0], self.num_experts)
        if n == 0:
            return
        pick = torch.randperm(tokens.shape[0], device=tokens.device)[:n]
        self.anchors_ED[:n] = F.normalize(tokens[pick].float(), dim=-1, eps=self.eps).to(
            self.anchors_ED.dtype
        )
        self.seeded.fill_(True)
        self._seeded = True

    def forward(self, tokens: Float[Tensor, "T D"]) -> Float[Tensor, "T E"]:
        """Score tokens by temperature-scaled cosine similarity to the anchors."""
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


class Router(nn.Module):
    """Scorer + softmax over all experts + top-k + renormalised combine weights.

    Args:
        scorer: Any :class:`Scorer` (``LinearScorer``, ``CosineScorer``, ...).
        schedule: A :class:`~moeblocks.schedules.KSchedule`, or an int for a constant k.
        noise_std: Standard deviation of Gaussian noise added to the scores before the
            softmax, in training mode only (0 disables it). ``Routing.scores`` records
            the clean scores; ``probs`` and the choice use the noisy ones.
    """

    def __init__(
        self, scorer: Scorer, schedule: KSchedule | int = 1, noise_std: float = 0.0
    ) -> None:
        super().__init__()
        if not isinstance(scorer, nn.Module) or not isinstance(scorer, Scorer):
            raise TypeError(
                f"scorer must be an nn.Module with dim, num_experts and forward(tokens), "
                f"got {type(scorer).__name__}"
            )
        if isinstance(schedule, int) and not isinstance(schedule, bool):
            schedule = ConstantK(schedule)
        if not isinstance(schedule, KSchedule):
            raise TypeError(
                f"schedule must be a KSchedule or an int, got {type(schedule).__name__}"
            )
        if schedule.max_k > scorer.num_experts:
            raise ValueError(
                f"schedule reaches k={schedule.max_k} but the scorer has only "
                f"{scorer.num_experts} experts"
            )
        if not (noise_std >= 0 and math.isfinite(noise_std)):
            raise ValueError(f"noise_std must be a finite float >= 0, got {noise_std!r}")
        self.scorer = scorer
        self.schedule = schedule
        self.noise_std = float(noise_std)

    @property
    def dim(self) -> int:
        """Token dimension D."""
        return self.scorer.dim

    @property
    def num_experts(self) -> int:
        """Number of experts E."""
        return self.scorer.num_experts

    def check_k(self, k: int) -> int:
        """Validate an explicit k against the number of experts."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise ValueError(f"k must be an int in [1, {self.num_experts}], got {k!r}")
        return k

    def forward(self, tokens: Float[Tensor, "T D"], k: int | None = None) -> Routing:
        """Route tokens.

        Args:
            tokens: Token vectors.
            k: Experts per token; ``None`` takes the schedule's current k. An explicit k
                serves inference-time k-sweeps.

        Returns:
            The :class:`Routing` record.
        """
        k = self.schedule.k if k is None else self.check_k(k)
        scores_TE = self.scorer(tokens)
        logits_TE = scores_TE
        if self.training and self.noise_std > 0:
            logits_TE = scores_TE + self.noise_std * torch.randn_like(scores_TE)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        weights_TK, experts_TK = probs_TE.topk(k, dim=-1)
        if k > 1:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return Routing(scores_TE, probs_TE, experts_TK, weights_TK)
