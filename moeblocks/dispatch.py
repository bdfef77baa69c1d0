"""Dispatchers: move routed token copies into expert-grouped order and back.

Legend: T tokens, E experts, K experts per token, N = T·K slots, R grouped rows (N plus
padding), D model dim.

``permute`` gathers the K copies of every token into one tensor whose rows are grouped
by expert and returns a :class:`~moeblocks.routing.Layout`; ``unpermute`` takes that
layout back, multiplies each expert output by its combine weight and sums the K copies
into token order. A dispatcher keeps nothing on ``self`` between the two calls.

Inputs are checked: shapes, dtypes and devices always; that every expert id lies in
``[0, E)`` on CPU tensors always and on GPU tensors with ``sync_checks=True`` (one device
sync per call).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from moeblocks._checks import (
    check_expert_ids,
    check_float,
    check_index,
    check_int,
    check_same_device,
)
from moeblocks.routing import Layout, Routing

__all__ = ["Dispatcher", "TorchDispatcher", "build_layout"]


@runtime_checkable
class Dispatcher(Protocol):
    """Groups routed token copies by expert and combines expert outputs back."""

    def permute(
        self, tokens: Float[Tensor, "T D"], routing: Routing
    ) -> tuple[Float[Tensor, "R D"], Layout]:
        """Return the expert-grouped copies of ``tokens`` and their layout."""
        ...

    def unpermute(
        self, grouped: Float[Tensor, "R D"], layout: Layout, weights: Float[Tensor, "T K"]
    ) -> Float[Tensor, "T D"]:
        """Weight the expert outputs and sum the K copies of each token back."""
        ...


def build_layout(
    experts: Int[Tensor, "T K"], num_experts: int, pad_to: int = 1, *, sync_checks: bool = False
) -> Layout:
    """Build the grouped order of all slots from the chosen experts.

    A stable argsort of the flattened expert ids keeps slots of one expert in slot
    (token) order. With ``pad_to > 1`` every expert segment is rounded up to a multiple
    of ``pad_to`` rows; sizing that padded tensor reads the counts on the host (one
    device sync), so the default ``pad_to=1`` has none.

    Args:
        experts: Expert ids per token and choice, integers in ``[0, num_experts)``.
        num_experts: E, >= 1.
        pad_to: Segment alignment in rows, >= 1.
        sync_checks: Also range-check the ids of GPU tensors (one device sync); CPU
            tensors are always checked.

    Raises:
        TypeError: If ``experts`` is not an integer tensor.
        ValueError: If ``experts`` is not ``[T, K]``, an id lies outside
            ``[0, num_experts)``, or ``num_experts`` / ``pad_to`` is not an int >= 1.

    Example:
        >>> layout = build_layout(torch.tensor([[1], [0], [1]]), num_experts=2)
        >>> layout.slot_of_row.tolist(), layout.counts.tolist()
        ([1, 0, 2], [1, 2])
    """
    check_int(pad_to, "pad_to")
    check_int(num_experts, "num_experts")
    check_index(experts, "experts", 2)
    check_expert_ids(experts, num_experts, sync_checks)
    flat_N = experts.reshape(-1)
    device = flat_N.device
    sorted_slots_N = torch.argsort(flat_N, stable=True)
    counts_E = torch.bincount(flat_N, minlength=num_experts)
    zero = counts_E.new_zeros(1)
    if pad_to == 1:
        rank_N = torch.arange(flat_N.numel(), device=device)
        row_of_slot_N = torch.empty_like(sorted_slots_N)
        row_of_slot_N[sorted_slots_N] = rank_N
        offsets = torch.cat([zero, counts_E.cumsum(0)])
        return Layout(row_of_slot_N, sorted_slots_N, counts_E, counts_E, offsets)

    group_sizes_E = (counts_E + pad_to - 1) // pad_to * pad_to
    offsets = torch.cat([zero, group_sizes_E.cumsum(0)])
    unpadded_starts_E = torch.cat([zero, counts_E.cumsum(0)[:-1]])
    sorted_experts_N = flat_N[sorted_slots_N]
    # Position inside the expert's segment, shifted to that segment's padded start.
    rank_N = torch.arange(flat_N.numel(), device=device)
    rows_N = rank_N - unpadded_starts_E[sorted_experts_N] + offsets[sorted_experts_N]
    num_rows = int(offsets[-1])  # host sync: the padded size is data-dependent
    slot_of_row_R = torch.full((num_rows,), -1, dtype=torch.long, device=device)
    slot_of_row_R[rows_N] = sorted_slots_N
    row_of_slot_N = torch.empty_like(sorted_slots_N)
    row_of_slot_N[sorted_slots_N] = rows_N
    return Layout(row_of_slot_N, slot_of_row_R, counts_E, group_sizes_E, offsets)


class _Permute(torch.autograd.Function):
    """``grouped[r] = tokens[slot_of_row[r] // K]``, zero on padding rows.

    Both directions are gathers: the backward reads each token's K rows back through
    ``row_of_slot`` and sums them in a fixed order, instead of scattering with atomics.
    """

    @staticmethod
    def forward(
        ctx: Any, tokens_TD: Tensor, slot_of_row_R: Tensor, row_of_slot_N: Tensor, top_k: int
    ) -> Tensor:
        ctx.save_for_backward(row_of_slot_N)
        ctx.top_k = top_k
        grouped_RD = tokens_TD.index_select(0, slot_of_row_R.clamp(min=0) // top_k)
        if slot_of_row_R.shape[0] != row_of_slot_N.shape[0]:  # padded: zero the pad rows
            grouped_RD = grouped_RD.masked_fill((slot_of_row_R < 0).unsqueeze(1), 0)
        return grouped_RD

    @staticmethod
    def backward(ctx: Any, grad_RD: Tensor) -> tuple[Tensor, None, None, None]:
        (row_of_slot_N,) = ctx.saved_tensors
        T = row_of_slot_N.shape[0] // ctx.top_k
        grad_TKD = grad_RD.index_select(0, row_of_slot_N).view(T, ctx.top_k, grad_RD.shape[-1])
        return grad_TKD.sum(1), None, None, None


class _Unpermute(torch.autograd.Function):
    """``out[t] = Σ_j w[t, j] · grouped[row_of_slot[t·K + j]]``, gathers both ways."""

    @staticmethod
    def forward(
        ctx: Any,
        grouped_RD: Tensor,
        weights_TK: Tensor,
        row_of_slot_N: Tensor,
        slot_of_row_R: Tensor,
    ) -> Tensor:
        ctx.save_for_backward(grouped_RD, weights_TK, row_of_slot_N, slot_of_row_R)
        T, K = weights_TK.shape
        copies_TKD = grouped_RD.index_select(0, row_of_slot_N).view(T, K, grouped_RD.shape[-1])
        # bmm accumulates the K products in float32 even for half inputs.
        w_T1K = weights_TK.to(grouped_RD.dtype).unsqueeze(1)
        return torch.bmm(w_T1K, copies_TKD).squeeze(1)

    @staticmethod
    def backward(ctx: Any, grad_TD: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        grouped_RD, weights_TK, row_of_slot_N, slot_of_row_R = ctx.saved_tensors
        T, K = weights_TK.shape
        # Under autocast the forward's bmm ran in a lower precision than grouped_RD, so
        # the incoming gradient can have another dtype: compute in grouped_RD's.
        grad_TD = grad_TD.to(grouped_RD.dtype)
        # Everything happens in grouped order: row r holds slot s, so it needs grad[s // K].
        slot_R = slot_of_row_R.clamp(min=0)
        grad_RD = grad_TD.index_select(0, slot_R // K)
        grad_weights = None
        if ctx.needs_input_grad[1]:
            # d out[t] / d w[t, j] = <grouped[row of slot t·K + j], grad[t]>: a row-wise dot
            # in grouped order, then read back per slot (einsum runs it as one batched mm).
            dots_R = torch.einsum("rd,rd->r", grouped_RD, grad_RD)
            grad_weights = dots_R.index_select(0, row_of_slot_N).view(T, K).to(weights_TK.dtype)
        grad_grouped = None
        if ctx.needs_input_grad[0]:
            # Padding rows read a weight of 0, so their gradient is 0.
            w_R1 = weights_TK.to(grad_TD.dtype).reshape(-1).index_select(0, slot_R)
            w_R1 = w_R1.masked_fill(slot_of_row_R < 0, 0).unsqueeze(1)
            # In place saves a fresh [R, D] buffer, unless a double backward needs grad_RD.
            in_place = not torch.is_grad_enabled()
            grad_grouped = grad_RD.mul_(w_R1) if in_place else grad_RD * w_R1
        return grad_grouped, grad_weights, None, None


class TorchDispatcher:
    """The reference dispatcher, in plain PyTorch indexing.

    Permute and unpermute are gathers in both directions (their backward passes read
    rows through the layout's inverse index instead of scattering), and the K copies of
    a token are summed in a fixed order, so results and gradients are deterministic on
    every device and no ``index_put_`` accumulation is needed.

    Args:
        pad_to: Round every expert segment up to a multiple of this many rows (filled
            with zeros), for grouped GEMMs that want aligned segments. 1 means no padding.
        sync_checks: Also range-check the expert ids of GPU tensors in :meth:`permute`,
            at one device sync per call. CPU tensors are always checked; shapes, dtypes
            and devices are always checked.
    """

    def __init__(self, pad_to: int = 1, *, sync_checks: bool = False) -> None:
        check_int(pad_to, "pad_to")
        self.pad_to = pad_to
        self.sync_checks = bool(sync_checks)

    def __repr__(self) -> str:
        extra = ", sync_checks=True" if self.sync_checks else ""
        return f"TorchDispatcher(pad_to={self.pad_to}{extra})"

    def permute(
        self, tokens: Float[Tensor, "T D"], routing: Routing
    ) -> tuple[Float[Tensor, "R D"], Layout]:
        """Gather the K copies of every token into expert-grouped rows.

        Args:
            tokens: Token vectors.
            routing: The router's decision for these tokens.

        Returns:
            The grouped copies (padding rows are zero) and their :class:`Layout`.

        Raises:
            ValueError: If ``tokens`` is not ``[T, D]`` with the T of ``routing``, the two
                are on different devices, or an expert id is out of range.
        """
        check_float(tokens, "tokens", 2)
        check_index(routing.experts, "routing.experts", 2)
        if tokens.shape[0] != routing.num_tokens:
            raise ValueError(
                f"tokens has {tokens.shape[0]} rows but routing.experts covers "
                f"{routing.num_tokens} tokens (shape {tuple(routing.experts.shape)}); "
                "expected one routing row per token"
            )
        check_same_device(routing.experts, "routing.experts", tokens, "tokens")
        layout = build_layout(
            routing.experts, routing.num_experts, self.pad_to, sync_checks=self.sync_checks
        )
        grouped = _Permute.apply(tokens, layout.slot_of_row, layout.row_of_slot, routing.top_k)
        return grouped, layout

    def unpermute(
        self, grouped: Float[Tensor, "R D"], layout: Layout, weights: Float[Tensor, "T K"]
    ) -> Float[Tensor, "T D"]:
        """Combine expert outputs: ``out[t] = Σ_j weights[t, j] · grouped[row(t·K + j)]``.

        Args:
            grouped: Expert outputs in grouped order.
            layout: The layout returned by :meth:`permute`.
            weights: Combine weights per token and choice; cast to ``grouped.dtype``.

        Returns:
            One vector per token.

        Raises:
            ValueError: If ``grouped`` does not have the layout's R rows, ``weights`` does
                not hold one weight per slot, or the tensors are on different devices.
        """
        check_float(grouped, "grouped", 2)
        check_float(weights, "weights", 2)
        if grouped.shape[0] != layout.num_rows:
            raise ValueError(
                f"grouped must have R = {layout.num_rows} rows (layout.slot_of_row), "
                f"got shape {tuple(grouped.shape)}"
            )
        if weights.numel() != layout.row_of_slot.shape[0]:
            raise ValueError(
                f"weights must have shape [T, K] with T·K = {layout.row_of_slot.shape[0]} "
                f"slots (layout.row_of_slot), got {tuple(weights.shape)}"
            )
        check_same_device(weights, "weights", grouped, "grouped")
        check_same_device(layout.row_of_slot, "layout.row_of_slot", grouped, "grouped")
        return _Unpermute.apply(grouped, weights, layout.row_of_slot, layout.slot_of_row)
