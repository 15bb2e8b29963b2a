// Tiled W4A4 GEMM for M > 16, one kernel template for both tensor-core paths
// (the MMA policy of mma.cuh says how a fragment becomes MMAs):
//
//  * a multi-stage cp.async pipeline streams 128-value K slices of A and W
//    (64 packed bytes per row) into shared memory, zero-filling rows past M/N
//    and bytes past Kp;
//  * rows are 64 bytes, four 16-byte chunks, stored with chunk c of row r at
//    c ^ ((r >> 1) & 3): the 8 rows one ldmatrix phase reads, and the 8 chunks
//    one cp.async phase writes, then fall in 8 distinct 16-byte bank groups;
//  * ldmatrix.x4 yields the packed words of an m16n8k64 fragment directly
//    (an 8x16-byte matrix row is 32 nibbles; lane l gets word l%4 of row l/4,
//    K values 8*(l%4)..+7 of that row, exactly the s4 fragment layout);
//  * per channel (one group): int32 accumulators over all of K, scaled once
//    in the epilogue. Per group: int32 partials scaled into fp32 accumulators
//    at each group's end, acc = fma(float(P), sa * sw, acc), in group order;
//  * blocks are 8 warps, one block per SM (registers), tiles 128x256 or
//    128x128 (see Tile128x256 / Tile128x128).
#pragma once

#include "apex4/int4.h"
#include "cuda/gemm_epilogue.cuh"
#include "cuda/mma.cuh"

namespace apex4::cuda {

template <int kBM_, int kBN_, int kWarpsM_, int kWarpsN_, int kStages_>
struct TileShape {
  static constexpr int kBM = kBM_, kBN = kBN_, kWarpsM = kWarpsM_, kWarpsN = kWarpsN_;
  static constexpr int kStages = kStages_;
  static constexpr int kBK = 128;  // K values per pipeline stage
  static constexpr int kRowBytes = kBK / 2;
  static constexpr int kChunks = kRowBytes / 16;
  static constexpr int kStepsPerStage = kBK / 64;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kWarpM = kBM / kWarpsM, kWarpN = kBN / kWarpsN;
  static constexpr int kMTiles = kWarpM / 16, kNTiles = kWarpN / 8;
  static constexpr int kStageBytes = (kBM + kBN) * kRowBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static_assert(kChunks == 4, "the shared-memory swizzle assumes 64-byte rows");
  static_assert(kWarpM % 16 == 0 && kWarpN % 16 == 0 && kBM % 16 == 0);
  static_assert((kBM * kChunks) % kThreads == 0 && (kBN * kChunks) % kThreads == 0);
};

// 8 warps of 64x64: 128 int32 accumulators a thread, the least operand
// traffic per MMA. Per channel only: per group a thread also needs fp32
// accumulators, which do not fit beside them.
using Tile128x256 = TileShape<128, 256, 2, 4, 4>;
// 8 warps of 64x32: per group, and per channel when 128x256 tiles would not
// give every SM one.
using Tile128x128 = TileShape<128, 128, 2, 4, 4>;

__device__ __forceinline__ int swizzled_chunk(int row, int chunk) { return chunk ^ ((row >> 1) & 3); }

template <class Tile>
__device__ __forceinline__ void copy_chunk(uint32_t stage, int smem_row, int chunk,
                                           const uint8_t* src, int row, int rows, int kbyte,
                                           int row_bytes) {
  const bool valid = row < rows && kbyte < row_bytes;
  const uint8_t* from = src + (valid ? static_cast<int64_t>(row) * row_bytes + kbyte : 0);
  cp_async_16(stage + smem_row * Tile::kRowBytes + swizzled_chunk(smem_row, chunk) * 16, from,
              valid);
}

template <class Mma, class Tile, bool kGrouped>
__global__ void __launch_bounds__(Tile::kThreads, 1) gemm_tiled_kernel(const GemmParams p) {
  constexpr int kBM = Tile::kBM, kBN = Tile::kBN, kMT = Tile::kMTiles, kNT = Tile::kNTiles;
  extern __shared__ __align__(128) uint8_t smem[];

  const TileOrigin origin = rastered_tile(blockIdx.x, p.m, p.n, kBM, kBN);
  const int m0 = origin.m0, n0 = origin.n0;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / Tile::kWarpsN, warp_n = warp % Tile::kWarpsN;
  const int row_bytes = p.kp / 2;
  const int ksteps = p.kp / 64;
  const int ktiles = (ksteps + Tile::kStepsPerStage - 1) / Tile::kStepsPerStage;
  const uint32_t smem_base = shared_addr(smem);

  auto load_stage = [&](int stage, int ktile) {
    const uint32_t base = smem_base + stage * Tile::kStageBytes;
    const int chunk = tid % Tile::kChunks;
    const int kbyte = ktile * Tile::kRowBytes + chunk * 16;
#pragma unroll
    for (int i = 0; i < kBM * Tile::kChunks / Tile::kThreads; ++i) {
      const int r = (tid + i * Tile::kThreads) / Tile::kChunks;
      copy_chunk<Tile>(base, r, chunk, p.a, m0 + r, p.m, kbyte, row_bytes);
    }
#pragma unroll
    for (int i = 0; i < kBN * Tile::kChunks / Tile::kThreads; ++i) {
      const int r = (tid + i * Tile::kThreads) / Tile::kChunks;
      copy_chunk<Tile>(base, kBM + r, chunk, p.w, n0 + r, p.n, kbyte, row_bytes);
    }
  };

  // ldmatrix addressing. A: matrices 0..3 are (rows 0-7, K 0-31), (rows 8-15,
  // K 0-31), (rows 0-7, K 32-63), (rows 8-15, K 32-63) = s4 registers a0..a3.
  // W: (n 0-7, K 0-31), (n 0-7, K 32-63), (n 8-15, ...) = b0, b1 of two n8
  // tiles. Every row a lane addresses has the same (row >> 1) & 3, since the
  // tile offsets are multiples of 8.
  const int lane_swizzle = (lane >> 1) & 3;
  const int a_row = warp_m * Tile::kWarpM + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int a_half = lane >> 4;
  const int b_row = kBM + warp_n * Tile::kWarpN + (lane & 7) + (lane >> 4) * 8;
  const int b_half = (lane >> 3) & 1;

  // Rows and columns of this thread's accumulators: c[i] is at row
  // groupID + 8 * (i / 2), column 2 * threadID_in_group + i % 2 of its tile.
  const int thread_m = m0 + warp_m * Tile::kWarpM + lane / 4;
  const int thread_n = n0 + warp_n * Tile::kWarpN + 2 * (lane % 4);

  // Scale factors of group `group` for this thread's rows and columns; the
  // row factor folds in the accumulator's power-of-two scale, which changes
  // no rounding: (sa / 256) * sw == (sa * sw) / 256 exactly.
  float row_scale[kMT][2], col_scale[kNT][2];
  auto load_row_scales = [&](int group) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = thread_m + mt * 16 + h * 8;
        row_scale[mt][h] =
            m < p.m ? __ldg(p.a_scale + static_cast<int64_t>(m) * p.groups + group) * Mma::kInvAccScale
                    : 0.0f;
      }
    }
  };
  auto load_col_scales = [&](int group) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = thread_n + nt * 8 + j;
        col_scale[nt][j] = n < p.n ? __ldg(p.w_scale + static_cast<int64_t>(n) * p.groups + group) : 0.0f;
      }
    }
  };

  int acc[kMT][kNT][4] = {};
  float facc[kMT][kNT][4] = {};  // per group only; dead (and removed) per channel

  // Per channel, the epilogue's factors are loaded now, their latency hidden
  // by the main loop (see StagedColumnFactors).
  __shared__ float column_factors[2][kBN];
  StagedColumnFactors<kBN> factors;
  if constexpr (!kGrouped) {
    if (tid < kBN) factors.load(p, n0 + tid, true);
    load_row_scales(0);
  }

#pragma unroll
  for (int s = 0; s < Tile::kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }

  const int steps_per_group = p.kp / p.groups / 64;
  int step_in_group = 0, group = 0;
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<Tile::kStages - 2>();
    __syncthreads();  // tile kt has landed, and every warp is done with tile kt-1
    const int next = kt + Tile::kStages - 1;
    if (next < ktiles) load_stage(next % Tile::kStages, next);
    cp_async_commit();

    const uint32_t stage = smem_base + (kt % Tile::kStages) * Tile::kStageBytes;
#pragma unroll
    for (int s = 0; s < Tile::kStepsPerStage; ++s) {
      if (kt * Tile::kStepsPerStage + s >= ksteps) break;  // K ends mid-stage
      if constexpr (kGrouped) {
        if (step_in_group == 0) {
          load_row_scales(group);
          load_col_scales(group);
        }
      }
      typename Mma::A a[kMT];
      typename Mma::B b[kNT];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        uint32_t r[4];
        ldmatrix_x4(r, stage + (a_row + mt * 16) * Tile::kRowBytes +
                           (((2 * s + a_half) ^ lane_swizzle) << 4));
        a[mt] = Mma::a_operand(r);
      }
#pragma unroll
      for (int pair = 0; pair < kNT / 2; ++pair) {
        uint32_t r[4];
        ldmatrix_x4(r, stage + (b_row + pair * 16) * Tile::kRowBytes +
                           (((2 * s + b_half) ^ lane_swizzle) << 4));
        b[2 * pair] = Mma::b_operand(r[0], r[1]);
        b[2 * pair + 1] = Mma::b_operand(r[2], r[3]);
      }
#pragma unroll
      for (int step = 0; step < Mma::kSteps; ++step) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) Mma::mma(acc[mt][nt], a[mt], b[nt], step);
        }
      }
      if constexpr (kGrouped) {
        if (++step_in_group == steps_per_group) {
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                facc[mt][nt][i] = fmaf(static_cast<float>(acc[mt][nt][i]),
                                       row_scale[mt][i / 2] * col_scale[nt][i % 2], facc[mt][nt][i]);
                acc[mt][nt][i] = 0;
              }
            }
          }
          step_in_group = 0;
          ++group;
        }
      }
    }
  }

  if constexpr (!kGrouped) {
    if (tid < kBN) factors.publish(column_factors, tid);
    __syncthreads();
  }
  store_output<kMT, kNT>(
      p, thread_m, thread_n,
      [&](int n) {
        if constexpr (kGrouped) {
          return load_column_factors(p, n, false);  // the bias only
        } else {
          return StagedColumnFactors<kBN>::read(column_factors, n - n0);
        }
      },
      [&](int mt, int nt, int i, const ColumnFactors& c) {
        if constexpr (kGrouped) {
          return __fadd_rn(facc[mt][nt][i], c.bias[i % 2]);
        } else {
          return per_channel_output(acc[mt][nt][i], row_scale[mt][i / 2], c.scale[i % 2],
                                    c.bias[i % 2]);
        }
      });
}

template <class Tile>
int64_t output_tiles(const GemmParams& p) {
  return static_cast<int64_t>((p.m + Tile::kBM - 1) / Tile::kBM) * ((p.n + Tile::kBN - 1) / Tile::kBN);
}

template <class Mma, class Tile, bool kGrouped>
cudaError_t launch_gemm_tiled_shape(const GemmParams& p, cudaStream_t stream) {
  const auto kernel = gemm_tiled_kernel<Mma, Tile, kGrouped>;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(output_tiles<Tile>(p)), Tile::kThreads, Tile::kSmemBytes, stream>>>(p);
  return cudaSuccess;
}

template <class Mma>
cudaError_t launch_gemm_tiled(const GemmParams& p, cudaStream_t stream) {
  if (p.groups != 1) return launch_gemm_tiled_shape<Mma, Tile128x128, true>(p, stream);
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  return output_tiles<Tile128x256>(p) >= sms
             ? launch_gemm_tiled_shape<Mma, Tile128x256, false>(p, stream)
             : launch_gemm_tiled_shape<Mma, Tile128x128, false>(p, stream);
}

}  // namespace apex4::cuda
