#!/usr/bin/env bash
# Compiles every CUDA translation unit under csrc/cuda for sm_80, sm_89 and
# sm_90a (object files only; no GPU needed), with the flags setup.py and
# torch.utils.cpp_extension use, and builds the standalone kernel test
# (csrc/cuda/tests/kernel_test.cu) into build/cuda_kernel_test and the
# timing program (csrc/cuda/tests/gemm_timing.cu) into build/gemm_timing.
#
#   csrc/cuda/compile_check.sh            # compile; fail on any error or spill
#   csrc/cuda/compile_check.sh --verbose  # also print ptxas register/smem use
#
# Works on a CPU-only machine: the CPU torch wheel ships the c10/cuda headers
# ops_cuda.cu needs, though not the CMake-generated cuda_cmake_macros.h
# (which only sets Windows export macros), hence C10_CUDA_NO_CMAKE_CONFIGURE_FILE.
set -euo pipefail
cd "$(dirname "$0")/../.."

NVCC=${NVCC:-nvcc}
PYTHON=${PYTHON:-python3}
VERBOSE=0
[[ "${1:-}" == "--verbose" ]] && VERBOSE=1

TORCH_INCLUDES=$($PYTHON -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
PYTHON_INCLUDE=$($PYTHON -c "import sysconfig; print(sysconfig.get_paths()['include'])")
ARCHS=(-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_89,code=sm_89
       -gencode=arch=compute_90a,code=sm_90a)
# setup.py's nvcc flags plus the ones torch.utils.cpp_extension adds.
FLAGS=(-O3 -std=c++17 --expt-relaxed-constexpr -lineinfo -Icsrc/include -Icsrc
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       -Xcompiler -fPIC -Xptxas -v --threads 0)
TORCH_FLAGS=($TORCH_INCLUDES -I"$PYTHON_INCLUDE" -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
             -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C)

OUT=build/cuda_compile_check
mkdir -p "$OUT"
status=0

check_log() {  # $1: log file; fails on spills, prints ptxas use if verbose
  if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$1" >/dev/null; then
    echo "FAIL: register spills in $1:"; grep -B2 -E "[1-9][0-9]* bytes spill" "$1"; status=1
  fi
  if [[ $VERBOSE == 1 ]]; then
    grep -E "Compiling entry|Used [0-9]+ registers|spill" "$1" |
      sed -E 's/ptxas info *: //; s/Compiling entry function .(_Z[^ ]*). for .(sm_[0-9a]+)./\2 \1/' |
      ( command -v c++filt >/dev/null && c++filt || cat ) || true
  fi
}

for src in csrc/cuda/*.cu; do
  name=$(basename "$src" .cu)
  extra=()
  [[ "$name" == ops_cuda ]] && extra=("${TORCH_FLAGS[@]}")
  echo "== $src"
  if ! $NVCC "${FLAGS[@]}" "${extra[@]}" "${ARCHS[@]}" -c "$src" -o "$OUT/$name.o" \
      >"$OUT/$name.log" 2>&1; then
    cat "$OUT/$name.log"; status=1; continue
  fi
  check_log "$OUT/$name.log"
done

echo "== csrc/cuda/tests/kernel_test.cu (standalone, linked with the torch-free kernels)"
kernel_srcs=()
for src in csrc/cuda/*.cu; do [[ "$(basename "$src")" != ops_cuda.cu ]] && kernel_srcs+=("$src"); done
if ! $NVCC "${FLAGS[@]}" "${ARCHS[@]}" csrc/cuda/tests/kernel_test.cu "${kernel_srcs[@]}" \
    -o build/cuda_kernel_test >"$OUT/kernel_test.log" 2>&1; then
  cat "$OUT/kernel_test.log"; status=1
else
  check_log "$OUT/kernel_test.log"
fi

# The torch-free timing program is Hopper-only (wgmma).
echo "== csrc/cuda/tests/gemm_timing.cu (sm_90a)"
if ! $NVCC "${FLAGS[@]}" -gencode=arch=compute_90a,code=sm_90a csrc/cuda/tests/gemm_timing.cu \
    csrc/cuda/gemm_wgmma.cu csrc/cuda/gemm_tiled_int8.cu csrc/cuda/gemm_decode.cu \
    csrc/cuda/quantize.cu -o build/gemm_timing >"$OUT/gemm_timing.log" 2>&1; then
  cat "$OUT/gemm_timing.log"; status=1
else
  check_log "$OUT/gemm_timing.log"
fi

[[ $status == 0 ]] && echo "compile check passed: ${#kernel_srcs[@]} kernel units + ops_cuda.cu + kernel_test for sm_80, sm_89, sm_90a; gemm_timing for sm_90a"
exit $status
