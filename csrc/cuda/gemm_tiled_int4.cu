// The sm_80/86/89 GEMM path: INT4 tensor cores (mma m16n8k64 s4).
#include "cuda/gemm_tiled.cuh"

namespace apex4::cuda {

cudaError_t launch_gemm_tiled_int4(const GemmParams& p, cudaStream_t stream) {
  return launch_gemm_tiled<Int4Mma>(p, stream);
}

}  // namespace apex4::cuda
