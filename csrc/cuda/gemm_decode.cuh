// W4A4 GEMM for a few tokens (M <= 16): memory-bound by design.
//
// The weight is the MMA's A operand (16 weight rows = the MMA's M) and the
// tokens its B operand (8 tokens = the MMA's N), so a 16-token step wastes no
// MMA rows. A block owns 16 weight rows (a row tile) and all of K, split
// across its warps in batches of 64-value chunks (warp w takes batches w,
// w + kWarps, ...); each warp loads a whole batch -- 8 bytes per row and
// thread, 256 contiguous bytes per weight row with one token tile -- before
// using any of it, so many loads are in flight. Weights come straight from
// global memory into registers (each byte is used by exactly one MMA, nothing
// to share through shared memory); the warps' partial sums are reduced in
// shared memory in warp order, so the result is deterministic. Per channel
// the partials are int32 and the reduction is exact; per group each warp
// scales its partials at every group end (or batch end, for groups longer
// than a batch) into fp32.
//
// The activations come from an activation source (below): packed a_q / a_s
// in global memory (w4a4_gemm), or x itself, which the block quantizes into
// shared memory first (the fused w4a4_linear): the same packed values and
// scales, bit for bit, so the same output bits. A fused block walks several
// row tiles (grid-stride), so each block quantizes x once for all of them.
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
#include "cuda/quantize.cuh"

namespace apex4::cuda {

namespace decode {
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;  // weight rows per block: the MMA's M
constexpr int kChunkBytes = 32;
// 64-value K chunks a warp loads at once: 256 bytes per weight row (two
// cache lines) with one token tile; halved with two, whose activation loads
// would otherwise push a thread past the 128 registers of two blocks per SM.
template <int kTokenTiles>
constexpr int kChunksPerBatch = 8 / kTokenTiles;
static_assert(kThreads == kQuantizeThreads, "the fused kernel quantizes with the whole block");
}  // namespace decode

// Where the decode kernel's activations come from. begin() runs before the
// block's first weight loads are issued and finish() after, so loads begin()
// issues are served first.

// Activations already quantized, in global memory (w4a4_gemm).
struct PackedActivations {
  const uint8_t* a;
  const float* a_scale;
  int row_bytes, groups;
  int tok0;  // the block's first token

  __device__ __forceinline__ void begin(uint8_t*, int tok0_, int) { tok0 = tok0_; }
  __device__ __forceinline__ void finish(int) {}
  // 8 bytes of token tok0 + tok's packed row, from byte `byte` on.
  __device__ __forceinline__ uint2 load(int tok, int byte) const {
    const uint8_t* row = a + static_cast<int64_t>(tok0 + tok) * row_bytes;
    return __ldg(reinterpret_cast<const uint2*>(row + byte));
  }
  __device__ __forceinline__ float scale(int tok, int group) const {
    return __ldg(a_scale + static_cast<int64_t>(tok0 + tok) * groups + group);
  }
};

// x [M, k] of float type T, quantized by each block into its shared memory
// (the fused w4a4_linear). Shared memory holds the scales' bits for `tokens`
// rows, the packed rows (packed_stride bytes apart), then, where x's rows
// are 16-byte aligned (`staged`), a raw copy of x that begin() requests with
// cp.async ahead of the weights and finish() quantizes from.
template <typename T>
struct QuantizingActivations {
  const T* x;
  int64_t k;
  int kp, group_len;
  float clip_ratio;
  bool staged;
  const uint32_t* scale_bits;
  uint8_t* packed;
  const T* raw;
  int groups;

  // Packed rows 32 bytes past a multiple of 128 apart: the 8 token rows one
  // 8-byte load instruction reads then fill the 32 banks twice over, the
  // fewest wavefronts for 256 bytes.
  static constexpr int64_t packed_stride(int64_t kp) {
    const int64_t bytes = kp / 2;
    return bytes + (32 - bytes % 128 + 128) % 128;
  }
  static constexpr int64_t packed_offset(int64_t tokens, int64_t groups) {
    return (tokens * groups * 4 + 15) / 16 * 16;
  }
  static constexpr int64_t raw_offset(int64_t tokens, int64_t kp, int64_t groups) {
    return packed_offset(tokens, groups) + tokens * packed_stride(kp);
  }
  static constexpr bool can_stage(int64_t k, uintptr_t x) {
    return k * static_cast<int64_t>(sizeof(T)) % 16 == 0 && x % 16 == 0;
  }
  static constexpr int64_t smem_bytes(int64_t tokens, int64_t k, int64_t kp, int64_t groups,
                                      bool staged) {
    const int64_t raw_bytes = tokens * k * static_cast<int64_t>(sizeof(T));
    return raw_offset(tokens, kp, groups) + (staged ? raw_bytes : 0);
  }

  __device__ __forceinline__ void begin(uint8_t* smem, int tok0, int tokens) {
    groups = kp / group_len;
    scale_bits = reinterpret_cast<const uint32_t*>(smem);
    packed = smem + packed_offset(tokens, groups);
    x += tok0 * k;
    if (staged) {
      uint8_t* copy = smem + raw_offset(tokens, kp, groups);
      const int chunks = static_cast<int>(tokens * k * static_cast<int64_t>(sizeof(T)) / 16);
      for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        cp_async_16(shared_addr(copy + 16 * c), reinterpret_cast<const uint8_t*>(x) + 16 * c, true);
      }
      cp_async_commit();
      raw = reinterpret_cast<const T*>(copy);
    }
  }
  __device__ __forceinline__ void finish(int tokens) {
    uint32_t* scales = const_cast<uint32_t*>(scale_bits);
    const int stride = static_cast<int>(packed_stride(kp));
    if (staged) {
      cp_async_wait<0>();
      __syncthreads();
      quantize_rows_in_block<T, false>(raw, k, kp, group_len, clip_ratio, true, tokens, packed,
                                       stride, scales);
    } else {
      quantize_rows_in_block<T, true>(x, k, kp, group_len, clip_ratio, false, tokens, packed,
                                      stride, scales);
    }
  }
  __device__ __forceinline__ uint2 load(int tok, int byte) const {
    return *reinterpret_cast<const uint2*>(packed + tok * packed_stride(kp) + byte);
  }
  __device__ __forceinline__ float scale(int tok, int group) const {
    return __uint_as_float(scale_bits[tok * groups + group]);
  }
};

template <int kTokenTiles, bool kGrouped, class Activations>
__global__ void __launch_bounds__(decode::kThreads, 2)
    gemm_decode_kernel(const GemmParams p, const Activations activations) {
  using Mma = Int8Mma;
  using Partial = std::conditional_t<kGrouped, float, int>;
  __shared__ Partial partials[decode::kWarps][kTokenTiles][4][32];
  extern __shared__ __align__(16) uint8_t activation_smem[];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int tok0 = blockIdx.y * 8 * kTokenTiles;
  const int tokens = min(p.m - tok0, 8 * kTokenTiles);
  const int row_tiles = (p.n + decode::kRows - 1) / decode::kRows;
  const int row_bytes = p.kp / 2;
  const int chunks = p.kp / 64;
  const int steps_per_group = p.kp / p.groups / 64;
  constexpr int kBatch = decode::kChunksPerBatch<kTokenTiles>;
  constexpr int kBatchStride = decode::kWarps * kBatch;

  bool a_ok[kTokenTiles];
#pragma unroll
  for (int tt = 0; tt < kTokenTiles; ++tt) a_ok[tt] = tt * 8 + g < tokens;

  const uint8_t* w_row[2];
  bool w_ok[2];
  auto set_row_tile = [&](int tile) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = tile * decode::kRows + g + 8 * h;
      w_ok[h] = n < p.n;
      w_row[h] = p.w + static_cast<int64_t>(w_ok[h] ? n : 0) * row_bytes + 8 * t;
    }
  };
  uint2 wv[kBatch][2];
  auto load_weights = [&](int c0) {
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const bool in_k = c0 + i < chunks;
      const int64_t offset = static_cast<int64_t>(c0 + i) * decode::kChunkBytes;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        wv[i][h] = in_k && w_ok[h] ? load_streaming_8(w_row[h] + offset) : make_uint2(0, 0);
      }
    }
  };

  // The first batch of weights is in flight while the activations are
  // prepared (quantized, for the fused kernel); their own loads go first.
  Activations act = activations;
  act.begin(activation_smem, tok0, tokens);
  set_row_tile(blockIdx.x);
  const bool first_batch_loaded = blockIdx.x < row_tiles && warp * kBatch < chunks;
  if (first_batch_loaded) load_weights(warp * kBatch);
  act.finish(tokens);

  bool weights_loaded = first_batch_loaded;
  for (int tile = blockIdx.x; tile < row_tiles; tile += gridDim.x) {
    const int n0 = tile * decode::kRows;
    set_row_tile(tile);
    int acc[kTokenTiles][4] = {};
    float facc[kTokenTiles][4] = {};  // per group only

    auto flush_group = [&](int group) {
      float sw[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        sw[h] = w_ok[h] ? __ldg(p.w_scale + static_cast<int64_t>(n0 + g + 8 * h) * p.groups + group)
                        : 0.0f;
      }
#pragma unroll
      for (int tt = 0; tt < kTokenTiles; ++tt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int tok = tt * 8 + 2 * t + j;
          const float sa = tok < tokens ? act.scale(tok, group) * Mma::kInvAccScale : 0.0f;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int i = 2 * h + j;  // c[i]: weight row g + 8h, token 2t + j
            facc[tt][i] = fmaf(static_cast<float>(acc[tt][i]), sa * sw[h], facc[tt][i]);
            acc[tt][i] = 0;
          }
        }
      }
    };

    for (int c0 = warp * kBatch; c0 < chunks; c0 += kBatchStride) {
      if (!weights_loaded) load_weights(c0);
      weights_loaded = false;
      uint2 av[kBatch][kTokenTiles];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const bool in_k = c0 + i < chunks;
#pragma unroll
        for (int tt = 0; tt < kTokenTiles; ++tt) {
          const int byte = (c0 + i) * decode::kChunkBytes + 8 * t;
          av[i][tt] = in_k && a_ok[tt] ? act.load(tt * 8 + g, byte) : make_uint2(0, 0);
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
    // The next row tile's first batch is in flight during this one's reduction.
    if (tile + gridDim.x < row_tiles && warp * kBatch < chunks) {
      set_row_tile(tile + gridDim.x);
      load_weights(warp * kBatch);
      weights_loaded = true;
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

    // One thread per output element of the tile: sum the warps' partials in
    // warp order, then scale (per channel) and add the bias (or 0) like the
    // tiled kernels' epilogue.
    if (threadIdx.x < kTokenTiles * 4 * 32) {
      const int tt = threadIdx.x / 128, i = threadIdx.x / 32 % 4, l = threadIdx.x % 32;
      const int n = n0 + l / 4 + 8 * (i / 2);
      const int tok = tt * 8 + 2 * (l % 4) + i % 2;
      if (n < p.n && tok < tokens) {
        Partial total = 0;
#pragma unroll
        for (int w = 0; w < decode::kWarps; ++w) total += partials[w][tt][i][l];
        float v;
        if constexpr (kGrouped) {
          v = total;
        } else {
          // 0 + float(P) * (sa * sw), rounded like the CPU kernel.
          const float s = (act.scale(tok, 0) * Mma::kInvAccScale) * p.w_scale[n];
          v = __fadd_rn(0.0f, __fmul_rn(static_cast<float>(total), s));
        }
        v = __fadd_rn(v, p.bias != nullptr ? load_float(p.bias, p.bias_kind, n) : 0.0f);
        store_float(p.out, p.out_kind, static_cast<int64_t>(tok0 + tok) * p.n + n, v);
      }
    }
    if (tile + gridDim.x < row_tiles) __syncthreads();  // partials are rewritten next tile
  }
}

// Grid: one block per row tile (fewer, each walking several, with
// max_row_blocks > 0) and per 8 * kTokenTiles tokens.
template <int kTokenTiles, bool kGrouped, class Activations>
cudaError_t launch_gemm_decode_shape(const GemmParams& p, const Activations& activations,
                                     size_t smem_bytes, int max_row_blocks, cudaStream_t stream) {
  constexpr int kTokens = 8 * kTokenTiles;
  const auto kernel = gemm_decode_kernel<kTokenTiles, kGrouped, Activations>;
  // Static (partials) plus dynamic shared memory may pass the 48 KB default.
  if (smem_bytes > 0) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
    if (err != cudaSuccess) return err;
  }
  int row_blocks = (p.n + decode::kRows - 1) / decode::kRows;
  if (max_row_blocks > 0 && row_blocks > max_row_blocks) row_blocks = max_row_blocks;
  const dim3 grid(row_blocks, (p.m + kTokens - 1) / kTokens);
  kernel<<<grid, decode::kThreads, smem_bytes, stream>>>(p, activations);
  return cudaSuccess;
}

// Token tiles and per-group variant of p, for one activation source.
template <class Activations>
cudaError_t launch_gemm_decode_for(const GemmParams& p, const Activations& activations,
                                   size_t smem_bytes, int max_row_blocks, cudaStream_t stream) {
  const auto launch = [&](auto token_tiles, auto grouped) {
    return launch_gemm_decode_shape<decltype(token_tiles)::value, decltype(grouped)::value>(
        p, activations, smem_bytes, max_row_blocks, stream);
  };
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  const bool one_tile = p.m <= 8;
  if (p.groups == 1) {
    return one_tile ? launch(One{}, std::false_type{}) : launch(Two{}, std::false_type{});
  }
  return one_tile ? launch(One{}, std::true_type{}) : launch(Two{}, std::true_type{});
}

}  // namespace apex4::cuda
