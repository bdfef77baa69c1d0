"""Index building: where every routed slot goes in the expert-grouped tensor.

Legend: T tokens, E experts, K experts per token, N = T·K slots, R grouped rows (N plus
padding), B blocks of slots, D model dim.

A counting sort instead of a comparison sort, in three launches and no host sync:

1. ``_count``: each block of ``BLOCK_N`` slots counts its expert ids (a histogram over
   E + 1 bins: bin E collects ids outside ``[0, E)``). With padding, the same programs
   also write -1 over ``slot_of_row`` (``_place`` overwrites the rows that hold slots).
2. ``_scan``: per bin, an exclusive prefix sum of the block counts over the blocks (a
   ``tl.cumsum`` over a tile of up to 128 blocks at a time, bins spread over programs)
   gives where each block's run of that expert starts; the totals are the counts.
3. ``_place``: each program turns the totals into segment offsets (counts rounded up to
   ``pad_to``, prefix-summed over the bins), adds them to its block's starts, and gives
   every slot the row offset + start + the number of earlier slots of the same expert
   inside its block. That rank keeps the order stable, so the result equals a stable
   argsort. Program 0 also writes counts, group sizes and offsets.

The row count is fixed in advance at its worst case, ``R = N + min(E, N)·(pad_to − 1)``
rounded up to ``pad_to``, so nothing is read back to size an output; the rows the
segments do not use are padding at the end of the last expert's segment, and the real
row count comes back as a 0-d device tensor (:attr:`SlotIndex.rows_used`). Ids outside
``[0, E)`` are placed after the last real segment, never out of bounds (and a
``tl.device_assert`` reports them when Triton runs with ``TRITON_DEBUG=1``).

Everything is integer arithmetic, so the result is exact and deterministic.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._checks import check_index, check_launchable, check_positive_int
from ._tiles import interpreted

__all__ = ["SlotIndex", "build_index", "num_rows_bound"]

# Slots per block. The in-block rank compares every pair of slots of a block, so the
# block stays small; the scan then runs over N / BLOCK_N blocks.
_BLOCK_N = 128
# Bins per scan program; blocks per scan step (fewer under the interpreter, so that
# the CPU tests cross several steps at small N).
_SCAN_BINS = 16
# Bins per piece of the offsets prefix sum in _place.
_OFFSET_BINS = 1024


class SlotIndex(NamedTuple):
    """The grouped order of all slots: the fields of ``moeblocks.Layout``, plus the rows used.

    Attributes:
        row_of_slot: ``[N]`` int64, grouped row of slot ``n = t·K + j``.
        slot_of_row: ``[R]`` int64, slot held by each grouped row, -1 for padding. R is
            :func:`num_rows_bound`, fixed by N, E and ``pad_to``.
        counts: ``[E]`` int64, routed slots per expert.
        group_sizes: ``[E]`` int64, counts rounded up to a multiple of ``pad_to``; the
            last expert's also takes the unused rows at the end, so the sizes sum to R.
        offsets: ``[E+1]`` int64, start row of each segment, then R.
        rows_used: ``[]`` int64 (a device tensor, never read back), the rows before the
            unused tail: what a data-dependent R would be (``R`` when ``pad_to == 1``).
    """

    row_of_slot: Tensor
    slot_of_row: Tensor
    counts: Tensor
    group_sizes: Tensor
    offsets: Tensor
    rows_used: Tensor


@triton.jit
def _count(
    experts_ptr,
    block_counts_ptr,
    slot_of_row_ptr,
    N,
    E,
    R,
    rows_per_block,
    BLOCK_N: tl.constexpr,
    BINS: tl.constexpr,
    FILL: tl.constexpr,
):
    block = tl.program_id(0)
    lane = tl.arange(0, BLOCK_N)
    slots = block.to(tl.int64) * BLOCK_N + lane
    valid = slots < N
    # Compare in int64, before narrowing: an int64 id of 2^32 must not wrap into range.
    expert = tl.load(experts_ptr + slots, mask=valid, other=0).to(tl.int64)
    in_range = (expert >= 0) & (expert < E)
    tl.device_assert(in_range | ~valid, "expert id outside [0, num_experts)")
    # Bin E: out-of-range ids; bin BINS - 1 (> E): lanes past N, never stored. So the
    # histogram needs no mask argument.
    bins = tl.where(valid, tl.where(in_range, expert, E), BINS - 1).to(tl.int32)
    hist = tl.histogram(bins, BINS)
    cols = tl.arange(0, BINS)
    tl.store(block_counts_ptr + block.to(tl.int64) * (E + 1) + cols, hist, mask=cols <= E)
    if FILL:
        # Padding rows keep -1; _place, launched after, overwrites the rows with slots.
        first_row = block.to(tl.int64) * rows_per_block
        for start in range(0, rows_per_block, BLOCK_N):
            rows = first_row + start + lane
            ok = (rows < R) & (start + lane < rows_per_block)
            tl.store(slot_of_row_ptr + rows, tl.full([BLOCK_N], -1, tl.int64), mask=ok)


@triton.jit
def _scan(
    block_counts_ptr,
    block_start_ptr,
    totals_ptr,
    num_blocks,
    E,
    BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    bins = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    bin_ok = bins <= E
    carry = tl.zeros([BLOCK_E], dtype=tl.int64)
    for first in range(0, num_blocks, BLOCK_B):
        blocks = first + tl.arange(0, BLOCK_B)
        mask = (blocks < num_blocks)[:, None] & bin_ok[None, :]
        where = blocks.to(tl.int64)[:, None] * (E + 1) + bins[None, :]
        tile = tl.load(block_counts_ptr + where, mask=mask, other=0)
        # Exclusive prefix over blocks = inclusive prefix minus the block itself. In
        # int32 inside the tile (exact: at most BLOCK_B · BLOCK_N slots), int64 across
        # tiles; an int64 tile needs twice the registers and spilled on sm_90.
        start = (tl.cumsum(tile, axis=0) - tile).to(tl.int64) + carry[None, :]
        tl.store(block_start_ptr + where, start, mask=mask)
        carry += tl.sum(tile, axis=0).to(tl.int64)
    tl.store(totals_ptr + bins, carry, mask=bin_ok)


@triton.jit
def _place(
    experts_ptr,
    block_start_ptr,
    totals_ptr,
    row_of_slot_ptr,
    slot_of_row_ptr,
    counts_ptr,
    group_sizes_ptr,
    offsets_ptr,
    rows_used_ptr,
    N,
    E,
    R,
    pad_to,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    block = tl.program_id(0)
    row_base = block_start_ptr + block.to(tl.int64) * (E + 1)
    # 1. Segment offsets from the totals (every program computes them: E is small, and
    #    it saves a launch), added to this block's starts in place. Row `block` of
    #    block_start belongs to this program alone.
    carry = tl.zeros([], dtype=tl.int64)
    for first in range(0, E + 1, BLOCK_E):
        bins = first + tl.arange(0, BLOCK_E)
        ok = bins <= E
        total = tl.load(totals_ptr + bins, mask=ok, other=0)
        # Expert segments round up to pad_to; the out-of-range bin E is not padded.
        size = tl.where(bins < E, (total + pad_to - 1) // pad_to * pad_to, total)
        offset = tl.cumsum(size, axis=0) - size + carry
        start = tl.load(row_base + bins, mask=ok, other=0)
        tl.store(row_base + bins, start + offset, mask=ok)
        if block == 0:
            used = carry + tl.sum(tl.where(bins < E, size, 0), axis=0)
            last = bins == E - 1
            tl.store(counts_ptr + bins, total, mask=bins < E)
            tl.store(offsets_ptr + bins, offset, mask=bins < E)
            # The unused tail rows belong to the last segment, so sizes sum to R.
            tl.store(group_sizes_ptr + bins, tl.where(last, R - offset, size), mask=bins < E)
            tl.store(rows_used_ptr + bins * 0, used, mask=bins == E)
        carry += tl.sum(size, axis=0)
    if block == 0:
        # (R + a zero, not R.to(): Triton passes an int argument equal to 1 as a constant.)
        tl.store(offsets_ptr + E, R + tl.zeros([], dtype=tl.int64))
    tl.debug_barrier()  # the stores above before the loads below, across the program

    # 2. Each slot's row: its bin's start in this block plus its rank among the earlier
    #    slots of the same bin. Lanes past N sit after every valid lane: never counted.
    lane = tl.arange(0, BLOCK_N)
    slots = block.to(tl.int64) * BLOCK_N + lane
    valid = slots < N
    expert = tl.load(experts_ptr + slots, mask=valid, other=0).to(tl.int64)
    # int32 bins and ranks (exact: E + 1 bins, ranks < BLOCK_N): the BLOCK_N² pair tile
    # in int64 took every register and spilled.
    bins = tl.where((expert >= 0) & (expert < E), expert, E).to(tl.int32)
    earlier_same = (bins[:, None] == bins[None, :]) & (lane[None, :] < lane[:, None])
    rank = tl.sum(earlier_same.to(tl.int32), axis=1)
    start = tl.load(row_base + bins, mask=valid, other=0, volatile=True)
    row = start + rank.to(tl.int64)
    tl.store(row_of_slot_ptr + slots, row, mask=valid)
    tl.store(slot_of_row_ptr + row, slots, mask=valid)


def _scan_block(interpreted: bool) -> int:
    """Blocks per scan step: fewer under the interpreter, so the CPU tests cross steps."""
    return 16 if interpreted else 128


def _offset_bins(num_experts: int) -> int:
    """Bins per piece of the offsets prefix sum in ``_place``."""
    return min(triton.next_power_of_2(num_experts + 1), _OFFSET_BINS)


def num_rows_bound(num_slots: int, num_experts: int, pad_to: int) -> int:
    """R, the rows :func:`build_index` allocates: the most the segments can need.

    At most ``min(E, N)`` experts receive slots, each with fewer than ``pad_to`` rows of
    padding, so ``N + min(E, N)·(pad_to − 1)`` rows always suffice; rounded up to a
    multiple of ``pad_to`` so that the last segment stays aligned too. Equal to N when
    ``pad_to == 1``. Works on symbolic sizes (used by the op's fake implementation).
    """
    if pad_to == 1:
        return num_slots
    worst = num_slots + torch.sym_min(num_experts, num_slots) * (pad_to - 1)
    return (worst + pad_to - 1) // pad_to * pad_to


def _launch(experts_TK: Tensor, num_experts: int, pad_to: int) -> SlotIndex:
    experts_N = experts_TK.reshape(-1).contiguous()
    N, E = experts_N.numel(), num_experts
    R = num_rows_bound(N, E, pad_to)
    like = {"dtype": torch.long, "device": experts_N.device}
    row_of_slot_N = torch.empty(N, **like)
    slot_of_row_R = torch.empty(R, **like)
    counts_E = torch.empty(E, **like)
    group_sizes_E = torch.empty(E, **like)
    offsets_E1 = torch.empty(E + 1, **like)
    rows_used = torch.empty((), **like)
    if N == 0:  # nothing to launch; N is a static size, so this is no sync
        for t in (counts_E, group_sizes_E, offsets_E1, rows_used):
            t.zero_()
        return SlotIndex(
            row_of_slot_N, slot_of_row_R, counts_E, group_sizes_E, offsets_E1, rows_used
        )

    num_blocks = triton.cdiv(N, _BLOCK_N)
    # Scratch whose every element is written before it is read: empty, not zeros.
    block_counts_BE1 = torch.empty(num_blocks, E + 1, dtype=torch.int32, device=experts_N.device)
    block_start_BE1 = torch.empty(num_blocks, E + 1, **like)
    totals_E1 = torch.empty(E + 1, **like)
    # Bins E (out of range) and E + 1 (lanes past N) exist; a power of two for histogram.
    bins = triton.next_power_of_2(E + 2)
    _count[(num_blocks,)](
        experts_N,
        block_counts_BE1,
        slot_of_row_R,
        N,
        E,
        R,
        triton.cdiv(R, num_blocks),
        BLOCK_N=_BLOCK_N,
        BINS=bins,
        FILL=R > N,
    )
    _scan[(triton.cdiv(E + 1, _SCAN_BINS),)](
        block_counts_BE1,
        block_start_BE1,
        totals_E1,
        num_blocks,
        E,
        BLOCK_B=_scan_block(interpreted(_scan)),
        BLOCK_E=_SCAN_BINS,
    )
    _place[(num_blocks,)](
        experts_N,
        block_start_BE1,
        totals_E1,
        row_of_slot_N,
        slot_of_row_R,
        counts_E,
        group_sizes_E,
        offsets_E1,
        rows_used,
        N,
        E,
        R,
        pad_to,
        BLOCK_N=_BLOCK_N,
        BLOCK_E=_offset_bins(E),
    )
    return SlotIndex(row_of_slot_N, slot_of_row_R, counts_E, group_sizes_E, offsets_E1, rows_used)


@torch.library.custom_op("moeblocks::build_index", mutates_args=())
def _build_index_op(
    experts: Tensor, num_experts: int, pad_to: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(_launch(experts, num_experts, pad_to))


@_build_index_op.register_fake
def _(
    experts: Tensor, num_experts: int, pad_to: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    N = experts.numel()
    like = {"dtype": torch.long, "device": experts.device}
    # Every size is known from N, E and pad_to: no data-dependent (unbacked) sizes.
    return (
        experts.new_empty(N, **like),
        experts.new_empty(num_rows_bound(N, num_experts, pad_to), **like),
        experts.new_empty(num_experts, **like),
        experts.new_empty(num_experts, **like),
        experts.new_empty(num_experts + 1, **like),
        experts.new_empty((), **like),
    )


def build_index(
    experts: Tensor, num_experts: int, pad_to: int = 1, *, sync_checks: bool = False
) -> SlotIndex:
    """Group the slots by expert (stable) with a histogram and prefix sums, without a sync.

    The result equals a stable argsort of ``experts.reshape(-1)`` exactly. With
    ``pad_to > 1`` every expert segment is rounded up to a multiple of ``pad_to`` rows,
    whose ``slot_of_row`` is -1, and the grouped rows number the worst case
    :func:`num_rows_bound` (the unused ones pad the last segment), so no size is read
    back to the host: the real row count is the device tensor ``rows_used``.

    Ids are range-checked (``ValueError``) for CPU tensors, where it costs no device
    sync, and for CUDA tensors only with ``sync_checks=True`` (one sync); not while
    ``torch.compile`` traces. Unchecked ids outside ``[0, num_experts)`` are never read
    or written out of bounds: their slots land after the last real segment (their
    results are meaningless), and ``TRITON_DEBUG=1`` turns them into a device assert.

    Registered as ``torch.ops.moeblocks.build_index``, whose fake gives every output a
    size known from N, E and ``pad_to``, so it compiles without graph breaks.

    Args:
        experts: ``[T, K]`` integer expert ids in ``[0, num_experts)``.
        num_experts: E, the number of experts.
        pad_to: Segment alignment in rows, >= 1.
        sync_checks: Also range-check the ids of CUDA tensors (one device sync).

    Returns:
        A :class:`SlotIndex` of int64 tensors.

    Example:
        Three tokens, top-1, two experts, segments padded to 2 rows; at most
        3 + 2·1 = 5 rows are needed, rounded up to 6::

            >>> idx = build_index(torch.tensor([[1], [0], [1]]), num_experts=2, pad_to=2)
            >>> idx.slot_of_row.tolist(), idx.row_of_slot.tolist()
            ([1, -1, 0, 2, -1, -1], [2, 0, 3])
            >>> idx.counts.tolist(), idx.group_sizes.tolist(), idx.offsets.tolist()
            ([1, 2], [2, 4], [0, 2, 6])
            >>> int(idx.rows_used)
            4
    """
    check_index(experts, "experts", 2)
    check_positive_int(num_experts, "num_experts")
    check_positive_int(pad_to, "pad_to")
    check_launchable(_place, experts, "experts")
    checked = experts.device.type == "cpu" or sync_checks
    if checked and experts.numel() and not torch.compiler.is_compiling():
        low, high = experts.min(), experts.max()
        if bool((low < 0) | (high >= num_experts)):  # a device sync on CUDA (opt-in)
            raise ValueError(
                f"experts must hold ids in [0, {num_experts}) (num_experts={num_experts}), "
                f"got values in [{int(low)}, {int(high)}]"
            )
    return SlotIndex(*torch.ops.moeblocks.build_index(experts, num_experts, pad_to))
