// What the tiled GEMM kernels (gemm_tiled.cuh: mma.sync, gemm_wgmma.cuh:
// wgmma) share: the order in which blocks walk the output tiles, and the
// epilogue that turns a thread's accumulator fragments into output elements.
//
// Both kernels hold accumulators in the m16n8 layout (mma.sync's c, and each
// warp's 16 rows of a wgmma m64 tile): fragment (mt, nt) of a thread covers
// rows thread_m + 16 mt + {0, 8} and columns thread_n + 8 nt + {0, 1}, element
// i at row + 8 (i / 2), column + i % 2.
#pragma once

#include "cuda/primitives.cuh"

namespace apex4::cuda {

struct TileOrigin {
  int m0, n0;
};

// Blocks walk the output tiles kRasterRows tile rows at a time, down each
// column of tiles, so the blocks resident together share a few panels of A
// and W in L2 rather than each sweeping all of W.
__device__ __forceinline__ TileOrigin rastered_tile(int tile, int m, int n, int bm, int bn) {
  constexpr int kRasterRows = 8;
  const int tiles_m = (m + bm - 1) / bm, tiles_n = (n + bn - 1) / bn;
  const int panel = tile / (kRasterRows * tiles_n);
  const int panel_rows = min(tiles_m - panel * kRasterRows, kRasterRows);
  const int in_panel = tile - panel * kRasterRows * tiles_n;
  return {(panel * kRasterRows + in_panel % panel_rows) * bm, (in_panel / panel_rows) * bn};
}

// Epilogue factors of output column n: its w_scale (per channel only) and
// bias, or 0; both 0 past N.
struct ColumnFactor {
  float scale, bias;
};
__device__ __forceinline__ ColumnFactor load_column_factor(const GemmParams& p, int n,
                                                           bool with_scale) {
  const bool in_n = n < p.n;
  return {with_scale && in_n ? __ldg(p.w_scale + n) : 0.0f,
          p.bias != nullptr && in_n ? load_float(p.bias, p.bias_kind, n) : 0.0f};
}

// The factors of the output columns n and n + 1.
struct ColumnFactors {
  float scale[2];
  float bias[2];
};

__device__ __forceinline__ ColumnFactors load_column_factors(const GemmParams& p, int n,
                                                             bool with_scale) {
  const ColumnFactor f0 = load_column_factor(p, n, with_scale);
  const ColumnFactor f1 = load_column_factor(p, n + 1, with_scale);
  return {{f0.scale, f1.scale}, {f0.bias, f1.bias}};
}

// A tile's column factors, staged through shared memory. Loaded in the
// epilogue, every column step of store_fragments waited an L2 latency for its
// factors behind the previous step's stores (a load may not pass a store that
// could alias it): 32 steps a 128x256 tile, about 20 slice times a tile on the
// H100 (the wgmma kernel's time against K had that fixed cost a tile). Thread
// t < kBN loads column n0 + t's factors into registers when the tile starts,
// publishes them to shared memory before the epilogue, and the epilogue reads
// shared memory only.
template <int kBN>
struct StagedColumnFactors {
  ColumnFactor mine{0.0f, 0.0f};  // of the thread's column

  __device__ __forceinline__ void load(const GemmParams& p, int n, bool with_scale) {
    mine = load_column_factor(p, n, with_scale);
  }
  // buffer[0] holds the tile's column scales, buffer[1] its biases.
  __device__ __forceinline__ void publish(float (&buffer)[2][kBN], int t) const {
    buffer[0][t] = mine.scale;
    buffer[1][t] = mine.bias;
  }
  // Columns c and c + 1 of the tile (c even, so c + 1 < kBN).
  static __device__ __forceinline__ ColumnFactors read(const float (&buffer)[2][kBN], int c) {
    return {{buffer[0][c], buffer[0][c + 1]}, {buffer[1][c], buffer[1][c + 1]}};
  }
};

// Per channel: 0 + float(P) * (sa * sw), then + bias (or + 0), every step
// rounded on its own as the CPU kernel does (no fused multiply-add), so every
// path gives the CPU's bits. row_scale folds in the accumulator's power-of-two
// factor (Int8Mma::kInvAccScale), which changes no rounding.
__device__ __forceinline__ float per_channel_output(int acc, float row_scale, float col_scale,
                                                    float bias) {
  return __fadd_rn(__fadd_rn(0.0f, __fmul_rn(static_cast<float>(acc), row_scale * col_scale)),
                   bias);
}

// Stores a thread's kMT x kNT accumulator fragments: columns(nt) gives the
// ColumnFactors of fragment column nt, value(mt, nt, i, factors) element i's
// output value. Rows past M and columns past N are skipped.
template <typename Out, int kMT, int kNT, class Columns, class Value>
__device__ __forceinline__ void store_fragments(const GemmParams& p, Out* out, int thread_m,
                                                int thread_n, Columns columns, Value value) {
  const bool pair_stores = p.n % 2 == 0;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const int n = thread_n + nt * 8;
    const ColumnFactors factors = columns(n);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = thread_m + mt * 16 + h * 8;
        if (m >= p.m) continue;
        Out* at = out + static_cast<int64_t>(m) * p.n + n;
        const float v0 = value(mt, nt, 2 * h, factors);
        const float v1 = value(mt, nt, 2 * h + 1, factors);
        if (pair_stores && n + 1 < p.n) {
          store_pair(at, v0, v1);
        } else {
          if (n < p.n) at[0] = from_float<Out>(v0);
          if (n + 1 < p.n) at[1] = from_float<Out>(v1);
        }
      }
    }
  }
}

// store_fragments for the output type of p (switched on once, around a store
// loop per type).
template <int kMT, int kNT, class Columns, class Value>
__device__ __forceinline__ void store_output(const GemmParams& p, int thread_m, int thread_n,
                                             Columns columns, Value value) {
  switch (p.out_kind) {
    case FloatKind::kF16:
      store_fragments<__half, kMT, kNT>(p, static_cast<__half*>(p.out), thread_m, thread_n,
                                        columns, value);
      break;
    case FloatKind::kBF16:
      store_fragments<__nv_bfloat16, kMT, kNT>(p, static_cast<__nv_bfloat16*>(p.out), thread_m,
                                               thread_n, columns, value);
      break;
    default:
      store_fragments<float, kMT, kNT>(p, static_cast<float*>(p.out), thread_m, thread_n, columns,
                                       value);
  }
}

}  // namespace apex4::cuda
