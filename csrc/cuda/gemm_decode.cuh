// W4A4 GEMM for a few tokens (M <= 16): memory-bound by design.
//
// The weight is the MMA's A operand (16 weight rows = the MMA's M) and the
// tokens its B operand (8 tokens = the MMA's N), so a 16-token step wastes no
// MMA rows. A block owns row tiles of one or two such 16-row groups and all
// of K. The weights and the block's activation rows stream through a ring of
// shared-memory stages (1 or 2 KB of K of each row): on Hopper warp 0 fills a
// stage with one bulk copy (cp.async.bulk) per row, completing on the stage's
// mbarrier, elsewhere all threads with cp.async; the ring keeps several
// stages -- tens of KB per block, up to the whole weight of small layers --
// in flight, and runs on into the block's next row tile. The warps split a
// stage's row groups and its 32 or 64 chunks of 64 values (with a 1 KB stage
// and one row group each warp multiplies 4 chunks, with two 8 of one group),
// from shared memory into MMA fragments; rows are stored 32 bytes more than
// a stage apart so that the 8-byte fragment loads of 8 rows hit distinct
// banks. The warps' partial sums are reduced in shared memory in warp order,
// so the result is deterministic. Per channel the partials are int32 and the
// reduction is exact; per group each warp scales its partials at every group
// end (or stage end, for groups longer than a warp's chunks) into fp32.
//
// Two row groups a tile: the token rows of a stage are read from L2 once per
// row tile, so with 9..16 tokens and 16-row tiles the L2 carries twice the
// weight bytes; 32-row tiles make it 1.5 times. launch_gemm_decode_for takes
// them, and 2 KB stages, where they pay.
//
// With GemmParams::prefetch set (the next layer's weight), each block asks L2
// for its share of those bytes once its own last weight copy is issued, so
// that DRAM streams the next weight while this kernel finishes and the small
// kernels between the two GEMMs (norms, attention, the quantizer) run.
//
// The kernel waits for the grid it depends on (griddepcontrol.wait) only
// after issuing its first weight stages, before the first read of the
// activations: w4a4_linear launches it as a programmatic dependent of the
// quantize kernel, so x is quantized once while the weights stream in.
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
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;  // weight rows of a row group: the MMA's M
constexpr int kChunkBytes = 32;  // 64 values: one k64 step
constexpr int kMaxStages = 6;
// Blocks a launch plans for per SM (registers and the ring's shared memory);
// the launchers' grids are this many blocks per SM.
constexpr int kBlocksPerSm = 2;
// Row pitch in a stage of stage_bytes of K: 32 bytes past a multiple of 128,
// so the 8-byte loads of rows g = 0..7 (bytes 8t..8t+7 of one chunk) fill 32
// banks twice over.
constexpr int row_pitch(int stage_bytes) { return stage_bytes + 32; }
// Shared memory of a ring slot: a row tile's weight rows and a block's token
// rows, stage_bytes of K each.
constexpr int slot_bytes(int tile_rows, int tokens, int stage_bytes) {
  return (tile_rows + tokens) * row_pitch(stage_bytes);
}
// The split of a stage (kStageBytes of K of each row) over the warps, with
// kRowGroups row groups a tile.
template <int kRowGroups, int kStageBytes>
struct Split {
  static_assert(kWarps % kRowGroups == 0, "the warps split evenly over the row groups");
  static_assert(kStageBytes % 128 == 0, "stages keep the row pitch's bank offset");
  static constexpr int kTileRows = kRows * kRowGroups;
  static constexpr int kGroupWarps = kWarps / kRowGroups;  // warps of a row group
  static constexpr int kStageChunks = kStageBytes / kChunkBytes;
  static_assert(kStageChunks % kGroupWarps == 0, "a stage's chunks split evenly over the warps");
  static constexpr int kWarpChunks = kStageChunks / kGroupWarps;  // a warp's chunks of a stage
  static constexpr int kRowPitch = row_pitch(kStageBytes);
};
}  // namespace decode

// The stages of one block: a ring of `stages` slots in shared memory through
// which the block's sequence of (row tile, K stage) items streams, each slot
// holding a row tile's weight rows and then the block's token rows. Item i goes to slot
// i % stages; its slot is refilled once every thread has consumed it.
template <int kStageBytes>
struct StageRing {
  static constexpr int kRowPitch = decode::row_pitch(kStageBytes);
  uint8_t* smem;
  int stages, slot_bytes;
  int first_tile, tile_step, tiles;  // the block's row tiles
  int tile_rows;
  int stages_per_tile;
  int n, row_bytes, tokens;
  const uint8_t* w;
  const uint8_t* a;  // the block's first token row
  const uint8_t* prefetch;  // GemmParams::prefetch
  int64_t prefetch_bytes;
#if defined(APEX4_SM90A)
  uint64_t* full;   // [stages] mbarriers: a slot's bytes have landed
  uint64_t* empty;  // [stages] mbarriers: every warp has read the slot
#endif

  __device__ __forceinline__ int items() const { return tiles * stages_per_tile; }
  __device__ __forceinline__ uint8_t* slot(int i) const {
    return smem + (i % stages) * slot_bytes;
  }
  __device__ __forceinline__ int k_byte(int i) const {
    return i % stages_per_tile * kStageBytes;
  }
  __device__ __forceinline__ int bytes(int i) const {
    return min(kStageBytes, row_bytes - k_byte(i));
  }
  // Copies `rows` rows of `bytes` from src (row_bytes apart) to dst (kRowPitch apart).
  __device__ __forceinline__ void copy_rows(uint8_t* dst, const uint8_t* src, int rows, int bytes,
                                            int i) const {
#if defined(APEX4_SM90A)
    if (threadIdx.x < 32) {  // warp 0, a row per lane
      const uint32_t bar = shared_addr(full + i % stages);
      for (int r = threadIdx.x; r < rows; r += 32) {
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
            " [%0], [%1], %2, [%3];\n" ::"r"(shared_addr(dst + r * kRowPitch)),
            "l"(src + static_cast<int64_t>(r) * row_bytes), "r"(bytes), "r"(bar)
            : "memory");
      }
    }
#else
    const int pieces = bytes / 16;
    for (int c = threadIdx.x; c < rows * pieces; c += decode::kThreads) {
      const int r = c / pieces, piece = c % pieces;
      cp_async_16(shared_addr(dst + r * kRowPitch + 16 * piece),
                  src + static_cast<int64_t>(r) * row_bytes + 16 * piece, true);
    }
#endif
  }
  // Once the block's last weight copy is issued, DRAM has time to spare for
  // the next layer's weight while this kernel finishes and the small kernels
  // between the two GEMMs run: warp 0 asks L2 for the block's share of it.
  __device__ __forceinline__ void prefetch_next() const {
    if (threadIdx.x >= 32 || prefetch_bytes == 0) return;
    constexpr int64_t kLine = 128;
    const int64_t blocks = static_cast<int64_t>(gridDim.x) * gridDim.y;
    const int64_t share = (prefetch_bytes / blocks + kLine) / kLine * kLine;
    const int64_t begin = (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * share;
    const int64_t end = min(prefetch_bytes, begin + share);
    for (int64_t at = begin + threadIdx.x * kLine; at < end; at += 32 * kLine) {
      prefetch_l2(prefetch + at);
    }
  }
  // Item i's weight rows; the slot then also waits for its token rows.
  __device__ __forceinline__ void fill_weights(int i) const {
    if (i >= items()) return;
    const int tile = first_tile + i / stages_per_tile * tile_step;
    const int rows = min(tile_rows, n - tile * tile_rows);
#if defined(APEX4_SM90A)
    if (threadIdx.x == 0) {
      mbarrier_arrive_expect_tx(shared_addr(full + i % stages),
                                static_cast<uint32_t>((rows + tokens) * bytes(i)));
    }
    __syncwarp();  // the expected bytes are set before warp 0 issues the copies
#endif
    copy_rows(slot(i), w + static_cast<int64_t>(tile) * tile_rows * row_bytes + k_byte(i),
              rows, bytes(i), i);
    if (i == items() - 1) prefetch_next();
  }
  __device__ __forceinline__ void fill_tokens(int i) const {
    if (i >= items()) return;
    copy_rows(slot(i) + tile_rows * kRowPitch, a + k_byte(i), tokens, bytes(i), i);
  }
  // Called by every thread after its last read of item i's slot, which then
  // takes item i + stages. On Hopper each warp arrives on the slot's empty
  // barrier and warp 0 refills the slot once all have: no warp waits for
  // another between stages, only for its data. Elsewhere a block barrier.
  __device__ __forceinline__ void release(int i) const {
#if defined(APEX4_SM90A)
    __syncwarp();
    if (threadIdx.x % 32 == 0) mbarrier_arrive(shared_addr(empty + i % stages));
    if (threadIdx.x >= 32 || i + stages >= items()) return;
    mbarrier_wait(shared_addr(empty + i % stages), (i / stages) & 1);
#else
    __syncthreads();
#endif
    fill_weights(i + stages);
    fill_tokens(i + stages);
  }
  // Waits until item i's bytes are in its slot (visible to this thread).
  __device__ __forceinline__ void wait(int i) const {
#if defined(APEX4_SM90A)
    mbarrier_wait(shared_addr(full + i % stages), (i / stages) & 1);
#else
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
#endif
  }
};

template <int kTokenTiles, int kRowGroups, int kStageBytes, bool kGrouped>
__global__ void __launch_bounds__(decode::kThreads, decode::kBlocksPerSm)
    gemm_decode_kernel(const GemmParams p, int stages) {
  using Mma = Int8Mma;
  using Partial = std::conditional_t<kGrouped, float, int>;
  using Split = decode::Split<kRowGroups, kStageBytes>;
  __shared__ Partial partials[Split::kGroupWarps][kRowGroups][kTokenTiles][4][32];
  extern __shared__ __align__(128) uint8_t smem[];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  // This warp's row group of a tile, and its place among that group's warps.
  const int rg = warp / Split::kGroupWarps, gw = warp % Split::kGroupWarps;
  const int tok0 = blockIdx.y * 8 * kTokenTiles;
  const int tokens = min(p.m - tok0, 8 * kTokenTiles);
  const int row_tiles = (p.n + Split::kTileRows - 1) / Split::kTileRows;
  const int chunks = p.kp / 64;
  const int steps_per_group = p.kp / p.groups / 64;

  StageRing<kStageBytes> ring;
  ring.smem = smem;
  ring.stages = stages;
  ring.slot_bytes = decode::slot_bytes(Split::kTileRows, min(p.m, 8 * kTokenTiles), kStageBytes);
  ring.tile_rows = Split::kTileRows;
  ring.first_tile = blockIdx.x;
  ring.tile_step = gridDim.x;
  ring.tiles = (row_tiles - 1 - blockIdx.x) / gridDim.x + 1;
  ring.row_bytes = p.kp / 2;
  ring.stages_per_tile = (ring.row_bytes + kStageBytes - 1) / kStageBytes;
  ring.n = p.n;
  ring.tokens = tokens;
  ring.w = p.w;
  ring.a = p.a + static_cast<int64_t>(tok0) * ring.row_bytes;
  ring.prefetch = p.prefetch;
  ring.prefetch_bytes = p.prefetch_bytes;
#if defined(APEX4_SM90A)
  __shared__ uint64_t full[decode::kMaxStages], empty[decode::kMaxStages];
  ring.full = full;
  ring.empty = empty;
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      mbarrier_init(shared_addr(full + s), 1);
      mbarrier_init(shared_addr(empty + s), decode::kWarps);
    }
    mbarrier_init_fence();
  }
  __syncthreads();
#endif

  // Weights first; the activations (and their scales) only once the grid
  // that writes them (if launched as its dependent) has finished.
  for (int i = 0; i < stages; ++i) ring.fill_weights(i);
  wait_for_prerequisite();
  for (int i = 0; i < stages; ++i) ring.fill_tokens(i);

  bool a_ok[kTokenTiles];
#pragma unroll
  for (int tt = 0; tt < kTokenTiles; ++tt) a_ok[tt] = tt * 8 + g < tokens;
  auto act_scale = [&](int tok, int group) {
    return __ldg(p.a_scale + static_cast<int64_t>(tok0 + tok) * p.groups + group);
  };
  // The epilogue: one thread per output element of a tile (element e: row
  // group erg, token tile et, accumulator register ei, lane el), each thread
  // taking kOutputs elements kThreads apart. Its scales and bias are read
  // before the tile's main loop, so that their latency hides behind it.
  constexpr int kElements = kRowGroups * kTokenTiles * 4 * 32;
  constexpr int kOutputs = (kElements + decode::kThreads - 1) / decode::kThreads;
  struct Output {
    int erg, et, ei, el, row, tok;
    bool ok;
    float act_scale, scale, bias;
  } out[kOutputs];
#pragma unroll
  for (int o = 0; o < kOutputs; ++o) {
    const int e = threadIdx.x + o * decode::kThreads;
    Output& q = out[o];
    q.erg = e / (kTokenTiles * 128);
    q.et = e / 128 % kTokenTiles;
    q.ei = e / 32 % 4;
    q.el = e % 32;
    q.row = q.erg * decode::kRows + q.el / 4 + 8 * (q.ei / 2);
    q.tok = q.et * 8 + 2 * (q.el % 4) + q.ei % 2;
    q.act_scale = !kGrouped && e < kElements && q.tok < tokens
                      ? act_scale(q.tok, 0) * Mma::kInvAccScale
                      : 0.0f;
  }

  int item = 0;
  for (int tile = blockIdx.x; tile < row_tiles; tile += gridDim.x) {
    const int n0 = tile * Split::kTileRows;
    const int w_row0 = n0 + rg * decode::kRows + g;  // this thread's first weight row
    bool w_ok[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) w_ok[h] = w_row0 + 8 * h < p.n;
    int acc[kTokenTiles][4] = {};
    float facc[kTokenTiles][4] = {};  // per group only
#pragma unroll
    for (int o = 0; o < kOutputs; ++o) {
      Output& q = out[o];
      const int e_n = n0 + q.row;
      q.ok = threadIdx.x + o * decode::kThreads < kElements && e_n < p.n && q.tok < tokens;
      // 0 + float(P) * (sa * sw), rounded like the CPU kernel (per channel).
      q.scale = !kGrouped && q.ok ? q.act_scale * p.w_scale[e_n] : 0.0f;
      q.bias = q.ok && p.bias != nullptr ? load_float(p.bias, p.bias_kind, e_n) : 0.0f;
    }

    auto flush_group = [&](int group) {
      float sw[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        sw[h] = w_ok[h] ? __ldg(p.w_scale + static_cast<int64_t>(w_row0 + 8 * h) * p.groups + group)
                        : 0.0f;
      }
#pragma unroll
      for (int tt = 0; tt < kTokenTiles; ++tt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int tok = tt * 8 + 2 * t + j;
          const float sa = tok < tokens ? act_scale(tok, group) * Mma::kInvAccScale : 0.0f;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int i = 2 * h + j;  // c[i]: weight row g + 8h, token 2t + j
            facc[tt][i] = fmaf(static_cast<float>(acc[tt][i]), sa * sw[h], facc[tt][i]);
            acc[tt][i] = 0;
          }
        }
      }
    };

    for (int s = 0; s < ring.stages_per_tile; ++s, ++item) {
      // This warp's chunks of the stage: c0 .. c_end - 1 (of K).
      const int c0 = s * Split::kStageChunks + gw * Split::kWarpChunks;
      const int c_end = min(chunks, c0 + Split::kWarpChunks);
      // Per group: where c0 sits in its group, so that the chunk loop finds the
      // group ends by counting (an integer division per chunk, ~35
      // instructions, cost more than the chunk's MMA work).
      int group = kGrouped ? c0 / steps_per_group : 0;
      int in_group = kGrouped ? c0 - group * steps_per_group : 0;
      ring.wait(item);
      const uint8_t* rows =
          ring.slot(item) + gw * Split::kWarpChunks * decode::kChunkBytes + 8 * t;
#pragma unroll
      for (int i = 0; i < Split::kWarpChunks; ++i) {
        const int c = c0 + i;
        if (c >= c_end) break;
        const uint8_t* chunk = rows + i * decode::kChunkBytes;
        uint2 wv[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          wv[h] = w_ok[h] ? *reinterpret_cast<const uint2*>(
                                chunk + (rg * decode::kRows + g + 8 * h) * Split::kRowPitch)
                          : make_uint2(0, 0);
        }
        const uint32_t words[4] = {wv[0].x, wv[1].x, wv[0].y, wv[1].y};
        const typename Mma::A a = Mma::a_operand(words);
#pragma unroll
        for (int tt = 0; tt < kTokenTiles; ++tt) {
          const uint2 av = a_ok[tt] ? *reinterpret_cast<const uint2*>(
                                          chunk + (Split::kTileRows + tt * 8 + g) * Split::kRowPitch)
                                    : make_uint2(0, 0);
          const typename Mma::B b = Mma::b_operand(av.x, av.y);
#pragma unroll
          for (int step = 0; step < Mma::kSteps; ++step) Mma::mma(acc[tt], a, b, step);
        }
        if constexpr (kGrouped) {
          // A group longer than the warp's chunks of this stage is flushed in pieces.
          const bool group_end = ++in_group == steps_per_group;
          if (group_end || c + 1 == c_end) flush_group(group);
          if (group_end) {
            ++group;
            in_group = 0;
          }
        }
      }
      if (s == ring.stages_per_tile - 1) {
#pragma unroll
        for (int tt = 0; tt < kTokenTiles; ++tt) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            if constexpr (kGrouped) {
              partials[gw][rg][tt][i][lane] = facc[tt][i];
            } else {
              partials[gw][rg][tt][i][lane] = acc[tt][i];
            }
          }
        }
      }
      ring.release(item);
    }
    __syncthreads();  // the tile's partials are written

    // Sum the warps' partials in warp order, then scale (per channel) and
    // add the bias (or 0) like the tiled kernels' epilogue.
#pragma unroll
    for (int o = 0; o < kOutputs; ++o) {
      const Output& q = out[o];
      if (!q.ok) continue;
      Partial total = 0;
#pragma unroll
      for (int w = 0; w < Split::kGroupWarps; ++w) total += partials[w][q.erg][q.et][q.ei][q.el];
      float v;
      if constexpr (kGrouped) {
        v = total;
      } else {
        v = __fadd_rn(0.0f, __fmul_rn(static_cast<float>(total), q.scale));
      }
      v = __fadd_rn(v, q.bias);
      store_float(p.out, p.out_kind, static_cast<int64_t>(tok0 + q.tok) * p.n + n0 + q.row, v);
    }
    if (tile + gridDim.x < row_tiles) __syncthreads();  // partials are rewritten next tile
  }
}

// A launch's ring: a slot's bytes (a row tile's weight rows and the block's
// token rows, kStageBytes of K each), the most (row tile, stage) items a block
// walks, and the stages that fit blocks_per_sm blocks per SM (each less its
// static partials and the 1 KB the system keeps), at most kMaxStages and
// items.
struct DecodeRing {
  int slot_bytes;
  int64_t items, stages;
};
inline DecodeRing decode_ring(const GemmParams& p, int row_blocks, int token_tiles, int row_groups,
                              int stage_bytes, int smem_per_sm, int blocks_per_sm) {
  const int tile_rows = decode::kRows * row_groups;
  const int tokens = p.m < 8 * token_tiles ? p.m : 8 * token_tiles;
  const int row_tiles = (p.n + tile_rows - 1) / tile_rows;
  DecodeRing ring;
  ring.slot_bytes = decode::slot_bytes(tile_rows, tokens, stage_bytes);
  ring.items = static_cast<int64_t>((row_tiles + row_blocks - 1) / row_blocks) *
               ((p.kp / 2 + stage_bytes - 1) / stage_bytes);
  const int64_t budget = smem_per_sm / blocks_per_sm - 1024 -
                         static_cast<int64_t>(sizeof(int)) * decode::kWarps * token_tiles * 128;
  ring.stages = budget / ring.slot_bytes;
  if (ring.stages > decode::kMaxStages) ring.stages = decode::kMaxStages;
  if (ring.stages > ring.items) ring.stages = ring.items;
  if (ring.stages < 1) ring.stages = 1;
  return ring;
}

// Row blocks of the grid: one per row tile, at most max_row_blocks if > 0.
inline int decode_row_blocks(int n, int tile_rows, int max_row_blocks) {
  const int row_tiles = (n + tile_rows - 1) / tile_rows;
  return max_row_blocks > 0 && row_tiles > max_row_blocks ? max_row_blocks : row_tiles;
}

inline cudaError_t decode_smem_per_sm(int* bytes) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(bytes, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
}

// Grid: one block per row tile (fewer, each walking several, with
// max_row_blocks > 0) and per 8 * kTokenTiles tokens; the ring as
// decode_ring sizes it for blocks_per_sm blocks an SM. programmatic: launched
// as a programmatic dependent of the kernel before it on the stream (compute
// capability 9.0+).
template <int kTokenTiles, int kRowGroups, int kStageBytes, bool kGrouped>
cudaError_t launch_gemm_decode_shape(const GemmParams& p, int max_row_blocks, bool programmatic,
                                     cudaStream_t stream,
                                     int blocks_per_sm = decode::kBlocksPerSm) {
  constexpr int kTokens = 8 * kTokenTiles;
  const auto kernel = gemm_decode_kernel<kTokenTiles, kRowGroups, kStageBytes, kGrouped>;
  int smem_per_sm = 0;
  cudaError_t err = decode_smem_per_sm(&smem_per_sm);
  if (err != cudaSuccess) return err;
  const int row_blocks = decode_row_blocks(p.n, decode::kRows * kRowGroups, max_row_blocks);
  const DecodeRing ring =
      decode_ring(p, row_blocks, kTokenTiles, kRowGroups, kStageBytes, smem_per_sm, blocks_per_sm);
  const size_t smem_bytes = static_cast<size_t>(ring.stages) * ring.slot_bytes;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem_bytes));
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, dim3(row_blocks, (p.m + kTokens - 1) / kTokens),
                       dim3(decode::kThreads), smem_bytes, stream, programmatic, p,
                       static_cast<int>(ring.stages));
}

// Token tiles, row groups, stage size and per-group variant of p (H100
// measurements in benchmarks/NOTES.md v14, v16):
//  * two row groups a tile only with two token tiles (where the token rows
//    weigh in L2) and a limited grid, where the busiest block's weight rows
//    grow by at most 1/7 over 16-row tiles: 32-row tiles cut the L2 token
//    reads from 2 to 1.5 times the weight bytes, worth that much imbalance
//    (M = 16: 0.91x the 16-row time at N = 28672, 0.90x at 8192, 1.04x at
//    12288, where they would add 1/3);
//  * 2 KB stages where the ring still holds min(3, items) of them, else 1 KB:
//    half the stage hand-offs (M = 1: 0.87x at 70B g128, 0.94x per channel)
//    but, with 16 token rows, too few stages in flight (M = 16, K = 8192:
//    1.09x).
inline cudaError_t launch_gemm_decode_for(const GemmParams& p, int max_row_blocks,
                                          bool programmatic, cudaStream_t stream) {
  int smem_per_sm = 0;
  const cudaError_t err = decode_smem_per_sm(&smem_per_sm);
  if (err != cudaSuccess) return err;
  const int token_tiles = p.m <= 8 ? 1 : 2;
  const auto busiest_rows = [&](int row_groups) {
    const int tile_rows = decode::kRows * row_groups;
    const int row_tiles = (p.n + tile_rows - 1) / tile_rows;
    return static_cast<int64_t>(tile_rows) *
           ((row_tiles + max_row_blocks - 1) / max_row_blocks);
  };
  const int row_groups =
      token_tiles == 2 && max_row_blocks > 0 && 7 * busiest_rows(2) <= 8 * busiest_rows(1) ? 2 : 1;
  const DecodeRing wide_stages =
      decode_ring(p, decode_row_blocks(p.n, decode::kRows * row_groups, max_row_blocks),
                  token_tiles, row_groups, 2048, smem_per_sm, decode::kBlocksPerSm);
  const bool wide = wide_stages.stages >= (wide_stages.items < 3 ? wide_stages.items : 3);

  const auto launch = [&](auto token_tiles_c, auto row_groups_c, auto stage_bytes_c) {
    constexpr int kTokenTiles = decltype(token_tiles_c)::value;
    constexpr int kRowGroups = decltype(row_groups_c)::value;
    constexpr int kStageBytes = decltype(stage_bytes_c)::value;
    return p.groups == 1
               ? launch_gemm_decode_shape<kTokenTiles, kRowGroups, kStageBytes, false>(
                     p, max_row_blocks, programmatic, stream)
               : launch_gemm_decode_shape<kTokenTiles, kRowGroups, kStageBytes, true>(
                     p, max_row_blocks, programmatic, stream);
  };
  const auto with_stages = [&](auto token_tiles_c, auto row_groups_c) {
    return wide ? launch(token_tiles_c, row_groups_c, std::integral_constant<int, 2048>{})
                : launch(token_tiles_c, row_groups_c, std::integral_constant<int, 1024>{});
  };
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  if (token_tiles == 1) return with_stages(One{}, One{});
  return row_groups == 2 ? with_stages(Two{}, Two{}) : with_stages(Two{}, One{});
}

}  // namespace apex4::cuda
