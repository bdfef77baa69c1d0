"""Slot dot: the row-wise dot product behind the gradients of the combine weights.

Legend: T tokens, E experts, K experts per token, N = T·K slots, R grouped rows (N plus
padding), D model dim.

``dots[t, j] = <a[t], b[row_of_slot[t·K + j]]>``, accumulated in float32 (float64 for
float64 inputs) over D in fixed pieces, then reduced once per slot. The tile is a fixed
function of D (never autotuned: a reduction's order follows the tile), so the result is
reproducible. With ``a`` the output gradient and ``b`` the expert outputs it is the
gradient of unpermute's weights; with ``a`` the tokens and ``b`` the gradient of the
grouped rows, the gradient of permute's weights.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._checks import check_float, check_launchable, check_same_device, check_slot_index
from ._tiles import LAUNCH_OPTIONS, accumulator, aligned, alignment_shift, fixed

__all__ = ["slot_dot"]


@fixed
@triton.jit
def _slot_dot(
    a_ptr,
    b_ptr,
    row_of_slot_ptr,
    out_ptr,
    N,
    D,
    K,
    D_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    D = aligned(D, D_SHIFT)
    slots = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    slot_ok = slots < N
    token = slots // K
    # int64 before any multiply: int32 rows would wrap past 2^31 elements.
    row = tl.load(row_of_slot_ptr + slots, mask=slot_ok, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=ACC)
    for first in range(0, D, BLOCK_D):
        cols = first + tl.arange(0, BLOCK_D)
        mask = slot_ok[:, None] & (cols < D)[None, :]
        a = tl.load(a_ptr + token[:, None] * D + cols[None, :], mask=mask, other=0).to(ACC)
        b = tl.load(b_ptr + row[:, None] * D + cols[None, :], mask=mask, other=0).to(ACC)
        acc += a * b
    tl.store(out_ptr + slots, tl.sum(acc, axis=1), mask=slot_ok)


def _out_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32


@torch.library.custom_op("moeblocks::slot_dot", mutates_args=())
def _slot_dot_op(
    a: Tensor, b: Tensor, row_of_slot: Tensor, slot_of_row: Tensor, top_k: int
) -> Tensor:
    N, D = row_of_slot.shape[0], a.shape[1]
    dtype = _out_dtype(a, b)
    if N == 0 or D == 0:
        return a.new_zeros(a.shape[0], top_k, dtype=dtype)
    out_TK = a.new_empty(a.shape[0], top_k, dtype=dtype)
    _slot_dot[lambda meta: (triton.cdiv(N, meta["BLOCK_ROWS"]),)](
        a.contiguous(),
        b.contiguous(),
        row_of_slot.contiguous(),
        out_TK,
        N,
        D,
        top_k,
        D_SHIFT=alignment_shift(D),
        ACC=accumulator(dtype),
        **LAUNCH_OPTIONS,
    )
    return out_TK


@_slot_dot_op.register_fake
def _(a: Tensor, b: Tensor, row_of_slot: Tensor, slot_of_row: Tensor, top_k: int) -> Tensor:
    return a.new_empty(a.shape[0], top_k, dtype=_out_dtype(a, b))


def slot_dot(a: Tensor, b: Tensor, row_of_slot: Tensor, slot_of_row: Tensor, top_k: int) -> Tensor:
    """Dot every token row with each of its K grouped rows.

    Registered as ``torch.ops.moeblocks.slot_dot`` with autograd (the gradient of ``a``
    is an :func:`unpermute` of ``b`` weighted by the output gradient, that of ``b`` a
    :func:`permute` of ``a`` scaled the same way), so the weight gradients of permute
    and unpermute are themselves differentiable.

    Args:
        a: ``[T, D]`` one row per token.
        b: ``[R, D]`` one row per grouped row; padding rows are never read.
        row_of_slot: ``[N]`` grouped row of each slot, from :func:`build_index`.
        slot_of_row: ``[R]`` slot of each grouped row (used by the backward pass).
        top_k: K, slots per token.

    Returns:
        ``[T, K]`` float32 (float64 if an input is float64).

    Example:
        With :func:`permute`'s example layout (grouped ``a1 | a0 b0 b1``)::

            >>> a = torch.tensor([[1.0], [2.0]])
            >>> b = torch.tensor([[10.0], [20.0], [30.0], [40.0]])
            >>> slot_dot(a, b, idx.row_of_slot, idx.slot_of_row, 2).tolist()
            [[20.0, 10.0], [60.0, 80.0]]
    """
    check_float(a, "a", 2)
    check_float(b, "b", 2)
    check_slot_index(row_of_slot, slot_of_row, a.shape[0], top_k)
    check_same_device(a, "a", (b, "b"), (row_of_slot, "row_of_slot"), (slot_of_row, "slot_of_row"))
    if tuple(b.shape) != (slot_of_row.shape[0], a.shape[1]):
        raise ValueError(
            f"b must have shape (R, D) = {(slot_of_row.shape[0], a.shape[1])}, got {tuple(b.shape)}"
        )
    check_launchable(_slot_dot, a, "a")
    return torch.ops.moeblocks.slot_dot(a, b, row_of_slot, slot_of_row, top_k)
