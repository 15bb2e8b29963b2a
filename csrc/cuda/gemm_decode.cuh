// W4A4 GEMM for a few tokens (M <= 16): memory-bound by design.
//
// The weight is the MMA's A operand (16 weight rows = the MMA's M) and the
// tokens its B operand (8 tokens = the MMA's N), so a 16-token step wastes no
// MMA rows. A block owns 16 weight rows and all of K, split across its warps
// in batches of 64-value chunks (warp w takes batches w, w + kWarps, ...);
// each warp loads a whole batch -- 8 bytes per row and thread, 256 contiguous
// bytes per weight row with one token tile -- before using any of it, so many
// loads are in flight. Weights come straight from global memory into
// registers (each byte is used by exactly one MMA, nothing to share through
// shared memory); the warps' partial sums are reduced in shared memory in warp
// order, so the result is deterministic. Per channel the partials are int32
// and the reduction is exact; per group each warp scales its partials at every
// group end (or batch end, for groups longer than a batch) into fp32.
//
// Fragment placement: thread (groupID g, threadID_in_group t) loads bytes
// [8t, 8t+8) of a chunk's 32 bytes, i.e. K values 16t..16t+15: its low word
// (16t..16t+7) fills s4 k-slots 8t..8t+7 and its high word (16t+8..16t+15)
// k-slots 32+8t..32+8t+7, in weight rows g and g+8 (A) and in token g's
// activation row (B) alike, so A and B agree on which K sits in which slot.
#pragma once

#include <type_traits>

#include "apex4/int4.h"
#include "cuda/mma.cuh"

namespace apex4::cuda {

namespace decode {
constexpr int kWarps = 8;
constexpr int kRows = 16;  // weight rows per block: the MMA's M
constexpr int kChunkBytes = 32;
// 64-value K chunks a warp loads at once: 256 bytes per weight row (two
// cache lines) with one token tile; halved with two, whose activation loads
// would otherwise push a thread past the 128 registers of two blocks per SM.
template <int kTokenTiles>
constexpr int kChunksPerBatch = 8 / kTokenTiles;
}  // namespace decode

template <int kTokenTiles, bool kGrouped>
__global__ void __launch_bounds__(decode::kWarps * 32, 2) gemm_decode_kernel(const GemmParams p) {
  using Mma = Int8Mma;
  using Partial = std::conditional_t<kGrouped, float, int>;
  __shared__ Partial partials[decode::kWarps][kTokenTiles][4][32];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int n0 = blockIdx.x * decode::kRows;
  const int tok0 = blockIdx.y * 8 * kTokenTiles;
  const int row_bytes = p.kp / 2;
  const int chunks = p.kp / 64;

  const uint8_t* w_row[2];
  bool w_ok[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int n = n0 + g + 8 * h;
    w_ok[h] = n < p.n;
    w_row[h] = p.w + static_cast<int64_t>(w_ok[h] ? n : 0) * row_bytes + 8 * t;
  }
  const uint8_t* a_row[kTokenTiles];
  bool a_ok[kTokenTiles];
#pragma unroll
  for (int tt = 0; tt < kTokenTiles; ++tt) {
    const int tok = tok0 + tt * 8 + g;
    a_ok[tt] = tok < p.m;
    a_row[tt] = p.a + static_cast<int64_t>(a_ok[tt] ? tok : 0) * row_bytes + 8 * t;
  }

  int acc[kTokenTiles][4] = {};
  float facc[kTokenTiles][4] = {};  // per group only
  const int steps_per_group = p.kp / p.groups / 64;

  auto flush_group = [&](int group) {
    float sw[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      sw[h] = w_ok[h] ? __ldg(p.w_scale + static_cast<int64_t>(n0 + g + 8 * h) * p.groups + group) : 0.0f;
    }
#pragma unroll
    for (int tt = 0; tt < kTokenTiles; ++tt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int tok = tok0 + tt * 8 + 2 * t + j;
        const float sa =
            tok < p.m ? __ldg(p.a_scale + static_cast<int64_t>(tok) * p.groups + group) * Mma::kInvAccScale
                      : 0.0f;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int i = 2 * h + j;  // c[i]: weight row g + 8h, token 2t + j
          facc[tt][i] = fmaf(static_cast<float>(acc[tt][i]), sa * sw[h], facc[tt][i]);
          acc[tt][i] = 0;
        }
      }
    }
  };

  constexpr int kBatch = decode::kChunksPerBatch<kTokenTiles>;
  constexpr int kBatchStride = decode::kWarps * kBatch;
  for (int c0 = warp * kBatch; c0 < chunks; c0 += kBatchStride) {
    uint2 wv[kBatch][2], av[kBatch][kTokenTiles];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const bool in_k = c0 + i < chunks;
      const int64_t offset = static_cast<int64_t>(c0 + i) * decode::kChunkBytes;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        wv[i][h] = in_k && w_ok[h] ? load_streaming_8(w_row[h] + offset) : make_uint2(0, 0);
      }
#pragma unroll
      for (int tt = 0; tt < kTokenTiles; ++tt) {
        av[i][tt] = in_k && a_ok[tt] ? __ldg(reinterpret_cast<const uint2*>(a_row[tt] + offset))
                                     : make_uint2(0, 0);
      }
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int c = c0 + i;
      if (c >= chunks) break;
      const uint32_t words[4] = {wv[i][0].x, wv[i][1].x, wv[i][0].y, wv[i][1].y};
      const typename Mma::A a = Mma::a_operand(words);
#pragma unroll
      for (int tt = 0; tt < kTokenTiles; ++tt) {
        const typename Mma::B b = Mma::b_operand(av[i][tt].x, av[i][tt].y);
#pragma unroll
        for (int step = 0; step < Mma::kSteps; ++step) Mma::mma(acc[tt], a, b, step);
      }
      if constexpr (kGrouped) {
        // The warp's next batch lies kBatchStride chunks further on, so a group
        // longer than what is left of this batch is flushed in pieces.
        if ((c + 1) % steps_per_group == 0 || i == kBatch - 1 || c + 1 == chunks) {
          flush_group(c / steps_per_group);
        }
      }
    }
  }

#pragma unroll
  for (int tt = 0; tt < kTokenTiles; ++tt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (kGrouped) {
        partials[warp][tt][i][lane] = facc[tt][i];
      } else {
        partials[warp][tt][i][lane] = acc[tt][i];
      }
    }
  }
  __syncthreads();

  // One thread per output element of the block: sum the warps' partials in
  // warp order, then scale (per channel) and add the bias (or 0) like the
  // tiled kernels' epilogue.
  if (threadIdx.x >= kTokenTiles * 4 * 32) return;
  const int tt = threadIdx.x / 128, i = threadIdx.x / 32 % 4, l = threadIdx.x % 32;
  const int n = n0 + l / 4 + 8 * (i / 2);
  const int tok = tok0 + tt * 8 + 2 * (l % 4) + i % 2;
  if (n >= p.n || tok >= p.m) return;
  Partial total = 0;
#pragma unroll
  for (int w = 0; w < decode::kWarps; ++w) total += partials[w][tt][i][l];
  float v;
  if constexpr (kGrouped) {
    v = total;
  } else {
    // 0 + float(P) * (sa * sw), rounded like the CPU kernel.
    const float s = (p.a_scale[tok] * Mma::kInvAccScale) * p.w_scale[n];
    v = __fadd_rn(0.0f, __fmul_rn(static_cast<float>(total), s));
  }
  v = __fadd_rn(v, p.bias != nullptr ? load_float(p.bias, p.bias_kind, n) : 0.0f);
  store_float(p.out, p.out_kind, static_cast<int64_t>(tok) * p.n + n, v);
}

template <int kTokenTiles, bool kGrouped>
void launch_gemm_decode_shape(const GemmParams& p, cudaStream_t stream) {
  constexpr int kTokens = 8 * kTokenTiles;
  const dim3 grid((p.n + decode::kRows - 1) / decode::kRows, (p.m + kTokens - 1) / kTokens);
  gemm_decode_kernel<kTokenTiles, kGrouped><<<grid, decode::kWarps * 32, 0, stream>>>(p);
}

}  // namespace apex4::cuda
