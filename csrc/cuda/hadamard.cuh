// The online rotation on the GPU: apex4::hadamard and the fused
// apex4::hadamard_quantize_act (launchers in hadamard.cu).
//
// A row of n = m * p values becomes x @ kron(F, H_p / sqrt(p)) with exactly
// the CPU kernel's arithmetic (csrc/cpu/kernels.h, rotate_row), operation for
// operation, so the two give the same bits: a fast Walsh-Hadamard transform
// inside each length-p block (the same butterflies, stage after stage), then
// tmp[dst*p+b] = 0 + f(0,dst) x[0*p+b] + f(1,dst) x[1*p+b] + ... in source
// order, f = fl(F * norm), each product and sum rounded on its own (no fused
// multiply-add). With m = 1 the factor is ignored and the row is scaled by
// norm, as on the CPU.
//
// One block per row at a time (blocks stride over rows): the row is read once
// from global memory, the first three butterfly stages are done in registers
// on the way into an fp32 copy of the row, the remaining stages in passes of
// up to three over that copy, then F mixes the blocks in place, and the
// result is stored (hadamard) or quantized with quantize_act's own block
// routine (quantize.cuh), which writes the packed row and its scales once.
// The copy and F (pre-scaled by norm) live in shared memory where they fit;
// larger rows use a per-block slice of a global workspace with the same code.
#pragma once

#include <cstdint>

#include "cuda/quantize.cuh"

namespace apex4::cuda {

// quantize_rows_in_block works with a whole block of kQuantizeThreads.
constexpr int kRotateThreads = kQuantizeThreads;
// Mixing by F: a task is kMixDst outputs (one float4 of F) of kMixCols
// columns b; a thread holds kMixTasks tasks until its round's reads are done.
constexpr int kMixDst = 4;
constexpr int kMixCols = 4;
constexpr int kMixTasks = 1;
constexpr int kMixRoundTasks = kRotateThreads * kMixTasks;

// Float offsets of a block's work area (shared memory, or its workspace slice).
struct RotationLayout {
  int row;     // the fp32 row being transformed, 16-byte aligned
  int mixed;   // where mixing by F writes (== row: in place, a round at a time)
  int factor;  // F * norm, [m][m_pad], zero columns past m
  int floats;  // the whole area, a multiple of 4
};

struct RotationArgs {
  const void* x;  // [rows, n], contiguous
  int rows, n, m, p, log_p, m_pad;
  float norm;            // 1 / sqrt(p), computed as the CPU kernel does
  const float* factor;   // [m, m]
  int round_cols;        // columns b mixed per round (m > 1)
  bool vector_io;        // n % 8 == 0 and x, y 16-byte aligned: 16-byte global accesses
  RotationLayout layout;
  float* workspace;      // [gridDim.x][layout.floats], or nullptr (shared memory)
  // hadamard
  void* y;  // [rows, n], x's type
  // hadamard_quantize_act
  int kp, group_len;
  float clip_ratio;
  uint8_t* packed;  // [rows, kp / 2]
  float* scales;    // [rows, kp / group_len]
};

// Butterfly stages t in [t0, t1) on 8 values: v[j], v[j + 2^t] for j with bit
// t clear become their sum and difference, as one stage of rotate_row.
__device__ __forceinline__ void butterflies(float (&v)[8], int t0, int t1) {
#pragma unroll
  for (int t = 0; t < 3; ++t) {
    if (t < t0 || t >= t1) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (j & (1 << t)) continue;
      const float u = v[j], w = v[j | (1 << t)];
      v[j] = u + w;
      v[j | (1 << t)] = u - w;
    }
  }
}

// Values 8*vec .. 8*vec+7 of a row of n (zeros past n) as floats; quantize.cuh's
// loads (vector_loads: n % 8 == 0 and the row 16-byte aligned).
template <typename T, bool kGlobal>
__device__ __forceinline__ void load_floats_8(const T* row, int n, int vec, bool vector_loads,
                                              float (&v)[8]) {
  const Vec8<T> raw = load_vec8<T, kGlobal>(row, n, vec, vector_loads);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = raw[i];
}

__device__ __forceinline__ void scale_8(float (&v)[8], float s) {
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = __fmul_rn(v[i], s);
}

// Values 8*vec .. 8*vec+7 of a row of n floats in the work area, those past n
// dropped.
__device__ __forceinline__ void store_work_8(float* row, int n, int vec, const float (&v)[8]) {
  const int e0 = vec * 8;
  if (n % 8 == 0) {
    reinterpret_cast<float4*>(row + e0)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(row + e0)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (e0 + i < n) row[e0 + i] = v[i];
    }
  }
}

// Stages 0 .. min(3, log p) - 1 on contiguous runs of 8, from x into the
// work row. Blocks shorter than 8 (p < 8) sit whole inside a run.
template <typename T>
__device__ __forceinline__ void fwht_first_pass(const T* x_row, const RotationArgs& a, float* row,
                                                bool scale) {
  const int vecs = (a.n + 7) / 8;
  const int stages = a.log_p < 3 ? a.log_p : 3;
  for (int vec = threadIdx.x; vec < vecs; vec += kRotateThreads) {
    float v[8];
    load_floats_8<T, true>(x_row, a.n, vec, a.vector_io, v);
    butterflies(v, 0, stages);
    if (scale) scale_8(v, a.norm);
    store_work_8(row, a.n, vec, v);
  }
}

// kStages stages from stride h0 = 2^log_h0 (>= 8) on, in place: a thread
// takes 2^kStages runs of 8 >> kStages contiguous values, h0 apart.
template <int kStages>
__device__ __forceinline__ void fwht_pass(float* row, const RotationArgs& a, int log_h0,
                                          bool scale) {
  constexpr int kRun = 8 >> kStages;
  const int items = a.n / 8;  // n is a multiple of p >= 16 here
  const int log_runs = log_h0 - (3 - kStages);  // runs of kRun in a stride h0
  const int h0 = 1 << log_h0;
  for (int i = threadIdx.x; i < items; i += kRotateThreads) {
    float* base = row + ((i >> log_runs) << (log_h0 + kStages)) + (i & ((1 << log_runs) - 1)) * kRun;
    float v[8];
#pragma unroll
    for (int s = 0; s < (1 << kStages); ++s) {
      float* src = base + s * h0;
      if constexpr (kRun == 4) {
        const float4 q = *reinterpret_cast<const float4*>(src);
        v[4 * s] = q.x, v[4 * s + 1] = q.y, v[4 * s + 2] = q.z, v[4 * s + 3] = q.w;
      } else if constexpr (kRun == 2) {
        const float2 q = *reinterpret_cast<const float2*>(src);
        v[2 * s] = q.x, v[2 * s + 1] = q.y;
      } else {
        v[s] = *src;
      }
    }
    butterflies(v, 3 - kStages, 3);
    if (scale) scale_8(v, a.norm);
#pragma unroll
    for (int s = 0; s < (1 << kStages); ++s) {
      float* dst = base + s * h0;
      if constexpr (kRun == 4) {
        *reinterpret_cast<float4*>(dst) = make_float4(v[4 * s], v[4 * s + 1], v[4 * s + 2],
                                                      v[4 * s + 3]);
      } else if constexpr (kRun == 2) {
        *reinterpret_cast<float2*>(dst) = make_float2(v[2 * s], v[2 * s + 1]);
      } else {
        *dst = v[s];
      }
    }
  }
}

// kMixDst outputs dst = 4g .. 4g+3 of the kMixCols columns c0 + slot + j*slots
// (those < c0 + cols; the others compute column c0 + slot again, unused):
// sums over the m sources, in order.
__device__ __forceinline__ void mix_task(const float* row, const float* factor,
                                         const RotationArgs& a, int g, int c0, int cols, int slot,
                                         int slots, float (&acc)[kMixDst][kMixCols]) {
  int offset[kMixCols];
#pragma unroll
  for (int j = 0; j < kMixCols; ++j) offset[j] = slot + j * slots < cols ? j * slots : 0;
#pragma unroll
  for (int d = 0; d < kMixDst; ++d) {
#pragma unroll
    for (int j = 0; j < kMixCols; ++j) acc[d][j] = 0.0f;
  }
  const float* column = row + c0 + slot;
  const float* f_row = factor + g * kMixDst;
  for (int src = 0; src < a.m; ++src) {
    const float4 f4 = *reinterpret_cast<const float4*>(f_row + src * a.m_pad);
    const float f[kMixDst] = {f4.x, f4.y, f4.z, f4.w};
    float y[kMixCols];
#pragma unroll
    for (int j = 0; j < kMixCols; ++j) y[j] = column[src * a.p + offset[j]];
#pragma unroll
    for (int d = 0; d < kMixDst; ++d) {
#pragma unroll
      for (int j = 0; j < kMixCols; ++j) acc[d][j] = __fadd_rn(acc[d][j], __fmul_rn(f[d], y[j]));
    }
  }
}

// out = the blocks of row mixed by F. In place (out == row), a round's
// columns are all read before any of them is written; the planner keeps a
// round within kMixRoundTasks tasks so that each thread holds its results.
__device__ __forceinline__ void mix_blocks(float* row, float* out, const float* factor,
                                           const RotationArgs& a) {
  const bool in_place = out == row;
  const int dst_groups = a.m_pad / kMixDst;
  for (int c0 = 0; c0 < a.p; c0 += a.round_cols) {
    const int cols = min(a.round_cols, a.p - c0);
    const int slots = (cols + kMixCols - 1) / kMixCols;
    const int tasks = slots * dst_groups;
    for (int t0 = 0; t0 < tasks; t0 += kMixRoundTasks) {
      float acc[kMixTasks][kMixDst][kMixCols];
#pragma unroll
      for (int i = 0; i < kMixTasks; ++i) {
        const int t = t0 + i * kRotateThreads + threadIdx.x;
        if (t < tasks) mix_task(row, factor, a, t / slots, c0, cols, t % slots, slots, acc[i]);
      }
      if (in_place) __syncthreads();
#pragma unroll
      for (int i = 0; i < kMixTasks; ++i) {
        const int t = t0 + i * kRotateThreads + threadIdx.x;
        if (t >= tasks) continue;
        const int g = t / slots, slot = t % slots;
#pragma unroll
        for (int d = 0; d < kMixDst; ++d) {
          const int dst = g * kMixDst + d;
#pragma unroll
          for (int j = 0; j < kMixCols; ++j) {
            if (dst < a.m && slot + j * slots < cols) {
              out[dst * a.p + c0 + slot + j * slots] = acc[i][d][j];
            }
          }
        }
      }
    }
  }
}

// Rotates row `r` of x into the work area; returns where the result is. Ends
// with __syncthreads. Without kMix the kernel serves only m = 1.
template <typename T, bool kMix>
__device__ __forceinline__ const float* rotate_row_in_block(const RotationArgs& a, int64_t r,
                                                            float* work) {
  float* row = work + a.layout.row;
  const bool scale_last = a.m == 1;
  fwht_first_pass(static_cast<const T*>(a.x) + r * a.n, a, row, scale_last && a.log_p <= 3);
  for (int log_h0 = 3; log_h0 < a.log_p; log_h0 += 3) {
    __syncthreads();
    const int stages = min(3, a.log_p - log_h0);
    const bool scale = scale_last && log_h0 + stages == a.log_p;
    if (stages == 3) {
      fwht_pass<3>(row, a, log_h0, scale);
    } else if (stages == 2) {
      fwht_pass<2>(row, a, log_h0, scale);
    } else {
      fwht_pass<1>(row, a, log_h0, scale);
    }
  }
  __syncthreads();
  if (!kMix || a.m == 1) return row;
  float* out = work + a.layout.mixed;
  mix_blocks(row, out, work + a.layout.factor, a);
  __syncthreads();
  return out;
}

// Row of n rotated floats -> y in x's type (round to nearest even, as the
// CPU kernel's cast).
template <typename T>
__device__ __forceinline__ void store_rotated(const float* rotated, const RotationArgs& a,
                                              int64_t r) {
  T* y_row = static_cast<T*>(a.y) + r * a.n;
  const int vecs = (a.n + 7) / 8;
  for (int vec = threadIdx.x; vec < vecs; vec += kRotateThreads) {
    float v[8];
    load_floats_8<float, false>(rotated, a.n, vec, a.n % 8 == 0, v);
    const int e0 = vec * 8;
    if (a.vector_io) {
      if constexpr (sizeof(T) == 2) {
        alignas(16) T h[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) h[i] = from_float<T>(v[i]);
        *reinterpret_cast<uint4*>(y_row + e0) = *reinterpret_cast<const uint4*>(h);
      } else {
        reinterpret_cast<float4*>(y_row + e0)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4*>(y_row + e0)[1] = make_float4(v[4], v[5], v[6], v[7]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (e0 + i < a.n) y_row[e0 + i] = from_float<T>(v[i]);
      }
    }
  }
}

// kShared: the work area is dynamic shared memory (then followed by the
// group scale bits), else the block's workspace slice (shared memory holds
// only the scale bits). kQuantize: hadamard_quantize_act, else hadamard.
// kMix: F may mix blocks (any m); without it the kernel serves only m = 1
// (power-of-two rows) and needs far fewer registers, so more blocks share an
// SM.
template <typename T, bool kShared, bool kQuantize, bool kMix>
__global__ void __launch_bounds__(kRotateThreads, kMix ? 2 : 4) rotate_kernel(const RotationArgs a) {
  extern __shared__ float4 smem_f4[];
  float* smem = reinterpret_cast<float*>(smem_f4);
  float* work = kShared ? smem : a.workspace + static_cast<int64_t>(blockIdx.x) * a.layout.floats;
  uint32_t* scale_bits = reinterpret_cast<uint32_t*>(kShared ? smem + a.layout.floats : smem);
  if (kMix && a.m > 1) {  // F * norm, rounded as rotate_row does; visible after the first pass's barrier
    float* factor = work + a.layout.factor;
    for (int i = threadIdx.x; i < a.m * a.m_pad; i += kRotateThreads) {
      const int src = i / a.m_pad, dst = i % a.m_pad;
      factor[i] = dst < a.m ? __fmul_rn(__ldg(a.factor + src * a.m + dst), a.norm) : 0.0f;
    }
  }
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const float* rotated = rotate_row_in_block<T, kMix>(a, r, work);
    if constexpr (kQuantize) {
      const int groups = a.kp / a.group_len;
      quantize_rows_in_block<float, false>(rotated, a.n, a.kp, a.group_len, a.clip_ratio,
                                           a.n % 8 == 0, 1, a.packed + r * (a.kp / 2), a.kp / 2,
                                           scale_bits);
      // Each thread reads back the words it will zero for the next row.
      for (int j = threadIdx.x; j < groups; j += kRotateThreads) {
        a.scales[r * groups + j] = __uint_as_float(scale_bits[j]);
      }
    } else {
      store_rotated<T>(rotated, a, r);
      __syncthreads();  // the work area is rewritten for the next row
    }
  }
}

}  // namespace apex4::cuda
