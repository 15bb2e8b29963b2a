// Tiled W4A4 GEMM on Hopper's warpgroup tensor cores (wgmma, sm_90a): the
// INT4 operands are unpacked to INT8 once per block in shared memory, where
// wgmma reads them.
//
// A block is three warpgroups, specialised:
//  * packed 128-value K slices of the A and W tiles (64 bytes a row) stream
//    into shared memory by bulk tensor copies (TMA, 64-byte swizzle, zeros
//    past M, N and Kp), a few stages ahead, issued by the first consumer
//    thread;
//  * the producer (warpgroup 0): all 128 threads unpack each slice into an
//    INT8 stage laid out for wgmma: K-major rows of 128 bytes with the
//    128-byte swizzle. The fence that hands their stores to the tensor cores
//    (fence.proxy.async) is a MEMBAR, which would also wait for loads the
//    fencing thread has in flight: hence no producer thread issues the
//    copies (with cp.async, or TMA from producer thread 0, every slice cost a
//    memory latency);
//  * two consumers (warpgroups 1 and 2) each multiply 64 rows of A by the
//    block's kBN rows of W with wgmma m64nNk32 s8, both operands from shared
//    memory, and keep the int32 accumulators in registers;
//  * mbarriers hand the stages over: packed_full (TMA bytes landed),
//    packed_empty (the 128 unpackers are done reading), full (the unpackers
//    arrive after fence.proxy.async, which makes their stores visible to the
//    tensor cores) and empty (the consumers' 256 threads arrive once the
//    wgmmas that read the stage are done).
//
// Unpacking (see mma.cuh's Int8Mma): packed word j of a 64-value slice splits
// into the even elements `(w << 4) & 0xF0F0F0F0` and the odd ones
// `w & 0xF0F0F0F0` (16 x value each); the even words of the slice fill the
// first 32 bytes of its 64 INT8 bytes and the odd words the next 32. Both
// operands use that same K placement, so the dot products are unchanged and
// the int32 accumulators hold exactly 256 * P (kMaxInt8MmaGroupLen).
//
// Per channel: 128x256 tiles (two m64n256 consumers, 128 accumulators a
// thread) or 128x128 ones, whichever needs fewer slice times per SM
// (gemm_wgmma.cu), scaled once in the epilogue. Per group (group lengths a
// multiple of the 128-value stage): 128x128 tiles (m64n128), each group's
// wgmmas issued back to back, its int32 partials folded into fp32
// accumulators after waiting for them: acc = fma(float(P), sa * sw, acc).
// (ptxas serializes every wgmma, C7520 in its -v output, if accumulator
// registers are touched on a path it cannot prove uniform, or if the paths
// into a join have different wgmmas in flight: keep the loops plain.)
//
// The grid is persistent: a block walks work units blockIdx.x, + gridDim.x,
// ..., its producer running ahead into the next unit while the consumers
// store the last one. A unit is an output tile, or per channel with few
// 128x128 tiles and a long K, a K range of one (split K): each split stores
// its exact int32 partial sums to a workspace, and the last split of a tile
// to finish (a counter per tile) adds the others' to its own and runs the
// epilogue. Integer sums are exact in any order, so split K changes no bit.
#pragma once

#include <cuda.h>  // CUtensorMap

#include <atomic>

#include "apex4/int4.h"
#include "cuda/gemm_epilogue.cuh"
#include "cuda/launch.h"
#include "cuda/mma.cuh"

namespace apex4::cuda {

template <int kBN_, bool kGrouped_, bool kSplitK_, int kInt8Stages_, int kPackedStages_>
struct WgmmaShape {
  static constexpr int kBM = 128, kBN = kBN_;
  static constexpr bool kGrouped = kGrouped_;
  static constexpr bool kSplitK = kSplitK_;  // per channel only
  static constexpr int kBK = 128;              // K values per stage
  static constexpr int kKSteps = kBK / 32;     // wgmma k32 steps per stage
  static constexpr int kRows = kBM + kBN;      // a stage holds A's rows, then W's
  static constexpr int kPackedRowBytes = kBK / 2;
  static constexpr int kInt8RowBytes = kBK;    // one 128-byte swizzle row
  static constexpr int kInt8Stages = kInt8Stages_, kPackedStages = kPackedStages_;
  static constexpr int kInt8StageBytes = kRows * kInt8RowBytes;
  static constexpr int kPackedStageBytes = kRows * kPackedRowBytes;
  static constexpr int kProducerThreads = 128;
  static constexpr int kConsumerThreads = 256;  // two warpgroups of 64 rows
  static constexpr int kThreads = kProducerThreads + kConsumerThreads;
  // A producer job is a warp's 8 rows x 4 chunks of a slice; the four
  // producer warps cover 32 rows per job.
  static constexpr int kJobs = kRows / 32;
  // Registers: the producer holds a slice's kJobs loaded words (4 each),
  // the consumers the accumulators (kBN / 2, per group twice: int32
  // partials and fp32 sums) plus addressing. setmaxnreg moves registers
  // within the block's pool, which is what the launch allocated: kThreads * the per-thread count ptxas chose
  // (at most kLaunchRegisters under __launch_bounds__(kThreads, 1), 168). A
  // role asking for more than the pool holds spins in setmaxnreg forever:
  // checked here and, against the count ptxas actually chose, at launch.
  static constexpr int kProducerRegisters = kBN == 256 ? 80 : 56;
  static constexpr int kConsumerRegisters = kBN == 256 ? 208 : 224;
  static constexpr int kLaunchRegisters = 65536 / kThreads / 8 * 8;
  static constexpr int kRoleRegisters =
      kProducerThreads * kProducerRegisters + kConsumerThreads * kConsumerRegisters;
  static constexpr int kBarrierBytes = 8 * 2 * (kInt8Stages + kPackedStages);
  static constexpr int kSmemBytes = 1024 /* alignment slack */ + kInt8Stages * kInt8StageBytes +
                                    kPackedStages * kPackedStageBytes + kBarrierBytes;
  // The kernel's static shared memory: per channel, the staged column factors
  // (scale and bias of kBN columns, two tiles), and the split-K flag.
  using ColumnFactorBuffers = float[2][2][kBN];
  static constexpr int kStaticSmemBytes = sizeof(ColumnFactorBuffers) + sizeof(int);
  static_assert(kRows % 32 == 0 && kBM % 32 == 0);
  static_assert(!(kSplitK && kGrouped), "split K is exact for int32 sums only");
  static_assert(kInt8StageBytes % 1024 == 0 && kPackedStageBytes % 1024 == 0 &&
                    kBM * kPackedRowBytes % 1024 == 0,
                "swizzle patterns need 1024-byte aligned stages and W boxes");
  static_assert(kSmemBytes + kStaticSmemBytes <= 227 * 1024);
  static_assert(kRoleRegisters <= kThreads * kLaunchRegisters,
                "setmaxnreg would wait forever for registers the block does not have");
};

using WgmmaWide = WgmmaShape<256, false, false, 3, 3>;   // per channel, enough tiles
using WgmmaNarrow = WgmmaShape<128, false, true, 4, 4>;   // per channel, few tiles
using WgmmaGrouped = WgmmaShape<128, true, false, 4, 4>;  // per group

__device__ __forceinline__ uint4 ld_shared_16(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}
__device__ __forceinline__ void st_shared_16(uint32_t addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}

// The work of one block: units blockIdx.x, blockIdx.x + gridDim.x, ...;
// unit u is K range u % splits of output tile u / splits.
struct WorkUnit {
  TileOrigin origin;
  int tile, split, k_begin, k_end;  // k-tiles of 128 values
};

template <class Shape>
struct WorkSchedule {
  int units, splits, tiles_per_split, ktiles;
  int m, n;
  __device__ __forceinline__ WorkUnit unit(int u) const {
    WorkUnit w;
    w.tile = u / splits;
    w.split = u % splits;
    w.origin = rastered_tile(w.tile, m, n, Shape::kBM, Shape::kBN);
    w.k_begin = w.split * tiles_per_split;
    w.k_end = min(ktiles, w.k_begin + tiles_per_split);
    return w;
  }
};

// Walks a block's (unit, k-tile) slices in order; a few registers, with the
// schedule passed in.
struct SliceCursor {
  int u, kt, k_end;
  TileOrigin origin;
  template <class Schedule>
  __device__ __forceinline__ void enter(const Schedule& schedule) {
    if (u >= schedule.units) return;
    const WorkUnit w = schedule.unit(u);
    kt = w.k_begin, k_end = w.k_end, origin = w.origin;
  }
  template <class Schedule>
  __device__ __forceinline__ void start(const Schedule& schedule) {
    u = blockIdx.x;
    enter(schedule);
  }
  template <class Schedule>
  __device__ __forceinline__ bool valid(const Schedule& schedule) const {
    return u < schedule.units;
  }
  template <class Schedule>
  __device__ __forceinline__ void advance(const Schedule& schedule) {
    if (++kt == k_end) {
      u += gridDim.x;
      enter(schedule);
    }
  }
};

__device__ __forceinline__ void consumer_barrier() {
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
}

// Split K: stores this split's exact int32 partial sums to the workspace
// (column pairs in one 8-byte store where N is even); the tile's last split
// to finish adds the other splits' sums to its own registers, every load of a
// split in flight at once, and returns true: it runs the epilogue. The others
// return false. Integer sums are exact in any order.
template <int kBN>
__device__ __forceinline__ bool add_split_partials(const GemmParams& p, const SplitK& split,
                                                   const WorkUnit& w, int splits, int thread_m,
                                                   int thread_n, int ctid, int (&acc)[kBN / 2],
                                                   int& last_split) {
  const bool pairs = p.n % 2 == 0;
  auto at = [&](int sp, int m, int n) {
    return split.partials + (static_cast<int64_t>(sp) * p.m + m) * p.n + n;
  };
  // f(i, m, n) for each of the thread's accumulator pairs (acc[i], acc[i + 1])
  // at row m, columns n and n + 1, where they are inside the output.
  auto each_pair = [&](auto&& f) {
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = thread_m + 8 * h, n = thread_n + 8 * nt;
        if (m < p.m && n < p.n) f(4 * nt + 2 * h, m, n);
      }
    }
  };
  each_pair([&](int i, int m, int n) {
    int* dst = at(w.split, m, n);
    if (pairs) {
      __stcg(reinterpret_cast<int2*>(dst), make_int2(acc[i], acc[i + 1]));
    } else {
      __stcg(dst, acc[i]);
      if (n + 1 < p.n) __stcg(dst + 1, acc[i + 1]);
    }
  });
  __threadfence();
  consumer_barrier();
  if (ctid == 0) last_split = atomicAdd(split.counters + w.tile, 1) == splits - 1;
  consumer_barrier();
  if (!last_split) return false;
  __threadfence();
  for (int sp = 0; sp < splits; ++sp) {
    if (sp == w.split) continue;
    each_pair([&](int i, int m, int n) {
      const int* src = at(sp, m, n);
      if (pairs) {
        const int2 v = __ldcg(reinterpret_cast<const int2*>(src));
        acc[i] += v.x;
        acc[i + 1] += v.y;
      } else {
        acc[i] += __ldcg(src);
        if (n + 1 < p.n) acc[i + 1] += __ldcg(src + 1);
      }
    });
  }
  if (ctid == 0) split.counters[w.tile] = 0;  // ready for reuse
  return true;
}

template <class Shape>
__global__ void __launch_bounds__(Shape::kThreads, 1)
    gemm_wgmma_kernel(const GemmParams p, const SplitK split,
                      const __grid_constant__ CUtensorMap a_map,
                      const __grid_constant__ CUtensorMap w_map) {
#if defined(APEX4_SM90A)
  constexpr int kBM = Shape::kBM, kBN = Shape::kBN;
  constexpr int kQ = Shape::kInt8Stages, kP = Shape::kPackedStages;
  extern __shared__ uint8_t smem_raw[];
  __shared__ int last_split;  // this block finished its tile's last split
  __shared__ typename Shape::ColumnFactorBuffers column_factors;  // by tile parity
  // Everything below is computed after the role's setmaxnreg: values live
  // across it would have to fit the producer's few registers (or spill).
  auto int8_base = [&] { return (shared_addr(smem_raw) + 1023) & ~1023u; };
  auto packed_base = [&] { return int8_base() + kQ * Shape::kInt8StageBytes; };
  auto bar_base = [&] { return packed_base() + kP * Shape::kPackedStageBytes; };
  auto full_bar = [&](int q) { return bar_base() + 8 * q; };
  auto empty_bar = [&](int q) { return bar_base() + 8 * (kQ + q); };
  auto packed_full_bar = [&](int s) { return bar_base() + 8 * (2 * kQ + s); };
  auto packed_empty_bar = [&](int s) { return bar_base() + 8 * (2 * kQ + kP + s); };
  if (threadIdx.x == 0) {
    for (int q = 0; q < kQ; ++q) {
      mbarrier_init(full_bar(q), Shape::kProducerThreads);
      mbarrier_init(empty_bar(q), Shape::kConsumerThreads);
    }
    for (int s = 0; s < kP; ++s) {
      mbarrier_init(packed_full_bar(s), 1);
      mbarrier_init(packed_empty_bar(s), Shape::kProducerThreads);
    }
    mbarrier_init_fence();
  }
  __syncthreads();

  auto make_schedule = [&] {
    const int ktiles = (p.kp + Shape::kBK - 1) / Shape::kBK;
    const int tiles = ((p.m + kBM - 1) / kBM) * ((p.n + kBN - 1) / kBN);
    return WorkSchedule<Shape>{tiles * split.splits, split.splits,
                               (ktiles + split.splits - 1) / split.splits, ktiles, p.m, p.n};
  };

  if (threadIdx.x < Shape::kProducerThreads) {
    // ---- producer: unpacks each packed slice into an INT8 stage.
    setmaxnreg_dec<Shape::kProducerRegisters>();
    const WorkSchedule<Shape> schedule = make_schedule();
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    // Job i: tile row 32 i + 8 warp + lane % 8 (A's rows, then W's), 16-byte
    // chunk lane / 8 of its 64-byte packed slice. A phase of 8 lanes touches 8
    // consecutive rows in one chunk column: conflict-free both in the packed
    // stage (TMA's 64-byte swizzle: chunk c of row r at c ^ ((r >> 1) & 3))
    // and in the INT8 stage (128-byte swizzle).
    const int chunk = lane / 8;
    auto job_row = [&](int i) { return 32 * i + 8 * warp + lane % 8; };
    // Even words of packed chunk c land in INT8 chunk 4 (c / 2) + c % 2 of the
    // row, odd words two chunks further (see the header comment).
    const int even_chunk = 4 * (chunk / 2) + chunk % 2;

    // Stages and barrier phase parities, stepped as running counters.
    int q = 0, s = 0;
    uint32_t phase = 0, packed_phase = 0;
    SliceCursor slice;
    for (slice.start(schedule); slice.valid(schedule); slice.advance(schedule)) {
      mbarrier_wait(packed_full_bar(s), packed_phase);
      mbarrier_wait(empty_bar(q), phase ^ 1);
      const uint32_t packed = packed_base() + s * Shape::kPackedStageBytes;
      const uint32_t int8 = int8_base() + q * Shape::kInt8StageBytes;
      // Every load of the slice is issued before the first store (the
      // asm's memory clobbers keep the compiler from hoisting them): one
      // shared-memory latency per slice, not one per job.
      uint4 words[Shape::kJobs];
#pragma unroll
      for (int i = 0; i < Shape::kJobs; ++i) {
        const int row = job_row(i);
        words[i] = ld_shared_16(packed + row * Shape::kPackedRowBytes +
                                ((chunk ^ ((row >> 1) & 3)) << 4));
      }
      mbarrier_arrive(packed_empty_bar(s));
#pragma unroll
      for (int i = 0; i < Shape::kJobs; ++i) {
        const int row = job_row(i);
        const uint4 w = words[i];
        const uint4 even = make_uint4(Int8Mma::even_x16(w.x), Int8Mma::even_x16(w.y),
                                      Int8Mma::even_x16(w.z), Int8Mma::even_x16(w.w));
        const uint4 odd = make_uint4(Int8Mma::odd_x16(w.x), Int8Mma::odd_x16(w.y),
                                     Int8Mma::odd_x16(w.z), Int8Mma::odd_x16(w.w));
        const uint32_t dst = int8 + row * Shape::kInt8RowBytes;
        st_shared_16(dst + ((even_chunk ^ (row & 7)) << 4), even);
        st_shared_16(dst + (((even_chunk + 2) ^ (row & 7)) << 4), odd);
      }
      fence_proxy_async_shared();
      mbarrier_arrive(full_bar(q));
      if (++q == kQ) q = 0, phase ^= 1;
      if (++s == kP) s = 0, packed_phase ^= 1;
    }
    return;
  }

  // ---- consumers: warpgroup wg multiplies tile rows 64 wg .. 64 wg + 63.
  setmaxnreg_inc<Shape::kConsumerRegisters>();
  const WorkSchedule<Shape> schedule = make_schedule();
  const int ctid = threadIdx.x - Shape::kProducerThreads;
  const int wg = ctid / 128, warp = ctid % 128 / 32, lane = ctid % 32;
  constexpr int kAcc = kBN / 2;

  auto a_desc = [&](int q, int step) {
    return wgmma_desc_k_major_sw128(int8_base() + q * Shape::kInt8StageBytes +
                                    64 * wg * Shape::kInt8RowBytes + 32 * step);
  };
  auto b_desc = [&](int q, int step) {
    return wgmma_desc_k_major_sw128(int8_base() + q * Shape::kInt8StageBytes +
                                    kBM * Shape::kInt8RowBytes + 32 * step);
  };

  // The first consumer thread issues the TMA copies: slice j of the block
  // goes to packed stage j % kP, kP - 1 slices ahead of the one consumed,
  // once every unpacker is done with the slice that stage held.
  SliceCursor issue{};  // used by the first consumer thread only
  int issued = 0;
  auto issue_next = [&] {
    const int s = issued % kP;
    mbarrier_wait(packed_empty_bar(s), ((issued / kP) & 1) ^ 1);
    const uint32_t stage = packed_base() + s * Shape::kPackedStageBytes;
    const int x = issue.kt * Shape::kPackedRowBytes;
    mbarrier_arrive_expect_tx(packed_full_bar(s), Shape::kPackedStageBytes);
    tma_load_2d(stage, &a_map, x, issue.origin.m0, packed_full_bar(s));
    tma_load_2d(stage + kBM * Shape::kPackedRowBytes, &w_map, x, issue.origin.n0,
                packed_full_bar(s));
    issue.advance(schedule);
    ++issued;
  };
  if (ctid == 0) {
    issue.start(schedule);
    for (int j = 0; j < kP - 1 && issue.valid(schedule); ++j) issue_next();
  }

  int q = 0;  // INT8 stage of the next slice, and its barriers' phase parity
  uint32_t phase = 0;
  int parity = 0;  // of the tiles stored, picks column_factors' buffer
  // One stage: its wgmmas issued back to back (the first one adding to acc or,
  // with accumulate = 0, overwriting it), then the previous stage handed back
  // once its wgmmas are done; this stage's run on while the next is waited for.
  auto mma_stage = [&](int(&acc)[kAcc], int accumulate, int& previous_q) {
    if (ctid == 0 && issue.valid(schedule)) issue_next();
    mbarrier_wait(full_bar(q), phase);
    wgmma_fence();
    wgmma_s8_k32<kBN>(acc, a_desc(q, 0), b_desc(q, 0), accumulate);
#pragma unroll
    for (int step = 1; step < Shape::kKSteps; ++step) {
      wgmma_s8_k32<kBN>(acc, a_desc(q, step), b_desc(q, step), 1);
    }
    wgmma_commit();
    wgmma_wait<1>();
    if (previous_q >= 0) mbarrier_arrive(empty_bar(previous_q));
    previous_q = q;
    if (++q == kQ) q = 0, phase ^= 1;
  };
  for (int u = blockIdx.x; u < schedule.units; u += gridDim.x) {
    const WorkUnit w = schedule.unit(u);
    const int thread_m = w.origin.m0 + 64 * wg + 16 * warp + lane / 4;
    const int thread_n = w.origin.n0 + 2 * (lane % 4);
    // The row factor folds in the accumulator's 256 (Int8Mma::kInvAccScale).
    auto row_scale = [&](int h, int group) {
      const int m = thread_m + 8 * h;
      return m < p.m ? __ldg(p.a_scale + static_cast<int64_t>(m) * p.groups + group) *
                           Int8Mma::kInvAccScale
                     : 0.0f;
    };

    if constexpr (!Shape::kGrouped) {
      // The epilogue's factors are loaded now, their latency hidden by the
      // main loop (see StagedColumnFactors).
      StagedColumnFactors<kBN> factors;
      if (ctid < kBN) factors.load(p, w.origin.n0 + ctid, true);
      const float rs[2] = {row_scale(0, 0), row_scale(1, 0)};
      int acc[kAcc];
#pragma unroll
      for (int i = 0; i < kAcc; ++i) acc[i] = 0;
      int previous_q = -1;
      for (int kt = w.k_begin; kt < w.k_end; ++kt) mma_stage(acc, 1, previous_q);
      wgmma_wait<0>();
      mbarrier_arrive(empty_bar(previous_q));

      if (Shape::kSplitK && schedule.splits > 1) {
        if (!add_split_partials<kBN>(p, split, w, schedule.splits, thread_m, thread_n, ctid, acc,
                                     last_split)) {
          continue;
        }
      }
      if (ctid < kBN) factors.publish(column_factors[parity], ctid);
      consumer_barrier();
      store_output<1, kBN / 8>(
          p, thread_m, thread_n,
          [&](int n) {
            return StagedColumnFactors<kBN>::read(column_factors[parity], n - w.origin.n0);
          },
          [&](int, int nt, int i, const ColumnFactors& c) {
            return per_channel_output(acc[4 * nt + i], rs[i / 2], c.scale[i % 2], c.bias[i % 2]);
          });
      parity ^= 1;
    } else {
      // Per group (whole stages: the launcher sends other group lengths to
      // the mma.sync kernel): each group runs mma_stage over its stages, as
      // per channel, the group's scales are loaded while its last wgmmas
      // finish, and its int32 partials are folded into the fp32 sums.
      int acc[kAcc];
      float facc[kAcc];
#pragma unroll
      for (int i = 0; i < kAcc; ++i) facc[i] = 0.0f;
      const int stages_per_group = p.kp / p.groups / Shape::kBK;
      for (int group = 0; group < p.groups; ++group) {
        int previous_q = -1;
        // A group's first stage overwrites the previous group's partials.
        for (int stage = 0; stage < stages_per_group; ++stage) {
          mma_stage(acc, stage != 0, previous_q);
        }
        const float rs[2] = {row_scale(0, group), row_scale(1, group)};
        float sw[kBN / 4];  // columns thread_n + 8 nt + j at 2 nt + j
        const float* sw_at = p.w_scale + static_cast<int64_t>(thread_n) * p.groups + group;
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            sw[2 * nt + j] = thread_n + 8 * nt + j < p.n ? __ldg(sw_at + j * p.groups) : 0.0f;
          }
          sw_at += 8 * p.groups;
        }
        wgmma_wait<0>();
        mbarrier_arrive(empty_bar(previous_q));
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int a = 4 * nt + i;
            facc[a] = fmaf(static_cast<float>(acc[a]), rs[i / 2] * sw[2 * nt + i % 2], facc[a]);
          }
        }
      }
      // The bias only, usually absent: staging it measured 2-5% slower.
      store_output<1, kBN / 8>(
          p, thread_m, thread_n, [&](int n) { return load_column_factors(p, n, false); },
          [&](int, int nt, int i, const ColumnFactors& c) {
            return __fadd_rn(facc[4 * nt + i], c.bias[i % 2]);
          });
    }
  }
#endif  // APEX4_SM90A
}

template <class Shape>
int64_t wgmma_output_tiles(const GemmParams& p) {
  return static_cast<int64_t>((p.m + Shape::kBM - 1) / Shape::kBM) *
         ((p.n + Shape::kBN - 1) / Shape::kBN);
}

// Tensor map of a packed [rows, row_bytes] operand, read in boxes of 64
// bytes (a 128-value K slice) by box_rows rows, 64-byte swizzled.
cudaError_t packed_tensor_map(CUtensorMap* map, const uint8_t* data, int rows, int row_bytes,
                              int box_rows);

// One block per SM (or per unit, if fewer), each walking its units.
template <class Shape>
cudaError_t launch_gemm_wgmma_shape(const GemmParams& p, const SplitK& split, int sms,
                                    cudaStream_t stream) {
  const auto kernel = gemm_wgmma_kernel<Shape>;
  CUtensorMap a_map, w_map;
  cudaError_t err = packed_tensor_map(&a_map, p.a, p.m, p.kp / 2, Shape::kBM);
  if (err == cudaSuccess) err = packed_tensor_map(&w_map, p.w, p.n, p.kp / 2, Shape::kBN);
  if (err == cudaSuccess) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               Shape::kSmemBytes);
  }
  if (err != cudaSuccess) return err;
  // A build whose ptxas gave the kernel fewer registers than the roles
  // redistribute would hang in setmaxnreg: refuse to launch it instead.
  static std::atomic<int> registers{0};  // ptxas's per-thread count, looked up once
  if (registers.load(std::memory_order_relaxed) == 0) {
    cudaFuncAttributes attr;
    err = cudaFuncGetAttributes(&attr, kernel);
    if (err != cudaSuccess) return err;
    registers.store(attr.numRegs, std::memory_order_relaxed);
  }
  if (registers.load(std::memory_order_relaxed) * Shape::kThreads < Shape::kRoleRegisters) {
    return cudaErrorLaunchOutOfResources;
  }
  const int64_t units = wgmma_output_tiles<Shape>(p) * split.splits;
  const unsigned blocks = static_cast<unsigned>(units < sms ? units : sms);
  kernel<<<blocks, Shape::kThreads, Shape::kSmemBytes, stream>>>(p, split, a_map, w_map);
  return cudaSuccess;
}

}  // namespace apex4::cuda
