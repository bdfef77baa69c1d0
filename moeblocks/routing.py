"""Typed records passed between the stages of an MoE layer.

Legend: T tokens, E experts, K experts per token (top-k), N = T·K routed slots,
R rows of the grouped tensor (N plus any alignment padding), D model dim.

A *slot* is one (token, choice) pair, numbered ``n = t·K + j`` for token ``t`` and its
``j``-th chosen expert. Every record is a frozen dataclass: stages hand records to each
other and never keep them on ``self``.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Bool, Float, Int
from torch import Tensor

from moeblocks._checks import (
    check_expert_ids,
    check_float,
    check_index,
    check_same_device,
)

__all__ = ["Layout", "MoEOutput", "Routing", "check_routing"]


@dataclass(frozen=True)
class Routing:
    """What a router decided for a batch of tokens.

    What ``probs`` holds depends on the router's scoring function (the aux losses read
    it, see :mod:`moeblocks.gating`):

    - ``"softmax"``: ``softmax(scores)`` over all experts; rows sum to 1.
    - ``"softmax_topk"``: also ``softmax(scores)`` over all experts (the combine weights
      are a softmax over the K chosen scores only, but the balance losses need a
      distribution over every expert).
    - ``"sigmoid"``: ``sigmoid(scores)`` per expert; rows do not sum to 1.

    Attributes:
        scores: Raw router scores (logits), float32 (float64 for float64 routing).
        probs: The scoring function applied to ``scores`` (see above), same dtype.
        experts: Indices of the K chosen experts per token, in descending order of the
            selection key (the probabilities plus any selection-only bias).
        weights: Combine weights of the chosen experts, after the router's weight
            policy (renormalised, raw or scaled) and any capacity drop.
        dropped: True for a routed copy that a capacity limit dropped (its weight is
            0, so it adds nothing to the output); None when no capacity applies.
        batch_shape: Leading shape of the layer input the T tokens were flattened from
            (set by :class:`~moeblocks.MoELayer`); sequence-wise losses and per-sequence
            capacity read the last entry as the sequence length. None: one sequence.
        slots: True for a real slot, False for an empty one (dynamic k: top-p, expert
            choice), whose weight is 0, which the layer does not compute and which the
            losses and inspection do not count; K is then the widest token's width.
            None: every slot is real (a fixed k).
    """

    scores: Float[Tensor, "T E"]
    probs: Float[Tensor, "T E"]
    experts: Int[Tensor, "T K"]
    weights: Float[Tensor, "T K"]
    dropped: Bool[Tensor, "T K"] | None = None
    batch_shape: tuple[int, ...] | None = None
    slots: Bool[Tensor, "T K"] | None = None

    @property
    def num_tokens(self) -> int:
        """T, the number of routed tokens."""
        return self.experts.shape[0]

    @property
    def num_experts(self) -> int:
        """E, the number of experts the router chose from."""
        return self.probs.shape[1]

    @property
    def top_k(self) -> int:
        """K, the number of experts chosen per token (the width, with dynamic k)."""
        return self.experts.shape[1]

    @property
    def k_per_token(self) -> Int[Tensor, " T"]:
        """The real slots of every token: K each for a fixed k, 0..K with dynamic k."""
        if self.slots is None:
            return self.experts.new_full((self.num_tokens,), self.top_k)
        return self.slots.sum(1)

    @property
    def num_dropped(self) -> Int[Tensor, ""]:
        """How many routed copies a capacity limit dropped (0 without a limit)."""
        if self.dropped is None:
            return self.experts.new_zeros(())
        return self.dropped.sum()

    def sequences(self) -> tuple[int, int]:
        """``(number of sequences, tokens per sequence)`` from ``batch_shape``.

        With no ``batch_shape`` (or a 1-D one) all T tokens form one sequence.
        """
        T = self.num_tokens
        if self.batch_shape is None or len(self.batch_shape) < 2:
            return (1, T) if T else (0, 0)
        S = self.batch_shape[-1]
        return (T // S if S else 0, S)


@dataclass(frozen=True)
class Layout:
    """Where every routed slot sits in the expert-grouped tensor.

    Rows of the grouped tensor are ordered by expert; inside one expert they follow slot
    order (the sort is stable). A segment may end in padding rows when the dispatcher
    aligns segments to a block size.

    Attributes:
        row_of_slot: Grouped row that holds slot ``n = t·K + j``.
        slot_of_row: Slot held by grouped row ``r``, or -1 for a padding row.
        counts: Routed slots per expert (without padding); sums to N.
        group_sizes: Rows per expert segment in the grouped tensor (counts rounded up to
            the alignment); sums to R. This is what an expert bank is given.
        offsets: Start row of each expert segment, with R appended: ``offsets[e+1] -
            offsets[e] == group_sizes[e]``.
    """

    row_of_slot: Int[Tensor, " N"]
    slot_of_row: Int[Tensor, " R"]
    counts: Int[Tensor, " E"]
    group_sizes: Int[Tensor, " E"]
    offsets: Int[Tensor, " E+1"]

    @property
    def num_rows(self) -> int:
        """R, the number of rows in the grouped tensor."""
        return self.slot_of_row.shape[0]


@dataclass(frozen=True)
class MoEOutput:
    """What an :class:`~moeblocks.MoELayer` returns.

    Attributes:
        out: The layer output, same shape and dtype as the input.
        aux_losses: Named auxiliary losses, each already multiplied by its weight, so a
            training loop adds ``sum(aux_losses.values())`` to its task loss.
        routing: The routing record of this call, for inspection and metrics.
    """

    out: Float[Tensor, "*batch D"]
    aux_losses: dict[str, Float[Tensor, ""]]
    routing: Routing

    def total_aux_loss(self) -> Float[Tensor, ""]:
        """Sum of all weighted auxiliary losses (a zero tensor when there are none)."""
        total = self.out.new_zeros((), dtype=self.routing.probs.dtype)
        for value in self.aux_losses.values():
            total = total + value
        return total


def check_routing(
    routing: object,
    num_experts: int | None = None,
    *,
    sync_checks: bool = False,
    name: str = "routing",
) -> Routing:
    """A :class:`~moeblocks.routing.Routing` whose fields agree with each other.

    ``scores`` and ``probs`` are ``[T, E]`` floats of one shape, ``experts`` an integer
    ``[T, K]`` and ``weights`` a float ``[T, K]`` (``dropped`` too, when set), all on one
    device. With ``num_experts``, E must equal it (a record from another router). The
    expert ids are range-checked by the :func:`value_checks` rule. A record that passes
    cannot make a loss fail inside ``scatter`` or ``gather``.
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"{name} must be a Routing, got {type(routing).__name__}")
    probs = check_float(routing.probs, f"{name}.probs", ndim=2)
    scores = check_float(routing.scores, f"{name}.scores", ndim=2)
    experts = check_index(routing.experts, f"{name}.experts", ndim=2)
    weights = check_float(routing.weights, f"{name}.weights", ndim=2)
    T, E = probs.shape
    if scores.shape != probs.shape:
        raise ValueError(
            f"{name}.scores must have the shape of {name}.probs [{T}, {E}], "
            f"got {tuple(scores.shape)}"
        )
    if experts.shape[0] != T or weights.shape != experts.shape:
        raise ValueError(
            f"{name}.experts and {name}.weights must both have shape [T, K] with T={T} "
            f"(the tokens of {name}.probs), got experts {tuple(experts.shape)} and "
            f"weights {tuple(weights.shape)}"
        )
    if routing.dropped is not None and routing.dropped.shape != experts.shape:
        raise ValueError(
            f"{name}.dropped must have shape {tuple(experts.shape)} like {name}.experts, "
            f"got {tuple(routing.dropped.shape)}"
        )
    for field in ("scores", "experts", "weights"):
        check_same_device(getattr(routing, field), f"{name}.{field}", probs, f"{name}.probs")
    if num_experts is not None and num_experts != E:
        raise ValueError(
            f"{name} is for {E} experts ({name}.probs has shape [{T}, {E}]), expected "
            f"{num_experts} (the router's num_experts)"
        )
    check_expert_ids(experts, E, sync_checks, name=f"{name}.experts")
    return routing
