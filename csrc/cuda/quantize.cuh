// quantize_act / quantize_weight, pack_int4 and unpack_int4 on the GPU.
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

// Values 8*vec .. 8*vec+7 of a row of k values, zeros past k.
template <typename T>
__device__ __forceinline__ void load_8(const T* row, int64_t k, int vec, bool vector_loads,
                                       float (&v)[8]) {
  const int64_t e0 = static_cast<int64_t>(vec) * 8;
  if (vector_loads && e0 + 8 <= k) {
    if constexpr (sizeof(T) == 2) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + e0));
      const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = to_float(h[i]);
    } else {
      const float4 lo = __ldg(reinterpret_cast<const float4*>(row + e0));
      const float4 hi = __ldg(reinterpret_cast<const float4*>(row + e0 + 4));
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
  // group_len is a multiple of 64: reduce there, one atomic per 64 values.
#pragma unroll
  for (int offset = 1; offset < 8; offset *= 2) {
    bits = max(bits, __shfl_xor_sync(0xffffffffu, bits, offset));
  }
  if (threadIdx.x % 8 == 0 && vec < vecs) atomicMax(group_bits + vec * 8 / group_len, bits);
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

}  // namespace apex4::cuda
