"""Ahead-of-time compilation of the kernels for a GPU target, and what their machine code says.

Legend: T tokens, E experts, K experts per token, N = T·K slots, R grouped rows, D model dim.

Triton compiles for a GPU it does not have: a stand-in driver names the target
(``GPUTarget("cuda", 90, 32)`` for H100, 80 for A100), and each kernel's own
``warmup`` runs Triton's launch-time binder (argument specialisation, autotune pruning,
heuristics) exactly as a launch would, then compiles to PTX and a cubin. The cubin is
read with ``cuobjdump`` (registers, stack = spills, shared memory), the TTIR with a
small data-flow pass (32-bit multiplies that reach an address), the PTX for access
widths and barriers. Nothing here runs a
kernel, so it works on a CPU-only machine; it needs the kernels compiled, not
interpreted, so run it in a process without ``TRITON_INTERPRET=1``
(``python -m moeblocks.kernels._static``, which prints JSON).
"""

import contextlib
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

from ._tiles import LAUNCH_OPTIONS, accumulator, alignment_shift, interpreted, t_bucket

__all__ = [
    "KernelStats",
    "compile_all",
    "index_variants",
    "mul32_addresses",
    "occupancy",
    "tool",
    "variants",
]

# Per SM, both on sm_80 and sm_90: 64K 32-bit registers, at most 64 resident warps and
# 32 resident blocks; registers are allocated per warp in units of 256.
_REGISTERS_PER_SM = 65536
_MAX_WARPS = 64
_MAX_BLOCKS = 32
_REGISTER_UNIT = 256
_SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}


@dataclasses.dataclass(frozen=True)
class KernelStats:
    """What one compiled variant's machine code shows.

    Attributes:
        kernel: Kernel name, e.g. ``"permute"`` or ``"index._place"``.
        arch: Compute capability (90 = sm_90a, H100; 80 = sm_80, A100).
        dtype: Row dtype (``"bf16"``, ``"fp32"``) or ``"i64"`` for the index kernels.
        D: Row width the variant was specialised for (0 for the index kernels).
        variant: Tile and switches, e.g. ``"4x1024/w8 weights"``.
        registers: Registers per thread.
        spill_bytes: Stack frame plus local memory per thread (spills live there).
        shared_bytes: Static and dynamic shared memory per block.
        warps: Warps per block.
        occupancy: Theoretical resident warps / 64 on the target.
        load_bits: Widest global load, in bits.
        store_bits: Widest global store, in bits.
        narrow_accesses: Global loads and stores narrower than 32 bits in the PTX.
        barriers: Block-wide barriers (``bar.sync``) in the PTX.
        mul32_addresses: Source lines of 32-bit multiplies that reach an address.
    """

    kernel: str
    arch: int
    dtype: str
    D: int
    variant: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    warps: int
    occupancy: float
    load_bits: int
    store_bits: int
    narrow_accesses: int
    barriers: int
    mul32_addresses: tuple[str, ...]


def tool(name: str) -> str | None:
    """Path of an NVIDIA tool (``ptxas``, ``cuobjdump``) shipped in the Triton wheel, or None."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.access(path, os.X_OK) else None


def occupancy(registers: int, warps: int, shared_bytes: int, arch: int) -> float:
    """Theoretical occupancy (resident warps / 64) of a block of ``warps`` warps."""
    per_warp = -(-registers * 32 // _REGISTER_UNIT) * _REGISTER_UNIT
    blocks = min(
        _MAX_BLOCKS,
        _MAX_WARPS // warps,
        _REGISTERS_PER_SM // max(per_warp, 1) // warps,
        _SHARED_PER_SM[arch] // shared_bytes if shared_bytes else _MAX_BLOCKS,
    )
    return blocks * warps / _MAX_WARPS


class _AheadOfTime:
    """A stand-in for Triton's active driver: names a target, launches nothing."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> str:
        return f"aot-sm{self.target.arch}"  # one binder cache per target

    def get_current_stream(self, device: object = None) -> int:
        return 0


@contextlib.contextmanager
def _target(arch: int) -> Iterator[None]:
    previous = driver._active
    driver.set_active(_AheadOfTime(arch))
    try:
        yield
    finally:
        driver.set_active(previous)


def _module(name: str) -> object:
    # The package re-exports functions under the module names (kernels.permute is the op).
    return importlib.import_module(f"{__package__}.{name}")


def _kernel(name: str) -> object:
    """The ``@triton.jit`` kernel (under its tile wrapper) of op module ``name``."""
    return getattr(_module(name), f"_{name}")


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def variants(T: int, D: int, K: int, E: int, dtype: str, pad_to: int = 1) -> list[tuple]:
    """Launches of every kernel at one shape: ``(name, kernel, args, kwargs, label)``.

    The arguments mirror the launchers (``_permute_op`` and the others) argument for
    argument; tensors are given as their dtype (Triton's ``MockTensor``: 16-byte aligned,
    as PyTorch's allocations are), integers as the values a launch would pass, so the
    binder specialises them the same way. Weights are float32, as routers give them.
    """
    from .index import num_rows_bound

    x = _DTYPES[dtype]
    i64 = torch.int64
    N = T * K
    P = num_rows_bound(N, E, pad_to) - N
    shared = {"ACC": accumulator(x), "D_SHIFT": alignment_shift(D), **LAUNCH_OPTIONS}
    w = torch.float32  # the router's weights, as the layer passes them
    permute_args = (x, w, i64, i64, x, T, P, D, K, t_bucket(T))
    unpermute_args = (x, w, i64, x, T, D, K, t_bucket(T))
    out = []
    for weights in (False, True):
        label = "weights" if weights else "plain"
        kwargs = {**shared, "HAS_WEIGHTS": weights}
        padded = {**kwargs, "PADDED": P > 0}
        out.append(("permute", _kernel("permute"), permute_args, padded, label))
        out.append(("unpermute", _kernel("unpermute"), unpermute_args, kwargs, label))
    backward_args = (x, x, w, i64, i64, x, torch.float32, T, P, D, K)
    kwargs = {**shared, "PADDED": P > 0, "K_POW2": triton.next_power_of_2(K)}
    out.append(("unpermute_backward", _kernel("unpermute_backward"), backward_args, kwargs, ""))
    slot_dot_args = (x, x, i64, torch.float32, N, D, K)
    out.append(("slot_dot", _kernel("slot_dot"), slot_dot_args, shared, ""))
    return out


def index_variants(T: int, K: int, E: int, pad_to: int = 1) -> list[tuple]:
    """The three index-building launches of :func:`~.index.build_index` at one shape."""
    index = _module("index")
    N = T * K
    R = index.num_rows_bound(N, E, pad_to)
    i64, i32 = torch.int64, torch.int32
    blocks = triton.cdiv(N, index._BLOCK_N)
    count = (i64, i32, i64, N, E, R, triton.cdiv(R, blocks))
    count_kw = {"BLOCK_N": index._BLOCK_N, "BINS": triton.next_power_of_2(E + 2), "FILL": R > N}
    scan = (i32, i64, i64, blocks, E)
    scan_kw = {"BLOCK_B": index._scan_block(interpreted=False), "BLOCK_E": index._SCAN_BINS}
    place = (i64, i64, i64, i64, i64, i64, i64, i64, i64, N, E, R, pad_to)
    place_kw = {"BLOCK_N": index._BLOCK_N, "BLOCK_E": index._offset_bins(E)}
    return [
        ("index._count", index._count, count, count_kw, ""),
        ("index._scan", index._scan, scan, scan_kw, ""),
        ("index._place", index._place, place, place_kw, ""),
    ]


def _resources(cubin: bytes) -> dict[str, int]:
    # cuobjdump's resource table is quick (~10 ms); a SASS listing would take ~0.3 s of
    # CPU per variant, so widths and barriers are read from the PTX instead.
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run(
            [tool("cuobjdump"), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}


def _access_bits(ptx: str, op: str) -> list[int]:
    """Width in bits of every global ``ld``/``st`` in the PTX (vector count × element bits)."""
    bits = []
    for modifiers in re.findall(rf"\b{op}\.global((?:\.[\w:]+)+)", ptx):
        parts = modifiers.split(".")
        lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        width = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bufs]\d+", p)), 32)
        bits.append(lanes * width)
    return bits


_DEF = re.compile(r"^\s*(%[\w.]+)(?::\d+)? = ([\w.]+) (.*)$")
_USE = re.compile(r"%[\w.]+")
_LOC = re.compile(r"^#(loc\d*) = loc\((.*)\)$", re.MULTILINE)
_LOC_REF = re.compile(r"loc\(#(loc\d*)\)")


def _source_lines(ttir: str) -> dict[str, str]:
    """Each location alias of the TTIR resolved to ``file:line`` (names and call sites followed)."""
    raw = dict(_LOC.findall(ttir))

    def resolve(alias: str, depth: int = 0) -> str:
        body = raw.get(alias, "")
        place = re.match(r'"([^"]*)":(\d+):\d+', body)
        if place:
            return f"{os.path.basename(place.group(1))}:{place.group(2)}"
        if depth > 20:
            return "?"
        refs = re.findall(r"#(loc\d*)", body)
        found = [resolve(ref, depth + 1) for ref in refs]
        return next((f for f in found if f != "?"), "?")

    return {alias: resolve(alias) for alias in raw}


def mul32_addresses(ttir: str) -> tuple[str, ...]:
    """Lines of 32-bit integer multiplies whose result flows into an address (``tt.addptr``).

    A forward taint over the SSA values of the TTIR: a multiply of i32 values taints
    its result, any op using a tainted value taints its results (comparisons excepted:
    a mask is no address). Such a product wraps past 2^31 elements before it is widened.
    Values carried around a loop (``scf.for`` iteration arguments) are not followed.
    """
    lines = _source_lines(ttir)
    tainted: dict[str, str] = {}
    found = []
    for text in ttir.splitlines():
        match = _DEF.match(text)
        if match is None:
            continue
        name, op, rest = match.groups()
        operands = _USE.findall(rest.split(" : ")[0])
        source = next((tainted[o] for o in operands if o in tainted), None)
        if op == "arith.muli" and re.search(r":\s*(tensor<.*x)?i32\b", rest):
            ref = _LOC_REF.search(rest)
            source = lines.get(ref.group(1), "?") if ref else "?"
        if source is None or op == "arith.cmpi":
            continue
        if op == "tt.addptr":
            found.append(source)
        tainted[name] = source
    return tuple(sorted(set(found)))


def _stats(name: str, compiled: object, arch: int, dtype: str, D: int, label: str) -> KernelStats:
    numbers = _resources(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    meta = compiled.metadata
    shared = max(numbers.get("SHARED", 0), int(getattr(meta, "shared", 0)))
    loads, stores = _access_bits(ptx, "ld"), _access_bits(ptx, "st")
    return KernelStats(
        kernel=name,
        arch=arch,
        dtype=dtype,
        D=D,
        variant=label,
        registers=numbers.get("REG", 0),
        spill_bytes=numbers.get("STACK", 0) + numbers.get("LOCAL", 0),
        shared_bytes=shared,
        warps=meta.num_warps,
        occupancy=occupancy(numbers.get("REG", 0), meta.num_warps, shared, arch),
        load_bits=max(loads, default=0),
        store_bits=max(stores, default=0),
        narrow_accesses=sum(b < 32 for b in loads + stores),
        barriers=len(re.findall(r"\b(?:bar|barrier)\.sync\b", ptx)),
        mul32_addresses=mul32_addresses(compiled.asm["ttir"]),
    )


def _constexprs(compiled: object) -> dict[str, object]:
    # The constexprs the binder bound (tile included), by name.
    src = compiled.src
    return {src.fn.arg_names[key[0]]: value for key, value in src.constants.items()}


def compile_variant(launch: tuple, arch: int, dtype: str, D: int) -> list[KernelStats]:
    """Compile one launch for ``arch`` (every tile the autotuner would try) and inspect it."""
    name, kernel, args, kwargs, label = launch
    if interpreted(kernel):
        raise RuntimeError(
            "the kernels were imported under TRITON_INTERPRET=1 and cannot be compiled "
            "for a GPU in this process; run python -m moeblocks.kernels._static instead"
        )
    with _target(arch):
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
    compiled = compiled if isinstance(compiled, list) else [compiled]
    stats = []
    for one in compiled:
        bound = _constexprs(one)
        if "BLOCK_D" in bound:
            tile = f"{bound['BLOCK_ROWS']}x{bound['BLOCK_D']}/w{one.metadata.num_warps}"
        else:
            tile = "/".join(f"{k}={bound[k]}" for k in ("BLOCK_N", "BLOCK_B") if k in bound)
        stats.append(_stats(name, one, arch, dtype, D, f"{tile} {label}".strip()))
    return stats


def compile_all(
    shapes: list[tuple[int, int, int, int]],
    dtypes: list[str],
    archs: list[int],
    kernels: list[str] | None = None,
) -> list[KernelStats]:
    """Compile every kernel variant for every ``(T, D, K, E)``, dtype and target.

    The index kernels (integer ids, no D) are compiled once per target, at the first
    shape. ``kernels`` keeps only the named kernels (e.g. ``["permute", "index._place"]``).
    """
    launches = []
    for T, D, K, E in shapes:
        for dtype in dtypes:
            launches += [(launch, dtype, D) for launch in variants(T, D, K, E, dtype)]
    T, _, K, E = shapes[0]
    launches += [(launch, "i64", 0) for launch in index_variants(T, K, E)]
    if kernels is not None:
        launches = [item for item in launches if item[0][0] in kernels]
    return [
        stats
        for arch in archs
        for launch, dtype, D in launches
        for stats in compile_variant(launch, arch, dtype, D)
    ]


def main(argv: list[str] | None = None) -> None:
    """Print the stats of every variant as JSON.

    Flags: ``--shape T,D,K,E`` (repeatable; default 16384,4096,4,64 and 16384,512,4,64),
    ``--dtypes bf16,fp32``, ``--archs 90,80``, ``--kernels permute,unpermute``.
    """
    shapes, dtypes, archs, kernels = [], ["bf16", "fp32"], [90, 80], None
    argv = sys.argv[1:] if argv is None else argv
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        if flag == "--shape":
            shapes.append(tuple(int(v) for v in value.split(",")))
        elif flag == "--dtypes":
            dtypes = value.split(",")
        elif flag == "--archs":
            archs = [int(v) for v in value.split(",")]
        elif flag == "--kernels":
            kernels = value.split(",")
        else:
            raise SystemExit(f"unknown flag {flag!r}")
    shapes = shapes or [(16384, 4096, 4, 64), (16384, 512, 4, 64)]
    stats = compile_all(shapes, dtypes, archs, kernels)
    json.dump([dataclasses.asdict(s) for s in stats], sys.stdout)


if __name__ == "__main__":
    main()
