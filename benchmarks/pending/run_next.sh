#!/usr/bin/env bash
# One device call (prepared): the decode launcher's 2 KB stages and 32-row
# tile rule and the quantizer's release-first, as landed, measured:
#  * kernel_test (sm_90a), gemm_timing decode / stages / rows / chain;
#  * the extension (9.0a) and the CUDA tests;
#  * kernel_test built as compute_80 PTX, JIT-compiled here: the decode
#    kernel's cp.async ring (the Ampere/Ada path) with 1 and 2 KB stages;
#  * the decode grid under CUDA graphs (copy column), then the per-channel
#    decode end to end with a profile if 200 s of LIMIT are left.
#   run(command="LIMIT=540 bash benchmarks/pending/run_next.sh", timeout_s=570,
#       carry=["build/next3"])
# Prebuild here: `BUILD_ONLY=1 bash benchmarks/pending/run_next.sh` (~3 min).
set -uo pipefail
cd "$(dirname "$0")/../.."
export CXX=/usr/bin/g++ PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
LIMIT=${LIMIT:-540}
B=build/next3
NV="nvcc -O3 -std=c++17 --expt-relaxed-constexpr -Icsrc/include -Icsrc"
KERNELS=$(ls csrc/cuda/*.cu | grep -v ops_cuda.cu)
mkdir -p $B
[[ -x $B/kernel_test ]] || $NV -gencode=arch=compute_90a,code=sm_90a \
  csrc/cuda/tests/kernel_test.cu $KERNELS -o $B/kernel_test &
[[ -x $B/kernel_test80 ]] || $NV -gencode=arch=compute_80,code=compute_80 \
  csrc/cuda/tests/kernel_test.cu $KERNELS -o $B/kernel_test80 &
[[ -x $B/gemm_timing ]] || $NV -gencode=arch=compute_90a,code=sm_90a csrc/cuda/tests/gemm_timing.cu \
  csrc/cuda/gemm_wgmma.cu csrc/cuda/gemm_tiled_int8.cu csrc/cuda/gemm_decode.cu \
  csrc/cuda/quantize.cu -o $B/gemm_timing &
wait
[[ ${BUILD_ONLY:-0} == 1 ]] && exit 0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total --format=csv,noheader
(TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=12 timeout 300 python3 setup.py build_ext --inplace \
  && python3 setup.py -q egg_info) >/tmp/build.log 2>&1 & build=$!
timeout 90 $B/kernel_test >"$OUT/kernel_test.log" 2>&1
echo "kernel_test rc $?: $(grep -E 'passed|built for' "$OUT/kernel_test.log" | tr '\n' ' ') at ${SECONDS}s"
T="$OUT/gemm_timing.txt"
for part in decode stages rows chain; do
  echo "### $part" >>"$T"; timeout 60 $B/gemm_timing $part >>"$T" 2>&1
  echo "gemm_timing $part rc $? at ${SECONDS}s"
done
grep -E "programmatic|plain|mismatch" "$T"
wait $build; echo "build rc $? at ${SECONDS}s"; tail -1 /tmp/build.log
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_*.py >"$OUT/pytest_cuda.log" 2>&1
echo "pytest rc $?: $(tail -1 "$OUT/pytest_cuda.log") at ${SECONDS}s"
timeout 120 $B/kernel_test80 >"$OUT/kernel_test80.log" 2>&1
echo "kernel_test80 rc $?: $(grep -E 'passed|built for' "$OUT/kernel_test80.log" | tr '\n' ' ') at ${SECONDS}s"
grep -i -m5 "fail" "$OUT"/kernel_test*.log
timeout 60 python3 benchmarks/bench_gemm.py --tokens 1 16 --granularities pc g128 --cuda-graph \
  --json "$OUT/bench_decode_graph.json" >"$OUT/bench_decode_graph.txt" 2>&1
echo "bench rc $? at ${SECONDS}s"; grep -v "K=\|unsupported" "$OUT/bench_decode_graph.txt" | tail -15
left=$((LIMIT - SECONDS - 5))
if ((left >= 200)); then
  timeout $left python3 benchmarks/bench_e2e.py --granularity pc --prefill 0 --profile 8 \
    --json "$OUT/bench_e2e.json" >"$OUT/bench_e2e.txt" 2>&1
  echo "e2e rc $? at ${SECONDS}s"; grep -v -i warn "$OUT/bench_e2e.txt" | grep -v "^node\|^w4a4_lin\|^attn_o\|^down" | tail -40
fi
