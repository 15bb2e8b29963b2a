#!/usr/bin/env bash
# One run on the GPU machine (no network needed): build the extension, run the
# standalone kernel test, the CUDA and CPU test suites, then the GEMM
# benchmark over the full grid (6 shapes x M in {1, 16, 128, 512, 2048, 8192}
# x FP16, INT8, FP8 and apex4 per granularity). Logs and bench_gemm.json go to
# $OUT (default ./out), at most 7 files; the benchmark table is printed last.
# Extra arguments go to bench_gemm.py, e.g.
#
#   OUT=/tmp/out benchmarks/gpu_check.sh --quick
#
# SKIP_CPU_TESTS=1 leaves out the CPU suite (CI runs it), SKIP_BENCH=1 the
# benchmark. E2E="ARGS" runs bench_e2e.py ARGS after the tests (two more
# files in $OUT: with SKIP_CPU_TESTS=1 the run stays within the device's 8).
# TORCH_CUDA_ARCH_LIST (default "9.0a;8.0") sets the extension's targets.
# Every step has a time limit, so a hung kernel cannot take the whole run; on
# an H100 the full run takes about 5 minutes (build 1.5, tests 1, bench 2).
# Exit status: non-zero if the build, a test or a benchmark failed.
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

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
$PYTHON -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
nvcc --version | tail -1

# The extension (sm_90a SASS for everything; sm_80 SASS for Ampere/Ada) and,
# alongside, the torch-free kernel test for this GPU only.
echo "== build (log: $OUT/build.log)"
KERNELS=$(ls csrc/cuda/*.cu | grep -v ops_cuda.cu)
KERNEL_TEST_LOG=$(mktemp)
nvcc -O3 -std=c++17 --expt-relaxed-constexpr -Icsrc/include -Icsrc \
  -gencode=arch=compute_90a,code=sm_90a csrc/cuda/tests/kernel_test.cu $KERNELS \
  -o build/cuda_kernel_test >"$KERNEL_TEST_LOG" 2>&1 &
kernel_test_build=$!
if ! TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"9.0a;8.0"} MAX_JOBS=16 timeout 400 $PYTHON setup.py build_ext --inplace \
    >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  echo "BUILD FAILED"
  exit 1
fi
grep -E "warning|error" "$OUT/build.log" | grep -v "AutogradState.h\|bit-field" | head -20
# Package metadata beside the in-place build, so that the apex4 torch.compile
# backend (a torch_dynamo_backends entry point) is found without installing.
$PYTHON setup.py -q egg_info >>"$OUT/build.log" 2>&1 || true

echo "== standalone kernel test (log: $OUT/kernel_test.log)"
if wait $kernel_test_build; then
  timeout 120 build/cuda_kernel_test >"$OUT/kernel_test.log" 2>&1
  kernel_test_rc=$?
  if [[ $kernel_test_rc -ne 0 ]]; then
    status=1
    echo "kernel_test exited with $kernel_test_rc; its log ends:"; tail -3 "$OUT/kernel_test.log"
  fi
  grep -E "FAILED|passed" "$OUT/kernel_test.log" | head -30
else
  status=1
fi
{ echo "== kernel_test build"; cat "$KERNEL_TEST_LOG"; } >>"$OUT/build.log"
rm -f "$KERNEL_TEST_LOG"
# A kernel that hung there would hang the torch tests too: stop early.
if [[ ${kernel_test_rc:-0} -eq 124 ]]; then
  echo "kernel_test timed out (a kernel hangs): stopping"
  exit 1
fi

echo "== CUDA tests (log: $OUT/test_cuda.log)"
# A test still running after 60 s gets every thread's stack dumped into the
# log, so a hang names its test; with pytest-timeout (the GPU image has it)
# one running past 120 s also ends the run there, not at the 300 s limit.
HANG_ARGS=(-o faulthandler_timeout=60)
$PYTHON -c "import pytest_timeout" 2>/dev/null && HANG_ARGS+=(--timeout=120 --timeout-method=thread)
timeout 300 $PYTHON -m pytest -q --maxfail=10 -p no:cacheprovider --durations=5 \
  "${HANG_ARGS[@]}" tests/test_cuda_*.py \
  >"$OUT/test_cuda.log" 2>&1 || status=1
tail -12 "$OUT/test_cuda.log"

# The CPU suite also runs in CI; SKIP_CPU_TESTS=1 saves GPU minutes.
if [[ -z "${SKIP_CPU_TESTS:-}" ]]; then
  echo "== CPU tests (log: $OUT/test_cpu.log)"
  timeout 300 $PYTHON -m pytest -q --maxfail=10 -p no:cacheprovider tests \
    $(for f in tests/test_cuda_*.py; do echo --ignore=$f; done) \
    >"$OUT/test_cpu.log" 2>&1 || status=1
  tail -5 "$OUT/test_cpu.log"
fi

echo "== tests status: $status (0 = all passed)"
if [[ -n "${E2E:-}" ]]; then
  echo "== end to end: bench_e2e.py $E2E (log: $OUT/e2e.log)"
  # shellcheck disable=SC2086  # E2E is a list of arguments
  timeout 600 $PYTHON benchmarks/bench_e2e.py $E2E --json "$OUT/e2e.json" >"$OUT/e2e.log" 2>&1 || status=1
  grep -v -i warn "$OUT/e2e.log" | tail -15
fi
[[ -n "${SKIP_BENCH:-}" ]] && exit $status  # SKIP_BENCH=1: build and tests only
echo "== GEMM benchmark (log: $OUT/bench_gemm.log)"
timeout 600 $PYTHON benchmarks/bench_gemm.py --json "$OUT/bench_gemm.json" "$@" 2>"$OUT/bench_gemm.log" \
  | tee "$OUT/bench_gemm_table.txt" || status=1
[[ -s "$OUT/bench_gemm_table.txt" ]] || { tail -20 "$OUT/bench_gemm.log"; status=1; }
exit $status
