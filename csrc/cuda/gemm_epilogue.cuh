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

// Epilogue factors of the output columns n and n + 1 (zero past N).
struct ColumnFactors {
  float scale[2];  // w_scale of the columns (per channel only)
  float bias[2];   // bias, or 0
};

__device__ __forceinline__ ColumnFactors load_column_factors(const GemmParams& p, int n,
                                                             bool with_scale) {
  ColumnFactors f;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const bool in_n = n + j < p.n;
    f.scale[j] = with_scale && in_n ? __ldg(p.w_scale + n + j) : 0.0f;
    f.bias[j] = p.bias != nullptr && in_n ? load_float(p.bias, p.bias_kind, n + j) : 0.0f;
  }
  return f;
}

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
