"""Plain-PyTorch references for the kernels, written for reading, not for speed.

Legend: T tokens, E experts, K experts per token, N = T·K slots, R grouped rows (N plus
padding), D model dim.

Same signatures and results as the Triton ops in this folder; the tests compare both
the outputs and, through PyTorch autograd on these functions, every gradient. Float
work happens in float32 (float64 for float64 inputs), like the kernels.
"""

import torch
from torch import Tensor

__all__ = [
    "build_index_reference",
    "permute_reference",
    "slot_dot_reference",
    "unpermute_backward_reference",
    "unpermute_reference",
]


def _acc(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def build_index_reference(
    experts: Tensor, num_experts: int, pad_to: int = 1
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Expert by expert: list its slots in slot order, then pad its segment.

    Rows after the last segment up to ``num_rows_bound`` are padding too, counted in the
    last expert's group size, as the kernel lays them out.

    Returns:
        ``(row_of_slot[N], slot_of_row[R], counts[E], group_sizes[E], offsets[E+1],
        rows_used[])``.
    """
    flat_N = experts.reshape(-1).long()
    N = flat_N.numel()
    segments, counts, sizes = [], [], []
    for e in range(num_experts):
        slots = torch.nonzero(flat_N == e).flatten()  # ascending: stable by construction
        size = -(-slots.numel() // pad_to) * pad_to
        padding = torch.full((size - slots.numel(),), -1, dtype=torch.long, device=flat_N.device)
        segments.append(torch.cat([slots, padding]))
        counts.append(slots.numel())
        sizes.append(size)
    rows_used = sum(sizes)
    # The worst case: min(E, N) experts with pad_to - 1 padding rows each, aligned.
    R = N if pad_to == 1 else -(-(N + min(num_experts, N) * (pad_to - 1)) // pad_to) * pad_to
    tail = torch.full((R - rows_used,), -1, dtype=torch.long, device=flat_N.device)
    slot_of_row_R = torch.cat([*segments, tail])
    sizes[-1] += R - rows_used
    row_of_slot_N = torch.empty_like(flat_N)
    filled = slot_of_row_R >= 0
    row_of_slot_N[slot_of_row_R[filled]] = torch.nonzero(filled).flatten()
    like = {"dtype": torch.long, "device": flat_N.device}
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return (
        row_of_slot_N,
        slot_of_row_R,
        torch.tensor(counts, **like),
        torch.tensor(sizes, **like),
        torch.tensor(offsets, **like),
        torch.tensor(rows_used, **like),
    )


def permute_reference(
    x: Tensor, row_of_slot: Tensor, slot_of_row: Tensor, top_k: int, weights: Tensor | None = None
) -> Tensor:
    """``grouped[r] = w[s] · x[s // K]`` for ``s = slot_of_row[r]``; zero where ``s = -1``."""
    filled_R = slot_of_row >= 0
    slot_R = slot_of_row.clamp(min=0)
    rows_RD = x[slot_R // top_k]
    if weights is not None:
        dtype = _acc(x, weights)
        rows_RD = (rows_RD.to(dtype) * weights.reshape(-1)[slot_R].to(dtype)[:, None]).to(x.dtype)
    return torch.where(filled_R[:, None], rows_RD, torch.zeros_like(rows_RD))


def unpermute_reference(
    y: Tensor, row_of_slot: Tensor, slot_of_row: Tensor, top_k: int, weights: Tensor | None = None
) -> Tensor:
    """``out[t] = Σ_j w[t, j] · y[row_of_slot[t·K + j]]``, summed in order j = 0 … K-1."""
    T, D = row_of_slot.shape[0] // top_k, y.shape[1]
    dtype = _acc(y) if weights is None else _acc(y, weights)
    copies_TKD = y[row_of_slot].reshape(T, top_k, D).to(dtype)
    if weights is not None:
        copies_TKD = copies_TKD * weights.to(dtype)[:, :, None]
    out_TD = torch.zeros(T, D, dtype=dtype, device=y.device)
    for j in range(top_k):
        out_TD = out_TD + copies_TKD[:, j]
    return out_TD.to(y.dtype)


def slot_dot_reference(
    a: Tensor, b: Tensor, row_of_slot: Tensor, slot_of_row: Tensor, top_k: int
) -> Tensor:
    """``dots[t, j] = <a[t], b[row_of_slot[t·K + j]]>`` in float32 (float64 if an input is)."""
    T, D = a.shape
    dtype = _acc(a, b)
    rows_TKD = b[row_of_slot].reshape(T, top_k, D).to(dtype)
    return (a.to(dtype)[:, None, :] * rows_TKD).sum(-1)


def unpermute_backward_reference(
    grad: Tensor,
    y: Tensor,
    row_of_slot: Tensor,
    slot_of_row: Tensor,
    top_k: int,
    weights: Tensor,
) -> tuple[Tensor, Tensor]:
    """``(grad_y, grad_w)`` of a weighted unpermute: a weighted permute and a slot dot."""
    dtype = _acc(grad, y, weights)
    w = weights.to(dtype)
    grad_y = permute_reference(grad.to(dtype), row_of_slot, slot_of_row, top_k, w).to(y.dtype)
    return grad_y, slot_dot_reference(grad, y, row_of_slot, slot_of_row, top_k)
