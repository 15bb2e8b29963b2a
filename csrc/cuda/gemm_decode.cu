// The decode GEMM path (any architecture, M <= 16 when picked automatically).
#include "cuda/gemm_decode.cuh"

namespace apex4::cuda {

cudaError_t launch_gemm_decode(const GemmParams& p, cudaStream_t stream) {
  const bool one_tile = p.m <= 8;
  if (p.groups == 1) {
    one_tile ? launch_gemm_decode_shape<1, false>(p, stream) : launch_gemm_decode_shape<2, false>(p, stream);
  } else {
    one_tile ? launch_gemm_decode_shape<1, true>(p, stream) : launch_gemm_decode_shape<2, true>(p, stream);
  }
  return cudaSuccess;
}

}  // namespace apex4::cuda
