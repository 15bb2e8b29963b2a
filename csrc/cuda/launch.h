// Host entry points of the CUDA kernels. Torch-free (plain pointers, sizes and
// a stream), so the binding (ops_cuda.cu) and the standalone nvcc test
// (tests/kernel_test.cu) drive exactly the same code.
//
// Every launcher enqueues its kernel on `stream` and returns the status of the
// host-side setup it did before the launch (cudaSuccess if none); the launch's
// own error is left for the caller to fetch with cudaGetLastError, which is
// what C10_CUDA_KERNEL_LAUNCH_CHECK does.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace apex4::cuda {

// Element type of a float tensor the kernels read or write.
enum class FloatKind : int { kF32, kF16, kBF16 };

// out[M, N] = sum_g float(P[m, n, g]) * (a_scale[m, g] * w_scale[n, g]) (+ bias[n]),
// P the exact int32 dot product of group g (docs/design.md). All row-major and
// contiguous: a [M, kp/2], w [N, kp/2], a_scale [M, groups], w_scale [N, groups].
struct GemmParams {
  const uint8_t* a;
  const float* a_scale;
  const uint8_t* w;
  const float* w_scale;
  const void* bias;  // [N] or nullptr
  FloatKind bias_kind;
  void* out;
  FloatKind out_kind;
  int m, n, kp, groups;  // kp and kp / groups are multiples of 64
  // Bytes the decode kernel asks L2 to fetch once its own loads are issued
  // (the next layer's weight; a hint that changes no result). Other kernels
  // ignore it.
  const uint8_t* prefetch = nullptr;
  int64_t prefetch_bytes = 0;
};

// The INT8 tensor-core paths hold every operand as 16 * value (see mma.cuh),
// so their int32 partial sums are 256x the true ones: exact while
// group_len * 128 * 128 fits in int32. Longer groups need the INT4 MMA path.
constexpr int64_t kMaxInt8MmaGroupLen = (int64_t{1} << 31) / (128 * 128) - 64;

// Largest M the decode kernel is built for (two 8-token MMA tiles); the
// binding picks it up to here. Larger M still runs, 16 tokens per block row.
constexpr int kDecodeMaxTokens = 16;

// x [rows, k] -> packed [rows, kp/2], scales [rows, kp/group_len]. With
// programmatic set, on compute capability 9.0+ the kernel is launched as a
// programmatic dependent of the kernel before it on the stream (its launch
// overlaps that kernel's end); a quantizer whose own dependent reads data
// before it waits (the decode pair) must be launched plainly: see
// quantize_kernel.
cudaError_t launch_quantize(const void* x, FloatKind x_kind, int64_t rows, int64_t k, int64_t kp,
                            int64_t group_len, float clip_ratio, uint8_t* packed, float* scales,
                            bool programmatic, cudaStream_t stream);
// Largest group count per row launch_quantize accepts (its shared memory).
constexpr int64_t kQuantizeMaxGroups = 12288;

cudaError_t launch_pack_int4(const int8_t* values, int64_t n_bytes, uint8_t* packed,
                             cudaStream_t stream);
cudaError_t launch_unpack_int4(const uint8_t* packed, int64_t n_bytes, int8_t* values,
                               cudaStream_t stream);

// Tiled GEMM on INT4 tensor cores (mma m16n8k64 s4): the sm_80/86/89 path.
cudaError_t launch_gemm_tiled_int4(const GemmParams& p, cudaStream_t stream);
// Tiled GEMM with INT4 unpacked to INT8 in registers (mma m16n8k32 s8): the
// sm90mma path, for compute capability 9.x+ without wgmma (Hopper emulates
// the s4 MMA). Needs group_len <= kMaxInt8MmaGroupLen.
cudaError_t launch_gemm_tiled_int8(const GemmParams& p, cudaStream_t stream);
// Tiled GEMM on Hopper's warpgroup tensor cores (wgmma s8, sm_90a only), INT4
// unpacked to INT8 in shared memory. Needs group_len <= kMaxInt8MmaGroupLen.
// Per group, group lengths that are not a multiple of 128 (64, 192, ...) run
// launch_gemm_tiled_int8 instead.
// Per channel, with at most half as many 128x128 output tiles as SMs and K of
// at least 8192 it splits K (plan_gemm_wgmma says how): the caller then
// provides a workspace of `tiles` zeroed counters (the kernel leaves them
// zero) and splits * M * N int32 partial sums.
struct SplitK {
  int splits = 1;            // K ranges per output tile (1: K is not split)
  int* counters = nullptr;   // [tiles], zero on entry (and left zero)
  int* partials = nullptr;   // [splits, M, N]
};
struct WgmmaPlan {
  int splits;     // SplitK::splits to launch with
  int64_t tiles;  // output tiles, one counter each
};
WgmmaPlan plan_gemm_wgmma(const GemmParams& p);
cudaError_t launch_gemm_wgmma(const GemmParams& p, const SplitK& split, cudaStream_t stream);
// Memory-bound GEMM for a few tokens: every weight byte is read once per 16
// tokens. Needs group_len <= kMaxInt8MmaGroupLen.
cudaError_t launch_gemm_decode(const GemmParams& p, cudaStream_t stream);

// w4a4_linear for a few tokens (1 .. kDecodeMaxTokens): launch_quantize of x
// [p.m, k] (float type x_kind) into p.a / p.a_scale, which are the caller's
// workspaces here ([p.m, kp/2] bytes, [p.m, groups] floats), then the decode
// GEMM, launched as the quantize kernel's programmatic dependent on compute
// capability 9.0+ so that its weights stream in while x is quantized (the
// quantize kernel itself launched plainly, so that every kernel before the
// pair, a writer of the weight among them, has finished first). The output
// has the bits of launch_quantize + launch_gemm_decode.
cudaError_t launch_linear_decode(const GemmParams& p, const void* x, FloatKind x_kind, int64_t k,
                                 float clip_ratio, cudaStream_t stream);

// Online rotation (hadamard.cuh): rows [rows, n] of x times kron(F, H_p /
// sqrt(p)), F the m x m float32 factor and p = n / m a power of two, with the
// CPU kernel's arithmetic in its order (the same bits). hadamard writes y
// [rows, n] in x's type; the fused op quantizes the rotated rows as
// launch_quantize does (packed [rows, kp/2], scales [rows, kp/group_len]).
// Rows too long for shared memory work in a global workspace of
// rotation_workspace_floats floats (0: none needed; groups = 0 for hadamard).
// The work area's float offsets must fit in int: 2 n + m (m + 3) <= INT_MAX.
cudaError_t rotation_workspace_floats(int64_t rows, int64_t n, int64_t m, int64_t groups,
                                      int64_t* floats);
cudaError_t launch_hadamard(const void* x, FloatKind x_kind, int64_t rows, int64_t n,
                            const float* factor, int64_t m, void* y, float* workspace,
                            cudaStream_t stream);
cudaError_t launch_hadamard_quantize(const void* x, FloatKind x_kind, int64_t rows, int64_t n,
                                     const float* factor, int64_t m, int64_t kp,
                                     int64_t group_len, float clip_ratio, uint8_t* packed,
                                     float* scales, float* workspace, cudaStream_t stream);

}  // namespace apex4::cuda
