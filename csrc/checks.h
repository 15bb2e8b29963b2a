// Argument validation shared by every backend's bindings (CPU and CUDA), so a
// bad call fails with the same message wherever it runs. Errors map to Python
// ValueError (TORCH_CHECK_VALUE) and TypeError (TORCH_CHECK_TYPE).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "apex4/int4.h"

namespace apex4 {

inline bool is_float_act(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat;
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "apex4: ", name, " is on ", t.device(),
                    " but the first input is on ", ref.device());
}

inline void check_group_size(std::optional<int64_t> group_size) {
  if (group_size.has_value()) {
    TORCH_CHECK_VALUE(*group_size > 0 && *group_size % kKAlign == 0,
                      "apex4: group_size must be a positive multiple of ", kKAlign,
                      " (or None for one group over all of K), got ", *group_size);
  }
}

struct QuantizeDims {
  int64_t rows, k, kp, groups, group_len;
};

inline QuantizeDims check_quantize_args(const at::Tensor& x, std::optional<int64_t> group_size,
                                        double clip_ratio) {
  TORCH_CHECK_TYPE(is_float_act(x.scalar_type()),
                   "apex4: quantize expects a float16, bfloat16 or float32 tensor, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, "apex4: quantize expects a tensor with a K dimension");
  TORCH_CHECK_VALUE(clip_ratio > 0.0 && clip_ratio <= 1.0,
                    "apex4: clip_ratio must be in (0, 1], got ", clip_ratio);
  check_group_size(group_size);
  const int64_t k = x.size(-1);
  TORCH_CHECK_VALUE(k > 0, "apex4: quantize expects K > 0");
  const int64_t g = group_size.value_or(0);
  QuantizeDims d;
  d.k = k;
  d.rows = x.numel() / k;
  d.kp = padded_k(k, g);
  d.groups = num_groups(k, g);
  d.group_len = d.kp / d.groups;
  return d;
}

// Packed outputs of a quantizer: [..., Kp/2] uint8 and [..., G] float32.
inline std::tuple<at::Tensor, at::Tensor> alloc_quantized(const at::Tensor& x,
                                                          const QuantizeDims& d) {
  auto packed_shape = x.sizes().vec();
  packed_shape.back() = d.kp / 2;
  auto scale_shape = x.sizes().vec();
  scale_shape.back() = d.groups;
  return {at::empty(packed_shape, x.options().dtype(at::kByte)),
          at::empty(scale_shape, x.options().dtype(at::kFloat))};
}

// An online rotation of n values is x @ kron(F, H_p / sqrt(p)) with F an
// m x m float32 factor and p = n / m a power of two. Returns m.
inline int64_t check_rotation(const at::Tensor& x, const at::Tensor& factor) {
  check_same_device(x, factor, "the rotation factor");
  TORCH_CHECK_TYPE(factor.scalar_type() == at::kFloat,
                   "apex4: the rotation factor must be float32, got ", factor.scalar_type());
  TORCH_CHECK_VALUE(factor.dim() == 2 && factor.size(0) == factor.size(1) && factor.size(0) > 0,
                    "apex4: the rotation factor must be a square matrix, got ", factor.sizes());
  const int64_t n = x.size(-1), m = factor.size(0);
  TORCH_CHECK_VALUE(n % m == 0 && ((n / m) & (n / m - 1)) == 0, "apex4: a rotation of ", n,
                    " values needs n / m to be a power of two, with m = ", m,
                    " the factor's size");
  return m;
}

// hadamard(x, factor): x a float tensor with a last dimension. Returns m.
inline int64_t check_hadamard_args(const at::Tensor& x, const at::Tensor& factor) {
  TORCH_CHECK_TYPE(is_float_act(x.scalar_type()),
                   "apex4: hadamard expects a float16, bfloat16 or float32 tensor, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, "apex4: hadamard expects a last dimension");
  return check_rotation(x, factor);
}

inline void check_packed(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kByte, "apex4: ", name,
                   " must be packed INT4 (uint8), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), "apex4: ", name, " must be contiguous");
}

inline void check_scales(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "apex4: ", name,
                   " must be float32 scales, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), "apex4: ", name, " must be contiguous");
}

struct GemmDims {
  int64_t m, n, kp, groups, group_len;
  at::ScalarType out_dtype;
};

inline GemmDims check_gemm_args(const at::Tensor& a_q, const at::Tensor& a_s,
                                const at::Tensor& w_q, const at::Tensor& w_s,
                                const std::optional<at::Tensor>& bias,
                                std::optional<at::ScalarType> out_dtype,
                                const std::optional<at::Tensor>& prefetch) {
  check_packed(a_q, "a_q");
  check_packed(w_q, "w_q");
  check_scales(a_s, "a_s");
  check_scales(w_s, "w_s");
  check_same_device(a_q, a_s, "a_s");
  check_same_device(a_q, w_q, "w_q");
  check_same_device(a_q, w_s, "w_s");
  TORCH_CHECK_VALUE(a_q.dim() >= 1, "apex4: a_q must have a K dimension");
  TORCH_CHECK_VALUE(w_q.dim() == 2, "apex4: w_q must be 2-D [N, Kp/2], got ", w_q.dim(), " dims");
  TORCH_CHECK_VALUE(w_s.dim() == 2 && w_s.size(0) == w_q.size(0),
                    "apex4: w_s must be [N, G] with N = ", w_q.size(0), ", got ", w_s.sizes());
  TORCH_CHECK_VALUE(a_s.dim() == a_q.dim(), "apex4: a_s must have a_q's dims, got ", a_s.sizes(),
                    " for a_q ", a_q.sizes());
  for (int64_t i = 0; i + 1 < a_q.dim(); ++i) {
    TORCH_CHECK_VALUE(a_s.size(i) == a_q.size(i), "apex4: a_s ", a_s.sizes(),
                      " does not match a_q ", a_q.sizes());
  }
  GemmDims d;
  d.kp = w_q.size(1) * 2;
  TORCH_CHECK_VALUE(a_q.size(-1) * 2 == d.kp, "apex4: a_q has K = ", a_q.size(-1) * 2,
                    " but w_q has K = ", d.kp);
  d.groups = w_s.size(1);
  TORCH_CHECK_VALUE(a_s.size(-1) == d.groups, "apex4: a_s has ", a_s.size(-1),
                    " groups but w_s has ", d.groups, "; activations and weights must share "
                    "the group size");
  TORCH_CHECK_VALUE(d.groups > 0 && d.kp % d.groups == 0 && (d.kp / d.groups) % kKAlign == 0,
                    "apex4: K = ", d.kp, " and ", d.groups, " groups do not give a group size "
                    "that is a multiple of ", kKAlign);
  d.group_len = d.kp / d.groups;
  d.n = w_q.size(0);
  d.m = a_q.numel() / std::max<int64_t>(a_q.size(-1), 1);
  if (a_q.size(-1) == 0) d.m = 0;
  d.out_dtype = out_dtype.value_or(at::kFloat);
  TORCH_CHECK_TYPE(is_float_act(d.out_dtype),
                   "apex4: out_dtype must be float16, bfloat16 or float32, got ", d.out_dtype);
  if (bias.has_value()) {
    check_same_device(a_q, *bias, "bias");
    TORCH_CHECK_TYPE(is_float_act(bias->scalar_type()),
                     "apex4: bias must be float16, bfloat16 or float32, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == d.n, "apex4: bias must be [N] = [",
                      d.n, "], got ", bias->sizes());
  }
  if (prefetch.has_value()) check_same_device(a_q, *prefetch, "prefetch");
  return d;
}

inline at::Tensor alloc_gemm_out(const at::Tensor& a_q, const GemmDims& d) {
  auto shape = a_q.sizes().vec();
  shape.back() = d.n;
  return at::empty(shape, a_q.options().dtype(d.out_dtype));
}

inline void check_pack_args(const at::Tensor& values) {
  TORCH_CHECK_TYPE(values.scalar_type() == at::kChar,
                   "apex4: pack_int4 expects int8 values, got ", values.scalar_type());
  TORCH_CHECK_VALUE(values.dim() >= 1 && values.size(-1) % 2 == 0,
                    "apex4: pack_int4 needs an even last dimension, got ", values.sizes());
  if (values.numel() > 0) {
    auto [lo, hi] = at::aminmax(values);
    TORCH_CHECK_VALUE(lo.item<int8_t>() >= -8 && hi.item<int8_t>() <= 7,
                      "apex4: pack_int4 values must lie in [-8, 7], got [", lo.item<int>(), ", ",
                      hi.item<int>(), "]");
  }
}

inline void check_unpack_args(const at::Tensor& packed) {
  check_packed(packed, "packed");
  TORCH_CHECK_VALUE(packed.dim() >= 1, "apex4: unpack_int4 expects a tensor with a last dimension");
}

}  // namespace apex4
