// CPU kernel bodies of the apex4 ops. Torch-free: plain pointers and sizes, so
// they build and test alone; csrc/cpu/ops_cpu.cpp validates arguments, allocates
// and splits the work across threads with at::parallel_for.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "apex4/int4.h"

namespace apex4::cpu {

// Quantize rows [row_begin, row_end) of x [rows, k] into packed [rows, kp/2]
// and scales [rows, groups]. T is any type with a conversion to float.
template <typename T>
void quantize_rows(const T* x, int64_t row_begin, int64_t row_end, int64_t k, int64_t kp,
                   int64_t group_len, float clip_ratio, uint8_t* packed, float* scales) {
  const int64_t groups = kp / group_len;
  std::vector<float> buf(group_len);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* xr = x + r * k;
    uint8_t* pr = packed + r * (kp / 2);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * group_len;
      const int64_t valid = std::clamp<int64_t>(k - k0, 0, group_len);
      float amax = 0.0f;
      float poison = 0.0f;  // becomes NaN iff the group holds NaN or Inf
      for (int64_t i = 0; i < valid; ++i) {
        const float v = static_cast<float>(xr[k0 + i]);
        buf[i] = v;
        amax = std::max(amax, std::fabs(v));
        poison += v * 0.0f;
      }
      std::fill(buf.begin() + valid, buf.end(), 0.0f);
      const float scale = group_scale(std::isnan(poison) ? NAN : amax, clip_ratio);
      scales[r * groups + g] = scale;
      for (int64_t i = 0; i < group_len; i += 2) {
        pr[(k0 + i) / 2] = pack_pair(quantize_value(buf[i], scale), quantize_value(buf[i + 1], scale));
      }
    }
  }
}

inline void pack_values(const int8_t* values, int64_t n_bytes, uint8_t* packed) {
  for (int64_t j = 0; j < n_bytes; ++j) packed[j] = pack_pair(values[2 * j], values[2 * j + 1]);
}

inline void unpack_values(const uint8_t* packed, int64_t n_bytes, int8_t* values) {
  for (int64_t j = 0; j < n_bytes; ++j) {
    values[2 * j] = static_cast<int8_t>(unpack_lo(packed[j]));
    values[2 * j + 1] = static_cast<int8_t>(unpack_hi(packed[j]));
  }
}

// ---- GEMM -------------------------------------------------------------------
// Output tiles of kTileM x kTileN; each tile unpacks its rows of A and W to
// int16 once (so the inner loop is a plain int16 dot product the compiler turns
// into multiply-add SIMD), then walks K group by group: exact int32 partials
// per group, scaled into float accumulators at the group's end.
constexpr int64_t kTileM = 64;
constexpr int64_t kTileN = 64;
constexpr int kMicroM = 4;
constexpr int kMicroN = 4;
// K is consumed in chunks so that the 4+4 rows of a micro-tile stay in L1 even
// for per-channel groups spanning all of K.
constexpr int64_t kChunkK = 512;

// Rows of an int16 tile buffer are rounded up to the micro-tile so the micro
// kernel needs no tails; the extra rows are zeros and never read back.
inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

inline void unpack_rows_i16(const uint8_t* packed, int64_t rows, int64_t rows_alloc, int64_t kp,
                            int16_t* out) {
  const int64_t kb = kp / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* p = packed + r * kb;
    int16_t* o = out + r * kp;
    for (int64_t j = 0; j < kb; ++j) {
      o[2 * j] = static_cast<int16_t>(unpack_lo(p[j]));
      o[2 * j + 1] = static_cast<int16_t>(unpack_hi(p[j]));
    }
  }
  std::memset(out + rows * kp, 0, sizeof(int16_t) * (rows_alloc - rows) * kp);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
// One binary for every x86 CPU: the loader picks the widest SIMD present.
#define APEX4_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define APEX4_SIMD_CLONES
#endif

// acc[i][j] += sum_k a[i][k] * w[j][k] over len values, for a kMicroM x kMicroN
// block; a and w rows are ld apart.
APEX4_SIMD_CLONES
inline void micro_dot(const int16_t* __restrict a, const int16_t* __restrict w, int64_t ld,
                      int64_t len, int32_t* __restrict acc, int64_t acc_ld) {
  for (int i = 0; i < kMicroM; ++i) {
    for (int j = 0; j < kMicroN; ++j) {
      const int16_t* ai = a + i * ld;
      const int16_t* wj = w + j * ld;
      int32_t s = 0;
      for (int64_t k = 0; k < len; ++k) s += static_cast<int32_t>(ai[k]) * wj[k];
      acc[i * acc_ld + j] += s;
    }
  }
}

struct GemmTileBuffers {
  std::vector<int16_t> a, w;
  std::vector<int32_t> partial;
  std::vector<float> acc;
  explicit GemmTileBuffers(int64_t kp)
      : a(kTileM * kp), w(kTileN * kp), partial(kTileM * kTileN), acc(kTileM * kTileN) {}
};

// One output tile: rows [m0, m0+tm) of A against rows [n0, n0+tn) of W.
// Accumulates in fp32, adds the bias, and rounds once into out (row stride ldo,
// any type constructible from float).
template <typename T>
void gemm_tile(const uint8_t* a_q, const float* a_s, const uint8_t* w_q, const float* w_s,
                      const float* bias, int64_t m0, int64_t tm, int64_t n0, int64_t tn,
                      int64_t kp, int64_t groups, GemmTileBuffers& buf, T* out,
                      int64_t ldo) {
  const int64_t group_len = kp / groups;
  const int64_t tm_alloc = round_up(tm, kMicroM), tn_alloc = round_up(tn, kMicroN);
  unpack_rows_i16(a_q + m0 * (kp / 2), tm, tm_alloc, kp, buf.a.data());
  unpack_rows_i16(w_q + n0 * (kp / 2), tn, tn_alloc, kp, buf.w.data());
  std::fill(buf.acc.begin(), buf.acc.end(), 0.0f);
  for (int64_t g = 0; g < groups; ++g) {
    std::fill(buf.partial.begin(), buf.partial.end(), 0);
    for (int64_t kc = g * group_len; kc < (g + 1) * group_len; kc += kChunkK) {
      const int64_t len = std::min(kChunkK, (g + 1) * group_len - kc);
      for (int64_t i = 0; i < tm_alloc; i += kMicroM) {
        for (int64_t j = 0; j < tn_alloc; j += kMicroN) {
          micro_dot(buf.a.data() + i * kp + kc, buf.w.data() + j * kp + kc, kp, len,
                    buf.partial.data() + i * kTileN + j, kTileN);
        }
      }
    }
    for (int64_t i = 0; i < tm; ++i) {
      const float sa = a_s[(m0 + i) * groups + g];
      for (int64_t j = 0; j < tn; ++j) {
        buf.acc[i * kTileN + j] +=
            static_cast<float>(buf.partial[i * kTileN + j]) * (sa * w_s[(n0 + j) * groups + g]);
      }
    }
  }
  for (int64_t i = 0; i < tm; ++i) {
    for (int64_t j = 0; j < tn; ++j) {
      out[(m0 + i) * ldo + n0 + j] =
          static_cast<T>(buf.acc[i * kTileN + j] + (bias ? bias[n0 + j] : 0.0f));
    }
  }
}

}  // namespace apex4::cpu
