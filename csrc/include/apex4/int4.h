// The one definition of the APEX4 INT4 data layout and quantization math.
// Torch-free and host/device-agnostic: the CPU kernels, the CUDA kernels and
// the standalone nvcc tests all include this file, so a packed tensor means the
// same thing everywhere. docs/design.md explains the layout in prose.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define APEX4_HD __host__ __device__ __forceinline__
#else
#define APEX4_HD inline
#endif

namespace apex4 {

// K is zero-padded to a multiple of this for per-channel / per-token
// quantization, and group sizes must be a multiple of it: one m16n8k64 INT4 MMA
// (or two k32 INT8 MMAs) consumes 64 values of K, so every group is a whole
// number of MMA steps and no kernel needs a K tail.
constexpr int64_t kKAlign = 64;
// Symmetric grid: values in [-kQMax, kQMax]; -8 is never produced (keeps the
// grid symmetric), though kernels accept it in packed input.
constexpr int kQMax = 7;

// group_size <= 0 means one group spanning all of K (per-channel / per-token).
APEX4_HD int64_t padded_k(int64_t k, int64_t group_size) {
  const int64_t align = group_size > 0 ? group_size : kKAlign;
  return (k + align - 1) / align * align;
}

APEX4_HD int64_t num_groups(int64_t k, int64_t group_size) {
  return group_size > 0 ? padded_k(k, group_size) / group_size : 1;
}

// Scale of a group from its absolute maximum. A non-finite amax (the group
// holds NaN or Inf) gives a NaN scale, so every output that uses the group is
// NaN instead of silently finite; the group's values quantize to 0.
APEX4_HD float group_scale(float amax, float clip_ratio) {
  if (!(amax <= 3.402823466e38f)) return NAN;  // NaN or +Inf
  return amax * clip_ratio / static_cast<float>(kQMax);
}

// Round half to even (rintf / __float2int_rn agree), clamp to the grid.
APEX4_HD int quantize_value(float x, float scale) {
  if (!(scale > 0.0f) || !(scale <= 3.402823466e38f)) return 0;  // zero, NaN
  float q = rintf(x / scale);
  q = q > kQMax ? kQMax : q;
  q = q < -kQMax ? -kQMax : q;
  return static_cast<int>(q);
}

// Packing: byte j of a row holds element 2j in bits 0-3 and element 2j+1 in
// bits 4-7, each as a two's-complement 4-bit integer.
APEX4_HD uint8_t pack_pair(int lo, int hi) {
  return static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
}
APEX4_HD int unpack_lo(uint8_t b) { return static_cast<int>(static_cast<int8_t>(b << 4)) >> 4; }
APEX4_HD int unpack_hi(uint8_t b) { return static_cast<int>(static_cast<int8_t>(b)) >> 4; }

}  // namespace apex4
