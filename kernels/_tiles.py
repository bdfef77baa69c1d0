"""Tile shapes and accumulator types shared by the row-moving kernels.

Legend: D model dim.
"""

import torch
import triton
import triton.language as tl

# Elements per program: enough rows in flight to keep memory busy on a GPU (with
# NUM_WARPS warps, 32 elements a thread), few enough programs that the CPU interpreter
# (one Python loop per program) stays quick. Untuned: no GPU was at hand.
_TILE_ELEMENTS = 8192
NUM_WARPS = 8
_MAX_BLOCK_D = 1024


def tile_sizes(D: int) -> tuple[int, int]:
    """(rows, columns) of one program's tile for rows of width ``D``.

    Columns are a power of two no wider than needed; a wider D is walked in pieces.
    """
    block_d = min(triton.next_power_of_2(max(D, 1)), _MAX_BLOCK_D)
    block_rows = max(1, _TILE_ELEMENTS // block_d)
    return block_rows, block_d


def accumulator(dtype: torch.dtype) -> tl.dtype:
    """float32 for the half types and float32, float64 for float64 (for gradcheck)."""
    return tl.float64 if dtype == torch.float64 else tl.float32
