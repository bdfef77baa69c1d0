"""Unpermute backward: the expert-output gradient and the weight gradient in one pass.

Legend: T tokens, E experts, K experts per token, N = T·K slots, R grouped rows (N plus
padding), D model dim.

For ``out[t] = Σ_j w[t, j] · y[row(t, j)]`` and an output gradient ``g``:

* ``grad_y[row(t, j)] = w[t, j] · g[t]`` (zero on padding rows), a weighted permute;
* ``grad_w[t, j] = <g[t], y[row(t, j)]>``, a :mod:`.slot_dot`.

Computed separately, ``g`` is read K times by each. Here one program owns a few tokens:
it reads ``g[t]`` once per column piece, and for each j reads ``y[row(t, j)]`` and writes
``grad_y[row(t, j)]``, accumulating the K dot products as it goes (in float32, float64
for float64 inputs). That moves ``T·D`` + ``2·N·D`` elements instead of ``2·T·D + 2·N·D``
plus the K-fold re-reads. The tile is fixed (never autotuned), so the dot products are
summed in the same order on every run: 4 rows of up to 256 columns on 4 warps, one warp
per row, so each dot product reduces inside a warp and the loop has no block-wide
barrier (the earlier 2 × 1024 tile spread a row over all warps: two barriers per piece
and K step).
"""

import functools

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
    backward_tile,
    fixed,
    padding_rows,
    row_grid,
    zero_padding_rows,
)

__all__ = ["unpermute_backward"]


@functools.partial(fixed, gpu=lambda args: backward_tile(args["D"], args["g_ptr"].dtype.itemsize))
@triton.jit
def _unpermute_backward(
    g_ptr,
    y_ptr,
    w_ptr,
    row_of_slot_ptr,
    pad_rows_ptr,
    grad_y_ptr,
    grad_w_ptr,
    T,
    P,
    D,
    K,
    PADDED: tl.constexpr,
    D_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    K_POW2: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    D = aligned(D, D_SHIFT)
    block = tl.program_id(0)
    if block < tl.cdiv(T, BLOCK_ROWS):
        tokens = block.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        token_ok = tokens < T
        choices = tl.arange(0, K_POW2)
        dots = tl.zeros([BLOCK_ROWS, K_POW2], dtype=ACC)
        for first in range(0, D, BLOCK_D):
            cols = first + tl.arange(0, BLOCK_D)
            mask = token_ok[:, None] & (cols < D)[None, :]
            g = tl.load(g_ptr + tokens[:, None] * D + cols[None, :], mask=mask, other=0).to(ACC)
            for j in range(K):
                slot = tokens * K + j
                # int64 before any multiply: int32 rows would wrap past 2^31 elements.
                row = tl.load(row_of_slot_ptr + slot, mask=token_ok, other=0).to(tl.int64)
                w = tl.load(w_ptr + slot, mask=token_ok, other=0).to(ACC)
                where = row[:, None] * D + cols[None, :]
                tl.store(
                    grad_y_ptr + where, (g * w[:, None]).to(grad_y_ptr.dtype.element_ty), mask=mask
                )
                y = tl.load(y_ptr + where, mask=mask, other=0).to(ACC)
                # Adding 0 to the other columns is exact: only column j changes.
                piece = tl.sum(g * y, axis=1)
                dots += tl.where(choices[None, :] == j, piece[:, None], 0.0)
        tl.store(
            grad_w_ptr + tokens[:, None] * K + choices[None, :],
            dots,
            mask=token_ok[:, None] & (choices < K)[None, :],
        )
    elif PADDED:
        zero_padding_rows(
            pad_rows_ptr, P, grad_y_ptr, block - tl.cdiv(T, BLOCK_ROWS), D, BLOCK_ROWS, BLOCK_D
        )


def _dots_dtype(g: Tensor, y: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (g.dtype, y.dtype) else torch.float32


@torch.library.custom_op("moeblocks::unpermute_backward", mutates_args=())
def _unpermute_backward_op(
    grad: Tensor,
    y: Tensor,
    weights: Tensor,
    row_of_slot: Tensor,
    slot_of_row: Tensor,
    top_k: int,
) -> tuple[Tensor, Tensor]:
    T, N, R, D = grad.shape[0], row_of_slot.shape[0], slot_of_row.shape[0], grad.shape[1]
    dtype = _dots_dtype(grad, y)
    grad_y_RD = y.new_empty(R, D)
    if R == 0 or D == 0:
        return grad_y_RD.zero_(), grad.new_zeros(T, top_k, dtype=dtype)
    grad_w_TK = grad.new_empty(T, top_k, dtype=dtype)
    pad_rows_P = padding_rows(slot_of_row, N)
    P = pad_rows_P.shape[0]
    _unpermute_backward[row_grid(T, P)](
        grad.contiguous(),
        y.contiguous(),
        weights.contiguous(),
        row_of_slot.contiguous(),
        pad_rows_P if P else row_of_slot,  # a placeholder when there is no padding
        grad_y_RD,
        grad_w_TK,
        T,
        P,
        D,
        top_k,
        PADDED=P > 0,
        D_SHIFT=alignment_shift(D),
        ACC=accumulator(dtype),
        K_POW2=triton.next_power_of_2(top_k),
        **LAUNCH_OPTIONS,
    )
    return grad_y_RD, grad_w_TK


@_unpermute_backward_op.register_fake
def _(
    grad: Tensor,
    y: Tensor,
    weights: Tensor,
    row_of_slot: Tensor,
    slot_of_row: Tensor,
    top_k: int,
) -> tuple[Tensor, Tensor]:
    dtype = _dots_dtype(grad, y)
    return y.new_empty(y.shape), grad.new_empty(grad.shape[0], top_k, dtype=dtype)


def unpermute_backward(
    grad: Tensor,
    y: Tensor,
    row_of_slot: Tensor,
    slot_of_row: Tensor,
    top_k: int,
    weights: Tensor,
) -> tuple[Tensor, Tensor]:
    """Both gradients of a weighted :func:`unpermute` in one pass over the rows.

    Registered as ``torch.ops.moeblocks.unpermute_backward`` with autograd (written with
    :func:`permute`, :func:`unpermute` and :func:`slot_dot`), so double backward works.

    Args:
        grad: ``[T, D]`` gradient of the unpermute output.
        y: ``[R, D]`` the expert outputs unpermute read; padding rows are never read.
        row_of_slot: ``[N]`` grouped row of each slot, from :func:`build_index`.
        slot_of_row: ``[R]`` slot of each grouped row, -1 for padding.
        top_k: K, slots per token.
        weights: ``[T, K]`` the combine weights.

    Returns:
        ``grad_y [R, D]`` in ``y.dtype`` (zero on padding rows) and ``grad_weights [T, K]``
        in float32 (float64 if ``grad`` or ``y`` is float64).

    Example:
        With :func:`permute`'s example layout (grouped ``a1 | a0 b0 b1``)::

            >>> g = torch.tensor([[1.0], [2.0]])
            >>> y = torch.tensor([[10.0], [20.0], [30.0], [40.0]])
            >>> w = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
            >>> grad_y, grad_w = unpermute_backward(g, y, idx.row_of_slot, idx.slot_of_row, 2, w)
            >>> grad_y.flatten().tolist(), grad_w.tolist()
            ([0.5, 0.5, 2.0, 0.0], [[20.0, 10.0], [60.0, 80.0]])
    """
    check_float(grad, "grad", 2)
    check_float(y, "y", 2)
    check_float(weights, "weights", 2)
    check_slot_index(row_of_slot, slot_of_row, grad.shape[0], top_k)
    check_same_device(
        grad,
        "grad",
        (y, "y"),
        (weights, "weights"),
        (row_of_slot, "row_of_slot"),
        (slot_of_row, "slot_of_row"),
    )
    if tuple(y.shape) != (slot_of_row.shape[0], grad.shape[1]):
        raise ValueError(
            f"y must have shape (R, D) = {(slot_of_row.shape[0], grad.shape[1])}, "
            f"got {tuple(y.shape)}"
        )
    if tuple(weights.shape) != (grad.shape[0], top_k):
        raise ValueError(
            f"weights must have shape (T, K) = {(grad.shape[0], top_k)}, got {tuple(weights.shape)}"
        )
    check_launchable(_unpermute_backward, grad, "grad")
    return torch.ops.moeblocks.unpermute_backward(grad, y, weights, row_of_slot, slot_of_row, top_k)
