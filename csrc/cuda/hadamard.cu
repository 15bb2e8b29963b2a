// Host launchers of hadamard.cuh's rotation kernels: where the work area goes
// (shared memory or a global workspace), mixing rounds, and the grid.
#include <algorithm>
#include <cmath>

#include "cuda/hadamard.cuh"

namespace apex4::cuda {
namespace {

int round_up_4(int64_t v) { return static_cast<int>((v + 3) / 4 * 4); }

struct RotationPlan {
  RotationArgs args{};
  bool shared = false;
  size_t smem_bytes = 0;
  int max_blocks = 0;             // global workspace: the grid (one slice per block)
  int64_t workspace_floats = 0;  // 0 with shared
};

// groups: scale groups per row (0 for hadamard).
cudaError_t plan_rotation(int64_t rows, int64_t n, int64_t m, int64_t groups, RotationPlan* plan) {
  int device = 0, sms = 0, smem_optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  if (err != cudaSuccess) return err;
  RotationArgs& a = plan->args;
  a.rows = static_cast<int>(rows);
  a.n = static_cast<int>(n);
  a.m = static_cast<int>(m);
  a.p = static_cast<int>(n / m);
  a.log_p = 0;
  while ((1 << a.log_p) < a.p) ++a.log_p;
  a.norm = 1.0f / std::sqrt(static_cast<float>(a.p));  // rotate_row's expression
  a.m_pad = m == 1 ? 0 : round_up_4(m);
  // Columns per mixing round: as many as keep a round within kMixRoundTasks.
  const int dst_groups = a.m_pad / kMixDst;
  const int slots = dst_groups > 0 ? kMixRoundTasks / dst_groups : 0;
  a.round_cols = m == 1 ? 0 : static_cast<int>(std::min<int64_t>(a.p, std::max(slots, 1) * kMixCols));
  const int row_floats = round_up_4(n);
  const int factor_floats = a.m * a.m_pad;
  const int64_t shared_bytes = 4 * (int64_t{row_floats} + factor_floats + groups);
  // In place needs a round of one column slot to fit (m <= 4 * kMixRoundTasks).
  plan->shared = shared_bytes <= smem_optin && (m == 1 || slots >= 1);
  if (plan->shared) {
    a.layout = {0, 0, row_floats, row_floats + factor_floats};
    plan->smem_bytes = static_cast<size_t>(shared_bytes);
  } else {
    const int mixed_floats = m == 1 ? 0 : row_floats;
    a.layout = {0, row_floats, row_floats + mixed_floats, row_floats + mixed_floats + factor_floats};
    plan->smem_bytes = static_cast<size_t>(4 * groups);
    plan->max_blocks = static_cast<int>(std::min<int64_t>(rows, 2 * sms));
    plan->workspace_floats = int64_t{plan->max_blocks} * a.layout.floats;
  }
  return cudaSuccess;
}

template <typename T, bool kQuantize, bool kMix>
cudaError_t launch_rotation(const RotationPlan& plan, cudaStream_t stream) {
  // The workspace kernel always can mix: rows that need it are rare.
  const auto kernel = plan.shared ? rotate_kernel<T, true, kQuantize, kMix>
                                  : rotate_kernel<T, false, kQuantize, true>;
  const int smem = static_cast<int>(plan.smem_bytes);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  int blocks = plan.max_blocks;
  if (plan.shared) {
    int device = 0, sms = 0, per_sm = 0;
    err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) {
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kRotateThreads, smem);
    }
    if (err != cudaSuccess) return err;
    // Blocks stride over rows, so F is scaled into shared memory once per block.
    blocks = static_cast<int>(std::min<int64_t>(plan.args.rows, int64_t{std::max(per_sm, 1)} * sms));
  }
  kernel<<<blocks, kRotateThreads, plan.smem_bytes, stream>>>(plan.args);
  return cudaSuccess;
}

template <bool kQuantize, bool kMix>
cudaError_t launch_rotation_for(const RotationPlan& plan, FloatKind kind, cudaStream_t stream) {
  switch (kind) {
    case FloatKind::kF16: return launch_rotation<__half, kQuantize, kMix>(plan, stream);
    case FloatKind::kBF16: return launch_rotation<__nv_bfloat16, kQuantize, kMix>(plan, stream);
    default: return launch_rotation<float, kQuantize, kMix>(plan, stream);
  }
}

template <bool kQuantize>
cudaError_t launch_rotation_for(const RotationPlan& plan, FloatKind kind, cudaStream_t stream) {
  return plan.args.m > 1 ? launch_rotation_for<kQuantize, true>(plan, kind, stream)
                         : launch_rotation_for<kQuantize, false>(plan, kind, stream);
}

bool aligned_16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t rotation_workspace_floats(int64_t rows, int64_t n, int64_t m, int64_t groups,
                                      int64_t* floats) {
  RotationPlan plan;
  const cudaError_t err = plan_rotation(rows, n, m, groups, &plan);
  *floats = plan.workspace_floats;
  return err;
}

cudaError_t launch_hadamard(const void* x, FloatKind x_kind, int64_t rows, int64_t n,
                            const float* factor, int64_t m, void* y, float* workspace,
                            cudaStream_t stream) {
  RotationPlan plan;
  cudaError_t err = plan_rotation(rows, n, m, 0, &plan);
  if (err != cudaSuccess) return err;
  RotationArgs& a = plan.args;
  a.x = x;
  a.factor = factor;
  a.y = y;
  a.workspace = workspace;
  a.vector_io = n % 8 == 0 && aligned_16(x) && aligned_16(y);
  return launch_rotation_for<false>(plan, x_kind, stream);
}

cudaError_t launch_hadamard_quantize(const void* x, FloatKind x_kind, int64_t rows, int64_t n,
                                     const float* factor, int64_t m, int64_t kp,
                                     int64_t group_len, float clip_ratio, uint8_t* packed,
                                     float* scales, float* workspace, cudaStream_t stream) {
  RotationPlan plan;
  cudaError_t err = plan_rotation(rows, n, m, kp / group_len, &plan);
  if (err != cudaSuccess) return err;
  RotationArgs& a = plan.args;
  a.x = x;
  a.factor = factor;
  a.workspace = workspace;
  a.vector_io = n % 8 == 0 && aligned_16(x);
  a.kp = static_cast<int>(kp);
  a.group_len = static_cast<int>(group_len);
  a.clip_ratio = clip_ratio;
  a.packed = packed;
  a.scales = scales;
  return launch_rotation_for<true>(plan, x_kind, stream);
}

}  // namespace apex4::cuda
