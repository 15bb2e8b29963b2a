// Throughput micro-benchmarks behind `python -m torch_apex4 probe`
// (torch_apex4/rho.py): each kernel keeps one execution pipe of every SM
// busy with independent chains of one instruction, so (ops per block
// iteration x blocks x iterations) / time is that pipe's rate.
//
//   FFMA    fma.rn.f32 chains                        2 FLOP per FMA
//   I2F     x += float(bits(x)): cvt.rn.f32.s32 + FADD, one conversion each
//   MMA_S8  mma.sync m16n8k32 s8 (Ampere and newer)   2 ops per MAC
//   MMA_S4  mma.sync m16n8k64 s4 (INT4 tensor cores; Hopper emulates it)
//   WGMMA_S8 wgmma m64n256k32 s8, operands in shared memory (sm_90a only)
//
// Every chain's final value is stored, so no instruction is dead code; the
// operands depend on kernel arguments or on the chain itself, so nothing is
// loop-invariant. The sm_90a check (a wgmma probe compiled without it would
// be an empty kernel with an absurd rate) is a sentinel the kernel writes.
//
// Torch-free: rho.py calls the extern "C" entry points below through ctypes
// on the loaded extension, so the probe adds no op to the apex4 namespace.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/primitives.cuh"

namespace apex4::cuda {
namespace {

enum ProbeKind : int { kFfma = 0, kI2f = 1, kMmaS8 = 2, kMmaS4 = 3, kWgmmaS8 = 4 };

constexpr int kThreads = 256;
constexpr int kChains = 8;   // independent dependency chains per thread (scalar probes)
constexpr int kUnroll = 16;  // instructions per chain per loop iteration
constexpr int kMmaChains = 4;
constexpr int kWgmmaSteps = 4;  // k32 steps per commit group: one 128-byte swizzle row
// wgmma operands: A 64 rows, B 256 rows, K-major 128-byte rows (sw128 atoms).
constexpr int kWgmmaABytes = 64 * 128;
constexpr int kWgmmaBBytes = 256 * 128;
constexpr int kWgmmaSmem = kWgmmaABytes + kWgmmaBBytes + 1024;  // + alignment slack
constexpr int kNotSm90a = -0x5A5A5A5A;  // sink value of a wgmma probe built without sm_90a

__global__ void __launch_bounds__(kThreads) probe_ffma(float* sink, int iterations, float b,
                                                       float c) {
  float x[kChains];
#pragma unroll
  for (int j = 0; j < kChains; ++j) x[j] = threadIdx.x * 1e-3f + j;
  for (int i = 0; i < iterations; ++i) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < kChains; ++j) x[j] = fmaf(x[j], b, c);
    }
  }
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < kChains; ++j) s += x[j];
  sink[blockIdx.x * kThreads + threadIdx.x] = s;
}

// The conversion's input is the chain's own bits, so it cannot be hoisted and
// costs no integer instruction; the FADD runs on the FP32 pipe beside it.
__global__ void __launch_bounds__(kThreads) probe_i2f(float* sink, int iterations, float seed) {
  float x[kChains];
#pragma unroll
  for (int j = 0; j < kChains; ++j) x[j] = seed + threadIdx.x + j;
  for (int i = 0; i < iterations; ++i) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < kChains; ++j) x[j] += static_cast<float>(__float_as_int(x[j]));
    }
  }
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < kChains; ++j) s += x[j];
  sink[blockIdx.x * kThreads + threadIdx.x] = s;
}

template <bool kInt4>
__global__ void __launch_bounds__(kThreads) probe_mma(int* sink, int iterations, uint32_t seed) {
  uint32_t a[4], b[2];
#pragma unroll
  for (int r = 0; r < 4; ++r) a[r] = seed * (threadIdx.x + 7 * r + 1);
  b[0] = seed ^ threadIdx.x;
  b[1] = seed + threadIdx.x;
  int c[kMmaChains][4] = {};
  for (int i = 0; i < iterations; ++i) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < kMmaChains; ++j) {
        if constexpr (kInt4) {
          mma_s4_k64(c[j], a, b);
        } else {
          mma_s8_k32(c[j], a, b);
        }
      }
    }
  }
  int s = 0;
#pragma unroll
  for (int j = 0; j < kMmaChains; ++j) s += c[j][0] + c[j][1] + c[j][2] + c[j][3];
  sink[blockIdx.x * kThreads + threadIdx.x] = s;
}

// Two warpgroups, each issuing m64n256k32 wgmmas on the same (zeroed) tiles,
// one commit group of kWgmmaSteps per iteration with one group kept in flight:
// the tensor pipe never waits for the issuing warps.
__global__ void __launch_bounds__(kThreads) probe_wgmma(int* sink, int iterations) {
#if defined(APEX4_SM90A)
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  for (int i = threadIdx.x; i < (kWgmmaABytes + kWgmmaBBytes) / 16; i += kThreads) {
    reinterpret_cast<uint4*>(smem)[i] = make_uint4(0, 0, 0, 0);
  }
  fence_proxy_async_shared();
  __syncthreads();
  const uint32_t a_addr = shared_addr(smem), b_addr = a_addr + kWgmmaABytes;
  int d[128];
#pragma unroll
  for (int r = 0; r < 128; ++r) d[r] = 0;
  for (int i = 0; i < iterations; ++i) {
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < kWgmmaSteps; ++s) {
      wgmma_s8_k32<256>(d, wgmma_desc_k_major_sw128(a_addr + 32 * s),
                        wgmma_desc_k_major_sw128(b_addr + 32 * s), 1);
    }
    wgmma_commit();
    wgmma_wait<1>();
  }
  wgmma_wait<0>();
  int s = 0;
#pragma unroll
  for (int r = 0; r < 128; ++r) s += d[r];
  sink[blockIdx.x * kThreads + threadIdx.x] = s;
#else
  (void)iterations;
  sink[blockIdx.x * kThreads + threadIdx.x] = kNotSm90a;
#endif
}

}  // namespace
}  // namespace apex4::cuda

using namespace apex4::cuda;

extern "C" {

__attribute__((visibility("default"))) int apex4_probe_threads() { return kThreads; }

__attribute__((visibility("default"))) int apex4_probe_not_sm90a_sentinel() { return kNotSm90a; }

// Operations one block performs per loop iteration: FLOP (2 per FMA) for
// FFMA, conversions for I2F, integer ops (2 per multiply-add) for the MMAs.
// -1 for an unknown kind.
__attribute__((visibility("default"))) double apex4_probe_ops_per_block_iteration(int kind) {
  const double warps = kThreads / 32, warpgroups = kThreads / 128;
  switch (kind) {
    case kFfma: return 2.0 * kThreads * kChains * kUnroll;
    case kI2f: return 1.0 * kThreads * kChains * kUnroll;
    case kMmaS8: return warps * kMmaChains * kUnroll * (2.0 * 16 * 8 * 32);
    case kMmaS4: return warps * kMmaChains * kUnroll * (2.0 * 16 * 8 * 64);
    case kWgmmaS8: return warpgroups * kWgmmaSteps * (2.0 * 64 * 256 * 32);
    default: return -1.0;
  }
}

// Launches `blocks` blocks of probe `kind` for `iterations` loop iterations on
// `stream`; sink holds blocks * apex4_probe_threads() 4-byte values. Returns
// a cudaError_t: cudaErrorInvalidValue for bad arguments.
__attribute__((visibility("default"))) int apex4_probe_launch(int kind, int blocks,
                                                              int iterations, void* sink,
                                                              void* stream) {
  if (blocks <= 0 || iterations <= 0 || sink == nullptr) return cudaErrorInvalidValue;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (kind) {
    case kFfma:
      probe_ffma<<<blocks, kThreads, 0, s>>>(static_cast<float*>(sink), iterations, 0.999f,
                                             1e-3f);
      break;
    case kI2f:
      probe_i2f<<<blocks, kThreads, 0, s>>>(static_cast<float*>(sink), iterations, 1.0f);
      break;
    case kMmaS8:
      probe_mma<false><<<blocks, kThreads, 0, s>>>(static_cast<int*>(sink), iterations,
                                                   0x9E3779B9u);
      break;
    case kMmaS4:
      probe_mma<true><<<blocks, kThreads, 0, s>>>(static_cast<int*>(sink), iterations,
                                                  0x9E3779B9u);
      break;
    case kWgmmaS8:
      probe_wgmma<<<blocks, kThreads, kWgmmaSmem, s>>>(static_cast<int*>(sink), iterations);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // extern "C"
