"""AllToAllDispatcher: route token copies to the rank that holds their expert.

Legend: T tokens, D model dim, K experts per token, E experts (all ranks), P ranks of the
expert-parallel group, L = E / P experts held per rank, N rows this rank sends (its T·K
slots, grouped by expert), M rows it receives (slots of every rank for its L experts).

Rank ``p`` of the group holds experts ``[p·L, (p+1)·L)``. The router still scores all E
experts on every rank. One MoE step, seen from one rank::

    permute    local permute     tokens[T, D]  -> send[N, D]       grouped by global expert
               count exchange    counts[E]     -> recv_counts[P, L] (all-to-all, host sync)
               row exchange      send[N, D]    -> recv[M, D]        by source rank
               regroup           recv[M, D]    -> grouped[M, D]     by local expert
    experts    local bank        grouped[M, D] -> out[M, D]         (E/P experts)
    unpermute  ungroup, row exchange back, local unpermute with the combine weights

Since experts of one rank are contiguous and the local permute is stable, the rows an
expert runs are ordered by source rank, then by token: the order a single process
holding all experts would use on the concatenated batch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from jaxtyping import Float, Int
from torch import Tensor
from torch.distributed import ProcessGroup

from moeblocks.dispatch import Dispatcher, TorchDispatcher, build_layout
from moeblocks.distributed.comm import all_to_all_rows
from moeblocks.routing import Layout, Routing

__all__ = ["AllToAllDispatcher", "ExpertParallelLayout"]


@dataclass(frozen=True)
class ExpertParallelLayout(Layout):
    """The layout of the rows this rank's experts run, plus the way back to their ranks.

    The inherited :class:`~moeblocks.routing.Layout` fields describe the received rows
    grouped by *local* expert (a "slot" here is a received row, in arrival order), so
    ``group_sizes`` has L entries: exactly what the local expert bank is given.

    Attributes:
        send: Layout of this rank's own T·K slots grouped by global expert (E entries);
            its grouped rows are what this rank sends, in destination-rank order.
        send_splits: Rows sent to each rank of the group (sums to N).
        recv_splits: Rows received from each rank of the group (sums to M).
    """

    send: Layout
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]


class AllToAllDispatcher:
    """Expert-parallel dispatcher: exchanges routed rows over a process group.

    ``permute`` returns the rows *received* for this rank's L experts, grouped by local
    expert, with an :class:`ExpertParallelLayout` whose ``group_sizes`` are the local
    experts' row counts, so an unchanged :class:`~moeblocks.MoELayer` runs the local
    expert bank (``E / P`` experts, see :func:`~moeblocks.distributed.shard_experts`)
    between ``permute`` and ``unpermute``. Gradients flow back through both exchanges.

    Every rank of the group must call ``permute`` and ``unpermute`` (and their backward)
    the same number of times, also with zero tokens. Sizing the uneven exchange reads the
    exchanged counts on the host: one device sync per ``permute``.

    Args:
        group: The expert-parallel process group; ``None`` is the default (world) group.
            ``torch.distributed`` must be initialised.
        local: Dispatcher for this rank's own permute and unpermute (grouping its slots
            by global expert and combining the returned rows with the routing weights).
            Default :class:`~moeblocks.TorchDispatcher`. Padding rows it adds travel
            with the real rows, so prefer one without padding.
    """

    def __init__(self, group: ProcessGroup | None = None, local: Dispatcher | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "AllToAllDispatcher needs torch.distributed initialised "
                "(call torch.distributed.init_process_group first)"
            )
        if local is not None and not isinstance(local, Dispatcher):
            raise TypeError(f"local must implement permute/unpermute, got {type(local).__name__}")
        self.group = group
        self.group_size = dist.get_world_size(group)
        self.group_rank = dist.get_rank(group)
        self.local: Dispatcher = TorchDispatcher() if local is None else local

    def __deepcopy__(self, memo: dict[int, object]) -> AllToAllDispatcher:
        """A copy over the same process group (a group is a communicator handle, not state)."""
        return AllToAllDispatcher(self.group, copy.deepcopy(self.local, memo))

    def __repr__(self) -> str:
        return (
            f"AllToAllDispatcher(rank={self.group_rank}, group_size={self.group_size}, "
            f"local={self.local!r})"
        )

    def local_experts(self, num_experts: int) -> int:
        """L, the experts each rank holds when the router chooses among ``num_experts``.

        Raises:
            ValueError: If ``num_experts`` is not divisible by the group size.
        """
        if num_experts % self.group_size:
            raise ValueError(
                f"num_experts ({num_experts}) must be divisible by the expert-parallel "
                f"group size ({self.group_size}) so every rank holds the same number of experts"
            )
        return num_experts // self.group_size

    def exchange_counts(self, send_counts: Int[Tensor, " E"]) -> Int[Tensor, "P L"]:
        """All-to-all of per-expert row counts.

        Args:
            send_counts: Rows this rank sends to each global expert.

        Returns:
            ``recv_counts[p, l]``, the rows rank ``p`` sends to this rank's local expert
            ``l``.
        """
        L = self.local_experts(send_counts.shape[0])
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)
        return recv_counts.view(self.group_size, L)

    def group_by_local_expert(
        self, recv: Float[Tensor, "M D"], recv_counts: Int[Tensor, "P L"]
    ) -> tuple[Float[Tensor, "M D"], Layout]:
        """Regroup received rows (by source rank, then local expert) by local expert.

        Args:
            recv: Received rows, in the order :func:`all_to_all_rows` returns them.
            recv_counts: Rows per source rank and local expert, from :meth:`exchange_counts`.

        Returns:
            The rows grouped by local expert (stable, by source rank, then token order)
            and their layout over L local experts.
        """
        P, L = recv_counts.shape
        local_ids = torch.arange(L, device=recv.device).repeat(P)
        expert_of_row_M = torch.repeat_interleave(
            local_ids, recv_counts.reshape(-1), output_size=recv.shape[0]
        )
        layout = build_layout(expert_of_row_M.unsqueeze(1), L)
        return recv[layout.slot_of_row], layout

    def permute(
        self, tokens: Float[Tensor, "T D"], routing: Routing
    ) -> tuple[Float[Tensor, "M D"], ExpertParallelLayout]:
        """Send every routed copy to the rank of its expert; group what arrives.

        Args:
            tokens: This rank's token vectors.
            routing: The router's decision for them, over all E experts.

        Returns:
            The rows this rank's L experts run, grouped by local expert, and their
            :class:`ExpertParallelLayout`.

        Raises:
            ValueError: If E is not divisible by the group size.
        """
        P = self.group_size
        send_ND, send_layout = self.local.permute(tokens, routing)
        send_counts_E = send_layout.group_sizes
        recv_counts_PL = self.exchange_counts(send_counts_E)
        splits = torch.stack([send_counts_E.view(P, -1).sum(1), recv_counts_PL.sum(1)])
        send_splits, recv_splits = (tuple(s) for s in splits.tolist())  # host sync
        recv_MD = all_to_all_rows(send_ND, recv_splits, send_splits, self.group)
        grouped_MD, recv_layout = self.group_by_local_expert(recv_MD, recv_counts_PL)
        record = {f.name: getattr(recv_layout, f.name) for f in fields(Layout)}
        return grouped_MD, ExpertParallelLayout(
            **record, send=send_layout, send_splits=send_splits, recv_splits=recv_splits
        )

    def unpermute(
        self, grouped: Float[Tensor, "M D"], layout: Layout, weights: Float[Tensor, "T K"]
    ) -> Float[Tensor, "T D"]:
        """Send expert outputs back to their ranks and combine them per token.

        Args:
            grouped: Outputs of the local experts, in the order :meth:`permute` returned.
            layout: The :class:`ExpertParallelLayout` returned by :meth:`permute`.
            weights: This rank's combine weights.

        Returns:
            ``out[t] = Σ_j weights[t, j] · expert_j(tokens[t])`` for this rank's tokens.

        Raises:
            TypeError: If ``layout`` did not come from an expert-parallel ``permute``.
        """
        if not isinstance(layout, ExpertParallelLayout):
            raise TypeError(
                f"layout must be the ExpertParallelLayout from permute, got {type(layout).__name__}"
            )
        recv_MD = grouped[layout.row_of_slot]
        back_ND = all_to_all_rows(recv_MD, layout.send_splits, layout.recv_splits, self.group)
        return self.local.unpermute(back_ND, layout.send, weights)
