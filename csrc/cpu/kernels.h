// CPU kernel bodies of the apex4 ops. Torch-free: plain pointers and sizes, so
// they build and test alone; csrc/cpu/ops_cpu.cpp validates arguments, allocates
// and splits the work across threads with at::parallel_for.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "apex4/int4.h"

namespace apex4::cpu {

// Quantizes one row of k floats (zero-padded to kp) into kp/2 packed bytes and
// kp/group_len scales.
inline void quantize_row(const float* x, int64_t k, int64_t kp, int64_t group_len,
                         float clip_ratio, uint8_t* packed, float* scales) {
  for (int64_t k0 = 0; k0 < kp; k0 += group_len) {
    const int64_t valid = std::clamp<int64_t>(k - k0, 0, group_len);
    float amax = 0.0f;
    float poison = 0.0f;  // becomes NaN iff the group holds NaN or Inf
    for (int64_t i = 0; i < valid; ++i) {
      amax = std::max(amax, std::fabs(x[k0 + i]));
      poison += x[k0 + i] * 0.0f;
    }
    const float scale = group_scale(std::isnan(poison) ? NAN : amax, clip_ratio);
    scales[k0 / group_len] = scale;
    for (int64_t i = 0; i < group_len; i += 2) {
      const float lo = i < valid ? x[k0 + i] : 0.0f;
      const float hi = i + 1 < valid ? x[k0 + i + 1] : 0.0f;
      packed[(k0 + i) / 2] = pack_pair(quantize_value(lo, scale), quantize_value(hi, scale));
    }
  }
}

// In-place orthonormal online rotation of one row of n = m * p values:
// x <- x @ kron(F, H_p / sqrt(p)), F an orthonormal m x m factor (row-major),
// H_p the Sylvester Hadamard matrix (p a power of two). A fast Walsh-Hadamard
// transform inside each length-p block, then F mixes the m blocks. tmp holds n.
inline void rotate_row(float* x, int64_t n, const float* factor, int64_t m, float* tmp) {
  const int64_t p = n / m;
  const float norm = 1.0f / std::sqrt(static_cast<float>(p));
  for (int64_t a = 0; a < m; ++a) {
    float* block = x + a * p;
    for (int64_t h = 1; h < p; h *= 2) {
      for (int64_t i = 0; i < p; i += 2 * h) {
        for (int64_t j = i; j < i + h; ++j) {
          const float u = block[j], v = block[j + h];
          block[j] = u + v;
          block[j + h] = u - v;
        }
      }
    }
  }
  if (m == 1) {
    for (int64_t i = 0; i < n; ++i) x[i] *= norm;
    return;
  }
  std::fill(tmp, tmp + n, 0.0f);
  for (int64_t src = 0; src < m; ++src) {
    for (int64_t dst = 0; dst < m; ++dst) {
      const float f = factor[src * m + dst] * norm;
      for (int64_t b = 0; b < p; ++b) tmp[dst * p + b] += f * x[src * p + b];
    }
  }
  std::copy(tmp, tmp + n, x);
}

// Rows [row_begin, row_end) of x [rows, k] (T converts to float): optionally
// rotated (factor != nullptr, m x m), then quantized.
template <typename T>
void quantize_rows(const T* x, int64_t row_begin, int64_t row_end, int64_t k, int64_t kp,
                   int64_t group_len, float clip_ratio, const float* factor, int64_t m,
                   uint8_t* packed, float* scales) {
  std::vector<float> row(k), tmp(factor ? k : 0);
  for (int64_t r = row_begin; r < row_end; ++r) {
    for (int64_t i = 0; i < k; ++i) row[i] = static_cast<float>(x[r * k + i]);
    if (factor) rotate_row(row.data(), k, factor, m, tmp.data());
    quantize_row(row.data(), k, kp, group_len, clip_ratio, packed + r * (kp / 2),
                 scales + r * (kp / group_len));
  }
}

// Rows [row_begin, row_end) of x [rows, n] rotated into y (same layout).
template <typename T>
void rotate_rows(const T* x, int64_t row_begin, int64_t row_end, int64_t n, const float* factor,
                 int64_t m, T* y) {
  std::vector<float> row(n), tmp(n);
  for (int64_t r = row_begin; r < row_end; ++r) {
    for (int64_t i = 0; i < n; ++i) row[i] = static_cast<float>(x[r * n + i]);
    rotate_row(row.data(), n, factor, m, tmp.data());
    for (int64_t i = 0; i < n; ++i) y[r * n + i] = static_cast<T>(row[i]);
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
// Each packed byte holds a pair of adjacent K values; widened to two int16
// halves of one int32, a pair is the operand of a 2-way int16 multiply-add
// (x86 pmaddwd). A tile keeps A row-major as pairs and W transposed as pairs
// ([K/2][columns]), so the micro-kernel broadcasts one A pair against a row of
// W pairs and accumulates vertically: no horizontal sums inside the K loop.
constexpr int64_t kTileM = 64;
constexpr int64_t kTileN = 64;
constexpr int kMicroM = 8;
constexpr int kMicroN = 32;
static_assert(kTileM % kMicroM == 0 && kTileN % kMicroN == 0, "tiles hold whole micro-tiles");

inline int32_t widen_pair(uint8_t b) {
  const uint32_t lo = static_cast<uint16_t>(static_cast<int16_t>(unpack_lo(b)));
  const uint32_t hi = static_cast<uint16_t>(static_cast<int16_t>(unpack_hi(b)));
  return static_cast<int32_t>(lo | (hi << 16));
}

#if defined(__GNUC__) && defined(__x86_64__)
#define APEX4_X86 1
#include <immintrin.h>
// One binary for every x86 CPU: the loader picks the widest SIMD present.
#define APEX4_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define APEX4_SIMD_CLONES
#endif

// Adds float(P_g) * (sa * sw) for group g of a kMicroM x kMicroN block into out.
inline void fold_group(const int32_t* part, const float* sa, int64_t groups, int64_t g,
                       const float* swt, int64_t ldw, float* out, int64_t ldo) {
  for (int i = 0; i < kMicroM; ++i) {
    const float s = sa[i * groups + g];
    for (int j = 0; j < kMicroN; ++j) {
      out[i * ldo + j] += static_cast<float>(part[i * kMicroN + j]) * (s * swt[g * ldw + j]);
    }
  }
}

// out[i][j] += sum_g float(P_g[i][j]) * (sa[i][g] * sw[g][j]) for one
// kMicroM x kMicroN block. a: [kMicroM][pairs_per_row] pairs; wt: [K/2][ldw]
// pairs; sa: [kMicroM][groups]; swt: [groups][ldw]. Portable version; the
// compiler vectorises the j loop.
APEX4_SIMD_CLONES
inline void micro_gemm_portable(const int32_t* __restrict a, int64_t pairs_per_row,
                                const int32_t* __restrict wt, int64_t ldw,
                                const float* __restrict sa, const float* __restrict swt,
                                int64_t groups, int64_t group_pairs, float* __restrict out,
                                int64_t ldo) {
  for (int64_t g = 0; g < groups; ++g) {
    int32_t part[kMicroM * kMicroN] = {};
    for (int64_t p = g * group_pairs; p < (g + 1) * group_pairs; ++p) {
      const int32_t* w = wt + p * ldw;
      for (int i = 0; i < kMicroM; ++i) {
        const int32_t ap = a[i * pairs_per_row + p];
        const int32_t a0 = static_cast<int16_t>(ap), a1 = static_cast<int16_t>(ap >> 16);
        for (int j = 0; j < kMicroN; ++j) {
          part[i * kMicroN + j] +=
              a0 * static_cast<int16_t>(w[j]) + a1 * static_cast<int16_t>(w[j] >> 16);
        }
      }
    }
    fold_group(part, sa, groups, g, swt, ldw, out, ldo);
  }
}

#ifdef APEX4_X86
// AVX-512 VNNI: one vpdpwssd is 16 columns x one pair of K, the A pair
// broadcast. 8 rows x 2 vectors = 16 int32 accumulators stay in registers
// through a group.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline void micro_gemm_vnni(
    const int32_t* __restrict a, int64_t pairs_per_row, const int32_t* __restrict wt, int64_t ldw,
    const float* __restrict sa, const float* __restrict swt, int64_t groups, int64_t group_pairs,
    float* __restrict out, int64_t ldo) {
  static_assert(kMicroM == 8 && kMicroN == 32, "register blocking is written for 8 x 32");
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[kMicroM][2];
    for (auto& row : acc) row[0] = row[1] = _mm512_setzero_si512();
    for (int64_t p = g * group_pairs; p < (g + 1) * group_pairs; ++p) {
      const __m512i w0 = _mm512_loadu_si512(wt + p * ldw);
      const __m512i w1 = _mm512_loadu_si512(wt + p * ldw + 16);
      for (int i = 0; i < kMicroM; ++i) {
        const __m512i ap = _mm512_set1_epi32(a[i * pairs_per_row + p]);
        acc[i][0] = _mm512_dpwssd_epi32(acc[i][0], ap, w0);
        acc[i][1] = _mm512_dpwssd_epi32(acc[i][1], ap, w1);
      }
    }
    alignas(64) int32_t part[kMicroM * kMicroN];
    for (int i = 0; i < kMicroM; ++i) {
      _mm512_store_si512(part + i * kMicroN, acc[i][0]);
      _mm512_store_si512(part + i * kMicroN + 16, acc[i][1]);
    }
    fold_group(part, sa, groups, g, swt, ldw, out, ldo);
  }
}
#endif

using MicroGemm = void (*)(const int32_t*, int64_t, const int32_t*, int64_t, const float*,
                           const float*, int64_t, int64_t, float*, int64_t);

// APEX4_CPU_KERNEL=portable forces the portable micro-kernel (tests use it to
// cover the path that CPUs without AVX-512 VNNI take).
inline MicroGemm select_micro_gemm() {
#ifdef APEX4_X86
  const char* forced = std::getenv("APEX4_CPU_KERNEL");
  if ((forced == nullptr || std::string_view(forced) != "portable") &&
      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")) {
    return micro_gemm_vnni;
  }
#endif
  return micro_gemm_portable;
}

// Per-thread tile storage; rows and columns past the matrix edge are zeros so
// the micro-kernel needs no tails.
struct GemmTileBuffers {
  std::vector<int32_t> a, wt;
  std::vector<float> sa, swt, out;
  MicroGemm micro = select_micro_gemm();
  GemmTileBuffers(int64_t kp, int64_t groups)
      : a(kTileM * kp / 2), wt(kp / 2 * kTileN), sa(kTileM * groups), swt(groups * kTileN),
        out(kTileM * kTileN) {}
};

// Loads rows [n0, n0+tn) of W, transposed into pairs, with their scales.
inline void load_w_tile(const uint8_t* w_q, const float* w_s, int64_t n0, int64_t tn, int64_t kp,
                        int64_t groups, GemmTileBuffers& buf) {
  const int64_t pairs = kp / 2;
  std::fill(buf.wt.begin(), buf.wt.end(), 0);
  std::fill(buf.swt.begin(), buf.swt.end(), 0.0f);
  for (int64_t j = 0; j < tn; ++j) {
    const uint8_t* src = w_q + (n0 + j) * pairs;
    for (int64_t p = 0; p < pairs; ++p) buf.wt[p * kTileN + j] = widen_pair(src[p]);
    for (int64_t g = 0; g < groups; ++g) buf.swt[g * kTileN + j] = w_s[(n0 + j) * groups + g];
  }
}

// One output tile: rows [m0, m0+tm) of A against the W tile in buf (columns
// [n0, n0+tn)), in fp32 plus bias, rounded once into out (row stride ldo, any
// type constructible from float).
template <typename T>
void gemm_tile(const uint8_t* a_q, const float* a_s, const float* bias, int64_t m0, int64_t tm,
               int64_t n0, int64_t tn, int64_t kp, int64_t groups, GemmTileBuffers& buf, T* out,
               int64_t ldo) {
  const int64_t pairs = kp / 2;
  std::fill(buf.a.begin(), buf.a.end(), 0);
  std::fill(buf.sa.begin(), buf.sa.end(), 0.0f);
  for (int64_t i = 0; i < tm; ++i) {
    const uint8_t* src = a_q + (m0 + i) * pairs;
    for (int64_t p = 0; p < pairs; ++p) buf.a[i * pairs + p] = widen_pair(src[p]);
    std::copy_n(a_s + (m0 + i) * groups, groups, buf.sa.begin() + i * groups);
  }
  const int64_t group_pairs = pairs / groups;
  std::fill(buf.out.begin(), buf.out.end(), 0.0f);
  for (int64_t i = 0; i < tm; i += kMicroM) {
    for (int64_t j = 0; j < tn; j += kMicroN) {
      buf.micro(buf.a.data() + i * pairs, pairs, buf.wt.data() + j, kTileN,
                buf.sa.data() + i * groups, buf.swt.data() + j, groups, group_pairs,
                buf.out.data() + i * kTileN + j, kTileN);
    }
  }
  for (int64_t i = 0; i < tm; ++i) {
    for (int64_t j = 0; j < tn; ++j) {
      out[(m0 + i) * ldo + n0 + j] =
          static_cast<T>(buf.out[i * kTileN + j] + (bias ? bias[n0 + j] : 0.0f));
    }
  }
}

}  // namespace apex4::cpu
