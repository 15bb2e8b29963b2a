// The sm90mma GEMM path: INT4 unpacked to INT8 in registers (mma m16n8k32 s8),
// for compute capability 9.x+ without wgmma.
#include "cuda/gemm_tiled.cuh"

namespace apex4::cuda {

cudaError_t launch_gemm_tiled_int8(const GemmParams& p, cudaStream_t stream) {
  return launch_gemm_tiled<Int8Mma>(p, stream);
}

}  // namespace apex4::cuda
