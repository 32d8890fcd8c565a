#!/usr/bin/env bash
# The GPU check: one script to run on a CUDA machine from the repository root.
#   (i)   installs carried wheels from .whl/ (for a machine with no package index),
#   (ii)  builds with CMake (host library + nvcc compile of kernels/*.cu for sm_80/sm_90),
#   (iii) runs the GPU tests (pytest -m gpu, every backend-parametrised cupy test included),
#         the structured projections (CountSketch kernel, Kronecker factors) as a stage of
#         their own, the bit-for-bit GPU tests again under compute-sanitizer memcheck
#         (out-of-bounds accesses that the CPU emulation cannot see), and the host-library
#         tests,
#   (iv)  runs the GPU benchmark (validation/bench_kernels_gpu.py; dense, Gaussian and
#         CountSketch kernels against cuBLAS).
# Logs and the benchmark JSON go to $OUT when it is set (else results/gpu_check/).
# Budget: each stage has its own timeout (60 + 90 + 120 + 45 + 60 + 45 + 90 s): under 9 minutes.
# Exit status: 0 when every stage passed, else the number of failed stages.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci CI=${CI:-1}
PY=${PYTHON:-python3}
LOG_DIR=${OUT:-results/gpu_check}
mkdir -p "$LOG_DIR"
failed=0
stage() { echo; echo "=== $* ==="; }

stage "wheels"
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/iif_site .whl/*.whl && export PYTHONPATH=/tmp/iif_site${PYTHONPATH:+:$PYTHONPATH} \
        || { echo "wheel install failed"; failed=$((failed + 1)); }
else
    echo "no .whl/ directory: using the packages installed here"
fi
# The package is used from the working tree, without installing it.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

stage "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$LOG_DIR/device.txt"
$PY -c "import cupy; print('cupy', cupy.__version__, 'runtime', cupy.cuda.runtime.runtimeGetVersion())" \
    2>&1 | tee -a "$LOG_DIR/device.txt"

stage "build (cmake)"
if timeout 60 cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >"$LOG_DIR/cmake.log" 2>&1 \
   && timeout 90 cmake --build build -j 8 >>"$LOG_DIR/cmake.log" 2>&1; then
    tail -n 3 "$LOG_DIR/cmake.log"
else
    tail -n 40 "$LOG_DIR/cmake.log"; echo "BUILD FAILED"; failed=$((failed + 1))
fi

stage "pytest -m gpu (kernel layer)"
# The kernel tests only: every gpu-marked test lives there, and other test modules may
# import packages (dask, zarr, randomgen) that a GPU image lacks.
STRUCTURED="structured or countsketch or kronecker"
timeout 120 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_*.py \
    -k "not ($STRUCTURED)" 2>&1 | tee "$LOG_DIR/pytest_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "GPU TESTS FAILED"; failed=$((failed + 1)); }

stage "pytest -m gpu (structured projections: CountSketch, Kronecker)"
# Device vs host twin and oracle, bit for bit: the CountSketch kernel's bytes, the bucket /
# sign pattern and the ±1 Kronecker factors from the generate kernel, and every
# backend-parametrised structured test with the cupy backend.
timeout 45 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_structured.py \
    tests/test_kernels_gpu.py -k "$STRUCTURED" -rA 2>&1 | tail -n 40 \
    | tee "$LOG_DIR/pytest_gpu_structured.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "STRUCTURED GPU TESTS FAILED"; failed=$((failed + 1)); }

stage "compute-sanitizer memcheck (bit-for-bit GPU tests)"
if command -v compute-sanitizer >/dev/null; then
    timeout 60 compute-sanitizer --tool memcheck --error-exitcode 3 \
        $PY -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py -k "bit_for_bit" \
        2>&1 | tail -n 30 | tee "$LOG_DIR/memcheck.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "MEMCHECK FAILED"; failed=$((failed + 1)); }
else
    echo "compute-sanitizer not found: memcheck skipped"
fi

stage "pytest host library"
timeout 45 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_host.py 2>&1 | tee "$LOG_DIR/pytest_host.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "HOST TESTS FAILED"; failed=$((failed + 1)); }

stage "benchmark"
timeout 90 $PY validation/bench_kernels_gpu.py --time-budget 60 --out "$LOG_DIR/bench_kernels_gpu.json" 2>&1 \
    | tee "$LOG_DIR/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "BENCHMARK FAILED"; failed=$((failed + 1)); }

stage "summary"
echo "failed stages: $failed (logs in $LOG_DIR)"
exit "$failed"
