"""Tile choices shared by the row-moving kernels: tuned on a GPU, fixed under the interpreter.

Legend: D model dim, K experts per token.

Two ways to pick a tile, both called the same way (``kernel[grid](...)`` with the tile
sizes left out and ``grid`` a function of them):

* :func:`autotuned`: on a GPU, :func:`triton.autotune` keyed on D, K, weights, padding
  and a token-count bucket over the widest tiles that fit D; under
  ``TRITON_INTERPRET=1`` a fixed tile, so the CPU tests never time anything.
  ``MOEBLOCKS_AUTOTUNE=0`` (read when the kernels are first imported) gives the fixed
  GPU tile instead, e.g. for test runs over many widths, where tuning every
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

# (rows, columns, warps) tried on a GPU, 1024-2048 elements per 4 warps (8 per thread):
# the tiles of 4-32 rows with 2048-4096 elements took 72-92 registers with fp32 weights
# (under 50 % occupancy) and spilled on sm_90, so they are gone (tests/test_kernels_static.py).
_GPU_TILES = [
    (1, 1024, 4),
    (1, 2048, 8),
    (2, 1024, 4),
    (2, 2048, 8),
    (2, 512, 4),
    (4, 512, 8),
    (4, 256, 4),
    (8, 256, 8),
    (8, 128, 4),
    (16, 64, 4),
]
# What changes the best tile besides D: K (index loads per column piece), weights on or
# off, padding programs, and the token count (programs per SM), in power-of-two buckets.
_TUNING_KEY = ("D", "K", "HAS_WEIGHTS", "PADDED", "T_BUCKET")
# The fused backward's tile: 4 rows of 256 bf16 (128 fp32) columns is one warp per row,
# so the per-row dot products reduce inside a warp, with no block-wide barrier in the loop.
_BACKWARD_TILE = (4, 256, 4)


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
    # The widest columns that fit the row (up to 1024-2048): a narrower piece only
    # reloads the row indices and weights once more per piece; a wider one masks lanes.
    width = max(triton.next_power_of_2(int(named_args["D"])), 64)
    widest = min(width, _MAX_BLOCK_D)
    fitting = [c for c in configs if widest <= c.kwargs["BLOCK_D"] <= width]
    return fitting or [min(configs, key=lambda c: c.kwargs["BLOCK_D"])]


def t_bucket(T: int) -> int:
    """The token count as the autotuner sees it: a power of two >= 16 (one tuning per bucket)."""
    return max(triton.next_power_of_2(max(T, 1)), 16)


def autotuned(fn: Callable) -> Callable:
    """Wrap a ``@triton.jit`` row kernel taking ``D``, ``BLOCK_ROWS`` and ``BLOCK_D``.

    On a GPU the first launch for each key (D, K, weights, padding, token bucket: those
    of :data:`_TUNING_KEY` the kernel takes) times the tiles (device syncs, once per
    key); later launches reuse the winner.
    """
    if interpreted(fn) or os.environ.get("MOEBLOCKS_AUTOTUNE", "1") == "0":
        return fixed(fn)
    configs = [
        triton.Config({"BLOCK_ROWS": rows, "BLOCK_D": cols}, num_warps=warps)
        for rows, cols, warps in _GPU_TILES
    ]
    key = [name for name in _TUNING_KEY if name in fn.arg_names]
    prune = {"early_config_prune": _prune}
    try:
        # Short timings (5 ms warm-up, 20 ms per tile), so tuning a new key costs ~0.1 s.
        return triton.autotune(
            configs=configs, key=key, prune_configs_by=prune, do_bench=_short_bench
        )(fn)
    except TypeError:  # a Triton without the do_bench argument: its default timings
        return triton.autotune(configs=configs, key=key, prune_configs_by=prune)(fn)


def _short_bench(kernel_call: Callable, quantiles: list[float]) -> list[float]:
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def fixed(fn: Callable, gpu: Callable[[dict], tuple[int, int, int]] | None = None) -> Callable:
    """Wrap a ``@triton.jit`` row kernel that reduces over D: one tile per launch.

    ``gpu(args)`` gives the GPU tile from the launch arguments (default
    :func:`gpu_tile` of D); under the interpreter :func:`interpreter_tile` is used.
    """
    if interpreted(fn):
        return triton.heuristics(
            {
                "BLOCK_ROWS": lambda args: interpreter_tile(args["D"])[0],
                "BLOCK_D": lambda args: interpreter_tile(args["D"])[1],
            }
        )(fn)
    gpu = gpu or (lambda args: gpu_tile(args["D"]))
    return triton.heuristics(
        {
            "BLOCK_ROWS": lambda args: gpu(args)[0],
            "BLOCK_D": lambda args: gpu(args)[1],
            "num_warps": lambda args: gpu(args)[2],
        }
    )(fn)


def backward_tile(D: int, itemsize: int) -> tuple[int, int, int]:
    """(rows, columns, warps) of the fused backward: one warp per row.

    A warp's 32 lanes with 16 bytes each span 512 bytes: 256 bf16 or 128 fp32 columns.
    Wider, and the compiler spreads a row over several warps, whose dot products then
    meet through shared memory behind block-wide barriers in every loop step.
    """
    rows, _, warps = _BACKWARD_TILE
    cols = 32 * 16 // itemsize
    return rows, min(cols, max(triton.next_power_of_2(max(D, 1)), 32)), warps


def row_grid(T: int, P: int) -> Callable[[dict], tuple[int]]:
    """Grid of the token-major kernels: token programs, then programs for P padding rows."""

    def grid(meta: dict) -> tuple[int]:
        rows = meta["BLOCK_ROWS"]
        return (triton.cdiv(T, rows) + triton.cdiv(P, rows),)

    return grid


def padding_rows(slot_of_row_R: torch.Tensor, num_slots: int) -> torch.Tensor:
    """The rows whose slot is -1, in order: ``R − N`` of them in a valid layout.

    ``torch.nonzero_static`` knows its output size, so this is no host sync; the kernels
    then launch one program per ``BLOCK_ROWS`` padding rows instead of one per block of
    all R rows. A bad layout with fewer padding rows fills the tail with -1 (skipped).
    """
    count = slot_of_row_R.shape[0] - num_slots
    if count <= 0:
        return slot_of_row_R.new_empty(0)
    found = torch.nonzero_static(slot_of_row_R < 0, size=count, fill_value=-1)
    return found.reshape(-1).contiguous()


def alignment_shift(D: int) -> int:
    """log2 of the largest power of two <= 16 dividing D: how wide a row access may be.

    Triton specialises an int argument on divisibility by 16 only, so for D = 4104 it
    would assume nothing and emit 16-bit accesses; ``D >> D_SHIFT << D_SHIFT`` in the
    kernel restores the 8-element (128-bit for bf16) alignment. Shifts, not a multiply:
    the compiler tracks divisibility through both, and no 32-bit product reaches an address.
    """
    return min(4, (D & -D).bit_length() - 1) if D > 0 else 4


def accumulator(dtype: torch.dtype) -> tl.dtype:
    """float32 for the half types and float32, float64 for float64 (for gradcheck)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def aligned(D, D_SHIFT: tl.constexpr):
    """D, with its known power-of-two divisor 2^D_SHIFT made visible to the compiler."""
    return D >> D_SHIFT << D_SHIFT


@triton.jit
def zero_padding_rows(
    pad_rows_ptr,
    P,
    out_ptr,
    block,
    D,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Write zeros to padding rows ``block·BLOCK_ROWS …`` of the P listed in ``pad_rows``."""
    which = block.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    rows = tl.load(pad_rows_ptr + which, mask=which < P, other=-1)
    padding = rows >= 0
    zeros = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=out_ptr.dtype.element_ty)
    for first in range(0, D, BLOCK_D):
        cols = first + tl.arange(0, BLOCK_D)
        tl.store(
            out_ptr + rows[:, None] * D + cols[None, :],
            zeros,
            mask=padding[:, None] & (cols < D)[None, :],
        )
