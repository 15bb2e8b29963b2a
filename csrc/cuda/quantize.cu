// Host launchers of quantize.cuh's kernels, and the elementwise pack_int4 /
// unpack_int4 kernels.
#include "cuda/quantize.cuh"

namespace apex4::cuda {

__global__ void pack_int4_kernel(const int8_t* values, int64_t n_bytes, uint8_t* packed) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n_bytes;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    packed[j] = pack_pair(values[2 * j], values[2 * j + 1]);
  }
}

__global__ void unpack_int4_kernel(const uint8_t* packed, int64_t n_bytes, int8_t* values) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n_bytes;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint8_t b = packed[j];
    values[2 * j] = static_cast<int8_t>(unpack_lo(b));
    values[2 * j + 1] = static_cast<int8_t>(unpack_hi(b));
  }
}

// Enough blocks to fill any current GPU; the kernels stride over the rest.
inline unsigned elementwise_blocks(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 8192 ? blocks : 8192);
}

cudaError_t launch_quantize(const void* x, FloatKind x_kind, int64_t rows, int64_t k, int64_t kp,
                            int64_t group_len, float clip_ratio, uint8_t* packed, float* scales,
                            bool programmatic, cudaStream_t stream) {
  // x's writer is most often the kernel right before (a norm, an activation),
  // and the launch gap after it is a good part of a decode step's small
  // kernels: programmatic where the kernel can wait (launch_kernel decides).
  switch (x_kind) {
    case FloatKind::kF16:
      return launch_quantize_typed(static_cast<const __half*>(x), rows, k, kp, group_len,
                                   clip_ratio, packed, scales, programmatic, stream);
    case FloatKind::kBF16:
      return launch_quantize_typed(static_cast<const __nv_bfloat16*>(x), rows, k, kp, group_len,
                                   clip_ratio, packed, scales, programmatic, stream);
    default:
      return launch_quantize_typed(static_cast<const float*>(x), rows, k, kp, group_len,
                                   clip_ratio, packed, scales, programmatic, stream);
  }
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
