#!/usr/bin/env bash
# One device call (not yet run): the decode kernel's row-group choice
# (`gemm_timing rows`: 16- against 32-row tiles at M = 16 on 8 shapes, among
# them the fused 7B q/k/v and gate/up and the 70B ones), kernel_test with the
# two-row-group cases at N = 19000..20000, then the CUDA tests, the decode grid
# under CUDA graphs and the end to end, with what is left of LIMIT seconds.
#   run(command="LIMIT=570 bash benchmarks/pending/run_rows.sh", timeout_s=595)
# (carry=["build/next2"] if kernel_test and gemm_timing were prebuilt there
# from this tree with nvcc: saves ~1 min; otherwise they are built here.)
set -uo pipefail
cd "$(dirname "$0")/../.."
export CXX=/usr/bin/g++ PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT" build/next2
LIMIT=${LIMIT:-570}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total --format=csv,noheader
(TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=10 timeout 300 python3 setup.py build_ext --inplace \
  && python3 setup.py -q egg_info) >/tmp/build.log 2>&1 & build=$!
NV="nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -Icsrc/include -Icsrc"
nv_jobs=()
[[ -x build/next2/kernel_test ]] || { $NV csrc/cuda/tests/kernel_test.cu \
  $(ls csrc/cuda/*.cu | grep -v ops_cuda.cu) -o build/next2/kernel_test & nv_jobs+=($!); }
[[ -x build/next2/gemm_timing ]] || { $NV csrc/cuda/tests/gemm_timing.cu csrc/cuda/gemm_wgmma.cu \
  csrc/cuda/gemm_tiled_int8.cu csrc/cuda/gemm_decode.cu csrc/cuda/quantize.cu \
  -o build/next2/gemm_timing & nv_jobs+=($!); }
for job in "${nv_jobs[@]}"; do wait "$job" || echo "an nvcc build failed"; done
timeout 60 build/next2/gemm_timing rows >"$OUT/gemm_timing_rows.txt" 2>&1
echo "gemm_timing rows rc $? at ${SECONDS}s"; cat "$OUT/gemm_timing_rows.txt"
timeout 120 build/next2/kernel_test >"$OUT/kernel_test.log" 2>&1
echo "kernel_test rc $?: $(grep -E 'passed' "$OUT/kernel_test.log" | tail -1) at ${SECONDS}s"
wait $build; echo "build rc $? at ${SECONDS}s"; tail -1 /tmp/build.log
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_*.py >"$OUT/pytest_cuda.log" 2>&1
echo "pytest rc $?: $(tail -1 "$OUT/pytest_cuda.log")  at ${SECONDS}s"
timeout 90 python3 benchmarks/bench_gemm.py --tokens 1 16 --granularities pc g128 --cuda-graph \
  --json "$OUT/bench_decode_graph.json" >"$OUT/bench_decode_graph.txt" 2>&1
echo "bench rc $? at ${SECONDS}s"; grep -v "K=\|unsupported" "$OUT/bench_decode_graph.txt" | tail -15
left=$((LIMIT - SECONDS - 5))
echo "e2e with ${left}s"
timeout $left python3 benchmarks/bench_e2e.py --granularity pc g128 --profile 8 \
  --json "$OUT/bench_e2e.json" >"$OUT/bench_e2e.txt" 2>&1
echo "e2e rc $? at ${SECONDS}s"; grep -v -i warn "$OUT/bench_e2e.txt" | tail -8
