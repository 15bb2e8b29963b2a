#!/usr/bin/env bash
# One device call (prepared, not yet run). Most wanted first, so that what
# finishes before the call's limit comes back:
#  * `gemm_timing chain`: the quantize kernel launched plainly, as a
#    programmatic dependent of x's writer (landed), or one that also releases
#    its GEMM before it waits, in a graph of 8 7B-shaped layers' decode
#    linears;
#  * `gemm_timing decode`, landed kernel (build/next2) against the
#    resident-token candidate (resident_tokens.patch, build/cand) and a probe
#    with 2 KB ring stages (stage_2k_probe.patch, build/probe2k: M = 1 cells
#    only; its M = 16 ring is starved by design), twice each;
#  * kernel_test of the candidate and of the landed tree, `gemm_timing rows`
#    (16- against 32-row tiles at M = 16, 8 shapes) of both;
#  * unless SHORT=1: the decode grid under CUDA graphs (with the copy column),
#    then the end to end (per channel) if 240 s of LIMIT are left, else the
#    CUDA tests.
#   run(command="LIMIT=540 bash benchmarks/pending/run_next.sh", timeout_s=570,
#       carry=["build/next2", "build/cand", "build/probe2k"])
# Prebuild here to save ~2 min there: `BUILD_ONLY=1 bash benchmarks/pending/run_next.sh`.
set -uo pipefail
cd "$(dirname "$0")/../.."
export CXX=/usr/bin/g++ PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
LIMIT=${LIMIT:-540}
B=build/next2 C=build/cand P=build/probe2k
NV="nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a"
build_tools() {  # $1: folder, then -I flags
  local dir=$1; shift
  mkdir -p "$dir"
  [[ -x $dir/kernel_test ]] || $NV "$@" csrc/cuda/tests/kernel_test.cu \
    $(ls csrc/cuda/*.cu | grep -v ops_cuda.cu) -o "$dir/kernel_test" &
  [[ -x $dir/gemm_timing ]] || $NV "$@" csrc/cuda/tests/gemm_timing.cu csrc/cuda/gemm_wgmma.cu \
    csrc/cuda/gemm_tiled_int8.cu csrc/cuda/gemm_decode.cu csrc/cuda/quantize.cu \
    -o "$dir/gemm_timing" &
}
# A candidate: the tree's gemm_decode.cuh with a patch, in its own folder,
# found ahead of csrc by -I.
build_candidate() {  # $1: folder, $2: patch
  if [[ ! -f $1/cuda/gemm_decode.cuh ]]; then
    mkdir -p "$1/cuda" && cp csrc/cuda/gemm_decode.cuh "$1/cuda/" \
      && patch -s -p2 -d "$1" < "$2" || exit 1
  fi
  build_tools "$1" -I"$1" -Icsrc/include -Icsrc
}
build_tools $B -Icsrc/include -Icsrc
build_candidate $C benchmarks/pending/resident_tokens.patch
build_candidate $P benchmarks/pending/stage_2k_probe.patch
wait
[[ ${BUILD_ONLY:-0} == 1 ]] && exit 0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total --format=csv,noheader
if [[ ${SHORT:-0} != 1 ]]; then
  (TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=10 timeout 300 python3 setup.py build_ext --inplace \
    && python3 setup.py -q egg_info) >/tmp/build.log 2>&1 & build=$!
fi
T="$OUT/gemm_timing.txt"
for run in "$B gemm_timing chain" "$B gemm_timing decode" "$C gemm_timing decode" \
           "$P gemm_timing decode" "$C kernel_test" "$B gemm_timing decode" \
           "$C gemm_timing decode" "$P gemm_timing decode" "$C gemm_timing rows" \
           "$B kernel_test" "$B gemm_timing rows"; do
  set -- $run
  if [[ $2 == kernel_test ]]; then
    log="$OUT/kernel_test_$([[ $1 == "$C" ]] && echo cand || echo base).log"
    timeout 90 "$1/kernel_test" >"$log" 2>&1
    echo "$run rc $?: $(grep -E 'passed' "$log" | tail -1) at ${SECONDS}s"
    grep -i -m5 "fail" "$log"
  else
    echo "### $run" >>"$T"; timeout 40 "$1/$2" "$3" >>"$T" 2>&1
    echo "$run rc $? at ${SECONDS}s"
  fi
done
grep -E "###|programmatic|plain|rows(16|32)|decode (pc|g128)|mismatch" "$T"
[[ ${SHORT:-0} == 1 ]] && exit 0
wait $build; echo "build rc $? at ${SECONDS}s"; tail -1 /tmp/build.log
left=$((LIMIT - SECONDS - 5)); ((left > 90)) && left=90
timeout $left python3 benchmarks/bench_gemm.py --tokens 1 16 --granularities pc g128 --cuda-graph \
  --json "$OUT/bench_decode_graph.json" >"$OUT/bench_decode_graph.txt" 2>&1
echo "bench rc $? at ${SECONDS}s"; grep -v "K=\|unsupported" "$OUT/bench_decode_graph.txt" | tail -15
left=$((LIMIT - SECONDS - 5))
if ((left >= 240)); then
  echo "e2e with ${left}s"
  timeout $left python3 benchmarks/bench_e2e.py --granularity pc --profile 8 \
    --json "$OUT/bench_e2e.json" >"$OUT/bench_e2e.txt" 2>&1
  echo "e2e rc $? at ${SECONDS}s"; grep -v -i warn "$OUT/bench_e2e.txt" | tail -8
else
  timeout $left python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_*.py >"$OUT/pytest_cuda.log" 2>&1
  echo "pytest rc $? (${left}s): $(tail -1 "$OUT/pytest_cuda.log")  at ${SECONDS}s"
fi
