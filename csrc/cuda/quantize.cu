// Host launchers of quantize.cuh's kernels.
#include "cuda/quantize.cuh"

namespace apex4::cuda {

cudaError_t launch_quantize(const void* x, FloatKind x_kind, int64_t rows, int64_t k, int64_t kp,
                            int64_t group_len, float clip_ratio, uint8_t* packed, float* scales,
                            cudaStream_t stream) {
  switch (x_kind) {
    case FloatKind::kF16:
      launch_quantize_typed(static_cast<const __half*>(x), rows, k, kp, group_len, clip_ratio,
                            packed, scales, stream);
      break;
    case FloatKind::kBF16:
      launch_quantize_typed(static_cast<const __nv_bfloat16*>(x), rows, k, kp, group_len,
                            clip_ratio, packed, scales, stream);
      break;
    default:
      launch_quantize_typed(static_cast<const float*>(x), rows, k, kp, group_len, clip_ratio,
                            packed, scales, stream);
  }
  return cudaSuccess;
}

cudaError_t launch_pack_int4(const int8_t* values, int64_t n_bytes, uint8_t* packed,
                             cudaStream_t stream) {
  constexpr int kThreads = 256;
  pack_int4_kernel<<<elementwise_blocks(n_bytes, kThreads), kThreads, 0, stream>>>(values, n_bytes,
                                                                                  packed);
  return cudaSuccess;
}

cudaError_t launch_unpack_int4(const uint8_t* packed, int64_t n_bytes, int8_t* values,
                               cudaStream_t stream) {
  constexpr int kThreads = 256;
  unpack_int4_kernel<<<elementwise_blocks(n_bytes, kThreads), kThreads, 0, stream>>>(
      packed, n_bytes, values);
  return cudaSuccess;
}

}  // namespace apex4::cuda
