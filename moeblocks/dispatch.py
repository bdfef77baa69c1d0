"""Dispatchers: move routed token copies into expert-grouped order and back.

Legend: T tokens, E experts, K experts per token, N = T·K slots, R grouped rows (N plus
padding), D model dim.

``permute`` gathers the K copies of every token into one tensor whose rows are grouped
by expert and returns a :class:`~moeblocks.routing.Layout`; ``unpermute`` takes that
layout back, multiplies each expert output by its combine weight and sums the K copies
into token order. A dispatcher keeps nothing on ``self`` between the two calls.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from moeblocks.routing import Layout, Routing

__all__ = ["Dispatcher", "TorchDispatcher", "build_layout", "make_dispatcher"]


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


def _check_pad_to(pad_to: int) -> None:
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1:
        raise ValueError(f"pad_to must be an int >= 1, got {pad_to!r}")


def build_layout(experts: Int[Tensor, "T K"], num_experts: int, pad_to: int = 1) -> Layout:
    """Build the grouped order of all slots from the chosen experts.

    A stable argsort of the flattened expert ids keeps slots of one expert in slot
    (token) order. With ``pad_to > 1`` every expert segment is rounded up to a multiple
    of ``pad_to`` rows; sizing that padded tensor reads the counts on the host (one
    device sync), so the default ``pad_to=1`` has none.

    Example:
        >>> layout = build_layout(torch.tensor([[1], [0], [1]]), num_experts=2)
        >>> layout.slot_of_row.tolist(), layout.counts.tolist()
        ([1, 0, 2], [1, 2])
    """
    _check_pad_to(pad_to)
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
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


class TorchDispatcher:
    """The readable reference dispatcher, in plain PyTorch indexing.

    Both directions are gathers whose backward passes scatter to distinct rows, and the
    K copies of a token are summed by a fixed-order reduction, so results and gradients
    are deterministic on every device.

    Args:
        pad_to: Round every expert segment up to a multiple of this many rows (filled
            with zeros), for grouped GEMMs that want aligned segments. 1 means no padding.
    """

    def __init__(self, pad_to: int = 1) -> None:
        _check_pad_to(pad_to)
        self.pad_to = pad_to

    def __repr__(self) -> str:
        return f"TorchDispatcher(pad_to={self.pad_to})"

    def permute(
        self, tokens: Float[Tensor, "T D"], routing: Routing
    ) -> tuple[Float[Tensor, "R D"], Layout]:
        """Gather the K copies of every token into expert-grouped rows.

        Args:
            tokens: Token vectors.
            routing: The router's decision for these tokens.

        Returns:
            The grouped copies (padding rows are zero) and their :class:`Layout`.
        """
        layout = build_layout(routing.experts, routing.num_experts, self.pad_to)
        T, D = tokens.shape
        K = routing.top_k
        slots_ND = tokens.unsqueeze(1).expand(T, K, D).reshape(T * K, D)
        if self.pad_to == 1:
            return slots_ND[layout.slot_of_row], layout
        # Padding rows point at an appended zero row.
        padded_ND = torch.cat([slots_ND, slots_ND.new_zeros(1, D)])
        index_R = torch.where(layout.slot_of_row < 0, T * K, layout.slot_of_row)
        return padded_ND[index_R], layout

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
        """
        T, K = weights.shape
        slots_TKD = grouped[layout.row_of_slot].view(T, K, grouped.shape[-1])
        # bmm accumulates the K products in float32 even for half inputs.
        w_T1K = weights.to(grouped.dtype).unsqueeze(1)
        return torch.bmm(w_T1K, slots_TKD).squeeze(1)


def make_dispatcher(name: str = "auto", pad_to: int = 1) -> Dispatcher:
    """Build a dispatcher by name.

    Args:
        name: ``"torch"`` for :class:`TorchDispatcher`; ``"triton"`` for the Triton
            kernels (needs CUDA tensors, or ``TRITON_INTERPRET=1`` on CPU); ``"auto"``
            for a dispatcher that takes Triton on CUDA tensors and the torch reference
            on CPU tensors.
        pad_to: Segment alignment, see :class:`TorchDispatcher`.
    """
    if name == "torch":
        return TorchDispatcher(pad_to=pad_to)
    if name in ("triton", "auto"):
        from moeblocks.triton_dispatch import AutoDispatcher, TritonDispatcher

        return (
            TritonDispatcher(pad_to=pad_to) if name == "triton" else AutoDispatcher(pad_to=pad_to)
        )
    raise ValueError(f"dispatcher name must be 'auto', 'torch' or 'triton', got {name!r}")
