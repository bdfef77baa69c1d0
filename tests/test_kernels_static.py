"""The kernels' machine code for H100 (sm_90a) and A100 (sm_80), compiled without a GPU.

Legend: T tokens, E experts, K experts per token, D model dim.

Triton compiles ahead of time for a GPU target on a CPU-only machine
(:mod:`moeblocks.kernels._static`): every kernel × bf16 and fp32 × every tile the
autotuner may pick at D = 4096 and D = 512 (and the fixed tiles of the reducing kernels
and the index kernels), for both targets, through each kernel's own launch-time binder.
The cubins are then held to what a memory-bound kernel needs: no register spills,
registers low enough for half the warps an H100 SM can hold, 128-bit row accesses, and
no 32-bit multiply on the way to an address (it would wrap past 2^31 elements).

The suite runs with ``TRITON_INTERPRET=1``, under which the kernels are interpreted
functions that cannot be compiled, so the compiling happens in subprocesses without it,
one per target, in parallel; Triton's on-disk cache makes later runs quicker. Skipped
where the Triton wheel ships no ``ptxas``/``cuobjdump`` (not an NVIDIA build).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from moeblocks.kernels import _static

if not (_static.tool("ptxas") and _static.tool("cuobjdump")):
    pytest.skip("the Triton wheel has no ptxas/cuobjdump", allow_module_level=True)

ROW_KERNELS = ("permute", "unpermute", "unpermute_backward")
NO_SPILLS = (*ROW_KERNELS, "index._count", "index._scan", "index._place")
# D = 4104 is a multiple of 8 but not of 16: Triton alone would assume nothing of it.
ODD_D = 4104


def _compile(*flags: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "moeblocks.kernels._static", *flags]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def stats() -> list[dict]:
    """Every compiled variant's stats, compiled once for the module."""
    runs = [_compile("--archs", "90"), _compile("--archs", "80")]
    odd = ("--shape", f"16384,{ODD_D},4,64", "--dtypes", "bf16", "--archs", "90")
    runs.append(_compile(*odd, "--kernels", ",".join((*ROW_KERNELS, "slot_dot"))))
    found = []
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err.decode()[-4000:]
        found += json.loads(out)
    print("\n" + _table(found))
    return found


def _table(found: list[dict]) -> str:
    cells = []
    for name in dict.fromkeys(s["kernel"] for s in found):
        mine = [s for s in found if s["kernel"] == name]
        regs = sorted({s["registers"] for s in mine})
        occupancy = min(s["occupancy"] for s in mine if s["arch"] == 90)
        spills = max(s["spill_bytes"] for s in mine)
        cells.append(
            f"{name} reg {regs[0]}-{regs[-1]} spill {spills} occ>={occupancy:.2f} "
            f"ld/st {min(s['load_bits'] for s in mine)}/{min(s['store_bits'] for s in mine)}"
        )
    return f"static ({len(found)} variants): " + " | ".join(cells)


def _where(s: dict) -> str:
    return f"{s['kernel']} sm_{s['arch']} {s['dtype']} D={s['D']} {s['variant']}"


def test_every_kernel_and_target_compiled(stats: list[dict]) -> None:
    names = {s["kernel"] for s in stats}
    assert names >= {*NO_SPILLS, "slot_dot"}, names
    assert {s["arch"] for s in stats} == {80, 90}
    # The autotuner's candidates at D = 4096: the 1024- and 2048-column tiles.
    tiles = {s["variant"] for s in stats if s["kernel"] == "permute" and s["D"] == 4096}
    assert len(tiles) >= 4, tiles


def test_no_spills(stats: list[dict]) -> None:
    spilling = [_where(s) for s in stats if s["kernel"] in NO_SPILLS and s["spill_bytes"]]
    assert not spilling, spilling


def test_half_occupancy_on_h100(stats: list[dict]) -> None:
    # Copies hide DRAM latency with many resident warps; 50 % means <= 64 registers.
    low = [
        f"{_where(s)}: {s['registers']} registers, occupancy {s['occupancy']}"
        for s in stats
        if s["kernel"] in ("permute", "unpermute") and s["arch"] == 90 and s["occupancy"] < 0.5
    ]
    assert not low, low


def test_row_accesses_are_128_bit(stats: list[dict]) -> None:
    narrow = [
        f"{_where(s)}: widest load {s['load_bits']}, store {s['store_bits']}"
        for s in stats
        if s["kernel"] in ROW_KERNELS and (s["load_bits"] < 128 or s["store_bits"] < 128)
    ]
    # No access narrower than 32 bits at all (bf16 rows read one element at a time would
    # be 16-bit; index and fp32 weights are 64 and 32): slot_dot, which stores one float
    # per slot, is held to it too.
    narrow += [
        f"{_where(s)}: {s['narrow_accesses']} accesses under 32 bits"
        for s in stats
        if s["kernel"] in (*ROW_KERNELS, "slot_dot") and s["narrow_accesses"]
    ]
    assert not narrow, narrow
    assert any(s["D"] == ODD_D for s in stats)  # D % 16 == 8 is among them


def test_backward_loop_has_no_block_barrier(stats: list[dict]) -> None:
    # One warp per row: the dot products reduce inside a warp. At most one barrier is
    # left, outside the loop, where the K dot products of the tile are stored.
    crowded = [
        f"{_where(s)}: {s['barriers']} barriers"
        for s in stats
        if s["kernel"] == "unpermute_backward" and s["barriers"] > 1
    ]
    assert not crowded, crowded


def test_no_32_bit_multiply_reaches_an_address(stats: list[dict]) -> None:
    found = [f"{_where(s)}: {s['mul32_addresses']}" for s in stats if s["mul32_addresses"]]
    assert not found, found


# ---------------------------------------------------------------- the helpers themselves


def test_occupancy_arithmetic() -> None:
    # 64 registers × 32 lanes = 2048 per warp: 32 warps of 64 fit the register file.
    assert _static.occupancy(64, 4, 0, 90) == 0.5
    assert _static.occupancy(65, 4, 0, 90) == 28 / 64  # 72 after rounding: 7 blocks of 4
    assert _static.occupancy(255, 4, 0, 90) == 0.125
    assert _static.occupancy(32, 4, 0, 80) == 1.0
    # Shared memory limits too: 100 KiB per block leaves one block on an A100.
    assert _static.occupancy(32, 4, 100 * 1024, 80) == 4 / 64


def test_mul32_taint_follows_values_to_addresses() -> None:
    ttir = "\n".join(
        [
            '#loc1 = loc("k.py":7:3)',
            '#loc2 = loc("rows"(#loc1))',
            "    %rows = arith.muli %a, %b : tensor<4xi32> loc(#loc2)",
            "    %wide = arith.extsi %rows : tensor<4xi32> to tensor<4xi64> loc(#loc1)",
            "    %ok = arith.cmpi slt, %a, %b : tensor<4xi32> loc(#loc1)",
            "    %safe = arith.muli %c, %d : i64 loc(#loc1)",
            "    %p = tt.addptr %base, %wide : tensor<4x!tt.ptr<f32>>, tensor<4xi64> loc(#loc1)",
        ]
    )
    assert _static.mul32_addresses(ttir) == ("k.py:7",)
    # An i64 product, or an i32 one that only feeds a mask, is no finding.
    harmless = ttir.replace(": tensor<4xi32> loc(#loc2)", ": tensor<4xi64> loc(#loc2)")
    assert _static.mul32_addresses(harmless) == ()
