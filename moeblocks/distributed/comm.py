"""Differentiable collectives: the two exchanges expert parallelism needs.

Legend: N rows this rank sends, M rows it receives, D row width, C reduced elements.

``torch.distributed.nn.functional`` has both ops with autograd, but they are deprecated
(each call warns) in favour of ``torch.distributed._functional_collectives``, a private
module; two small autograd functions here keep the backward explicit and use public API
only. Every rank of the group must call each op, forward and backward, in the same order
(a rank with no rows still calls it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor
from torch.distributed import ProcessGroup

__all__ = ["all_reduce_sum", "all_to_all_rows"]


def _exchange(
    rows: Tensor, recv_splits: Sequence[int], send_splits: Sequence[int], group: ProcessGroup | None
) -> Tensor:
    out = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
    dist.all_to_all_single(
        out, rows.contiguous(), list(recv_splits), list(send_splits), group=group
    )
    return out


class _AllToAllRows(torch.autograd.Function):
    """Uneven all-to-all whose backward is the reverse all-to-all of the gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        rows: Tensor,
        recv_splits: tuple[int, ...],
        send_splits: tuple[int, ...],
        group: ProcessGroup | None,
    ) -> Tensor:
        ctx.splits = (recv_splits, send_splits)  # type: ignore[attr-defined]
        ctx.group = group  # type: ignore[attr-defined]
        return _exchange(rows, recv_splits, send_splits, group)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor, None, None, None]:
        recv_splits, send_splits = ctx.splits  # type: ignore[attr-defined]
        # The rows came in by recv_splits; their gradients go back by the same splits.
        return _exchange(grad, send_splits, recv_splits, ctx.group), None, None, None  # type: ignore[attr-defined]


class _AllReduceSum(torch.autograd.Function):
    """``y = Σ_ranks x`` on every rank.

    Every rank's ``y`` depends on every rank's ``x``, so the backward sums the incoming
    gradients over the group too.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, group: ProcessGroup | None
    ) -> Tensor:
        ctx.group = group  # type: ignore[attr-defined]
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor, None]:
        out = grad.clone()
        dist.all_reduce(out, group=ctx.group)  # type: ignore[attr-defined]
        return out, None


def _check_splits(name: str, splits: Sequence[int], group: ProcessGroup | None) -> tuple[int, ...]:
    size = dist.get_world_size(group)
    out = tuple(int(s) for s in splits)
    if len(out) != size or any(s < 0 for s in out):
        raise ValueError(f"{name} must hold {size} non-negative ints (one per rank), got {out}")
    return out


def all_to_all_rows(
    rows: Float[Tensor, "N D"],
    recv_splits: Sequence[int],
    send_splits: Sequence[int],
    group: ProcessGroup | None = None,
) -> Float[Tensor, "M D"]:
    """Send ``send_splits[p]`` consecutive rows to rank ``p``; receive ``recv_splits[p]`` from it.

    Received rows are concatenated in rank order. The backward sends each row's gradient
    back to the rank it came from, so gradients flow across the exchange.

    Args:
        rows: Rows to send, ordered by destination rank.
        recv_splits: Rows to receive from each rank of ``group`` (sums to M).
        send_splits: Rows to send to each rank of ``group`` (sums to N).
        group: The process group; ``None`` is the default (world) group.

    Returns:
        The received rows.

    Raises:
        ValueError: If the splits do not have one entry per rank or ``send_splits`` does
            not sum to the number of rows.
    """
    recv = _check_splits("recv_splits", recv_splits, group)
    send = _check_splits("send_splits", send_splits, group)
    if sum(send) != rows.shape[0]:
        raise ValueError(f"send_splits must sum to rows.shape[0]={rows.shape[0]}, got {send}")
    return _AllToAllRows.apply(rows, recv, send, group)


def all_reduce_sum(
    x: Float[Tensor, "*C"], group: ProcessGroup | None = None
) -> Float[Tensor, "*C"]:
    """Differentiable sum of ``x`` over the ranks of ``group``, returned on every rank.

    The backward all-reduces the gradient: if every rank adds a loss computed from the
    result, each rank's ``x`` receives the sum of those losses' gradients.

    Args:
        x: A float tensor of the same shape on every rank.
        group: The process group; ``None`` is the default (world) group.

    Returns:
        ``Σ_ranks x``.
    """
    return _AllReduceSum.apply(x, group)
