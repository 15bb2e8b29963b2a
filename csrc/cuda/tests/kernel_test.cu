// Standalone test of the CUDA kernels, without torch: drives the launchers of
// launch.h and checks them against a host reference written from int4.h and
// docs/design.md. Built by csrc/cuda/compile_check.sh (build/cuda_kernel_test);
// run it on a GPU (benchmarks/gpu_check.sh does). Exit status 0 iff all pass.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "apex4/int4.h"
#include "cuda/launch.h"

using apex4::cuda::FloatKind;
using apex4::cuda::GemmParams;

namespace {

int g_passed = 0, g_failed = 0;

void expect(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

#define CUDA_OK(expr)                                                              \
  do {                                                                             \
    const cudaError_t err_ = (expr);                                               \
    if (err_ != cudaSuccess) {                                                     \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(err_), __FILE__, \
                  __LINE__);                                                       \
      std::exit(2);                                                                \
    }                                                                              \
  } while (0)

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t count = 0;
  explicit DeviceBuffer(size_t n) : count(n) {
    CUDA_OK(cudaMalloc(&ptr, n * sizeof(T) + 16));
    CUDA_OK(cudaMemset(ptr, 0xFF, n * sizeof(T) + 16));  // poison: NaN / -1 bytes
  }
  explicit DeviceBuffer(const std::vector<T>& v) : DeviceBuffer(v.size()) {
    CUDA_OK(cudaMemcpy(ptr, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  std::vector<T> host() const {
    std::vector<T> v(count);
    CUDA_OK(cudaMemcpy(v.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }
};

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

// ---- quantize ---------------------------------------------------------------

// The design's quantizer on float values already converted from the input type.
void quantize_host(const std::vector<float>& x, int64_t rows, int64_t k, int64_t group,
                   float clip, std::vector<uint8_t>& packed, std::vector<float>& scales) {
  const int64_t kp = apex4::padded_k(k, group), groups = apex4::num_groups(k, group);
  const int64_t len = kp / groups;
  packed.assign(rows * kp / 2, 0);
  scales.assign(rows * groups, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      float amax = 0.0f;
      bool finite = true;
      std::vector<float> v(len, 0.0f);
      for (int64_t i = 0; i < len; ++i) {
        const int64_t e = g * len + i;
        if (e < k) v[i] = x[r * k + e];
        finite = finite && std::isfinite(v[i]);
        amax = std::max(amax, std::fabs(v[i]));
      }
      const float scale = apex4::group_scale(finite ? amax : NAN, clip);
      scales[r * groups + g] = scale;
      for (int64_t i = 0; i < len; i += 2) {
        packed[r * kp / 2 + (g * len + i) / 2] = apex4::pack_pair(
            apex4::quantize_value(v[i], scale), apex4::quantize_value(v[i + 1], scale));
      }
    }
  }
}

template <typename T>
T from_float_host(float v);
template <>
float from_float_host<float>(float v) { return v; }
template <>
__half from_float_host<__half>(float v) { return __float2half_rn(v); }
template <>
__nv_bfloat16 from_float_host<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
float to_float_host(float v) { return v; }
float to_float_host(__half v) { return __half2float(v); }
float to_float_host(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
void test_quantize(FloatKind kind, const char* type_name, int64_t rows, int64_t k, int64_t group,
                   std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<T> x(rows * k);
  std::vector<float> xf(rows * k);
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = from_float_host<T>(normal(rng));
    xf[i] = to_float_host(x[i]);
  }
  if (rows > 2) {  // a NaN in row 1, an Inf in row 2: NaN scales for their groups
    x[1 * k + k / 2] = from_float_host<T>(NAN);
    x[2 * k] = from_float_host<T>(INFINITY);
    xf[1 * k + k / 2] = NAN;
    xf[2 * k] = INFINITY;
  }
  const int64_t kp = apex4::padded_k(k, group), groups = apex4::num_groups(k, group);
  std::vector<uint8_t> packed_ref;
  std::vector<float> scales_ref;
  const float clip = 0.9f;
  quantize_host(xf, rows, k, group, clip, packed_ref, scales_ref);

  DeviceBuffer<T> dx(x);
  DeviceBuffer<uint8_t> dpacked(rows * kp / 2);
  DeviceBuffer<float> dscales(rows * groups);
  CUDA_OK(apex4::cuda::launch_quantize(dx.ptr, kind, rows, k, kp, kp / groups, clip, dpacked.ptr,
                                       dscales.ptr, true, nullptr));
  CUDA_OK(cudaGetLastError());
  const auto packed = dpacked.host();
  const auto scales = dscales.host();
  bool scales_ok = true;
  for (size_t i = 0; i < scales.size(); ++i) scales_ok = scales_ok && same_bits(scales[i], scales_ref[i]);
  const std::string what = std::string("quantize ") + type_name + " rows=" + std::to_string(rows) +
                           " k=" + std::to_string(k) + " group=" + std::to_string(group);
  expect(scales_ok, what + ": scales bit-identical");
  expect(packed == packed_ref, what + ": packed bytes identical");
}

// ---- pack / unpack ----------------------------------------------------------

void test_pack_unpack(std::mt19937& rng) {
  const int64_t n_bytes = 100003;
  std::uniform_int_distribution<int> value(-8, 7);
  std::vector<int8_t> values(2 * n_bytes);
  for (auto& v : values) v = static_cast<int8_t>(value(rng));
  DeviceBuffer<int8_t> dvalues(values);
  DeviceBuffer<uint8_t> dpacked(n_bytes);
  DeviceBuffer<int8_t> dround(2 * n_bytes);
  CUDA_OK(apex4::cuda::launch_pack_int4(dvalues.ptr, n_bytes, dpacked.ptr, nullptr));
  CUDA_OK(apex4::cuda::launch_unpack_int4(dpacked.ptr, n_bytes, dround.ptr, nullptr));
  CUDA_OK(cudaGetLastError());
  const auto packed = dpacked.host();
  bool layout_ok = true;
  for (int64_t j = 0; j < n_bytes; ++j) {
    layout_ok = layout_ok && packed[j] == apex4::pack_pair(values[2 * j], values[2 * j + 1]);
  }
  expect(layout_ok, "pack_int4 layout");
  expect(dround.host() == values, "unpack_int4(pack_int4(v)) == v");
}

// ---- GEMM -------------------------------------------------------------------

struct GemmCase {
  int m, n, kp, groups;
};

using Launcher = cudaError_t (*)(const GemmParams&, cudaStream_t);

// The wgmma path with the split-K workspace its plan asks for.
cudaError_t launch_wgmma_planned(const GemmParams& p, cudaStream_t stream) {
  const apex4::cuda::WgmmaPlan plan = apex4::cuda::plan_gemm_wgmma(p);
  apex4::cuda::SplitK split;
  if (plan.splits > 1) {
    static DeviceBuffer<int>* counters = nullptr;
    static DeviceBuffer<int>* partials = nullptr;
    delete counters;
    delete partials;
    counters = new DeviceBuffer<int>(plan.tiles);
    CUDA_OK(cudaMemset(counters->ptr, 0, plan.tiles * sizeof(int)));
    partials = new DeviceBuffer<int>(static_cast<size_t>(plan.splits) * p.m * p.n);
    split = {plan.splits, counters->ptr, partials->ptr};
  }
  return apex4::cuda::launch_gemm_wgmma(p, split, stream);
}

std::vector<int8_t> unpack_host(const std::vector<uint8_t>& packed) {
  std::vector<int8_t> values(2 * packed.size());
  for (size_t j = 0; j < packed.size(); ++j) {
    values[2 * j] = static_cast<int8_t>(apex4::unpack_lo(packed[j]));
    values[2 * j + 1] = static_cast<int8_t>(apex4::unpack_hi(packed[j]));
  }
  return values;
}

// Exact int32 partials P[m][n][g] of packed operands.
std::vector<int32_t> partials_host(const std::vector<uint8_t>& a_packed,
                                   const std::vector<uint8_t>& w_packed, const GemmCase& c) {
  const std::vector<int8_t> a = unpack_host(a_packed), w = unpack_host(w_packed);
  const int len = c.kp / c.groups;
  std::vector<int32_t> p(static_cast<size_t>(c.m) * c.n * c.groups, 0);
  for (int m = 0; m < c.m; ++m) {
    for (int n = 0; n < c.n; ++n) {
      const int8_t* ar = a.data() + static_cast<size_t>(m) * c.kp;
      const int8_t* wr = w.data() + static_cast<size_t>(n) * c.kp;
      for (int g = 0; g < c.groups; ++g) {
        int32_t sum = 0;
        for (int k = g * len; k < (g + 1) * len; ++k) sum += ar[k] * wr[k];
        p[(static_cast<size_t>(m) * c.n + n) * c.groups + g] = sum;
      }
    }
  }
  return p;
}

void test_gemm(const char* path, Launcher launch, const GemmCase& c, std::mt19937& rng) {
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(0.01f, 0.1f);
  std::vector<uint8_t> a(static_cast<size_t>(c.m) * c.kp / 2), w(static_cast<size_t>(c.n) * c.kp / 2);
  for (auto& b : a) b = static_cast<uint8_t>(byte(rng));  // every nibble, -8 included
  for (auto& b : w) b = static_cast<uint8_t>(byte(rng));
  std::vector<float> sa(static_cast<size_t>(c.m) * c.groups), sw(static_cast<size_t>(c.n) * c.groups);
  for (auto& s : sa) s = scale(rng);
  for (auto& s : sw) s = scale(rng);
  std::vector<__half> bias(c.n);
  for (auto& b : bias) b = __float2half_rn(scale(rng) * 10.0f);
  const auto partials = partials_host(a, w, c);

  DeviceBuffer<uint8_t> da(a), dw(w);
  DeviceBuffer<float> dsa(sa), dsw(sw);
  DeviceBuffer<__half> dbias(bias);
  const std::vector<float> ones_a(sa.size(), 1.0f), ones_w(sw.size(), 1.0f);
  DeviceBuffer<float> dones_a(ones_a), dones_w(ones_w);
  const std::string what = std::string(path) + " m=" + std::to_string(c.m) + " n=" +
                           std::to_string(c.n) + " kp=" + std::to_string(c.kp) +
                           " groups=" + std::to_string(c.groups);

  // Unit scales, fp32 out: the output is sum_g P_g, exact in fp32 here.
  {
    DeviceBuffer<float> out(static_cast<size_t>(c.m) * c.n);
    const GemmParams p{da.ptr, dones_a.ptr, dw.ptr, dones_w.ptr, nullptr, FloatKind::kF32,
                       out.ptr, FloatKind::kF32, c.m, c.n, c.kp, c.groups};
    CUDA_OK(launch(p, nullptr));
    CUDA_OK(cudaGetLastError());
    const auto got = out.host();
    int wrong = 0;
    for (int i = 0; i < c.m * c.n; ++i) {
      int64_t sum = 0;
      for (int g = 0; g < c.groups; ++g) sum += partials[static_cast<size_t>(i) * c.groups + g];
      if (got[i] != static_cast<float>(sum) && ++wrong <= 4) {
        std::printf("  [%d, %d]: got %.9g, want %lld\n", i / c.n, i % c.n, got[i],
                    static_cast<long long>(sum));
      }
    }
    if (wrong > 0) std::printf("  %d of %d outputs wrong\n", wrong, c.m * c.n);
    expect(wrong == 0, what + ": unit scales give the exact integer sums");
  }
  // Real scales, fp16 bias, every output type, against a float64 reference.
  for (FloatKind kind : {FloatKind::kF32, FloatKind::kF16, FloatKind::kBF16}) {
    const size_t count = static_cast<size_t>(c.m) * c.n;
    DeviceBuffer<float> out(count);  // big enough for any output type
    const GemmParams p{da.ptr, dsa.ptr, dw.ptr, dsw.ptr, dbias.ptr, FloatKind::kF16,
                       out.ptr, kind, c.m, c.n, c.kp, c.groups};
    CUDA_OK(launch(p, nullptr));
    CUDA_OK(cudaGetLastError());
    const auto raw = out.host();
    const double out_eps = kind == FloatKind::kF32 ? 0x1p-24 : kind == FloatKind::kF16 ? 0x1p-11 : 0x1p-8;
    bool close = true;
    for (size_t i = 0; i < count && close; ++i) {
      const int m = static_cast<int>(i / c.n), n = static_cast<int>(i % c.n);
      double ref = __half2float(bias[n]), magnitude = std::fabs(ref);
      for (int g = 0; g < c.groups; ++g) {
        const double term = static_cast<double>(partials[i * c.groups + g]) *
                            sa[static_cast<size_t>(m) * c.groups + g] * sw[static_cast<size_t>(n) * c.groups + g];
        ref += term;
        magnitude += std::fabs(term);
      }
      float got;
      if (kind == FloatKind::kF32) {
        got = raw[i];
      } else {
        uint16_t bits;
        std::memcpy(&bits, reinterpret_cast<const uint16_t*>(raw.data()) + i, 2);
        got = kind == FloatKind::kF16 ? __half2float(__ushort_as_half(bits))
                                      : __bfloat162float(__ushort_as_bfloat16(bits));
      }
      const double bound = magnitude * (c.groups + 2) * 2 * 0x1p-24 + std::fabs(ref) * out_eps + 1e-30;
      close = std::isfinite(got) && std::fabs(got - ref) <= bound;
      if (!close) std::printf("  [%d, %d]: got %.9g, want %.9g (bound %.3g)\n", m, n, got, ref, bound);
    }
    expect(close, what + " out kind " + std::to_string(static_cast<int>(kind)) + ": matches float64 reference");
  }
}

// ---- fused decode linear ----------------------------------------------------

// launch_linear_decode must give the bits of launch_quantize + launch_gemm_decode.
template <typename T>
void test_linear_decode(FloatKind kind, const char* type_name, int m, int n, int64_t k,
                        int64_t group, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<T> x(static_cast<size_t>(m) * k);
  for (auto& v : x) v = from_float_host<T>(normal(rng));
  const int64_t kp = apex4::padded_k(k, group), groups = apex4::num_groups(k, group);
  std::vector<float> wf(static_cast<size_t>(n) * k);
  for (auto& v : wf) v = normal(rng);
  std::vector<uint8_t> w_packed;
  std::vector<float> w_scales;
  quantize_host(wf, n, k, group, 1.0f, w_packed, w_scales);
  std::vector<float> bias(n);
  for (auto& b : bias) b = normal(rng);

  DeviceBuffer<T> dx(x);
  DeviceBuffer<uint8_t> dw(w_packed), da(static_cast<size_t>(m) * kp / 2);
  DeviceBuffer<float> dsw(w_scales), dsa(static_cast<size_t>(m) * groups), dbias(bias);
  DeviceBuffer<T> two_ops(static_cast<size_t>(m) * n), fused(static_cast<size_t>(m) * n);
  const float clip = 0.9f;
  CUDA_OK(apex4::cuda::launch_quantize(dx.ptr, kind, m, k, kp, kp / groups, clip, da.ptr, dsa.ptr,
                                       true, nullptr));
  GemmParams p{da.ptr, dsa.ptr, dw.ptr, dsw.ptr, dbias.ptr, FloatKind::kF32, two_ops.ptr, kind,
               m, n, static_cast<int>(kp), static_cast<int>(groups)};
  CUDA_OK(apex4::cuda::launch_gemm_decode(p, nullptr));
  DeviceBuffer<uint8_t> da2(static_cast<size_t>(m) * kp / 2);  // launch_linear_decode's workspaces
  DeviceBuffer<float> dsa2(static_cast<size_t>(m) * groups);
  p.a = da2.ptr;
  p.a_scale = dsa2.ptr;
  p.out = fused.ptr;
  CUDA_OK(apex4::cuda::launch_linear_decode(p, dx.ptr, kind, k, clip, nullptr));
  CUDA_OK(cudaGetLastError());
  const auto a = two_ops.host(), b = fused.host();
  const bool same = std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
  expect(same, std::string("linear_decode ") + type_name + " m=" + std::to_string(m) + " n=" +
                   std::to_string(n) + " k=" + std::to_string(k) + " group=" +
                   std::to_string(group) + ": bits of quantize + decode GEMM");
}

__global__ void fill_weight(__half* w, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const uint32_t h = (static_cast<uint32_t>(i) * 2654435761u) >> 20;  // 12 bits
    w[i] = __float2half(static_cast<float>(h) / 1024.0f - 2.0f);
  }
}

// The decode pair right after the kernel that writes its weight (quantized
// on the GPU as quantize_weight does, into poisoned buffers): its GEMM streams
// the weight before it waits, so it must not start until that kernel has
// finished. One 16-row tile a block and a long K, so that the GEMM would read
// the rows of the weight quantizer's last wave while they are written. Must
// give the bits of the same pair run once the weight is complete.
void test_linear_decode_after_weight_writer(std::mt19937& rng) {
  int device = 0, sms = 0;
  CUDA_OK(cudaGetDevice(&device));
  CUDA_OK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int n = 2 * sms * 16;
  const int64_t k = 32768;
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<__half> x(k);
  for (auto& v : x) v = from_float_host<__half>(normal(rng));
  DeviceBuffer<__half> dx(x), w(static_cast<size_t>(n) * k);
  fill_weight<<<1024, 256>>>(w.ptr, static_cast<int64_t>(n) * k);
  CUDA_OK(cudaDeviceSynchronize());
  DeviceBuffer<uint8_t> w_packed(static_cast<size_t>(n) * k / 2), a(k / 2);
  DeviceBuffer<float> w_scales(n), a_scales(1);
  DeviceBuffer<__half> racing(n), settled(n);
  GemmParams p{a.ptr, a_scales.ptr, w_packed.ptr, w_scales.ptr, nullptr, FloatKind::kF32,
               racing.ptr, FloatKind::kF16, 1, n, static_cast<int>(k), 1};
  CUDA_OK(apex4::cuda::launch_quantize(w.ptr, FloatKind::kF16, n, k, k, k, 1.0f, w_packed.ptr,
                                       w_scales.ptr, true, nullptr));
  CUDA_OK(apex4::cuda::launch_linear_decode(p, dx.ptr, FloatKind::kF16, k, 1.0f, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  p.out = settled.ptr;
  CUDA_OK(apex4::cuda::launch_linear_decode(p, dx.ptr, FloatKind::kF16, k, 1.0f, nullptr));
  const auto got = racing.host(), want = settled.host();
  bool finite = true;
  for (const __half v : want) finite = finite && std::isfinite(__half2float(v));
  expect(finite && std::memcmp(got.data(), want.data(), got.size() * sizeof(__half)) == 0,
         "linear_decode right after the weight's writer: bits of the settled run");
}

}  // namespace

// This binary's kernels came from sm_90a code (wgmma, bulk copies) only if
// it was built for it: a compute_80 PTX build, JIT-compiled on a Hopper GPU,
// runs the Ampere paths there (the decode kernel's cp.async ring) and has no
// wgmma kernel to test.
__global__ void build_probe() {}
bool built_for_sm90a() {
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, build_probe) != cudaSuccess) return false;
  std::printf("built for compute_%d, running as sm_%d\n", attributes.ptxVersion,
              attributes.binaryVersion);
  return attributes.ptxVersion >= 90;
}

int main() {
  // Line-buffered even into a file, with a line as each part starts: if a
  // kernel hangs and the run is killed, the log ends at the part that hung.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::printf("quantize, pack\n");
  std::mt19937 rng(1234);
  for (int64_t group : {0, 64, 128, 256}) {
    for (int64_t k : {64, 576, 1000, 4096}) {
      test_quantize<float>(FloatKind::kF32, "f32", 5, k, group, rng);
      test_quantize<__half>(FloatKind::kF16, "f16", 5, k, group, rng);
      test_quantize<__nv_bfloat16>(FloatKind::kBF16, "bf16", 5, k, group, rng);
    }
  }
  test_quantize<__half>(FloatKind::kF16, "f16", 3, 28672, 0, rng);
  test_quantize<float>(FloatKind::kF32, "f32", 3, 20001, 128, rng);
  // Rows longer than a block's registers (32768 values) are done in chunks;
  // groups of 192 and 512 meet in shared memory.
  test_quantize<__half>(FloatKind::kF16, "f16", 3, 70000, 0, rng);
  test_quantize<__nv_bfloat16>(FloatKind::kBF16, "bf16", 3, 70000, 128, rng);
  test_quantize<float>(FloatKind::kF32, "f32", 3, 40001, 192, rng);
  test_quantize<__half>(FloatKind::kF16, "f16", 3, 4096, 512, rng);
  test_pack_unpack(rng);

  // The last two have enough 128x256 tiles (with M, N and K tails) for the
  // tiled kernels' wide per-channel tile on a 132-SM GPU.
  const GemmCase cases[] = {{1, 192, 576, 1},    {1, 200, 576, 9},    {7, 1000, 1024, 8},
                            {16, 264, 640, 5},   {17, 130, 4096, 1},  {33, 256, 2048, 16},
                            {130, 264, 640, 10}, {200, 520, 1536, 1}, {129, 257, 1088, 17},
                            {64, 96, 8192, 32},  {4200, 1100, 64, 1}, {4224, 1056, 192, 1},
                            // split K in 2 (odd N) and 4; groups of three stages; many groups
                            {40, 131, 8192, 1},  {17, 130, 16384, 1}, {70, 200, 1152, 3},
                            {300, 136, 4096, 32}};
  int device = 0, major = 0, minor = 0;
  CUDA_OK(cudaGetDevice(&device));
  CUDA_OK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  CUDA_OK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  const struct {
    const char* name;
    Launcher launch;
    bool runs;
  } paths[] = {{"tiled_int4 (sm80)", apex4::cuda::launch_gemm_tiled_int4, true},
               {"tiled_int8 (sm90mma)", apex4::cuda::launch_gemm_tiled_int8, true},
               {"wgmma (sm90)", launch_wgmma_planned, major == 9 && minor == 0 && built_for_sm90a()},
               {"decode", apex4::cuda::launch_gemm_decode, true}};
  for (const auto& path : paths) {
    if (!path.runs) continue;
    std::printf("gemm %s\n", path.name);
    for (const GemmCase& c : cases) test_gemm(path.name, path.launch, c, rng);
  }
  // 9..16 tokens and N with two 32-row tiles for each of 2 blocks per SM (up
  // to 148 SMs): the decode kernel's two-row-group tiles, with N, K (a short
  // last stage) and token tails, some blocks walking one tile more, groups of
  // 128 and 192 (a group across a warp's chunks); the last two with K too
  // long for resident token rows beside two 32-row stages.
  for (const GemmCase& c : {GemmCase{16, 19000, 2112, 1}, GemmCase{9, 20000, 3072, 24},
                            GemmCase{12, 19500, 1152, 6}, GemmCase{16, 19000, 5120, 1},
                            GemmCase{14, 19500, 6144, 48}}) {
    test_gemm("decode", apex4::cuda::launch_gemm_decode, c, rng);
  }
  std::printf("linear decode\n");
  for (int64_t group : {0, 64, 128}) {
    for (int m : {1, 3, 8, 9, 16}) {
      test_linear_decode<__half>(FloatKind::kF16, "f16", m, 300, 1000, group, rng);
      test_linear_decode<float>(FloatKind::kF32, "f32", m, 4100, 576, group, rng);
    }
    test_linear_decode<__nv_bfloat16>(FloatKind::kBF16, "bf16", 2, 5000, 4096, group, rng);
    test_linear_decode<__half>(FloatKind::kF16, "f16", 3, 200, 1001, group, rng);  // unaligned rows
  }
  test_linear_decode_after_weight_writer(rng);
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
