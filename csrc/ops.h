// Per-backend implementations of the apex4 ops. Each backend's binding file
// (csrc/cpu/ops_cpu.cpp, csrc/cuda/ops_cuda.cu) defines these for its device
// and registers them with TORCH_LIBRARY_IMPL; the schemas live in csrc/ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace apex4 {

// quantize_act and quantize_weight share one implementation per backend.
using QuantizeFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& x,
                                                      std::optional<int64_t> group_size,
                                                      double clip_ratio);
using RotatedQuantizeFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& x,
                                                             const at::Tensor& factor,
                                                             std::optional<int64_t> group_size,
                                                             double clip_ratio);
using GemmFn = at::Tensor(const at::Tensor& a_q, const at::Tensor& a_s, const at::Tensor& w_q,
                          const at::Tensor& w_s, const std::optional<at::Tensor>& bias,
                          std::optional<at::ScalarType> out_dtype,
                          const std::optional<at::Tensor>& prefetch);

}  // namespace apex4
