#!/usr/bin/env bash
# One device call for the unmeasured m16x2 decode candidate (m16x2.patch: the
# decode header and its tests, applied to a copy of the tree in /tmp/cand)
# against the landed kernel (this tree):
#   run(command="LIMIT=570 bash benchmarks/pending/run_m16x2.sh", timeout_s=595)
# (carry=["build/next"] if its binaries were prebuilt from this tree and the
# patch: saves ~1 min; otherwise they are built here.)
# kernel_test of the candidate and `gemm_timing decode` base/cand twice while
# both extensions build; the verdict (compare_decode.py) keeps the candidate
# only if kernel_test passes and its M = 16 cells on N = 11008 / 28672 total
# under 0.98x; then the CUDA tests, the decode grid under CUDA graphs and the
# end to end on the kept one, with what is left of LIMIT seconds.
set -uo pipefail
cd "$(dirname "$0")/../.."
export CXX=/usr/bin/g++ PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT" build/next
LIMIT=${LIMIT:-570}
PENDING=benchmarks/pending
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total --format=csv,noheader
rm -rf /tmp/cand && mkdir /tmp/cand && tar --exclude=./build --exclude=./.git -cf - . | tar -xf - -C /tmp/cand
(cd /tmp/cand && { patch -s -p1 || git apply; } <$OLDPWD/$PENDING/m16x2.patch) || { echo "cand: patch failed"; exit 1; }
build() { (cd "$1" && TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=5 timeout 300 python3 setup.py build_ext --inplace \
  && python3 setup.py -q egg_info) >"$2" 2>&1; }
build /tmp/cand /tmp/build_cand.log & b_cand=$!
build "$PWD" /tmp/build_base.log & b_base=$!
NV="nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a"
TIMING="csrc/cuda/tests/gemm_timing.cu csrc/cuda/gemm_wgmma.cu csrc/cuda/gemm_tiled_int8.cu csrc/cuda/gemm_decode.cu csrc/cuda/quantize.cu"
nv_jobs=()
[[ -x build/next/kernel_test_cand ]] || { (cd /tmp/cand && $NV -Icsrc/include -Icsrc csrc/cuda/tests/kernel_test.cu \
  $(ls csrc/cuda/*.cu | grep -v ops_cuda.cu) -o $OLDPWD/build/next/kernel_test_cand) & nv_jobs+=($!); }
[[ -x build/next/gemm_timing_cand ]] || { $NV -I/tmp/cand/csrc -Icsrc/include -Icsrc $TIMING -o build/next/gemm_timing_cand & nv_jobs+=($!); }
[[ -x build/next/gemm_timing_base ]] || { $NV -Icsrc/include -Icsrc $TIMING -o build/next/gemm_timing_base & nv_jobs+=($!); }
for job in "${nv_jobs[@]}"; do wait "$job" || echo "an nvcc build failed"; done
echo "binaries at ${SECONDS}s"
timeout 120 build/next/kernel_test_cand >"$OUT/kernel_test.log" 2>&1; kt=$?
grep -E "FAILED|passed" "$OUT/kernel_test.log" | tail -8; echo "kernel_test rc $kt"
{ for r in 1 2; do
  echo "### base run $r"; timeout 100 build/next/gemm_timing_base decode
  echo "### cand run $r"; timeout 100 build/next/gemm_timing_cand decode
done; } >"$OUT/gemm_timing_decode_base_cand.txt" 2>&1
python3 $PENDING/compare_decode.py "$OUT/gemm_timing_decode_base_cand.txt" $kt | tee "$OUT/verdict.txt"
keep=$(tail -1 "$OUT/verdict.txt")
wait $b_cand; rc_c=$?; wait $b_base; rc_b=$?
echo "builds: cand $rc_c base $rc_b; keep=$keep; at ${SECONDS}s"
if [[ $keep == cand ]]; then cd /tmp/cand; export PYTHONPATH=$PWD; tail -3 /tmp/build_cand.log; else tail -3 /tmp/build_base.log; fi
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_*.py >"$OUT/pytest_cuda.log" 2>&1
echo "pytest rc $?: $(tail -1 "$OUT/pytest_cuda.log")  at ${SECONDS}s"
timeout 150 python3 benchmarks/bench_gemm.py --tokens 1 16 --granularities pc g128 --cuda-graph \
  --json "$OUT/bench_decode_graph.json" >"$OUT/bench_decode_graph.txt" 2>&1
echo "bench rc $? at ${SECONDS}s"; tail -20 "$OUT/bench_decode_graph.txt"
left=$((LIMIT - SECONDS - 5))
echo "e2e with ${left}s"
timeout $left python3 benchmarks/bench_e2e.py --granularity pc g128 --profile 8 \
  --json "$OUT/bench_e2e.json" >"$OUT/bench_e2e.txt" 2>&1
echo "e2e rc $? at ${SECONDS}s"; grep -v -i warn "$OUT/bench_e2e.txt" | tail -25
