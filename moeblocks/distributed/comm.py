"""Differentiable collectives: the two exchanges expert parallelism needs.

Legend: N rows this rank sends, M rows it receives, D row width, C reduced elements.

``torch.distributed.nn.functional`` has both ops with autograd, but they are deprecated
(each call warns) in favour of ``torch.distributed._functional_collectives``, a private
module; two small autograd functions here keep the backward explicit and use public API
only. Every rank of the group must call each op, forward and backward, in the same order
(a rank with no rows still calls it).

A collective whose peer never comes waits for the process group's timeout
(:func:`collective_timeout`, set by :data:`TIMEOUT_ENV`), then fails; gloo's error
says only that a receive timed out. Ranks that :func:`mark` where they are in the
rendezvous store let :func:`timeout_error` name the rank that was waited for.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor
from torch.distributed import ProcessGroup

__all__ = [
    "TIMEOUT_ENV",
    "CollectiveTimeoutError",
    "all_reduce_sum",
    "all_to_all_rows",
    "collective_timeout",
    "mark",
    "timeout_error",
]

TIMEOUT_ENV = "MOEBLOCKS_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0  # a step of the paper preset takes seconds; a save, a minute
_MARK_KEY = "moeblocks/mark/"


class CollectiveTimeoutError(RuntimeError):
    """A collective waited longer than :func:`collective_timeout`; names the ranks waited for."""


def collective_timeout() -> datetime.timedelta:
    """How long a collective waits for its peers: :data:`TIMEOUT_ENV` seconds (default 600).

    Give it to ``init_process_group(timeout=...)``. Raises ValueError for a value that is
    not a positive number of seconds.
    """
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {text!r}")
    return datetime.timedelta(seconds=seconds)


def _store() -> dist.Store | None:
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def mark(where: str, count: int) -> None:
    """Record in the rendezvous store that this rank reached ``where``, its ``count``-th mark.

    One small store write (no collective); a no-op without a process group. ``count``
    must grow along the run (e.g. the step), so the ranks behind have the lower counts.
    """
    store = _store()
    if store is not None:
        store.set(f"{_MARK_KEY}{dist.get_rank()}", f"{count}|{where}")


def _marks(store: dist.Store, world: int) -> dict[int, tuple[int, str]]:
    """Every rank's last mark (``(-1, "no mark")`` for a rank that made none)."""
    keys = [f"{_MARK_KEY}{r}" for r in range(world)]
    present = [store.check([k]) for k in keys]
    values = store.multi_get([k for k, ok in zip(keys, present, strict=True) if ok])
    found = iter(values)
    out = {}
    for r, ok in enumerate(present):
        count, _, where = next(found).decode().partition("|") if ok else ("-1", "", "no mark")
        out[r] = (int(count), where)
    return out


def timeout_error(err: BaseException) -> CollectiveTimeoutError | None:
    """For a collective's timeout error, one that names the ranks waited for; else None.

    The ranks waited for are those whose last :func:`mark` is behind the newest one
    (all other ranks when none is behind). Reads the rendezvous store, which outlives a
    dead or stuck peer.
    """
    text = str(err)
    if not isinstance(err, RuntimeError) or "timed out" not in text.lower():
        return None
    store, rank = _store(), dist.get_rank() if dist.is_initialized() else 0
    limit = f"{collective_timeout().total_seconds():g} s ({TIMEOUT_ENV})"
    try:
        assert store is not None
        marks = _marks(store, dist.get_world_size())
    except Exception as store_err:  # the store is gone too: say what is known
        return CollectiveTimeoutError(
            f"rank {rank}: a collective waited longer than {limit} for another rank "
            f"(their progress is unknown: {store_err}); {text.splitlines()[0]}"
        )
    newest = max(count for count, _ in marks.values())
    behind = [r for r, (count, _) in marks.items() if count < newest and r != rank]
    waited = behind or [r for r in marks if r != rank]
    seen = "; ".join(f"rank {r} last at {marks[r][1]!r}" for r in waited)
    return CollectiveTimeoutError(
        f"rank {rank}: a collective waited longer than {limit} for rank "
        f"{', '.join(map(str, waited))} ({seen}; this rank at {marks[rank][1]!r})"
    )


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
