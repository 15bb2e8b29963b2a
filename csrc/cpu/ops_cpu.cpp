// CPU bindings: validate, allocate, split across threads; the arithmetic is in
// kernels.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/kernels.h"

namespace apex4 {
namespace {

// Rotation (factor defined) and quantization in one pass over each row.
std::tuple<at::Tensor, at::Tensor> quantize_rows_cpu(const at::Tensor& x,
                                                     std::optional<int64_t> group_size,
                                                     double clip_ratio, const at::Tensor& factor) {
  const QuantizeDims d = check_quantize_args(x, group_size, clip_ratio);
  const int64_t m = factor.defined() ? check_rotation(x, factor) : 0;
  auto [packed, scales] = alloc_quantized(x, d);
  const at::Tensor xc = x.contiguous();
  const at::Tensor fc = factor.defined() ? factor.contiguous() : factor;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "quantize_cpu", [&] {
    const scalar_t* src = xc.const_data_ptr<scalar_t>();
    uint8_t* dst = packed.mutable_data_ptr<uint8_t>();
    float* sc = scales.mutable_data_ptr<float>();
    const float* f = fc.defined() ? fc.const_data_ptr<float>() : nullptr;
    // Enough rows per task that a thread's work dwarfs the dispatch cost.
    const int64_t grain = std::max<int64_t>(1, 16384 / d.kp);
    at::parallel_for(0, d.rows, grain, [&](int64_t begin, int64_t end) {
      cpu::quantize_rows(src, begin, end, d.k, d.kp, d.group_len, static_cast<float>(clip_ratio),
                         f, m, dst, sc);
    });
  });
  return {packed, scales};
}

std::tuple<at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& x,
                                                std::optional<int64_t> group_size,
                                                double clip_ratio) {
  return quantize_rows_cpu(x, group_size, clip_ratio, at::Tensor());
}

std::tuple<at::Tensor, at::Tensor> hadamard_quantize_act_cpu(const at::Tensor& x,
                                                             const at::Tensor& factor,
                                                             std::optional<int64_t> group_size,
                                                             double clip_ratio) {
  return quantize_rows_cpu(x, group_size, clip_ratio, factor);
}

at::Tensor hadamard_cpu(const at::Tensor& x, const at::Tensor& factor) {
  const int64_t m = check_hadamard_args(x, factor);
  const at::Tensor xc = x.contiguous();
  const at::Tensor fc = factor.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t n = xc.size(-1), rows = xc.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "hadamard_cpu", [&] {
    const scalar_t* src = xc.const_data_ptr<scalar_t>();
    scalar_t* dst = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
      cpu::rotate_rows(src, begin, end, n, fc.const_data_ptr<float>(), m, dst);
    });
  });
  return y;
}

at::Tensor pack_int4_cpu(const at::Tensor& values) {
  check_pack_args(values);
  const at::Tensor v = values.contiguous();
  auto shape = v.sizes().vec();
  shape.back() /= 2;
  at::Tensor packed = at::empty(shape, v.options().dtype(at::kByte));
  cpu::pack_values(v.const_data_ptr<int8_t>(), packed.numel(), packed.mutable_data_ptr<uint8_t>());
  return packed;
}

at::Tensor unpack_int4_cpu(const at::Tensor& packed) {
  check_unpack_args(packed);
  auto shape = packed.sizes().vec();
  shape.back() *= 2;
  at::Tensor values = at::empty(shape, packed.options().dtype(at::kChar));
  cpu::unpack_values(packed.const_data_ptr<uint8_t>(), packed.numel(),
                     values.mutable_data_ptr<int8_t>());
  return values;
}

at::Tensor w4a4_gemm_cpu(const at::Tensor& a_q, const at::Tensor& a_s, const at::Tensor& w_q,
                         const at::Tensor& w_s, const std::optional<at::Tensor>& bias,
                         std::optional<at::ScalarType> out_dtype,
                         const std::optional<at::Tensor>& prefetch) {
  const GemmDims d = check_gemm_args(a_q, a_s, w_q, w_s, bias, out_dtype, prefetch);
  at::Tensor out = alloc_gemm_out(a_q, d);
  if (d.m == 0 || d.n == 0) return out;
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t tiles_n = (d.n + cpu::kTileN - 1) / cpu::kTileN;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.out_dtype, "w4a4_gemm_cpu", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    // Threads split N: each unpacks a W tile once and reuses it for all of M.
    at::parallel_for(0, tiles_n, 1, [&](int64_t begin, int64_t end) {
      cpu::GemmTileBuffers buf(d.kp, d.groups);
      for (int64_t tn = begin; tn < end; ++tn) {
        const int64_t n0 = tn * cpu::kTileN, n_len = std::min(cpu::kTileN, d.n - n0);
        cpu::load_w_tile(w_q.const_data_ptr<uint8_t>(), w_s.const_data_ptr<float>(), n0, n_len,
                         d.kp, d.groups, buf);
        for (int64_t m0 = 0; m0 < d.m; m0 += cpu::kTileM) {
          cpu::gemm_tile(a_q.const_data_ptr<uint8_t>(), a_s.const_data_ptr<float>(),
                         bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr, m0,
                         std::min(cpu::kTileM, d.m - m0), n0, n_len, d.kp, d.groups, buf, dst,
                         d.n);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(apex4, CPU, m) {
  m.impl("quantize_act", &quantize_cpu);
  m.impl("quantize_weight", &quantize_cpu);
  m.impl("pack_int4", &pack_int4_cpu);
  m.impl("unpack_int4", &unpack_int4_cpu);
  m.impl("w4a4_gemm", &w4a4_gemm_cpu);
  m.impl("hadamard", &hadamard_cpu);
  m.impl("hadamard_quantize_act", &hadamard_quantize_act_cpu);
}

}  // namespace apex4
