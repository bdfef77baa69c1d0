"""Expert capacity (Switch, GShard): drop the routed copies an expert has no room for.

Legend: T tokens, E experts, K experts per token, G capacity groups of S tokens.

Tokens are split into groups (the whole call, or each sequence). In each group every
expert accepts at most C routed copies; copies queue by choice rank first (all first
choices before any second choice, as in GShard) and by token order within a rank (as in
Switch). A copy past the capacity is *dropped*: its weight becomes 0, so it adds nothing
to the output and receives no gradient, and the residual connection around the layer
carries the token. ``Routing.dropped`` marks the dropped copies and
``Routing.num_dropped`` counts them. The decision is deterministic and has no host sync.

Inputs are checked: shapes always, expert ids in ``[0, E)`` on CPU tensors always and on
GPU tensors with ``sync_checks=True`` (an id past E would silently join the next group's
queue).

The dropped copies still pass through the dispatcher and the expert bank (their output
is multiplied by 0), so capacity changes the result, not the compute.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from moeblocks._checks import check_expert_ids, check_index, check_int
from moeblocks.routing import Routing

__all__ = ["Capacity", "capacity_positions"]


def capacity_positions(
    experts: Int[Tensor, "T K"], num_experts: int, num_groups: int, *, sync_checks: bool = False
) -> Int[Tensor, "T K"]:
    """Each copy's 0-based place in its expert's queue within its group.

    The T tokens form ``num_groups`` consecutive groups of equal size; queues are ordered
    by choice rank, then token.

    Args:
        experts: Expert ids in ``[0, num_experts)``.
        num_experts: E, >= 1.
        num_groups: G, >= 0, dividing T (0 only for T = 0).
        sync_checks: Also range-check the ids of GPU tensors (one device sync); CPU
            tensors are always checked.

    Raises:
        ValueError: If the T tokens do not split into ``num_groups`` equal groups, or an
            id lies outside ``[0, num_experts)``.
    """
    check_index(experts, "experts", 2)
    check_int(num_experts, "num_experts")
    check_int(num_groups, "num_groups", low=0)
    T, K = experts.shape
    if (num_groups == 0 and T) or (num_groups and T % num_groups):
        raise ValueError(
            f"num_groups must divide the {T} tokens of experts into equal groups, "
            f"got num_groups={num_groups}"
        )
    check_expert_ids(experts, num_experts, sync_checks)
    G = num_groups
    S = T // G if G else 0
    e_GKS = experts.view(G, S, K).transpose(1, 2)  # queue order: rank j, then token
    group_G11 = torch.arange(G, device=experts.device).view(G, 1, 1)
    key_N = (group_G11 * num_experts + e_GKS).reshape(-1)
    order_N = torch.argsort(key_N, stable=True)
    counts = torch.bincount(key_N, minlength=G * num_experts)
    starts = counts.cumsum(0) - counts
    sorted_key_N = key_N[order_N]
    place_sorted_N = torch.arange(key_N.numel(), device=experts.device) - starts[sorted_key_N]
    place_N = torch.empty_like(place_sorted_N)
    place_N[order_N] = place_sorted_N
    return place_N.view(G, K, S).transpose(1, 2).reshape(T, K)


@dataclass(frozen=True)
class Capacity:
    """A per-expert capacity for token-choice routing.

    Give either ``factor`` (capacity ``C = ceil(factor · S · K / E)`` for groups of S
    tokens) or ``limit`` (a fixed C, Hugging Face Switch's ``expert_capacity``).

    Args:
        factor: Capacity factor (Switch: 1.0–1.25 in training, 2.0 in evaluation), > 0.
        limit: Fixed number of copies per expert and group, >= 0.
        per: ``"batch"``: one group per layer call; ``"sequence"``: one group per
            sequence (the last entry of the layer input's leading shape).
        sync_checks: Also range-check the expert ids of GPU routing records, at one
            device sync per call (CPU records are always checked).
        renormalize: After dropping, give each token's kept copies the token's whole
            weight: ``w_j · Σ_i w_i / Σ_kept w_i`` (GShard and NLLB-MoE normalise the
            top-2 gates after dropping, so a token whose second choice overflows keeps
            its full weight on the first). A token with no kept copy keeps weight 0;
            nothing changes for a token that lost no copy.
    """

    factor: float | None = None
    limit: int | None = None
    per: str = "batch"
    sync_checks: bool = False
    renormalize: bool = False

    def __post_init__(self) -> None:
        if (self.factor is None) == (self.limit is None):
            raise ValueError("give exactly one of factor and limit")
        if self.factor is not None and not (math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"factor must be a finite number > 0, got {self.factor!r}")
        if self.limit is not None and (
            isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 0
        ):
            raise ValueError(f"limit must be an int >= 0, got {self.limit!r}")
        if self.per not in ("batch", "sequence"):
            raise ValueError(f"per must be 'batch' or 'sequence', got {self.per!r}")
        if not isinstance(self.sync_checks, bool):
            raise TypeError(f"sync_checks must be a bool, got {self.sync_checks!r}")
        if not isinstance(self.renormalize, bool):
            raise TypeError(f"renormalize must be a bool, got {self.renormalize!r}")

    def capacity(self, group_tokens: int, top_k: int, num_experts: int) -> int:
        """C for a group of ``group_tokens`` tokens."""
        if self.limit is not None:
            return self.limit
        return math.ceil(self.factor * group_tokens * top_k / num_experts)

    def __call__(self, routing: Routing) -> Routing:
        """The routing with overflow copies dropped (weight 0) and marked.

        Raises:
            ValueError: If ``routing.batch_shape`` does not cover its T tokens (with
                ``per="sequence"``) or an expert id is out of range.
        """
        if self.per == "sequence":
            G, S = routing.sequences()
            if routing.num_tokens != G * S:
                raise ValueError(
                    f"routing.batch_shape {routing.batch_shape} does not cover the routing's "
                    f"{routing.num_tokens} tokens; expected leading dims whose product is T"
                )
        else:
            G, S = (1, routing.num_tokens) if routing.num_tokens else (0, 0)
        C = self.capacity(S, routing.top_k, routing.num_experts)
        place_TK = capacity_positions(
            routing.experts, routing.num_experts, G, sync_checks=self.sync_checks
        )
        dropped_TK: Bool[Tensor, "T K"] = place_TK >= C
        if routing.dropped is not None:
            dropped_TK = dropped_TK | routing.dropped
        weights_TK = routing.weights.masked_fill(dropped_TK, 0.0)
        if self.renormalize:
            total_T1 = routing.weights.sum(-1, keepdim=True)
            kept_T1 = weights_TK.sum(-1, keepdim=True)
            # The same sum when nothing was dropped, so the ratio is exactly 1 there.
            weights_TK = weights_TK * (total_T1 / kept_T1.masked_fill(kept_T1 == 0, 1.0))
        return dataclasses.replace(routing, weights=weights_TK, dropped=dropped_TK)
