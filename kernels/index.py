"""Index building: where every routed slot goes in the expert-grouped tensor.

Legend: T tokens, E experts, K experts per token, N = T·K slots, R grouped rows (N plus
padding), B blocks of slots, D model dim.

A counting sort instead of a comparison sort, in four launches:

1. ``_block_histogram``: each block of ``BLOCK_N`` slots counts its expert ids.
2. ``_scan_blocks``: per expert, an exclusive prefix sum of those counts over the
   blocks gives where each block's run of that expert starts; the totals are the counts.
3. ``_segments``: group sizes (counts rounded up to ``pad_to``) and their prefix sum,
   the segment offsets.
4. ``_place``: a slot's row is its segment's offset, plus its block's start inside the
   segment, plus the number of earlier slots of the same expert inside its block. That
   rank keeps the order stable, so the result equals a stable argsort.

Everything is integer arithmetic, so the result is exact and deterministic.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._checks import check_index, check_launchable, check_positive_int

__all__ = ["SlotIndex", "build_index"]

# Slots per block. The in-block rank compares every pair of slots of a block, so the
# block stays small; the scan then runs over N / BLOCK_N blocks.
_BLOCK_N = 128
# Tile of the block scan: blocks per step x experts per program.
_SCAN_BLOCKS = 64
_SCAN_EXPERTS = 64
_SEGMENT_EXPERTS = 256


class SlotIndex(NamedTuple):
    """The grouped order of all slots; the same fields as ``moeblocks.Layout``.

    Attributes:
        row_of_slot: ``[N]`` int64, grouped row of slot ``n = t·K + j``.
        slot_of_row: ``[R]`` int64, slot held by each grouped row, -1 for padding.
        counts: ``[E]`` int64, routed slots per expert.
        group_sizes: ``[E]`` int64, counts rounded up to a multiple of ``pad_to``.
        offsets: ``[E+1]`` int64, start row of each segment, then R.
    """

    row_of_slot: Tensor
    slot_of_row: Tensor
    counts: Tensor
    group_sizes: Tensor
    offsets: Tensor


@triton.jit
def _block_histogram(
    experts_ptr, block_counts_ptr, N, E, BLOCK_N: tl.constexpr, BINS: tl.constexpr
):
    block = tl.program_id(0)
    slots = block * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = slots < N
    expert = tl.load(experts_ptr + slots, mask=valid, other=0).to(tl.int32)
    # tl.histogram wants a power-of-two bin count; bins past E stay empty.
    hist = tl.histogram(expert, BINS, mask=valid)
    bins = tl.arange(0, BINS)
    tl.store(block_counts_ptr + block.to(tl.int64) * E + bins, hist, mask=bins < E)


@triton.jit
def _scan_blocks(
    block_counts_ptr,
    block_start_ptr,
    counts_ptr,
    num_blocks,
    E,
    BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    experts = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    expert_ok = experts < E
    carry = tl.zeros([BLOCK_E], dtype=tl.int32)
    for first in range(0, num_blocks, BLOCK_B):
        blocks = first + tl.arange(0, BLOCK_B)
        mask = (blocks < num_blocks)[:, None] & expert_ok[None, :]
        where = blocks.to(tl.int64)[:, None] * E + experts[None, :]
        tile = tl.load(block_counts_ptr + where, mask=mask, other=0)
        # Exclusive prefix over blocks = inclusive prefix minus the block itself.
        start = tl.cumsum(tile, axis=0) - tile + carry[None, :]
        tl.store(block_start_ptr + where, start, mask=mask)
        carry += tl.sum(tile, axis=0)
    tl.store(counts_ptr + experts, carry.to(tl.int64), mask=expert_ok)


@triton.jit
def _segments(counts_ptr, group_sizes_ptr, offsets_ptr, E, pad_to, BLOCK_E: tl.constexpr):
    # One program: E is at most a few thousand, and the scan over experts is sequential.
    tl.store(offsets_ptr, tl.zeros([], dtype=tl.int64))
    carry = tl.zeros([], dtype=tl.int64)
    for first in range(0, E, BLOCK_E):
        experts = first + tl.arange(0, BLOCK_E)
        ok = experts < E
        counts = tl.load(counts_ptr + experts, mask=ok, other=0)
        sizes = (counts + pad_to - 1) // pad_to * pad_to
        tl.store(group_sizes_ptr + experts, sizes, mask=ok)
        tl.store(offsets_ptr + 1 + experts, tl.cumsum(sizes, axis=0) + carry, mask=ok)
        carry += tl.sum(sizes, axis=0)


@triton.jit
def _place(
    experts_ptr,
    block_start_ptr,
    offsets_ptr,
    row_of_slot_ptr,
    slot_of_row_ptr,
    N,
    E,
    BLOCK_N: tl.constexpr,
):
    block = tl.program_id(0)
    lane = tl.arange(0, BLOCK_N)
    slots = block.to(tl.int64) * BLOCK_N + lane
    valid = slots < N
    expert = tl.load(experts_ptr + slots, mask=valid, other=0).to(tl.int32)
    # Stable rank: earlier slots of this block routed to the same expert. Invalid lanes
    # sit at the end of the last block, after every valid lane, so they never count.
    earlier_same = (expert[:, None] == expert[None, :]) & (lane[None, :] < lane[:, None])
    rank = tl.sum(earlier_same.to(tl.int32), axis=1)
    start = tl.load(block_start_ptr + block.to(tl.int64) * E + expert, mask=valid, other=0)
    offset = tl.load(offsets_ptr + expert, mask=valid, other=0)
    row = offset + start + rank
    tl.store(row_of_slot_ptr + slots, row, mask=valid)
    tl.store(slot_of_row_ptr + row, slots, mask=valid)


def _launch(experts_TK: Tensor, num_experts: int, pad_to: int) -> SlotIndex:
    experts_N = experts_TK.reshape(-1).contiguous()
    N, E = experts_N.numel(), num_experts
    device = experts_N.device
    counts_E = torch.zeros(E, dtype=torch.long, device=device)
    group_sizes_E = torch.zeros(E, dtype=torch.long, device=device)
    offsets_E1 = torch.zeros(E + 1, dtype=torch.long, device=device)
    row_of_slot_N = torch.empty(N, dtype=torch.long, device=device)
    if N == 0:
        return SlotIndex(row_of_slot_N, row_of_slot_N.clone(), counts_E, group_sizes_E, offsets_E1)

    num_blocks = triton.cdiv(N, _BLOCK_N)
    block_counts_BE = torch.empty(num_blocks, E, dtype=torch.int32, device=device)
    block_start_BE = torch.empty_like(block_counts_BE)
    bins = max(triton.next_power_of_2(E), 16)  # a power of two, and not a degenerate 1
    _block_histogram[(num_blocks,)](experts_N, block_counts_BE, N, E, BLOCK_N=_BLOCK_N, BINS=bins)
    _scan_blocks[(triton.cdiv(E, _SCAN_EXPERTS),)](
        block_counts_BE,
        block_start_BE,
        counts_E,
        num_blocks,
        E,
        BLOCK_B=_SCAN_BLOCKS,
        BLOCK_E=_SCAN_EXPERTS,
    )
    _segments[(1,)](counts_E, group_sizes_E, offsets_E1, E, pad_to, BLOCK_E=_SEGMENT_EXPERTS)
    if pad_to == 1:
        num_rows = N  # no padding: every row holds a slot, nothing to read back
        slot_of_row_R = torch.empty(N, dtype=torch.long, device=device)
    else:
        num_rows = int(offsets_E1[-1])  # host sync: the padded row count is data-dependent
        slot_of_row_R = torch.full((num_rows,), -1, dtype=torch.long, device=device)
    _place[(num_blocks,)](
        experts_N,
        block_start_BE,
        offsets_E1,
        row_of_slot_N,
        slot_of_row_R,
        N,
        E,
        BLOCK_N=_BLOCK_N,
    )
    return SlotIndex(row_of_slot_N, slot_of_row_R, counts_E, group_sizes_E, offsets_E1)


@torch.library.custom_op("moeblocks::build_index", mutates_args=())
def _build_index_op(
    experts: Tensor, num_experts: int, pad_to: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(_launch(experts, num_experts, pad_to))


@_build_index_op.register_fake
def _(
    experts: Tensor, num_experts: int, pad_to: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    N = experts.numel()
    if pad_to == 1:
        num_rows = N
    else:
        # The padded row count depends on the counts, so the fake gives an unbacked size.
        # Its bounds may be symbolic (N is, under dynamic shapes), which new_dynamic_size
        # does not take, so they are stated as checks: at least one row per slot, at most
        # pad_to - 1 padding rows per expert.
        num_rows = torch.library.get_ctx().new_dynamic_size()
        torch._check(num_rows >= N)
        torch._check(num_rows <= N + num_experts * (pad_to - 1))
    like = {"dtype": torch.long, "device": experts.device}
    return (
        experts.new_empty(N, **like),
        experts.new_empty(num_rows, **like),
        experts.new_empty(num_experts, **like),
        experts.new_empty(num_experts, **like),
        experts.new_empty(num_experts + 1, **like),
    )


def build_index(experts: Tensor, num_experts: int, pad_to: int = 1) -> SlotIndex:
    """Group the slots by expert (stable) with a histogram and prefix sums.

    The result equals a stable argsort of ``experts.reshape(-1)`` exactly. With
    ``pad_to > 1`` every expert segment is rounded up to a multiple of ``pad_to`` rows,
    whose ``slot_of_row`` is -1. Costs: with ``pad_to == 1`` the output sizes are known
    and nothing is read back; ``pad_to > 1`` reads the padded row count back to the host
    (one device sync). In eager mode the expert ids are range-checked, which also reads
    one scalar back; that check is skipped while ``torch.compile`` traces.

    Registered as ``torch.ops.moeblocks.build_index``; its fake gives ``slot_of_row`` an
    unbacked size in ``[N, N + E·(pad_to - 1)]`` when ``pad_to > 1``.

    Args:
        experts: ``[T, K]`` integer expert ids in ``[0, num_experts)``.
        num_experts: E, the number of experts.
        pad_to: Segment alignment in rows, >= 1.

    Returns:
        A :class:`SlotIndex` of int64 tensors.

    Example:
        Three tokens, top-1, two experts, segments padded to 2 rows::

            >>> idx = build_index(torch.tensor([[1], [0], [1]]), num_experts=2, pad_to=2)
            >>> idx.slot_of_row.tolist(), idx.row_of_slot.tolist()
            ([1, -1, 0, 2], [2, 0, 3])
            >>> idx.counts.tolist(), idx.group_sizes.tolist(), idx.offsets.tolist()
            ([1, 2], [2, 2], [0, 2, 4])
    """
    check_index(experts, "experts", 2)
    check_positive_int(num_experts, "num_experts")
    check_positive_int(pad_to, "pad_to")
    check_launchable(_place, experts, "experts")
    if experts.numel() and not torch.compiler.is_compiling():
        low, high = experts.min(), experts.max()
        if bool((low < 0) | (high >= num_experts)):  # host sync, eager only
            raise ValueError(
                f"experts must hold ids in [0, {num_experts}) (num_experts={num_experts}), "
                f"got values in [{int(low)}, {int(high)}]"
            )
    return SlotIndex(*torch.ops.moeblocks.build_index(experts, num_experts, pad_to))
