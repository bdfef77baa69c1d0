"""Tile choices shared by the row-moving kernels: tuned on a GPU, fixed under the interpreter.

Legend: D model dim, K experts per token.

Two ways to pick a tile, both called the same way (``kernel[grid](...)`` with the tile
sizes left out and ``grid`` a function of them):

* :func:`autotuned`: on a GPU, :func:`triton.autotune` keyed on D over a short list of
  tiles; under ``TRITON_INTERPRET=1`` a fixed tile, so the CPU tests never time
  anything. ``MOEBLOCKS_AUTOTUNE=0`` (read when the kernels are first imported) gives
  the fixed GPU tile instead, e.g. for test runs over many widths, where tuning every
  new D would cost more than the tests. Only for kernels whose every output element is
  computed the same way whatever the tile (copies, and sums over K in a fixed order),
  so that the tuner's choice can never change a bit of the result.
* :func:`fixed`: one tile chosen from D, for kernels that reduce over D (dot products):
  a reduction's order follows the tile and the warp count, so a tuner picking another
  tile in another process would change the rounding. Fixed tiles keep them reproducible.

Every launch passes ``enable_fp_fusion=False`` (:data:`LAUNCH_OPTIONS`): without it,
whether ``acc + w·v`` becomes one fused multiply-add depends on the Triton version and
the backend, and the GPU results would differ from the interpreter's and the plain
PyTorch reference's by a rounding. Memory-bound kernels lose nothing by it.
"""

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Elements per program under the interpreter: few programs, because the interpreter
# runs one Python loop per program, and numpy is quick on a few thousand elements.
_INTERPRETER_ELEMENTS = 8192
_MAX_BLOCK_D = 1024
LAUNCH_OPTIONS = {"enable_fp_fusion": False}

# (rows, columns, warps) tried on a GPU. One program per 1-16 rows: a bf16 row of
# D = 4096 is 8 KiB, so 1-4 rows per program keep 8-32 KiB in flight per program.
_GPU_TILES = [
    (1, 1024, 4),
    (1, 2048, 8),
    (2, 1024, 4),
    (2, 2048, 8),
    (4, 512, 4),
    (4, 1024, 8),
    (8, 256, 4),
    (8, 512, 8),
    (16, 128, 4),
    (32, 64, 4),
]


def interpreted(kernel: object) -> bool:
    """Whether ``kernel`` (possibly wrapped by autotune or heuristics) runs interpreted."""
    while not isinstance(kernel, InterpretedFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return isinstance(kernel, InterpretedFunction)


def interpreter_tile(D: int) -> tuple[int, int]:
    """(rows, columns) of one program under the interpreter, for rows of width ``D``."""
    block_d = min(triton.next_power_of_2(max(D, 1)), _MAX_BLOCK_D)
    return max(1, _INTERPRETER_ELEMENTS // block_d), block_d


def gpu_tile(D: int) -> tuple[int, int, int]:
    """(rows, columns, warps) of the fixed GPU tile for rows of width ``D`` (untuned).

    Three widths only, so that a run over many D compiles few kernel variants.
    """
    block_d = 64 if D <= 64 else 256 if D <= 256 else 1024
    return 2048 // block_d, block_d, 4


def _prune(configs: list, named_args: dict, **kwargs: object) -> list:
    # Columns wider than the row only mask lanes off; keep the tiles that fit D.
    width = max(triton.next_power_of_2(int(named_args["D"])), 64)
    fitting = [c for c in configs if c.kwargs["BLOCK_D"] <= width]
    return fitting or [min(configs, key=lambda c: c.kwargs["BLOCK_D"])]


def autotuned(fn: Callable) -> Callable:
    """Wrap a ``@triton.jit`` row kernel taking ``D``, ``BLOCK_ROWS`` and ``BLOCK_D``.

    On a GPU the first launch for each D times the tiles (device syncs, once per D);
    later launches reuse the winner.
    """
    if interpreted(fn) or os.environ.get("MOEBLOCKS_AUTOTUNE", "1") == "0":
        return fixed(fn)
    configs = [
        triton.Config({"BLOCK_ROWS": rows, "BLOCK_D": cols}, num_warps=warps)
        for rows, cols, warps in _GPU_TILES
    ]
    prune = {"early_config_prune": _prune}
    try:
        # Short timings (5 ms warm-up, 20 ms per tile), so tuning a new D costs ~0.2 s.
        return triton.autotune(
            configs=configs, key=["D"], prune_configs_by=prune, do_bench=_short_bench
        )(fn)
    except TypeError:  # a Triton without the do_bench argument: its default timings
        return triton.autotune(configs=configs, key=["D"], prune_configs_by=prune)(fn)


def _short_bench(kernel_call: Callable, quantiles: list[float]) -> list[float]:
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def fixed(fn: Callable) -> Callable:
    """Wrap a ``@triton.jit`` row kernel that reduces over D: one tile, chosen from D."""
    if interpreted(fn):
        return triton.heuristics(
            {
                "BLOCK_ROWS": lambda args: interpreter_tile(args["D"])[0],
                "BLOCK_D": lambda args: interpreter_tile(args["D"])[1],
            }
        )(fn)
    return triton.heuristics(
        {
            "BLOCK_ROWS": lambda args: gpu_tile(args["D"])[0],
            "BLOCK_D": lambda args: gpu_tile(args["D"])[1],
            "num_warps": lambda args: gpu_tile(args["D"])[2],
        }
    )(fn)


def row_grid(T: int, N: int, R: int) -> Callable[[dict], tuple[int]]:
    """Grid of the token-major kernels: token programs, then padding programs if R > N."""

    def grid(meta: dict) -> tuple[int]:
        rows = meta["BLOCK_ROWS"]
        return (triton.cdiv(T, rows) + (triton.cdiv(R, rows) if R > N else 0),)

    return grid


def accumulator(dtype: torch.dtype) -> tl.dtype:
    """float32 for the half types and float32, float64 for float64 (for gradcheck)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def zero_padding_rows(
    slot_of_row_ptr,
    out_ptr,
    block,
    R,
    D,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Write zeros to the rows of block ``block`` whose slot is -1 (padding rows)."""
    rows = block.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    slot = tl.load(slot_of_row_ptr + rows, mask=rows < R, other=0)
    padding = (rows < R) & (slot < 0)
    zeros = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=out_ptr.dtype.element_ty)
    for first in range(0, D, BLOCK_D):
        cols = first + tl.arange(0, BLOCK_D)
        tl.store(
            out_ptr + rows[:, None] * D + cols[None, :],
            zeros,
            mask=padding[:, None] & (cols < D)[None, :],
        )
