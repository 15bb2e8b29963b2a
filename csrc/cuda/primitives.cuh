// Device building blocks shared by the kernels: the PTX instructions they are
// made of (cp.async, ldmatrix, integer mma.sync, streaming loads) and float
// conversions for the fp32/fp16/bf16 tensors they read and write.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "cuda/launch.h"

namespace apex4::cuda {

__device__ __forceinline__ uint32_t shared_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy through L2 only. With valid = false nothing is
// read and the destination is zero-filled: that is how tiles past the end of
// M, N or K become zeros, which add nothing to any dot product.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Programmatic dependent launch (compute capability 9.0+; no-ops below).
// Lets the grid launched as this one's programmatic dependent start before
// this one finishes.
__device__ __forceinline__ void release_dependents() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
// Waits until the grid this one was launched as a programmatic dependent of
// has finished and its writes are visible; returns at once for a plain launch.
__device__ __forceinline__ void wait_for_prerequisite() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
// Whether kernel, as loaded on the current device, came from compute_90+
// code: only then does its wait_for_prerequisite wait (a compute_80 PTX build
// JIT-compiled on a Hopper GPU has it as a no-op). Such code runs only on a
// 9.0+ GPU, so this also says the GPU has programmatic launch. Cached per
// thread, since the attribute query costs a few driver calls a launch.
template <typename Kernel>
cudaError_t waits_for_prerequisite(Kernel kernel, bool* waits) {
  struct Seen {
    const void* kernel;
    int device;
    bool waits;
  };
  thread_local Seen seen[64];
  thread_local int count = 0;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const void* key = reinterpret_cast<const void*>(kernel);
  for (int i = 0; i < count; ++i) {
    if (seen[i].kernel == key && seen[i].device == device) {
      *waits = seen[i].waits;
      return cudaSuccess;
    }
  }
  cudaFuncAttributes attributes;
  err = cudaFuncGetAttributes(&attributes, kernel);
  if (err != cudaSuccess) return err;
  *waits = attributes.ptxVersion >= 90;
  if (count < 64) seen[count++] = {key, device, *waits};
  return cudaSuccess;
}

// Launches kernel on stream, as a programmatic dependent of the kernel before
// it on the stream if `programmatic` (compute capability 9.0+) and the kernel
// waits for it (waits_for_prerequisite); otherwise plainly, so that it stays
// ordered.
template <typename Kernel, typename... Args>
cudaError_t launch_kernel(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes,
                          cudaStream_t stream, bool programmatic, Args&&... args) {
  if (programmatic) {
    const cudaError_t err = waits_for_prerequisite(kernel, &programmatic);
    if (err != cudaSuccess) return err;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = programmatic ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// Asks L2 to fetch the 128-byte line at p; nothing waits for it.
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

// Four 8x8 b16 matrices (8 rows of 16 bytes each); lanes 8j..8j+7 address the
// rows of matrix j, and lane l receives 32-bit word l%4 of row l/4 of each.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a * b on a 16x8 tile. a: rows groupID and groupID+8 of A (16 x k,
// row-major), b: column groupID of B (k x 8, column-major); each 32-bit
// register holds consecutive k values, lowest k in the lowest bits.
__device__ __forceinline__ void mma_s4_k64(int (&c)[4], const uint32_t (&a)[4],
                                           const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_s8_k32(int (&c)[4], const uint32_t (&a)[4],
                                           const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ---- Hopper (sm_90a) only: mbarriers, async-proxy fence, wgmma, setmaxnreg.
// Callers compile these only where APEX4_SM90A is set (the sm_90a pass).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define APEX4_SM90A 1

__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the initialised barriers visible before any thread uses them.
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the barrier's phase of parity `parity` has completed. A fresh
// barrier counts its (virtual) preceding phase, parity 1, as completed.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// Arrives and adds `bytes` to the transaction count the current phase waits
// for (the bytes the bulk copies signalling this barrier will deliver).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// Bulk tensor copy (TMA) of the box at (x, y) of a 2-D tensor map into shared
// memory, completing on the mbarrier `bar`; out-of-bounds elements are zeros.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* tensor_map, int x, int y,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(tensor_map), "r"(x), "r"(y), "r"(bar)
      : "memory");
}
// Orders this thread's ordinary shared-memory stores before later reads of
// that memory by the tensor cores (the async proxy).
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

// wgmma shared-memory matrix descriptor of a K-major operand stored with the
// 128-byte swizzle: 8-row atoms of 128-byte rows, 16-byte chunk j of row r at
// chunk j ^ (r % 8), atoms 1024 bytes apart (the stride byte offset). The
// leading byte offset is unused for this layout. `addr` may point 32 * s bytes
// into the rows (the s-th K step of 32 bytes): the hardware swizzles the final
// address, so the step's chunks are found where the writer put them.
__device__ __forceinline__ uint64_t wgmma_desc_k_major_sw128(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

#define APEX4_R8(i) "+r"(d[i]), "+r"(d[i + 1]), "+r"(d[i + 2]), "+r"(d[i + 3]), \
                    "+r"(d[i + 4]), "+r"(d[i + 5]), "+r"(d[i + 6]), "+r"(d[i + 7])
#define APEX4_R32(i) APEX4_R8(i), APEX4_R8(i + 8), APEX4_R8(i + 16), APEX4_R8(i + 24)

// d (+)= A * B^T over 32 K values, A 64 x 32 and B kN x 32 int8, both K-major
// in shared memory; d is the warpgroup's 64 x kN int32 tile in the
// m16n8-accumulator layout (d[4j..4j+3] = columns 8j..8j+7 of the warp's 16
// rows, as mma.sync's c of n8 tile j). accumulate = 0 overwrites d.
template <int kN>
__device__ __forceinline__ void wgmma_s8_k32(int (&d)[kN / 2], uint64_t a_desc, uint64_t b_desc,
                                             int accumulate) {
  static_assert(kN == 128 || kN == 256, "wgmma_s8_k32 is written for N = 128 and 256");
  if constexpr (kN == 256) {
    asm volatile(
        "{\n.reg .pred acc;\nsetp.ne.b32 acc, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "%128, %129, acc;\n}\n"
        : APEX4_R32(0), APEX4_R32(32), APEX4_R32(64), APEX4_R32(96)
        : "l"(a_desc), "l"(b_desc), "r"(accumulate)
        : "memory");
  } else {
    asm volatile(
        "{\n.reg .pred acc;\nsetp.ne.b32 acc, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, acc;\n}\n"
        : APEX4_R32(0), APEX4_R32(32)
        : "l"(a_desc), "l"(b_desc), "r"(accumulate)
        : "memory");
  }
}
#undef APEX4_R32
#undef APEX4_R8
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// 8-byte load of data read exactly once (weights in the decode kernel): do not
// let it evict reusable lines from L1.
__device__ __forceinline__ uint2 load_streaming_8(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];\n"
               : "=r"(v.x), "=r"(v.y)
               : "l"(p));
  return v;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float load_float(const void* p, FloatKind kind, int64_t i) {
  switch (kind) {
    case FloatKind::kF16: return __half2float(static_cast<const __half*>(p)[i]);
    case FloatKind::kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Conversions from the fp32 accumulators round to nearest even, as the CPU
// kernels' casts do.
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

// p[0] = v0, p[1] = v1 in one store; p must be aligned to two elements.
template <typename T>
__device__ __forceinline__ void store_pair(T* p, float v0, float v1) {
  if constexpr (std::is_same_v<T, __half>) {
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(v0, v1);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);
  } else {
    *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
  }
}

__device__ __forceinline__ void store_float(void* p, FloatKind kind, int64_t i, float v) {
  switch (kind) {
    case FloatKind::kF16: static_cast<__half*>(p)[i] = from_float<__half>(v); break;
    case FloatKind::kBF16: static_cast<__nv_bfloat16*>(p)[i] = from_float<__nv_bfloat16>(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

}  // namespace apex4::cuda
