// The decode GEMM path (any architecture, M <= 16 when picked automatically),
// and the fused decode w4a4_linear.
#include "cuda/gemm_decode.cuh"

namespace apex4::cuda {

cudaError_t launch_gemm_decode(const GemmParams& p, cudaStream_t stream) {
  const PackedActivations activations{p.a, p.a_scale, p.kp / 2, p.groups, 0};
  return launch_gemm_decode_for(p, activations, 0, 0, stream);
}

template <typename T>
cudaError_t launch_linear_decode_typed(const GemmParams& p, const T* x, int64_t k,
                                       float clip_ratio, cudaStream_t stream) {
  using Activations = QuantizingActivations<T>;
  const bool staged = Activations::can_stage(k, reinterpret_cast<uintptr_t>(x));
  const Activations activations{x,       k,       p.kp,    p.kp / p.groups, clip_ratio, staged,
                                nullptr, nullptr, nullptr, p.groups};
  const size_t smem = static_cast<size_t>(Activations::smem_bytes(p.m, k, p.kp, p.groups, staged));
  // Two blocks per SM, each walking several row tiles: x is quantized once per
  // block rather than once per 16 weight rows.
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (err != cudaSuccess) return err;
  return launch_gemm_decode_for(p, activations, smem, 2 * sms, stream);
}

cudaError_t launch_linear_decode(const GemmParams& p, const void* x, FloatKind x_kind, int64_t k,
                                 float clip_ratio, cudaStream_t stream) {
  switch (x_kind) {
    case FloatKind::kF16:
      return launch_linear_decode_typed(p, static_cast<const __half*>(x), k, clip_ratio, stream);
    case FloatKind::kBF16:
      return launch_linear_decode_typed(p, static_cast<const __nv_bfloat16*>(x), k, clip_ratio,
                                        stream);
    default:
      return launch_linear_decode_typed(p, static_cast<const float*>(x), k, clip_ratio, stream);
  }
}

}  // namespace apex4::cuda
