// CUDA bindings: validate (checks.h, shared with the CPU backend), allocate,
// pick a kernel, launch on the current stream. The kernels live in the
// torch-free headers beside this file and are driven through launch.h.
//
// w4a4_gemm picks its kernel by compute capability and M; APEX4_GEMM_PATH
// (read on every call) overrides the choice, so the tests can run every path
// on one GPU:
//   auto     decode for M <= 16, else sm90 on compute capability 9.0, sm90mma on
//            other 9.x and newer, else sm80
//   sm80     tiled GEMM on INT4 tensor cores (mma.sync; Hopper emulates them, slowly)
//   sm90     tiled GEMM on wgmma INT8 tensor cores, INT4 unpacked in shared memory
//   sm90mma  tiled GEMM on mma.sync INT8 tensor cores, INT4 unpacked in registers
//   decode   memory-bound kernel for few tokens (any M; 16 tokens per block row)
// The INT8 paths hold 256x the partial sums in int32; for groups longer than
// kMaxInt8MmaGroupLen they would overflow, and sm80 runs instead. sm90 needs
// compute capability 9.0 exactly (wgmma is sm_90a); elsewhere sm90mma runs.
//
// w4a4_linear on CUDA: where w4a4_gemm would take the decode path, the
// quantize kernel and the decode GEMM run as a programmatic-dependent pair
// (launch.h's launch_linear_decode: the GEMM's weights stream in while x is
// quantized), with the bits of quantize_act + w4a4_gemm; otherwise the
// composite (csrc/ops.cpp) runs those two ops.
//
// Only c10/cuda headers (the stream is c10::cuda::getCurrentCUDAStream, which
// at::cuda::getCurrentCUDAStream forwards to): ATen/cuda/CUDAContext.h pulls
// in cuBLAS and cuSPARSE headers, which a CPU-only build machine lacks, and
// this file must still compile there (csrc/cuda/compile_check.sh).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>

#include "checks.h"
#include "cuda/launch.h"

namespace apex4 {

// The device-independent composite (csrc/ops.cpp): quantize_act, then w4a4_gemm.
at::Tensor w4a4_linear(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_s,
                       const std::optional<at::Tensor>& bias, double act_clip,
                       const std::optional<at::Tensor>& prefetch);

namespace {

cuda::FloatKind float_kind(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return cuda::FloatKind::kF16;
    case at::kBFloat16: return cuda::FloatKind::kBF16;
    default: return cuda::FloatKind::kF32;
  }
}

// The kernels read packed rows 16 bytes at a time from the tensor's start; a
// view that starts mid-allocation may not be aligned for that.
at::Tensor aligned_16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 ? t : t.clone();
}

void check_int_range(int64_t v, const char* what) {
  TORCH_CHECK_VALUE(v <= std::numeric_limits<int>::max(), "apex4: ", what, " = ", v,
                    " is too large for the CUDA kernels");
}

std::tuple<at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& x,
                                                 std::optional<int64_t> group_size,
                                                 double clip_ratio) {
  const QuantizeDims d = check_quantize_args(x, group_size, clip_ratio);
  TORCH_CHECK_VALUE(d.groups <= cuda::kQuantizeMaxGroups, "apex4: ", d.groups,
                    " groups per row exceed the CUDA quantizer's limit of ",
                    cuda::kQuantizeMaxGroups);
  check_int_range(d.kp, "padded K");
  check_int_range(d.rows, "the number of rows");
  const c10::cuda::CUDAGuard guard(x.device());
  auto [packed, scales] = alloc_quantized(x, d);
  if (d.rows == 0) return {packed, scales};
  const at::Tensor xc = x.contiguous();
  C10_CUDA_CHECK(cuda::launch_quantize(xc.const_data_ptr(), float_kind(xc.scalar_type()), d.rows,
                                       d.k, d.kp, d.group_len, static_cast<float>(clip_ratio),
                                       packed.mutable_data_ptr<uint8_t>(),
                                       scales.mutable_data_ptr<float>(), /*programmatic=*/true,
                                       c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {packed, scales};
}

at::Tensor pack_int4_cuda(const at::Tensor& values) {
  check_pack_args(values);
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor v = values.contiguous();
  auto shape = v.sizes().vec();
  shape.back() /= 2;
  at::Tensor packed = at::empty(shape, v.options().dtype(at::kByte));
  if (packed.numel() == 0) return packed;
  C10_CUDA_CHECK(cuda::launch_pack_int4(v.const_data_ptr<int8_t>(), packed.numel(),
                                        packed.mutable_data_ptr<uint8_t>(),
                                        c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return packed;
}

at::Tensor unpack_int4_cuda(const at::Tensor& packed) {
  check_unpack_args(packed);
  const c10::cuda::CUDAGuard guard(packed.device());
  auto shape = packed.sizes().vec();
  shape.back() *= 2;
  at::Tensor values = at::empty(shape, packed.options().dtype(at::kChar));
  if (packed.numel() == 0) return values;
  C10_CUDA_CHECK(cuda::launch_unpack_int4(packed.const_data_ptr<uint8_t>(), packed.numel(),
                                          values.mutable_data_ptr<int8_t>(),
                                          c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return values;
}

enum class GemmPath { kAuto, kSm80, kSm90, kSm90Mma, kDecode };

GemmPath requested_gemm_path() {
  const char* env = std::getenv("APEX4_GEMM_PATH");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return GemmPath::kAuto;
  if (std::strcmp(env, "sm80") == 0) return GemmPath::kSm80;
  if (std::strcmp(env, "sm90") == 0) return GemmPath::kSm90;
  if (std::strcmp(env, "sm90mma") == 0) return GemmPath::kSm90Mma;
  if (std::strcmp(env, "decode") == 0) return GemmPath::kDecode;
  TORCH_CHECK_VALUE(false, "apex4: APEX4_GEMM_PATH must be auto, sm80, sm90, sm90mma or decode, "
                    "got '", env, "'");
}

GemmPath choose_gemm_path(int64_t m, int64_t group_len, const at::Device& device) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device.index()));
  TORCH_CHECK_VALUE(major >= 8, "apex4: the CUDA kernels need compute capability 8.0 or newer, "
                    "this GPU is ", major, ".x");
  const bool has_wgmma = major == 9 && minor == 0;
  GemmPath path = requested_gemm_path();
  if (path == GemmPath::kAuto) {
    path = m <= cuda::kDecodeMaxTokens ? GemmPath::kDecode
           : has_wgmma                 ? GemmPath::kSm90
           : major >= 9                ? GemmPath::kSm90Mma
                                       : GemmPath::kSm80;
  }
  if (path == GemmPath::kSm90 && !has_wgmma) path = GemmPath::kSm90Mma;
  if (path != GemmPath::kSm80 && group_len > cuda::kMaxInt8MmaGroupLen) path = GemmPath::kSm80;
  return path;
}

// The kernels' view of a GEMM: packed operands (16-byte aligned), scales,
// optional bias, and out, whose dtype is the output's and whose last dim is N.
cuda::GemmParams gemm_params(const at::Tensor& a_q, const at::Tensor& a_s, const at::Tensor& w_q,
                             const at::Tensor& w_s, const at::Tensor& bias, at::Tensor& out,
                             int64_t m, int64_t kp, int64_t groups) {
  cuda::GemmParams p{};
  p.a = a_q.const_data_ptr<uint8_t>();
  p.a_scale = a_s.const_data_ptr<float>();
  p.w = w_q.const_data_ptr<uint8_t>();
  p.w_scale = w_s.const_data_ptr<float>();
  p.bias = bias.defined() ? bias.const_data_ptr() : nullptr;
  p.bias_kind = bias.defined() ? float_kind(bias.scalar_type()) : cuda::FloatKind::kF32;
  p.out = out.mutable_data_ptr();
  p.out_kind = float_kind(out.scalar_type());
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(w_q.size(0));
  p.kp = static_cast<int>(kp);
  p.groups = static_cast<int>(groups);
  return p;
}

// The next weight to bring into L2 while the decode kernel runs: as much of
// its start as half the L2 holds (the rest of L2 serves the kernels between).
cuda::GemmParams with_prefetch(cuda::GemmParams p, const std::optional<at::Tensor>& prefetch) {
  if (!prefetch.has_value() || prefetch->numel() == 0) return p;
  int l2_bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, prefetch->get_device()));
  p.prefetch = static_cast<const uint8_t*>(prefetch->const_data_ptr());
  p.prefetch_bytes = std::min<int64_t>(prefetch->nbytes(), l2_bytes / 2);
  return p;
}

at::Tensor w4a4_gemm_cuda(const at::Tensor& a_q, const at::Tensor& a_s, const at::Tensor& w_q,
                          const at::Tensor& w_s, const std::optional<at::Tensor>& bias,
                          std::optional<at::ScalarType> out_dtype,
                          const std::optional<at::Tensor>& prefetch) {
  const GemmDims d = check_gemm_args(a_q, a_s, w_q, w_s, bias, out_dtype, prefetch);
  check_int_range(d.m, "M");
  check_int_range(d.n, "N");
  check_int_range(d.kp, "padded K");
  const c10::cuda::CUDAGuard guard(a_q.device());
  at::Tensor out = alloc_gemm_out(a_q, d);
  if (d.m == 0 || d.n == 0) return out;
  const GemmPath path = choose_gemm_path(d.m, d.group_len, a_q.device());
  const at::Tensor a = aligned_16(a_q), w = aligned_16(w_q);
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const cuda::GemmParams p =
      with_prefetch(gemm_params(a, a_s, w, w_s, bias_c, out, d.m, d.kp, d.groups), prefetch);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (path) {
    case GemmPath::kDecode: C10_CUDA_CHECK(cuda::launch_gemm_decode(p, stream)); break;
    case GemmPath::kSm90: {
      const cuda::WgmmaPlan plan = cuda::plan_gemm_wgmma(p);
      cuda::SplitK split;
      at::Tensor counters, partials;
      if (plan.splits > 1) {
        counters = at::zeros({plan.tiles}, a_q.options().dtype(at::kInt));
        partials = at::empty({plan.splits * d.m * d.n}, a_q.options().dtype(at::kInt));
        split = {plan.splits, counters.mutable_data_ptr<int>(), partials.mutable_data_ptr<int>()};
      }
      C10_CUDA_CHECK(cuda::launch_gemm_wgmma(p, split, stream));
      break;
    }
    case GemmPath::kSm90Mma: C10_CUDA_CHECK(cuda::launch_gemm_tiled_int8(p, stream)); break;
    default: C10_CUDA_CHECK(cuda::launch_gemm_tiled_int4(p, stream));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// True where w4a4_linear(x, w_q, w_s) runs as the decode pair: the arguments
// are well formed (anything else goes to the composite, which raises the
// errors) and w4a4_gemm would take the decode path.
bool fused_linear_applies(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_s) {
  if (!x.is_cuda() || !is_float_act(x.scalar_type()) || x.dim() < 1 || x.size(-1) == 0 ||
      w_q.dim() != 2 || w_s.dim() != 2 || w_s.size(0) != w_q.size(0) || w_s.size(1) == 0 ||
      w_q.size(0) == 0) {
    return false;
  }
  const int64_t kp = w_q.size(1) * 2, groups = w_s.size(1);
  if (kp == 0 || kp % groups != 0 || (kp / groups) % kKAlign != 0) return false;
  const int64_t group_len = kp / groups;
  if (padded_k(x.size(-1), groups == 1 ? 0 : group_len) != kp) return false;
  const int64_t m = x.numel() / x.size(-1);
  if (m < 1 || m > cuda::kDecodeMaxTokens || groups > cuda::kQuantizeMaxGroups) return false;
  return choose_gemm_path(m, group_len, x.device()) == GemmPath::kDecode;
}

at::Tensor w4a4_linear_cuda(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_s,
                            const std::optional<at::Tensor>& bias, double act_clip,
                            const std::optional<at::Tensor>& prefetch) {
  if (!fused_linear_applies(x, w_q, w_s)) return w4a4_linear(x, w_q, w_s, bias, act_clip, prefetch);
  const int64_t kp = w_q.size(1) * 2, groups = w_s.size(1);
  const std::optional<int64_t> group_size =
      groups == 1 ? std::nullopt : std::optional<int64_t>(kp / groups);
  const QuantizeDims qd = check_quantize_args(x, group_size, act_clip);
  check_packed(w_q, "w_q");
  check_scales(w_s, "w_s");
  check_same_device(x, w_q, "w_q");
  check_same_device(x, w_s, "w_s");
  if (bias.has_value()) {
    check_same_device(x, *bias, "bias");
    TORCH_CHECK_TYPE(is_float_act(bias->scalar_type()),
                     "apex4: bias must be float16, bfloat16 or float32, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == w_q.size(0),
                      "apex4: bias must be [N] = [", w_q.size(0), "], got ", bias->sizes());
  }
  if (prefetch.has_value()) check_same_device(x, *prefetch, "prefetch");
  check_int_range(w_q.size(0), "N");
  const c10::cuda::CUDAGuard guard(x.device());
  auto shape = x.sizes().vec();
  shape.back() = w_q.size(0);
  at::Tensor out = at::empty(shape, x.options());
  const at::Tensor xc = x.contiguous(), w = aligned_16(w_q);
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  check_int_range(kp, "padded K");
  const at::Tensor a_q = at::empty({qd.rows, kp / 2}, x.options().dtype(at::kByte));
  const at::Tensor a_s = at::empty({qd.rows, groups}, x.options().dtype(at::kFloat));
  const cuda::GemmParams p =
      with_prefetch(gemm_params(a_q, a_s, w, w_s, bias_c, out, qd.rows, kp, groups), prefetch);
  C10_CUDA_CHECK(cuda::launch_linear_decode(p, xc.const_data_ptr(), float_kind(x.scalar_type()),
                                            qd.k, static_cast<float>(act_clip),
                                            c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---- online rotation ----------------------------------------------------------

// Sizes the rotation kernels index with int (launch.h), and their global
// workspace where a row does not fit in shared memory.
at::Tensor rotation_workspace(const at::Tensor& x, int64_t rows, int64_t n, int64_t m,
                              int64_t groups) {
  check_int_range(rows, "the number of rows");
  check_int_range(2 * n + m * (m + 3), "the rotation's work area (2 K + m (m + 3) floats)");
  int64_t floats = 0;
  C10_CUDA_CHECK(cuda::rotation_workspace_floats(rows, n, m, groups, &floats));
  return floats > 0 ? at::empty({floats}, x.options().dtype(at::kFloat)) : at::Tensor();
}

float* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<float>() : nullptr;
}

at::Tensor hadamard_cuda(const at::Tensor& x, const at::Tensor& factor) {
  const int64_t m = check_hadamard_args(x, factor);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), fc = factor.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t n = xc.size(-1), rows = xc.numel() / n;
  at::Tensor workspace = rotation_workspace(x, rows, n, m, 0);
  if (rows == 0) return y;
  C10_CUDA_CHECK(cuda::launch_hadamard(xc.const_data_ptr(), float_kind(xc.scalar_type()), rows, n,
                                       fc.const_data_ptr<float>(), m, y.mutable_data_ptr(),
                                       data_or_null(workspace),
                                       c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::tuple<at::Tensor, at::Tensor> hadamard_quantize_act_cuda(const at::Tensor& x,
                                                              const at::Tensor& factor,
                                                              std::optional<int64_t> group_size,
                                                              double clip_ratio) {
  const QuantizeDims d = check_quantize_args(x, group_size, clip_ratio);
  const int64_t m = check_rotation(x, factor);
  TORCH_CHECK_VALUE(d.groups <= cuda::kQuantizeMaxGroups, "apex4: ", d.groups,
                    " groups per row exceed the CUDA quantizer's limit of ",
                    cuda::kQuantizeMaxGroups);
  check_int_range(d.kp, "padded K");
  const c10::cuda::CUDAGuard guard(x.device());
  auto [packed, scales] = alloc_quantized(x, d);
  at::Tensor workspace = rotation_workspace(x, d.rows, d.k, m, d.groups);
  if (d.rows == 0) return {packed, scales};
  const at::Tensor xc = x.contiguous(), fc = factor.contiguous();
  C10_CUDA_CHECK(cuda::launch_hadamard_quantize(
      xc.const_data_ptr(), float_kind(xc.scalar_type()), d.rows, d.k, fc.const_data_ptr<float>(),
      m, d.kp, d.group_len, static_cast<float>(clip_ratio), packed.mutable_data_ptr<uint8_t>(),
      scales.mutable_data_ptr<float>(), data_or_null(workspace),
      c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {packed, scales};
}

}  // namespace

TORCH_LIBRARY_IMPL(apex4, CUDA, m) {
  m.impl("quantize_act", &quantize_cuda);
  m.impl("quantize_weight", &quantize_cuda);
  m.impl("pack_int4", &pack_int4_cuda);
  m.impl("unpack_int4", &unpack_int4_cuda);
  m.impl("w4a4_gemm", &w4a4_gemm_cuda);
  m.impl("w4a4_linear", &w4a4_linear_cuda);
  m.impl("hadamard", &hadamard_cuda);
  m.impl("hadamard_quantize_act", &hadamard_quantize_act_cuda);
}

}  // namespace apex4
