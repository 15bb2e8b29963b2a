// The decode GEMM path (any architecture, M <= 16 when picked automatically),
// and the decode w4a4_linear: the quantize kernel, then the decode GEMM as its
// programmatic dependent.
#include "cuda/gemm_decode.cuh"

namespace apex4::cuda {
namespace {

// Blocks of the decode GEMM: decode::kBlocksPerSm per SM, each walking row
// tiles, so that its ring runs on from one tile into the next.
cudaError_t decode_row_blocks(int* blocks) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  *blocks = decode::kBlocksPerSm * sms;
  return err;
}

}  // namespace

cudaError_t launch_gemm_decode(const GemmParams& p, cudaStream_t stream) {
  int blocks = 0;
  const cudaError_t err = decode_row_blocks(&blocks);
  if (err != cudaSuccess) return err;
  return launch_gemm_decode_for(p, blocks, false, stream);
}

cudaError_t launch_linear_decode(const GemmParams& p, const void* x, FloatKind x_kind, int64_t k,
                                 float clip_ratio, cudaStream_t stream) {
  int blocks = 0;
  cudaError_t err = decode_row_blocks(&blocks);
  if (err != cudaSuccess) return err;
  err = launch_quantize(x, x_kind, p.m, k, p.kp, p.kp / p.groups, clip_ratio,
                        const_cast<uint8_t*>(p.a), const_cast<float*>(p.a_scale),
                        /*programmatic=*/false, stream);
  if (err != cudaSuccess) return err;
  // Programmatic where the kernel has griddepcontrol (launch_kernel decides).
  return launch_gemm_decode_for(p, blocks, true, stream);
}

}  // namespace apex4::cuda
