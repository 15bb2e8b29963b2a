#!/usr/bin/env bash
# One run on the GPU machine (no network needed): build the extension, run the
# standalone kernel test, the CUDA and CPU test suites, then the GEMM
# benchmark. Logs and bench_gemm.json go to $OUT (default ./out); the
# benchmark table is printed last. Extra arguments go to bench_gemm.py, e.g.
#
#   OUT=/tmp/out benchmarks/gpu_check.sh --quick
#
# Exit status: non-zero if the build, a test or the benchmark failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
export OUT
mkdir -p "$OUT" build
PYTHON=${PYTHON:-python3}
# The extension is built in place, not installed: make the repo importable.
# The device image sets CXX to a g++ wrapper that links its own libstdc++ into
# the module; that copy's uninitialised locale crashes the first C++ error
# message that formats a number. The system g++ links the shared libstdc++.
export CXX=/usr/bin/g++
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0

{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
  $PYTHON -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -1
} 2>&1 | tee "$OUT/environment.txt"

# The extension (sm_90a SASS for everything; sm_80 SASS for Ampere/Ada) and,
# alongside, the torch-free kernel test for this GPU only.
echo "== build (log: $OUT/build.log)"
KERNELS=$(ls csrc/cuda/*.cu | grep -v ops_cuda.cu)
nvcc -O3 -std=c++17 --expt-relaxed-constexpr -Icsrc/include -Icsrc \
  -gencode=arch=compute_90a,code=sm_90a csrc/cuda/tests/kernel_test.cu $KERNELS \
  -o build/cuda_kernel_test >"$OUT/kernel_test_build.log" 2>&1 &
kernel_test_build=$!
if ! TORCH_CUDA_ARCH_LIST="9.0a;8.0" MAX_JOBS=16 $PYTHON setup.py build_ext --inplace \
    >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  echo "BUILD FAILED"
  exit 1
fi
grep -E "warning|error" "$OUT/build.log" | grep -v "AutogradState.h\|bit-field" | head -20

echo "== standalone kernel test (log: $OUT/kernel_test.log)"
if wait $kernel_test_build; then
  build/cuda_kernel_test >"$OUT/kernel_test.log" 2>&1 || status=1
  grep -E "FAILED|passed" "$OUT/kernel_test.log" | head -30
else
  tail -30 "$OUT/kernel_test_build.log"; status=1
fi

echo "== CUDA tests (log: $OUT/test_cuda.log)"
$PYTHON -m pytest -q --maxfail=10 -p no:cacheprovider --durations=5 tests/test_cuda_ops.py \
  >"$OUT/test_cuda.log" 2>&1 || status=1
tail -25 "$OUT/test_cuda.log"

echo "== CPU tests (log: $OUT/test_cpu.log)"
$PYTHON -m pytest -q --maxfail=10 -p no:cacheprovider tests --ignore=tests/test_cuda_ops.py \
  >"$OUT/test_cpu.log" 2>&1 || status=1
tail -5 "$OUT/test_cpu.log"

echo "== tests status: $status (0 = all passed)"
echo "== GEMM benchmark (log: $OUT/bench_gemm.log)"
$PYTHON benchmarks/bench_gemm.py --json "$OUT/bench_gemm.json" "$@" 2>"$OUT/bench_gemm.log" \
  | tee "$OUT/bench_gemm_table.txt" || status=1
[[ -s "$OUT/bench_gemm_table.txt" ]] || { tail -20 "$OUT/bench_gemm.log"; status=1; }
exit $status
