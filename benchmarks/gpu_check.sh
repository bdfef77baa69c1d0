#!/usr/bin/env bash
# One prepared GPU check for the Triton kernels (issue 17), in under 8 minutes:
#
#   1. pytest -m gpu            the GPU-only tests (large sizes, no host sync, compile)
#   2. kernel property tests    tests/test_kernels.py on CUDA: compiled kernels, no interpreter
#   3. bench_permute.py         index / permute / unpermute vs copy_ and TorchDispatcher
#   4. bench_layer.py           bf16 layer fwd+bwd vs a dense FFN of equal FLOPs and HF's block
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
run pytest_kernels 130 env MOEBLOCKS_AUTOTUNE=0 "${PYRUN[@]}" -m pytest tests/test_kernels.py \
    -m "not gpu" -q -p no:cacheprovider -x

# -- 3 + 4: benchmarks ------------------------------------------------------------------
# The target shape first, then the issue's grid as far as 90 s allow (the stage limits
# add up to 7.5 minutes, so the whole check ends inside 8).
run bench_permute 140 "${PYRUN[@]}" benchmarks/bench_permute.py --max-seconds 90 --out "$DEST"
run bench_layer 80 "${PYRUN[@]}" benchmarks/bench_layer.py --device cuda --dtype bfloat16 \
    --tokens 16384 --dim 4096 --hidden 1024 --experts 64 --k 4 --repeats 10 --sets base hf \
    --out "$DEST/layer_cuda.md"

say "done in $(($(date +%s) - STARTED))s; failed stages: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
