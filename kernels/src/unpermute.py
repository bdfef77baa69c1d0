"""Unpermute: weight the expert outputs and sum the K copies of each token back.

Legend: T tokens, E experts, K experts per token, N = T·K slots, R grouped rows (N plus
padding), D model dim.

``out[t] = Σ_j w[t, j] · y[row_of_slot[t·K + j]]`` (``w = 1`` when no weights are
given), accumulated in float32 in the fixed order ``j = 0 … K-1`` by the one program
that owns token ``t``: no atomics, so the sum is bitwise reproducible. Padding rows of
``y`` are never read.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._checks import (
    check_float,
    check_launchable,
    check_positive_int,
    check_same_device,
    check_slot_index,
)
from ._tiles import LAUNCH_OPTIONS, accumulator, aligned, alignment_shift, autotuned, t_bucket

__all__ = ["unpermute"]


@autotuned
@triton.jit
def _unpermute(
    y_ptr,
    w_ptr,
    row_of_slot_ptr,
    out_ptr,
    T,
    D,
    K,
    T_BUCKET,  # read by the autotuner's key only
    HAS_WEIGHTS: tl.constexpr,
    D_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    D = aligned(D, D_SHIFT)
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    token_ok = tokens < T
    for first in range(0, D, BLOCK_D):
        cols = first + tl.arange(0, BLOCK_D)
        mask = token_ok[:, None] & (cols < D)[None, :]
        acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=ACC)
        for j in range(K):
            slot = tokens * K + j
            # int64 before any multiply: int32 rows would wrap past 2^31 elements.
            row = tl.load(row_of_slot_ptr + slot, mask=token_ok, other=0).to(tl.int64)
            v = tl.load(y_ptr + row[:, None] * D + cols[None, :], mask=mask, other=0).to(ACC)
            if HAS_WEIGHTS:
                v = v * tl.load(w_ptr + slot, mask=token_ok, other=0).to(ACC)[:, None]
            acc += v
        tl.store(
            out_ptr + tokens[:, None] * D + cols[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=mask,
        )


@torch.library.custom_op("moeblocks::unpermute", mutates_args=())
def _unpermute_op(
    y: Tensor, weights: Tensor | None, row_of_slot: Tensor, slot_of_row: Tensor, top_k: int
) -> Tensor:
    T, D = row_of_slot.shape[0] // top_k, y.shape[1]
    out_TD = y.new_empty(T, D)
    if T == 0 or D == 0:
        return out_TD
    w = weights.contiguous() if weights is not None else y  # y: a placeholder, never read
    _unpermute[lambda meta: (triton.cdiv(T, meta["BLOCK_ROWS"]),)](
        y.contiguous(),
        w,
        row_of_slot.contiguous(),
        out_TD,
        T,
        D,
        top_k,
        t_bucket(T),
        HAS_WEIGHTS=weights is not None,
        D_SHIFT=alignment_shift(D),
        ACC=accumulator(y.dtype),
        **LAUNCH_OPTIONS,
    )
    return out_TD


@_unpermute_op.register_fake
def _(
    y: Tensor, weights: Tensor | None, row_of_slot: Tensor, slot_of_row: Tensor, top_k: int
) -> Tensor:
    return y.new_empty(row_of_slot.shape[0] // top_k, y.shape[1])


def unpermute(
    y: Tensor,
    row_of_slot: Tensor,
    slot_of_row: Tensor,
    top_k: int,
    weights: Tensor | None = None,
) -> Tensor:
    """Sum the K weighted copies of every token back into token order.

    Registered as ``torch.ops.moeblocks.unpermute`` with autograd: the gradient of ``y``
    is :func:`permute` of the output gradient scaled by the same weights (zero on
    padding rows), the gradient of ``weights`` the row-wise dot :func:`slot_dot`; when
    both are needed, one fused pass (:func:`unpermute_backward`) computes them together.

    Args:
        y: ``[R, D]`` expert outputs in grouped order.
        row_of_slot: ``[N]`` grouped row of each slot, from :func:`build_index`.
        slot_of_row: ``[R]`` slot of each grouped row (used by the backward pass).
        top_k: K, copies per token; ``T = N / K``.
        weights: Optional ``[T, K]`` combine weights, applied in float32 (float64 for
            float64 ``y``); without them the copies are summed.

    Returns:
        ``[T, D]`` in ``y.dtype``.

    Example:
        Continuing :func:`permute`'s example (grouped ``a1 | a0 b0 b1``) with expert
        outputs ``[10, 20, 30, 40]`` and weights ``[[0.5, 0.5], [1, 0]]``::

            >>> y = torch.tensor([[10.0], [20.0], [30.0], [40.0]])
            >>> w = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
            >>> unpermute(y, idx.row_of_slot, idx.slot_of_row, 2, w).flatten().tolist()
            [15.0, 30.0]
    """
    check_float(y, "y", 2)
    check_positive_int(top_k, "top_k")
    num_tokens = row_of_slot.shape[0] // top_k if isinstance(row_of_slot, Tensor) else 0
    check_slot_index(row_of_slot, slot_of_row, num_tokens, top_k)
    check_same_device(y, "y", (row_of_slot, "row_of_slot"), (slot_of_row, "slot_of_row"))
    if y.shape[0] != slot_of_row.shape[0]:
        raise ValueError(
            f"y must have R = {slot_of_row.shape[0]} rows (one per grouped row), "
            f"got shape {tuple(y.shape)}"
        )
    if weights is not None:
        check_float(weights, "weights", 2)
        check_same_device(y, "y", (weights, "weights"))
        if tuple(weights.shape) != (num_tokens, top_k):
            raise ValueError(
                f"weights must have shape (T, K) = {(num_tokens, top_k)}, "
                f"got {tuple(weights.shape)}"
            )
    check_launchable(_unpermute, y, "y")
    return torch.ops.moeblocks.unpermute(y, weights, row_of_slot, slot_of_row, top_k)
