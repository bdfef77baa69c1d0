"""Permute: gather the K copies of every token into expert-grouped rows.

Legend: T tokens, E experts, K experts per token, N = T·K slots, R grouped rows (N plus
padding), D model dim.

``grouped[r] = w[s] · x[s // K]`` for the slot ``s = slot_of_row[r]`` (``w = 1`` when no
weights are given), and zero for padding rows (``s = -1``). The kernel is token-major:
one program reads ``x[t]`` once and writes its K rows through ``row_of_slot`` (a
row-major gather would read every token row K times); the ``R − N`` padding rows are
listed once (``torch.nonzero_static``, no sync) and zeroed by one extra program per
``BLOCK_ROWS`` of them, launched only when there is padding. Every output
row is written by exactly one program, so the op is deterministic. The optional
per-slot scale makes the op the exact transpose of :mod:`.unpermute`, which is what
their backward passes use.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._checks import check_float, check_launchable, check_same_device, check_slot_index
from ._tiles import (
    LAUNCH_OPTIONS,
    accumulator,
    aligned,
    alignment_shift,
    autotuned,
    padding_rows,
    row_grid,
    t_bucket,
    zero_padding_rows,
)

__all__ = ["permute"]


@autotuned
@triton.jit
def _permute(
    x_ptr,
    w_ptr,
    row_of_slot_ptr,
    pad_rows_ptr,
    out_ptr,
    T,
    P,
    D,
    K,
    T_BUCKET,  # read by the autotuner's key only
    HAS_WEIGHTS: tl.constexpr,
    PADDED: tl.constexpr,
    D_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Token-major: the first cdiv(T, BLOCK_ROWS) programs each read BLOCK_ROWS token rows
    # once and write their K copies; the programs after them (launched only when there
    # are padding rows) write zeros to BLOCK_ROWS of the P padding rows each.
    D = aligned(D, D_SHIFT)
    block = tl.program_id(0)
    if block < tl.cdiv(T, BLOCK_ROWS):
        tokens = block.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        token_ok = tokens < T
        for first in range(0, D, BLOCK_D):
            cols = first + tl.arange(0, BLOCK_D)
            mask = token_ok[:, None] & (cols < D)[None, :]
            v = tl.load(x_ptr + tokens[:, None] * D + cols[None, :], mask=mask, other=0)
            for j in range(K):
                slot = tokens * K + j
                # int64 before any multiply: int32 rows would wrap past 2^31 elements.
                row = tl.load(row_of_slot_ptr + slot, mask=token_ok, other=0).to(tl.int64)
                out = v
                if HAS_WEIGHTS:
                    w = tl.load(w_ptr + slot, mask=token_ok, other=0).to(ACC)
                    out = v.to(ACC) * w[:, None]  # one rounding, after the product
                tl.store(
                    out_ptr + row[:, None] * D + cols[None, :],
                    out.to(out_ptr.dtype.element_ty),
                    mask=mask,
                )
    elif PADDED:
        first_padding = block - tl.cdiv(T, BLOCK_ROWS)
        zero_padding_rows(pad_rows_ptr, P, out_ptr, first_padding, D, BLOCK_ROWS, BLOCK_D)


@torch.library.custom_op("moeblocks::permute", mutates_args=())
def _permute_op(
    x: Tensor, weights: Tensor | None, row_of_slot: Tensor, slot_of_row: Tensor, top_k: int
) -> Tensor:
    T, N, R, D = x.shape[0], row_of_slot.shape[0], slot_of_row.shape[0], x.shape[1]
    out_RD = x.new_empty(R, D)
    if R == 0 or D == 0:
        return out_RD
    w = weights.contiguous() if weights is not None else x  # x: a placeholder, never read
    pad_rows_P = padding_rows(slot_of_row, N)
    P = pad_rows_P.shape[0]
    _permute[row_grid(T, P)](
        x.contiguous(),
        w,
        row_of_slot.contiguous(),
        pad_rows_P if P else row_of_slot,  # a placeholder when there is no padding
        out_RD,
        T,
        P,
        D,
        top_k,
        t_bucket(T),
        HAS_WEIGHTS=weights is not None,
        PADDED=P > 0,
        D_SHIFT=alignment_shift(D),
        ACC=accumulator(x.dtype),
        **LAUNCH_OPTIONS,
    )
    return out_RD


@_permute_op.register_fake
def _(
    x: Tensor, weights: Tensor | None, row_of_slot: Tensor, slot_of_row: Tensor, top_k: int
) -> Tensor:
    return x.new_empty(slot_of_row.shape[0], x.shape[1])


def permute(
    x: Tensor,
    row_of_slot: Tensor,
    slot_of_row: Tensor,
    top_k: int,
    weights: Tensor | None = None,
) -> Tensor:
    """Gather token copies into expert-grouped rows, optionally scaled per slot.

    Registered as ``torch.ops.moeblocks.permute`` with autograd: the gradient of ``x``
    is :func:`unpermute` of the output gradient (the K copies summed, scaled by the same
    weights), the gradient of ``weights`` the row-wise dot :func:`slot_dot`.

    Args:
        x: ``[T, D]`` token vectors (float16, bfloat16, float32 or float64).
        row_of_slot: ``[N]`` grouped row of each slot, from :func:`build_index`.
        slot_of_row: ``[R]`` slot of each grouped row, -1 for padding.
        top_k: K, copies per token; ``N == T·K``.
        weights: Optional ``[T, K]`` scale of each copy, applied in float32 (float64
            for float64 ``x``) before the single rounding to ``x.dtype``.

    Returns:
        ``[R, D]`` grouped copies in ``x.dtype``; padding rows are zero.

    Example:
        Tokens ``a, b`` with top-2 experts ``[[1, 0], [1, 1]]`` have slots
        ``a0 a1 b0 b1``; grouped by expert that is ``a1 | a0 b0 b1``::

            >>> x = torch.tensor([[1.0], [2.0]])
            >>> idx = build_index(torch.tensor([[1, 0], [1, 1]]), num_experts=2)
            >>> idx.slot_of_row.tolist()
            [1, 0, 2, 3]
            >>> permute(x, idx.row_of_slot, idx.slot_of_row, top_k=2).flatten().tolist()
            [1.0, 1.0, 2.0, 2.0]
    """
    check_float(x, "x", 2)
    check_slot_index(row_of_slot, slot_of_row, x.shape[0], top_k)
    check_same_device(x, "x", (row_of_slot, "row_of_slot"), (slot_of_row, "slot_of_row"))
    if weights is not None:
        check_float(weights, "weights", 2)
        check_same_device(x, "x", (weights, "weights"))
        if tuple(weights.shape) != (x.shape[0], top_k):
            raise ValueError(
                f"weights must have shape (T, K) = {(x.shape[0], top_k)}, "
                f"got {tuple(weights.shape)}"
            )
    check_launchable(_permute, x, "x")
    return torch.ops.moeblocks.permute(x, weights, row_of_slot, slot_of_row, top_k)
