#!/usr/bin/env bash
# One device call (prepared): the tables of record after the decode launcher's
# 2 KB stages and 32-row tile rule landed, and what limits the decode kernel:
#  * kernel_test (sm_90a), and a mutant of it with the decode pair's
#    quantizer programmatic and releasing first (its weight-writer test must
#    fail); `gemm_timing stages` (1-4 KB stages, 2 or 1 blocks per SM,
#    forced) and `chain` (the pair against one kernel after the other);
#  * the extension (9.0a); the end to end per channel (prefill, decode b1
#    and b16, with a profile); then, as time allows, the CUDA tests, ncu of
#    the decode kernel at 7B up (4096->11008, M = 1 and 16) and 4096^2
#    (M = 1), and the eager GEMM grid (pc and g128: the cost-model check's
#    input). At most 8 files come back.
#   run(command="LIMIT=550 bash benchmarks/pending/run_next.sh", timeout_s=580,
#       carry=["build/next4"])
# Prebuild here: `BUILD_ONLY=1 bash benchmarks/pending/run_next.sh` (~1.5 min).
set -uo pipefail
cd "$(dirname "$0")/../.."
export CXX=/usr/bin/g++ PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
LIMIT=${LIMIT:-550}
B=build/next4
NV="nvcc -O3 -std=c++17 --expt-relaxed-constexpr -Icsrc/include -Icsrc -gencode=arch=compute_90a,code=sm_90a"
mkdir -p $B
[[ -x $B/kernel_test ]] || $NV csrc/cuda/tests/kernel_test.cu \
  $(ls csrc/cuda/*.cu | grep -v ops_cuda.cu) -o $B/kernel_test &
[[ -x $B/gemm_timing ]] || $NV csrc/cuda/tests/gemm_timing.cu csrc/cuda/gemm_wgmma.cu \
  csrc/cuda/gemm_tiled_int8.cu csrc/cuda/gemm_decode.cu csrc/cuda/quantize.cu -o $B/gemm_timing &
if [[ ! -x $B/kernel_test_mutant ]]; then
  M=$B/mutant && mkdir -p $M/cuda && cp csrc/cuda/quantize.cuh $M/cuda/ && cp csrc/cuda/gemm_decode.cu $M/
  python3 - "$M" <<'PY'
import sys
def swap(path, old, new):
    s = open(path).read()
    assert old in s, (path, old)
    open(path, "w").write(s.replace(old, new))
swap(sys.argv[1] + "/cuda/quantize.cuh", "  wait_for_prerequisite();\n  release_dependents();",
     "  release_dependents();\n  wait_for_prerequisite();")
swap(sys.argv[1] + "/gemm_decode.cu", "/*programmatic=*/false", "/*programmatic=*/true")
PY
  $NV -I$M csrc/cuda/tests/kernel_test.cu $(ls csrc/cuda/*.cu | grep -v "ops_cuda.cu\|gemm_decode.cu") \
    $M/gemm_decode.cu -o $B/kernel_test_mutant &
fi
wait
[[ ${BUILD_ONLY:-0} == 1 ]] && exit 0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv,noheader
(TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=12 timeout 300 python3 setup.py build_ext --inplace \
  && python3 setup.py -q egg_info) >/tmp/build.log 2>&1 & build=$!
timeout 90 $B/kernel_test >"$OUT/kernel_test.log" 2>&1
echo "kernel_test rc $?: $(grep -E 'passed' "$OUT/kernel_test.log") at ${SECONDS}s"
grep -i "fail" "$OUT/kernel_test.log" | head -5
# The mutant (v16): the pair's quantizer programmatic and releasing its GEMM
# before it waits; the weight-writer test must fail there, and only it.
timeout 90 $B/kernel_test_mutant >/tmp/mutant.log 2>&1
echo "mutant rc $?: $(grep -E 'passed' /tmp/mutant.log)"; grep -i "fail" /tmp/mutant.log | head -5
{ echo "== mutant"; grep -iE "fail|passed" /tmp/mutant.log; } >>"$OUT/kernel_test.log"
timeout 60 $B/gemm_timing stages chain >"$OUT/gemm_timing.txt" 2>&1
echo "gemm_timing stages chain rc $? at ${SECONDS}s"; grep -E "one after|paired|mismatch" "$OUT/gemm_timing.txt"
wait $build; echo "build rc $? at ${SECONDS}s"; tail -1 /tmp/build.log
timeout 320 python3 benchmarks/bench_e2e.py --granularity pc --profile 8 \
  --json "$OUT/bench_e2e.json" >"$OUT/bench_e2e.txt" 2>&1
echo "e2e rc $? at ${SECONDS}s"; grep -v -i warn "$OUT/bench_e2e.txt" | tail -7
if ((LIMIT - SECONDS > 70)); then
  timeout $((LIMIT - SECONDS - 5)) python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_*.py \
    >"$OUT/pytest_cuda.log" 2>&1
  echo "pytest rc $?: $(tail -1 "$OUT/pytest_cuda.log") at ${SECONDS}s"
fi
if ((LIMIT - SECONDS > 40)); then
  timeout $((LIMIT - SECONDS - 5)) ncu --clock-control none -k regex:gemm_decode \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section LaunchStats --section Occupancy python3 benchmarks/profile_kernels.py \
    1,4096,11008 16,4096,11008 1,4096,4096 >"$OUT/ncu_decode.txt" 2>&1
  echo "ncu rc $? at ${SECONDS}s"
fi
if ((LIMIT - SECONDS > 150)); then
  timeout $((LIMIT - SECONDS - 5)) python3 benchmarks/bench_gemm.py --granularities pc g128 \
    --json "$OUT/bench_gemm.json" >"$OUT/bench_gemm_table.txt" 2>/tmp/bench_gemm.log
  echo "grid rc $? at ${SECONDS}s"
fi
