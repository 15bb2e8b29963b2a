// quantize_act / quantize_weight on the GPU (pack_int4 and unpack_int4, plain
// elementwise kernels, live in quantize.cu).
//
// Quantization is one pass over x: one block per row reads the row once into
// registers (8 values a thread and slot, 16-byte loads where aligned), finds
// each group's amax, turns it into the group's scale and writes the packed
// row and the scales once. The math is int4.h's, on the same fp32 values as
// the CPU kernel, so the two agree bit for bit. Rows longer than the register
// cache (kSlots * 8 * 256 values) re-read their tail from global memory (L2).
#pragma once

#include <cstdint>

#include "apex4/int4.h"
#include "cuda/primitives.cuh"

namespace apex4::cuda {

constexpr int kQuantizeThreads = 256;

// 16 bytes at p: read-only global loads (__ldg) for global memory, plain
// (generic) loads where p may point to shared memory.
template <bool kGlobal, typename V>
__device__ __forceinline__ V load_16(const void* p) {
  if constexpr (kGlobal) {
    return __ldg(reinterpret_cast<const V*>(p));
  } else {
    return *reinterpret_cast<const V*>(p);
  }
}

// Values 8*vec .. 8*vec+7 of a row of k values, zeros past k; kGlobal says
// whether the row is in global memory (else shared).
template <typename T, bool kGlobal = true>
__device__ __forceinline__ void load_8(const T* row, int64_t k, int vec, bool vector_loads,
                                       float (&v)[8]) {
  const int64_t e0 = static_cast<int64_t>(vec) * 8;
  if (vector_loads && e0 + 8 <= k) {
    if constexpr (sizeof(T) == 2) {
      const uint4 raw = load_16<kGlobal, uint4>(row + e0);
      const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = to_float(h[i]);
    } else {
      const float4 lo = load_16<kGlobal, float4>(row + e0);
      const float4 hi = load_16<kGlobal, float4>(row + e0 + 4);
      v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w;
      v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = e0 + i < k ? to_float(row[e0 + i]) : 0.0f;
  }
}

// Folds |v| into the amax of its group. Amaxes are kept as the bits of |x|:
// for non-negative floats unsigned order is float order, and NaN bits sort
// above +Inf, so a NaN or Inf anywhere in the group reaches group_scale, which
// turns either into a NaN scale (the CPU kernel's rule).
__device__ __forceinline__ void note_amax(const float (&v)[8], int vec, int vecs, int group_len,
                                          uint32_t* group_bits) {
  uint32_t bits = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) bits = max(bits, __float_as_uint(fabsf(v[i])));
  // Lanes 8j..8j+7 hold 64 consecutive values, which lie in one group since
  // group_len is a multiple of 64: reduce there. When groups are multiples of
  // 256 (per channel, for one) the warp's 256 values lie in one group: reduce
  // over the warp, one atomic per warp instead of four on the same word.
#pragma unroll
  for (int offset = 1; offset < 8; offset *= 2) {
    bits = max(bits, __shfl_xor_sync(0xffffffffu, bits, offset));
  }
  const bool whole_warp = group_len % 256 == 0;
  if (whole_warp) {
    bits = max(bits, __shfl_xor_sync(0xffffffffu, bits, 8));
    bits = max(bits, __shfl_xor_sync(0xffffffffu, bits, 16));
  }
  // A lane writes if it leads its reduction and holds values (vecs is a
  // multiple of 8, so an 8-lane span is in range or out as a whole).
  if (threadIdx.x % (whole_warp ? 32 : 8) == 0 && vec < vecs) {
    atomicMax(group_bits + vec * 8 / group_len, bits);
  }
}

__device__ __forceinline__ void store_packed(const float (&v)[8], int vec, int vecs, int group_len,
                                             const uint32_t* group_bits, uint8_t* packed_row) {
  if (vec >= vecs) return;
  const float scale = __uint_as_float(group_bits[vec * 8 / group_len]);
  uint32_t word = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t byte =
        pack_pair(quantize_value(v[2 * j], scale), quantize_value(v[2 * j + 1], scale));
    word |= byte << (8 * j);
  }
  reinterpret_cast<uint32_t*>(packed_row)[vec] = word;
}

template <typename T, int kSlots>
__global__ void __launch_bounds__(kQuantizeThreads)
    quantize_kernel(const T* x, int64_t k, int kp, int group_len, float clip_ratio,
                    bool vector_loads, uint8_t* packed, float* scales) {
  extern __shared__ uint32_t group_bits[];  // per group: amax bits, then scale bits
  const int groups = kp / group_len;
  const int vecs = kp / 8;
  const int slots = (vecs + kQuantizeThreads - 1) / kQuantizeThreads;
  const int64_t row = blockIdx.x;
  const T* x_row = x + row * k;
  uint8_t* packed_row = packed + row * (kp / 2);

  for (int j = threadIdx.x; j < groups; j += kQuantizeThreads) group_bits[j] = 0;
  __syncthreads();
  float v[kSlots][8];
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    const int vec = s * kQuantizeThreads + threadIdx.x;
    load_8(x_row, k, vec, vector_loads, v[s]);
    note_amax(v[s], vec, vecs, group_len, group_bits);
  }
  for (int s = kSlots; s < slots; ++s) {
    const int vec = s * kQuantizeThreads + threadIdx.x;
    float u[8];
    load_8(x_row, k, vec, vector_loads, u);
    note_amax(u, vec, vecs, group_len, group_bits);
  }
  __syncthreads();
  for (int j = threadIdx.x; j < groups; j += kQuantizeThreads) {
    const float scale = group_scale(__uint_as_float(group_bits[j]), clip_ratio);
    scales[row * groups + j] = scale;
    group_bits[j] = __float_as_uint(scale);
  }
  __syncthreads();
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    store_packed(v[s], s * kQuantizeThreads + threadIdx.x, vecs, group_len, group_bits, packed_row);
  }
  for (int s = kSlots; s < slots; ++s) {
    const int vec = s * kQuantizeThreads + threadIdx.x;
    float u[8];
    load_8(x_row, k, vec, vector_loads, u);
    store_packed(u, vec, vecs, group_len, group_bits, packed_row);
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
      float v[8];
      load_8<T, kGlobal>(x + r * k, k, vec, vector_loads, v);
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
      float v[8];
      load_8<T, kGlobal>(x + r * k, k, vec, vector_loads, v);
      store_packed(v, vec, vecs, group_len, scales + r * groups, packed + r * packed_stride);
    }
  }
  __syncthreads();
}

template <typename T>
void launch_quantize_typed(const T* x, int64_t rows, int64_t k, int64_t kp, int64_t group_len,
                           float clip_ratio, uint8_t* packed, float* scales, cudaStream_t stream) {
  const int64_t per_thread = (kp / 8 + kQuantizeThreads - 1) / kQuantizeThreads;
  const bool vector_loads = k % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const size_t smem = static_cast<size_t>(kp / group_len) * sizeof(uint32_t);
  auto launch = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(rows), kQuantizeThreads, smem, stream>>>(
        x, k, static_cast<int>(kp), static_cast<int>(group_len), clip_ratio, vector_loads, packed,
        scales);
  };
  if (per_thread <= 1) {
    launch(quantize_kernel<T, 1>);
  } else if (per_thread <= 2) {
    launch(quantize_kernel<T, 2>);
  } else if (per_thread <= 4) {
    launch(quantize_kernel<T, 4>);
  } else {
    launch(quantize_kernel<T, 8>);
  }
}

}  // namespace apex4::cuda
