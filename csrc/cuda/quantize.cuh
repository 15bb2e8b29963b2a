// quantize_act / quantize_weight on the GPU (pack_int4 and unpack_int4, plain
// elementwise kernels, live in quantize.cu).
//
// Quantization is one pass over x: a block per row, sized so that every
// thread holds 4 (or 8) vectors of 8 values of the row in registers, issues
// all of its loads before using any (many bytes in flight), finds each
// group's amax, turns it into the group's scale and writes the packed row and
// the scales once. Groups of 64, 128 or 256 values lie in 8, 16 or 32
// consecutive lanes, so their amax needs only shuffles; longer groups (and
// per channel) meet in shared memory. The math is int4.h's on the same fp32
// values as the CPU kernel, with the division done exactly but cheaply
// (quantize_8), so the two agree bit for bit. Rows longer than a block's
// registers (32768 values, 65536 of the 16-bit types) are done in chunks,
// re-reading them from L2 when their groups span chunks.
#pragma once

#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "apex4/int4.h"
#include "cuda/primitives.cuh"

namespace apex4::cuda {

// Threads of the block quantize_rows_in_block runs with.
constexpr int kQuantizeThreads = 256;
// Largest block of quantize_kernel (one row, or a chunk of one, per block).
constexpr int kQuantizeMaxThreads = 1024;

// Eight consecutive values of a row as the raw bits of T: 4 words for the
// 16-bit types, 8 for fp32.
template <typename T>
struct Vec8 {
  uint32_t w[sizeof(T) * 2];
  __device__ __forceinline__ float operator[](int i) const {
    if constexpr (sizeof(T) == 4) {
      return __uint_as_float(w[i]);
    } else if constexpr (std::is_same_v<T, __half>) {
      const __half2 h = *reinterpret_cast<const __half2*>(&w[i / 2]);
      return i % 2 == 0 ? __low2float(h) : __high2float(h);
    } else {  // bfloat16: the top half of an fp32
      return __uint_as_float(i % 2 == 0 ? w[i / 2] << 16 : w[i / 2] & 0xFFFF0000u);
    }
  }
};
// Vectors a thread of quantize_kernel holds: 4, or 8 for 16-bit rows longer
// than 4 * 8 * 512 values, so that a block stays within 512 threads and two
// blocks (two rows) fit an SM's registers.
constexpr int kVecsPerThread = 4;
constexpr int kLongRowVecsPerThread = 8;
constexpr int64_t kLongRowVecs = 512 * kVecsPerThread;

// Values 8*vec .. 8*vec+7 of a row of k values, zeros past k (or for vec <
// 0); kGlobal says whether the row is in global memory (read-only loads)
// or shared memory (generic loads). vector_loads: rows are 16-byte aligned
// and k % 8 == 0.
template <typename T, bool kGlobal = true>
__device__ __forceinline__ Vec8<T> load_vec8(const T* row, int64_t k, int64_t vec,
                                             bool vector_loads) {
  Vec8<T> v;
  const int64_t e0 = vec * 8;
  constexpr int kWords = sizeof(T) * 2;
  if (vector_loads) {
    const bool in_row = vec >= 0 && e0 < k;
#pragma unroll
    for (int h = 0; h < kWords / 4; ++h) {
      const uint4* p = reinterpret_cast<const uint4*>(row + e0) + h;
      uint4 u = make_uint4(0, 0, 0, 0);
      if (in_row) {
        if constexpr (kGlobal) {
          u = __ldg(p);
        } else {
          u = *p;
        }
      }
      v.w[4 * h] = u.x, v.w[4 * h + 1] = u.y, v.w[4 * h + 2] = u.z, v.w[4 * h + 3] = u.w;
    }
  } else {
    const auto* bits = reinterpret_cast<
        const std::conditional_t<sizeof(T) == 4, uint32_t, unsigned short>*>(row);
#pragma unroll
    for (int i = 0; i < kWords; ++i) v.w[i] = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t b = vec >= 0 && e0 + i < k ? bits[e0 + i] : 0u;
      if constexpr (sizeof(T) == 4) {
        v.w[i] = b;
      } else {
        v.w[i / 2] |= b << (16 * (i % 2));
      }
    }
  }
  return v;
}

// |v|'s largest value as float bits: for non-negative floats unsigned order is
// float order, and NaN bits sort above +Inf, so a NaN or Inf anywhere in a
// group reaches group_scale, which turns either into a NaN scale (the CPU
// kernel's rule).
// For the 16-bit types the same holds for their own bits: the max is taken
// two halves at a time on the packed words, then converted once (exactly).
template <typename T>
__device__ __forceinline__ uint32_t amax_bits(const Vec8<T>& v) {
  if constexpr (sizeof(T) == 4) {
    uint32_t bits = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) bits = max(bits, v.w[i] & 0x7FFFFFFFu);
    return bits;
  } else {
    constexpr uint32_t kAbs = 0x7FFF7FFFu;
    const uint32_t pair = __vmaxu2(__vmaxu2(v.w[0] & kAbs, v.w[1] & kAbs),
                                   __vmaxu2(v.w[2] & kAbs, v.w[3] & kAbs));
    const uint32_t bits = max(pair >> 16, pair & 0xFFFFu);
    if constexpr (std::is_same_v<T, __half>) {
      return __float_as_uint(__half2float(__ushort_as_half(static_cast<unsigned short>(bits))));
    } else {
      return bits << 16;
    }
  }
}

// The max of bits over aligned spans of `lanes` lanes (a power of two <= 32).
__device__ __forceinline__ uint32_t span_max(uint32_t bits, int lanes) {
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    if (offset < lanes) bits = max(bits, __shfl_xor_sync(0xffffffffu, bits, offset));
  }
  return bits;
}

// Nibbles of four values, each the low byte of t[i] (two's complement), in
// bytes 0 (values 0, 1) and 2 (values 2, 3) of the result.
__device__ __forceinline__ uint32_t nibble_pairs(uint32_t t0, uint32_t t1, uint32_t t2,
                                                 uint32_t t3) {
  const uint32_t bytes = __byte_perm(__byte_perm(t0, t1, 0x0040), __byte_perm(t2, t3, 0x0040),
                                     0x5410);
  return (bytes & 0x0F0F0F0Fu) | ((bytes >> 4) & 0xF0F0F0F0u);
}

// The packed word (value i in bits 4i..4i+3) of quantize_value(v[i], scale),
// int4.h's rintf(v / scale) clamped to +-7, without a division per value:
// y = v * fl(1 / scale) is within 3 ulps of fl(v / scale) (two roundings of
// 2^-24 each against one), i.e. within 8 * 2^-22 for |y| <= 8, so rounding y
// gives the same integer unless a half-integer lies that close to y. Where
// one lies within the far larger margin 2^-16 (about one value in 30000),
// the word is recomputed with int4.h's division. Clamping to +-7 before
// rounding changes nothing (rounding is monotone and +-7 are integers), and
// is needed only for clip ratios below 1 (kClamp): otherwise |v| <= amax
// makes |y| <= 7 (1 + 2^-21), which rounds to at most 7. y + 1.5 * 2^23
// rounds y to the nearest integer, ties to even like rintf, into the low
// mantissa bits, whose low byte is the value's two's complement.
template <bool kClamp = true, typename V>
__device__ __forceinline__ uint32_t quantize_8(const V& v, float scale) {
  const float inv = __frcp_rn(scale);
  if (scale > 0.0f && inv <= FLT_MAX) {  // else 0 or NaN scale: int4.h's zeros below
    constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
    constexpr float kQ = static_cast<float>(kQMax);
    uint32_t t[8];
    bool near_half = false;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float y = kClamp ? fminf(fmaxf(v[i] * inv, -kQ), kQ) : v[i] * inv;
      const float shifted = y + kRound;
      near_half |= fabsf(y - (shifted - kRound)) >= 0.5f - 0x1p-16f;
      t[i] = __float_as_uint(shifted);
    }
    if (!near_half) {
      return __byte_perm(nibble_pairs(t[0], t[1], t[2], t[3]),
                         nibble_pairs(t[4], t[5], t[6], t[7]), 0x6420);
    }
  }
  uint32_t word = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t byte =
        pack_pair(quantize_value(v[2 * j], scale), quantize_value(v[2 * j + 1], scale));
    word |= byte << (8 * j);
  }
  return word;
}

// One row (blockIdx.x) of x [rows, k] into packed [rows, kp/2] and scales
// [rows, groups]; the block's kVecs * blockDim.x vectors form a chunk, and
// thread t holds vectors t, t + blockDim.x, ... of it (coalesced loads).
template <typename T, bool kVectorLoads, bool kClamp, int kVecs>
__global__ void __launch_bounds__(kQuantizeMaxThreads)
    quantize_kernel(const T* x, int64_t k, int kp, int group_len, float clip_ratio,
                    uint8_t* packed, float* scales) {
  extern __shared__ uint32_t group_bits[];  // per group: amax bits, then scale bits
  const int groups = kp / group_len;
  const int vecs = kp / 8;
  const int chunk = blockDim.x * kVecs;
  const int64_t row = blockIdx.x;
  const T* x_row = x + row * k;
  uint32_t* packed_row = reinterpret_cast<uint32_t*>(packed + row * (kp / 2));
  float* row_scales = scales + row * groups;
  const int lane = threadIdx.x % 32;
  Vec8<T> v[kVecs];
  // Launched as a programmatic dependent, the kernel waits here for the
  // kernel before it (x's writer, most often). Its own dependent (the decode
  // GEMM of the w4a4_linear pair) is released only then: that GEMM reads its
  // weight before it waits for this grid, so the release must follow the
  // completion of every earlier kernel, a writer of that weight among them.
  // Launched plainly (the pair's quantizer), the wait is a no-op and the GEMM
  // starts streaming at once (1.4 % of a decode chain faster than a release
  // once x's loads are issued; H100, benchmarks/NOTES.md v16).
  wait_for_prerequisite();
  release_dependents();
  auto load_chunk = [&](int c0) {
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
      const int vec = c0 + j * blockDim.x + threadIdx.x;
      v[j] = load_vec8<T>(x_row, k, vec < vecs ? vec : -1, kVectorLoads);
    }
  };

  if (256 % group_len == 0) {
    // Groups of 64, 128 or 256 values: a chunk holds whole groups, each in
    // group_len / 8 consecutive lanes.
    const int lanes = group_len / 8;
    const int lane_shift = __ffs(lanes) - 1;  // vec >> lane_shift: its group
    for (int c0 = 0; c0 < vecs; c0 += chunk) {
      load_chunk(c0);
#pragma unroll
      for (int j = 0; j < kVecs; ++j) {
        const int vec = c0 + j * blockDim.x + threadIdx.x;
        const float scale =
            group_scale(__uint_as_float(span_max(amax_bits(v[j]), lanes)), clip_ratio);
        if (vec < vecs) {
          if (lane % lanes == 0) row_scales[vec >> lane_shift] = scale;
          packed_row[vec] = quantize_8<kClamp>(v[j], scale);
        }
      }
    }
    return;
  }

  // Longer groups: amaxes meet in shared memory.
  for (int g = threadIdx.x; g < groups; g += blockDim.x) group_bits[g] = 0;
  __syncthreads();
  const bool one_pass = vecs <= chunk;
  for (int c0 = 0; c0 < vecs; c0 += chunk) {
    load_chunk(c0);
    if (groups == 1) {  // per channel: one atomic per warp
      uint32_t bits = 0;
#pragma unroll
      for (int j = 0; j < kVecs; ++j) bits = max(bits, amax_bits(v[j]));
      bits = span_max(bits, 32);
      if (lane == 0) atomicMax(group_bits, bits);
    } else {  // lanes 8i..8i+7 hold 64 values of one group
#pragma unroll
      for (int j = 0; j < kVecs; ++j) {
        const int vec = c0 + j * blockDim.x + threadIdx.x;
        const uint32_t bits = span_max(amax_bits(v[j]), 8);
        if (lane % 8 == 0 && vec < vecs) atomicMax(group_bits + vec * 8 / group_len, bits);
      }
    }
  }
  __syncthreads();
  for (int g = threadIdx.x; g < groups; g += blockDim.x) {
    const float scale = group_scale(__uint_as_float(group_bits[g]), clip_ratio);
    row_scales[g] = scale;
    group_bits[g] = __float_as_uint(scale);
  }
  __syncthreads();
  for (int c0 = 0; c0 < vecs; c0 += chunk) {
    if (!one_pass) load_chunk(c0);
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
      const int vec = c0 + j * blockDim.x + threadIdx.x;
      if (vec < vecs) {
        const int group = groups == 1 ? 0 : vec * 8 / group_len;
        packed_row[vec] = quantize_8<kClamp>(v[j], __uint_as_float(group_bits[group]));
      }
    }
  }
}

// Folds |v| into the amax of its group in shared memory (quantize_rows_in_block).
template <typename T>
__device__ __forceinline__ void note_amax(const Vec8<T>& v, int vec, int vecs, int group_len,
                                          uint32_t* group_bits) {
  // Lanes 8j..8j+7 hold 64 consecutive values, which lie in one group since
  // group_len is a multiple of 64: reduce there. When groups are multiples of
  // 256 (per channel, for one) the warp's 256 values lie in one group: reduce
  // over the warp, one atomic per warp instead of four on the same word.
  const bool whole_warp = group_len % 256 == 0;
  const uint32_t bits = span_max(amax_bits(v), whole_warp ? 32 : 8);
  // A lane writes if it leads its reduction and holds values (vecs is a
  // multiple of 8, so an 8-lane span is in range or out as a whole).
  if (threadIdx.x % (whole_warp ? 32 : 8) == 0 && vec < vecs) {
    atomicMax(group_bits + vec * 8 / group_len, bits);
  }
}

// Quantizes rows 0 .. rows-1 of x [rows, k] (in global memory, or shared
// with kGlobal = false) with the whole block of kQuantizeThreads threads into
// shared memory: row r packed at packed + r * packed_stride, its group scales
// at scales[r * groups ..] (as float bits). Same math on the same fp32 values
// as quantize_kernel, so the same bits as quantize_act. Reads x twice, and
// ends with __syncthreads.
template <typename T, bool kGlobal>
__device__ void quantize_rows_in_block(const T* x, int64_t k, int kp, int group_len,
                                       float clip_ratio, bool vector_loads, int rows,
                                       uint8_t* packed, int packed_stride, uint32_t* scales) {
  const int groups = kp / group_len;
  const int vecs = kp / 8;
  const int slots = (vecs + kQuantizeThreads - 1) / kQuantizeThreads;
  for (int j = threadIdx.x; j < rows * groups; j += kQuantizeThreads) scales[j] = 0;
  __syncthreads();
  for (int r = 0; r < rows; ++r) {
    for (int s = 0; s < slots; ++s) {
      const int vec = s * kQuantizeThreads + threadIdx.x;
      const Vec8<T> v = load_vec8<T, kGlobal>(x + r * k, k, vec < vecs ? vec : -1, vector_loads);
      note_amax(v, vec, vecs, group_len, scales + r * groups);
    }
  }
  __syncthreads();
  for (int j = threadIdx.x; j < rows * groups; j += kQuantizeThreads) {
    scales[j] = __float_as_uint(group_scale(__uint_as_float(scales[j]), clip_ratio));
  }
  __syncthreads();
  for (int r = 0; r < rows; ++r) {
    for (int s = 0; s < slots; ++s) {
      const int vec = s * kQuantizeThreads + threadIdx.x;
      if (vec >= vecs) continue;
      const Vec8<T> v = load_vec8<T, kGlobal>(x + r * k, k, vec, vector_loads);
      const float scale = __uint_as_float(scales[r * groups + vec * 8 / group_len]);
      reinterpret_cast<uint32_t*>(packed + r * packed_stride)[vec] = quantize_8(v, scale);
    }
  }
  __syncthreads();
}

// programmatic: the kernel is launched as a programmatic dependent of the
// kernel before it on the stream (compute capability 9.0+), so that its
// launch overlaps that kernel's end.
template <typename T>
cudaError_t launch_quantize_typed(const T* x, int64_t rows, int64_t k, int64_t kp,
                                  int64_t group_len, float clip_ratio, uint8_t* packed,
                                  float* scales, bool programmatic, cudaStream_t stream) {
  const bool vector_loads = k % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  // Enough warps for a row's vectors (one chunk), at most kQuantizeMaxThreads.
  const bool long_rows = sizeof(T) == 2 && vector_loads && kp / 8 > kLongRowVecs;
  const int64_t vecs_per_thread = long_rows ? kLongRowVecsPerThread : kVecsPerThread;
  const int64_t warps = (kp / 8 + 32 * vecs_per_thread - 1) / (32 * vecs_per_thread);
  const unsigned threads =
      static_cast<unsigned>(warps * 32 < kQuantizeMaxThreads ? warps * 32 : kQuantizeMaxThreads);
  const size_t smem =
      256 % group_len == 0 ? 0 : static_cast<size_t>(kp / group_len) * sizeof(uint32_t);
  const bool clamp = clip_ratio < 1.0f;  // see quantize_8
  constexpr int kLong = sizeof(T) == 2 ? kLongRowVecsPerThread : kVecsPerThread;
  const auto kernel =
      !vector_loads ? (clamp ? quantize_kernel<T, false, true, kVecsPerThread>
                             : quantize_kernel<T, false, false, kVecsPerThread>)
      : long_rows   ? (clamp ? quantize_kernel<T, true, true, kLong>
                             : quantize_kernel<T, true, false, kLong>)
                    : (clamp ? quantize_kernel<T, true, true, kVecsPerThread>
                             : quantize_kernel<T, true, false, kVecsPerThread>);
  return launch_kernel(kernel, dim3(static_cast<unsigned>(rows)), dim3(threads), smem, stream,
                       programmatic, x, k, static_cast<int>(kp), static_cast<int>(group_len),
                       clip_ratio, packed, scales);
}

}  // namespace apex4::cuda
