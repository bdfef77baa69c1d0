#!/usr/bin/env bash
# One prepared GPU check for the Triton kernels (issues 17, 29), in under 10 minutes:
#
#   1. pytest -m gpu            the GPU-only tests (large sizes, no host sync, compile)
#   2. kernel property tests    tests/test_kernels.py on CUDA: compiled kernels, no interpreter
#   3. bench_permute.py         index / permute / unpermute vs copy_ and TorchDispatcher
#   4. bench_layer.py           bf16 layer fwd+bwd vs a dense FFN of equal FLOPs and HF's block
#   5. kernel_vs_copy           each kernel at T=16384, D=4096, K=4, E=64 bf16, pad_to 1 and
#                               128, against a copy_ moving the same bytes (kernel_vs_copy.md)
#   6. ncu                      DRAM bytes, throughput (% of peak) and time of each kernel
#                               launch, where Nsight Compute is installed (ncu.csv)
#
# Tables and the log go to $OUT when it is set (the device tool's folder), else to
# benchmarks/results/: gpu_check.log, permute_cuda.md/.csv, layer_cuda.md. Each table
# names the device, the date and its command.
#
# It runs unchanged on a machine whose python already has torch, triton, transformers,
# hypothesis, jaxtyping and einops, with nothing installable: a package that is missing
# is installed only from wheels carried in $WHEELS (default .whl/, into /tmp/site), and
# beartype may stay missing (the tests then run without runtime shape checks and say so).
# moeblocks need not be installed: when `import moeblocks.kernels` fails, a throwaway
# folder maps moeblocks/ and kernels/src/ (as moeblocks.kernels) without pip.
#
# Usage, from the repository root:  bash benchmarks/gpu_check.sh
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
DEST="${OUT:-$ROOT/benchmarks/results}"
WHEELS="${WHEELS:-$ROOT/.whl}"
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"
export PYTHONUNBUFFERED=1
STARTED=$(date +%s)
FAILED=()

say() { echo "[gpu_check $(($(date +%s) - STARTED))s] $*" | tee -a "$LOG"; }
: >"$LOG"

# -- environment ------------------------------------------------------------------------
SITE=/tmp/moeblocks_site
mkdir -p "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
for module in beartype hypothesis jaxtyping einops; do
    if ! "$PY" -c "import $module" 2>/dev/null; then
        if compgen -G "$WHEELS/*.whl" >/dev/null &&
            "$PY" -m pip install -q --no-index --no-deps --no-compile --find-links "$WHEELS" \
                --target "$SITE" "$module" >>"$LOG" 2>&1; then
            say "installed $module from $WHEELS"
        else
            say "NOTE: $module is missing and no wheel for it was carried in $WHEELS"
        fi
    fi
done
if ! "$PY" -c "import moeblocks.kernels" 2>/dev/null; then
    # Not installed: link the package folders into the site folder. Python then runs with
    # -P, so that the repository's own moeblocks/ (without kernels/) does not shadow it.
    rm -rf "$SITE/moeblocks"
    mkdir -p "$SITE/moeblocks"
    for entry in "$ROOT"/moeblocks/*; do ln -s "$entry" "$SITE/moeblocks/"; done
    ln -s "$ROOT/kernels/src" "$SITE/moeblocks/kernels"
    say "moeblocks is not installed: mapped $ROOT/moeblocks and $ROOT/kernels in $SITE"
fi
PYRUN=("$PY" -P)
"${PYRUN[@]}" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch, triton, moeblocks.kernels
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
print("torch", torch.__version__, "| triton", triton.__version__, "| moeblocks", moeblocks.kernels.__file__)
EOF
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    say "no CUDA device: nothing to check here"
    exit 1
fi

run() {  # run NAME SECONDS COMMAND...: a time-limited stage whose failure is recorded
    local name=$1 limit=$2
    shift 2
    say "start $name (limit ${limit}s): $*"
    if timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; then
        say "ok $name"
    else
        say "FAILED $name (exit ${PIPESTATUS[0]})"
        FAILED+=("$name")
    fi
}

# -- 1 + 2: tests -----------------------------------------------------------------------
# The GPU-only tests, with autotuning as users get it.
GPU_TESTS=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
run pytest_gpu 100 "${PYRUN[@]}" -m pytest -m gpu $GPU_TESTS -q -p no:cacheprovider -rs
# The property tests on CUDA: fixed tiles (MOEBLOCKS_AUTOTUNE=0), since hypothesis draws
# many widths and tuning each would take longer than the tests.
run pytest_kernels 110 env MOEBLOCKS_AUTOTUNE=0 "${PYRUN[@]}" -m pytest tests/test_kernels.py \
    -m "not gpu" -q -p no:cacheprovider -x

# -- 3 + 4: benchmarks ------------------------------------------------------------------
# The target shape first, then the issue's grid as far as 80 s allow (the stage limits
# add up to 9 minutes, so the whole check ends inside 10).
run bench_permute 120 "${PYRUN[@]}" benchmarks/bench_permute.py --max-seconds 80 --out "$DEST"
run bench_layer 80 "${PYRUN[@]}" benchmarks/bench_layer.py --device cuda --dtype bfloat16 \
    --tokens 16384 --dim 4096 --hidden 1024 --experts 64 --k 4 --repeats 10 --sets base hf \
    --out "$DEST/layer_cuda.md"

# -- 5 + 6: each kernel against a copy of its bytes, then what DRAM saw -----------------
cat >"$DEST/kernel_vs_copy.py" <<'PYEOF'
"""Each kernel at the target shape, pad_to 1 and 128, against a copy_ of the same bytes."""
import statistics, sys
import torch
from moeblocks import kernels

T, D, K, E, ROW = 16384, 4096, 4, 64, 2
N = T * K
ONCE = "--once" in sys.argv  # under ncu: one launch of each, no timing


def timed(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def copy_us(nbytes):  # a copy_ whose read + write traffic is nbytes
    src = torch.empty(nbytes // 4, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return timed(lambda: dst.copy_(src))


gen = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
g = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
experts = torch.rand(T, E, device="cuda", generator=gen).topk(K, dim=1).indices
w = torch.rand(T, K, device="cuda", generator=gen)
print(f"{torch.cuda.get_device_name()}: T={T} D={D} K={K} E={E} bf16, fp32 weights")
print("| step | pad_to | R | µs | copy µs (same bytes) | time / copy | GB/s |")
print("|---|---:|---:|---:|---:|---:|---:|")
for pad_to in (1, 128):
    idx = kernels.build_index(experts, E, pad_to)
    R = idx.slot_of_row.shape[0]
    y = torch.randn(R, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    index = (idx.row_of_slot, idx.slot_of_row, K)
    steps = {
        "index": (lambda: kernels.build_index(experts, E, pad_to), 4 * N * 8),
        "permute": (lambda: kernels.permute(x, *index), T * D * ROW + R * D * ROW + N * 8),
        "unpermute": (lambda: kernels.unpermute(y, *index, w), (N + T) * D * ROW + N * 12),
        "unpermute_backward": (
            lambda: kernels.unpermute_backward(g, y, *index, w),
            (T + N + R) * D * ROW + N * 16,
        ),
    }
    for name, (fn, nbytes) in steps.items():
        if ONCE:
            fn()
            continue
        us, copy = timed(fn), copy_us(nbytes)
        print(f"| {name} | {pad_to} | {R} | {us:.1f} | {copy:.1f} | {us / copy:.2f} "
              f"| {nbytes / us / 1e3:.0f} |")
torch.cuda.synchronize()
PYEOF
run kernel_vs_copy 60 bash -c "${PYRUN[*]} '$DEST/kernel_vs_copy.py' | tee '$DEST/kernel_vs_copy.md'"
if command -v ncu >/dev/null 2>&1; then
    METRICS=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum
    METRICS=$METRICS,dram__throughput.avg.pct_of_peak_sustained_elapsed
    run ncu 60 ncu --csv --metrics "$METRICS" --kernel-name "regex:_count|_scan|_place|_permute|_unpermute" \
        --log-file "$DEST/ncu.csv" "${PYRUN[@]}" "$DEST/kernel_vs_copy.py" --once
else
    say "ncu is not installed: no DRAM counters this run (kernel_vs_copy.md has the times)"
fi

say "done in $(($(date +%s) - STARTED))s; failed stages: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
