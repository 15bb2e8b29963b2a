// The sm_90a GEMM path: wgmma s8 with INT4 unpacked to INT8 in shared memory.
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <algorithm>

#include "cuda/gemm_wgmma.cuh"

namespace apex4::cuda {

cudaError_t packed_tensor_map(CUtensorMap* map, const uint8_t* data, int rows, int row_bytes,
                              int box_rows) {
  // The driver's encoder, looked up once through the runtime (no -lcuda).
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(row_bytes), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(row_bytes)};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<uint8_t*>(data), dims,
                            strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_64B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

namespace {

int multiprocessors() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return 0;
  }
  return sms;
}

// Per channel, the tile with fewer k-slice times per SM: a 128x256 slice
// took 1.5x a 128x128 one on an H100 at small M (benchmarks/NOTES.md, v5), so
// 128x256 tiles when ceil(wide / sms) * 3 < ceil(narrow / sms) * 2.
bool wide_tiles(const GemmParams& p, int sms) {
  const int64_t wide = wgmma_output_tiles<WgmmaWide>(p), narrow = wgmma_output_tiles<WgmmaNarrow>(p);
  return p.groups == 1 && sms > 0 && (wide + sms - 1) / sms * 3 < (narrow + sms - 1) / sms * 2;
}

}  // namespace

WgmmaPlan plan_gemm_wgmma(const GemmParams& p) {
  const int sms = multiprocessors();
  if (p.groups != 1) return {1, wgmma_output_tiles<WgmmaGrouped>(p)};
  if (wide_tiles(p, sms)) return {1, wgmma_output_tiles<WgmmaWide>(p)};
  // 128x128 tiles: split K so that the units still fit on the SMs in one
  // wave, each split keeping at least 32 k-tiles (4096 values): shorter
  // splits measured no faster, the partial sums' traffic and the last
  // split's additions eating the gain. Then even out the ranges so that none
  // is empty.
  const int64_t tiles = wgmma_output_tiles<WgmmaNarrow>(p);
  const int ktiles = (p.kp + WgmmaNarrow::kBK - 1) / WgmmaNarrow::kBK;
  int64_t splits = std::min<int64_t>(sms / std::max<int64_t>(tiles, 1), ktiles / 32);
  if (splits < 2) return {1, tiles};
  const int64_t per_split = (ktiles + splits - 1) / splits;
  return {static_cast<int>((ktiles + per_split - 1) / per_split), tiles};
}

cudaError_t launch_gemm_wgmma(const GemmParams& p, const SplitK& split, cudaStream_t stream) {
  const int sms = multiprocessors();
  if (sms == 0) return cudaErrorInvalidDevice;
  if (p.groups != 1) {
    // The wgmma kernel folds groups at stage ends (128 values).
    if (p.kp / p.groups % WgmmaGrouped::kBK != 0) return launch_gemm_tiled_int8(p, stream);
    return launch_gemm_wgmma_shape<WgmmaGrouped>(p, SplitK{}, sms, stream);
  }
  return wide_tiles(p, sms) ? launch_gemm_wgmma_shape<WgmmaWide>(p, SplitK{}, sms, stream)
                            : launch_gemm_wgmma_shape<WgmmaNarrow>(p, split, sms, stream);
}

}  // namespace apex4::cuda
