// Kernel timings of the Hopper GEMM variants (wgmma, and the decode kernel
// for a few tokens), without torch: each variant is launched through the
// torch-free launchers on random packed operands, after a 256 MB memset that
// leaves L2 cold and dirty (as triton's do_bench does); CUDA events around
// the launch alone, median of kReps. Every variant's output is checked
// against a reference variant first (per channel: the same bits; per group:
// the mma.sync kernel, within fp32 rounding). To compare a kernel change,
// build this twice, the second time with `-I` to a folder holding the
// changed header (e.g. cuda/gemm_decode.cuh) ahead of -Icsrc.
//
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -Icsrc/include -Icsrc \
//     -gencode=arch=compute_90a,code=sm_90a csrc/cuda/tests/gemm_timing.cu \
//     csrc/cuda/gemm_wgmma.cu csrc/cuda/gemm_tiled_int8.cu csrc/cuda/gemm_decode.cu \
//     csrc/cuda/quantize.cu -o build/gemm_timing
//   build/gemm_timing [splitk|grouped|wide|decode|rows|stages|chain]...   (default: all)
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "cuda/gemm_decode.cuh"
#include "cuda/gemm_wgmma.cuh"
#include "cuda/launch.h"
#include "cuda/quantize.cuh"

using namespace apex4::cuda;

namespace {

#define CUDA_OK(expr)                                                                        \
  do {                                                                                       \
    const cudaError_t err_ = (expr);                                                         \
    if (err_ != cudaSuccess) {                                                               \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(err_), __FILE__, __LINE__); \
      std::exit(2);                                                                          \
    }                                                                                        \
  } while (0)

constexpr int kReps = 15;

__global__ void fill_bytes(uint8_t* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    p[i] = static_cast<uint8_t>(h);
  }
}
__global__ void fill_scales(float* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2246822519u ^ seed;
    h ^= h >> 16;
    p[i] = 0.01f + 0.09f * static_cast<float>(h & 0xFFFF) / 65535.0f;
  }
}

struct Problem {
  int m, n, k, groups;
  uint8_t *a, *w;
  float *sa, *sw;
  float* out;
  // What a kernel must move at least: packed operands, scales, fp32 output.
  double bytes() const {
    return double(n + m) * (k / 2 + 4.0 * groups) + 4.0 * m * n;
  }
  GemmParams params() const {
    return GemmParams{a, sa, w, sw, nullptr, FloatKind::kF32, out, FloatKind::kF32,
                      m, n, k, groups};
  }
};

Problem make_problem(int m, int n, int k, int groups) {
  Problem pr{m, n, k, groups};
  CUDA_OK(cudaMalloc(&pr.a, int64_t{m} * k / 2));
  CUDA_OK(cudaMalloc(&pr.w, int64_t{n} * k / 2));
  CUDA_OK(cudaMalloc(&pr.sa, int64_t{m} * groups * 4));
  CUDA_OK(cudaMalloc(&pr.sw, int64_t{n} * groups * 4));
  CUDA_OK(cudaMalloc(&pr.out, int64_t{m} * n * 4));
  fill_bytes<<<512, 256>>>(pr.a, int64_t{m} * k / 2, 17 + m);
  fill_bytes<<<512, 256>>>(pr.w, int64_t{n} * k / 2, 91 + n);
  fill_scales<<<256, 256>>>(pr.sa, int64_t{m} * groups, 5);
  fill_scales<<<256, 256>>>(pr.sw, int64_t{n} * groups, 7);
  CUDA_OK(cudaGetLastError());
  return pr;
}
void free_problem(Problem& pr) {
  cudaFree(pr.a), cudaFree(pr.w), cudaFree(pr.sa), cudaFree(pr.sw), cudaFree(pr.out);
}

uint8_t* g_flush = nullptr;
constexpr size_t kFlushBytes = size_t{256} << 20;

double median_us(const std::function<void()>& launch) {
  cudaEvent_t e0, e1;
  CUDA_OK(cudaEventCreate(&e0));
  CUDA_OK(cudaEventCreate(&e1));
  launch();  // warm-up
  CUDA_OK(cudaGetLastError());
  std::vector<double> t;
  for (int r = 0; r < kReps; ++r) {
    CUDA_OK(cudaMemsetAsync(g_flush, r, kFlushBytes));
    CUDA_OK(cudaEventRecord(e0));
    launch();
    CUDA_OK(cudaEventRecord(e1));
    CUDA_OK(cudaEventSynchronize(e1));
    float ms = 0;
    CUDA_OK(cudaEventElapsedTime(&ms, e0, e1));
    t.push_back(ms * 1e3);
  }
  CUDA_OK(cudaGetLastError());
  cudaEventDestroy(e0), cudaEventDestroy(e1);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

std::vector<float> output(const Problem& pr) {
  std::vector<float> v(int64_t{pr.m} * pr.n);
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaMemcpy(v.data(), pr.out, v.size() * 4, cudaMemcpyDeviceToHost));
  return v;
}

int g_failures = 0;

// Runs and checks each variant against the first; prints one line per variant.
void run_variants(Problem& pr, const std::vector<std::pair<std::string, std::function<void()>>>& vs,
                  bool exact) {
  std::vector<float> ref;
  const double ops = 2.0 * pr.m * pr.n * pr.k;
  for (size_t i = 0; i < vs.size(); ++i) {
    CUDA_OK(cudaMemset(pr.out, 0xFF, int64_t{pr.m} * pr.n * 4));
    vs[i].second();
    CUDA_OK(cudaGetLastError());
    const std::vector<float> got = output(pr);
    bool ok = true;
    if (i == 0) {
      ref = got;
      for (float x : got) ok = ok && std::isfinite(x);
    } else {
      double err = 0, norm = 0;
      for (size_t j = 0; j < got.size(); ++j) {
        if (exact && std::memcmp(&got[j], &ref[j], 4) != 0) ok = false;
        err += (double(got[j]) - ref[j]) * (double(got[j]) - ref[j]);
        norm += double(ref[j]) * ref[j];
      }
      if (!exact) ok = std::sqrt(err / std::max(norm, 1e-30)) < 1e-5;
    }
    if (!ok) ++g_failures;
    const double us = median_us(vs[i].second);
    std::printf("M=%5d N=%5d K=%5d G=%4d  %-22s %9.1f us %7.0f TOP/s %6.0f GB/s %s\n", pr.m,
                pr.n, pr.k, pr.groups, vs[i].first.c_str(), us, ops / us / 1e6,
                pr.bytes() / us / 1e3, ok ? "" : "MISMATCH");
    std::fflush(stdout);
  }
}

const int kShapes[][2] = {{4096, 4096}, {4096, 11008}, {11008, 4096},
                          {8192, 8192}, {8192, 28672}, {28672, 8192}};

void splitk(int sms) {
  std::printf("== split K (per channel, 128x128 tiles), plan vs forced splits\n");
  int *counters, *partials;
  CUDA_OK(cudaMalloc(&counters, 4096 * 4));
  CUDA_OK(cudaMemset(counters, 0, 4096 * 4));
  CUDA_OK(cudaMalloc(&partials, size_t{64} << 20));
  for (const auto& s : kShapes) {
    for (int m : {16, 64, 128, 256, 512}) {
      Problem pr = make_problem(m, s[1], s[0], 1);
      const GemmParams p = pr.params();
      const WgmmaPlan plan = plan_gemm_wgmma(p);
      const int ktiles = p.kp / 128;
      std::vector<std::pair<std::string, std::function<void()>>> vs;
      vs.push_back({"narrow s=1", [=] {
                      CUDA_OK(launch_gemm_wgmma_shape<WgmmaNarrow>(p, SplitK{}, sms, nullptr));
                    }});
      for (int splits : {2, 3, 4, 6, 8}) {
        if (splits > ktiles || wgmma_output_tiles<WgmmaNarrow>(p) * splits > 4 * sms ||
            int64_t{splits} * m * s[1] * 4 > (int64_t{64} << 20)) {
          continue;
        }
        vs.push_back({"narrow s=" + std::to_string(splits), [=] {
                        CUDA_OK(launch_gemm_wgmma_shape<WgmmaNarrow>(
                            p, SplitK{splits, counters, partials}, sms, nullptr));
                      }});
      }
      if (plan.splits > 1) {
        vs.push_back({"plan s=" + std::to_string(plan.splits) + "+memset", [=] {
                        CUDA_OK(cudaMemsetAsync(counters, 0, plan.tiles * 4));
                        CUDA_OK(launch_gemm_wgmma(p, SplitK{plan.splits, counters, partials},
                                                  nullptr));
                      }});
      }
      if (wgmma_output_tiles<WgmmaWide>(p) >= 1) {
        vs.push_back({"wide", [=] {
                        CUDA_OK(launch_gemm_wgmma_shape<WgmmaWide>(p, SplitK{}, sms, nullptr));
                      }});
      }
      run_variants(pr, vs, true);
      free_problem(pr);
    }
  }
  cudaFree(counters), cudaFree(partials);
}

void grouped(int) {
  std::printf("== per group: wgmma vs mma.sync (sm90mma)\n");
  for (const auto& s : kShapes) {
    for (int m : {128, 2048, 8192}) {
      for (int len : {128, 256}) {
        if (len == 256 && m != 8192) continue;
        Problem pr = make_problem(m, s[1], s[0], s[0] / len);
        const GemmParams p = pr.params();
        run_variants(pr,
                     {{"tiled_int8 g" + std::to_string(len),
                       [=] { CUDA_OK(launch_gemm_tiled_int8(p, nullptr)); }},
                      {"wgmma g" + std::to_string(len),
                       [=] { CUDA_OK(launch_gemm_wgmma(p, SplitK{}, nullptr)); }}},
                     false);
        free_problem(pr);
      }
    }
  }
}

void wide(int sms) {
  std::printf("== per channel, large M\n");
  for (const auto& s : kShapes) {
    for (int m : {2048, 8192}) {
      Problem pr = make_problem(m, s[1], s[0], 1);
      const GemmParams p = pr.params();
      run_variants(pr,
                   {{"wide", [=] {
                       CUDA_OK(launch_gemm_wgmma_shape<WgmmaWide>(p, SplitK{}, sms, nullptr));
                     }},
                    {"tiled_int8", [=] { CUDA_OK(launch_gemm_tiled_int8(p, nullptr)); }}},
                   true);
      free_problem(pr);
    }
  }
}

// Each of kShapes at M = 1 and 16, per channel and g128: fn(problem, label).
void for_each_decode_problem(const std::function<void(Problem&, const std::string&)>& fn) {
  for (const auto& s : kShapes) {
    for (int m : {1, 16}) {
      for (int len : {0, 128}) {
        Problem pr = make_problem(m, s[1], s[0], len == 0 ? 1 : s[0] / len);
        fn(pr, len == 0 ? " pc" : " g128");
        free_problem(pr);
      }
    }
  }
}

// The decode kernel for a few tokens against mma.sync (the reference);
// GB/s is the bandwidth the shape needs at the measured time.
void decode_vs_mma(int) {
  std::printf("== decode kernel, M <= 16\n");
  for_each_decode_problem([](Problem& pr, const std::string& label) {
    const GemmParams p = pr.params();
    run_variants(pr,
                 {{"tiled_int8" + label, [=] { CUDA_OK(launch_gemm_tiled_int8(p, nullptr)); }},
                  {"decode" + label, [=] { CUDA_OK(launch_gemm_decode(p, nullptr)); }}},
                 pr.groups == 1);
  });
}

// The decode kernel at M = 16 with its tile forced to one row group (16
// rows) and to two (32), on a grid of 2 blocks per SM, at N from less than a
// 32-row tile per block to several (the 7B and 70B layers, fused q/k/v and
// gate/up among them): the data behind launch_gemm_decode_for's choice.
void rows(int sms) {
  std::printf("== decode kernel, M = 16: 16-row against 32-row tiles\n");
  const int shapes[][2] = {{4096, 4096},  {4096, 11008}, {4096, 12288}, {4096, 22016},
                           {8192, 8192},  {8192, 10240}, {8192, 28672}, {8192, 57344}};
  for (const auto& s : shapes) {
    for (int len : {0, 128}) {
      Problem pr = make_problem(16, s[1], s[0], len == 0 ? 1 : s[0] / len);
      const GemmParams p = pr.params();
      const std::string label = len == 0 ? " pc" : " g128";
      const auto forced = [=](auto row_groups) {
        constexpr int kRowGroups = decltype(row_groups)::value;
        const auto launch = len == 0 ? launch_gemm_decode_shape<2, kRowGroups, 1024, false>
                                     : launch_gemm_decode_shape<2, kRowGroups, 1024, true>;
        return [=] {
          CUDA_OK(launch(p, decode::kBlocksPerSm * sms, false, nullptr, decode::kBlocksPerSm));
        };
      };
      run_variants(pr,
                   {{"rows16" + label, forced(std::integral_constant<int, 1>{})},
                    {"rows32" + label, forced(std::integral_constant<int, 2>{})}},
                   len == 0);
      free_problem(pr);
    }
  }
}

// The decode kernel with its ring's stages forced to 1, 2, 3 and 4 KB of K
// of each row (16-row tiles), planned for 2 blocks per SM (the launchers'
// grid) and for 1 with twice the shared memory, at M = 1 and 16: the data
// behind launch_gemm_decode_for's stage size. The ring holds what fits; with
// large stages and 16 tokens that is one or two.
void stages(int sms) {
  std::printf("== decode kernel: ring stages of 1, 2, 3, 4 KB; 2 or 1 blocks per SM\n");
  for_each_decode_problem([sms](Problem& pr, const std::string& label) {
    const GemmParams p = pr.params();
    const bool grouped = pr.groups > 1;
    const auto forced = [=](auto stage_bytes, int per_sm) {
      constexpr int kStageBytes = decltype(stage_bytes)::value;
      const auto launch = [=] {
        CUDA_OK(p.m <= 8 ? (grouped ? launch_gemm_decode_shape<1, 1, kStageBytes, true>
                                    : launch_gemm_decode_shape<1, 1, kStageBytes, false>)(
                               p, per_sm * sms, false, nullptr, per_sm)
                         : (grouped ? launch_gemm_decode_shape<2, 1, kStageBytes, true>
                                    : launch_gemm_decode_shape<2, 1, kStageBytes, false>)(
                               p, per_sm * sms, false, nullptr, per_sm));
      };
      return std::make_pair("stage" + std::to_string(kStageBytes / 1024) + "k/" +
                                std::to_string(per_sm) + label,
                            std::function<void()>(launch));
    };
    using K1 = std::integral_constant<int, 1024>;
    using K2 = std::integral_constant<int, 2048>;
    using K3 = std::integral_constant<int, 3072>;
    using K4 = std::integral_constant<int, 4096>;
    run_variants(pr,
                 {forced(K1{}, 2), forced(K2{}, 2), forced(K3{}, 2), forced(K4{}, 2),
                  forced(K1{}, 1), forced(K2{}, 1), forced(K4{}, 1)},
                 !grouped);
  });
}

// The next layer's x from this layer's output, one block per row: stands for
// the norm or activation kernel that writes a decode linear's input.
__global__ void write_x(const float* prev, int prev_n, __half* x, int k) {
  const float* row = prev + static_cast<int64_t>(blockIdx.x) * prev_n;
  for (int c = threadIdx.x; c < k; c += blockDim.x) {
    x[static_cast<int64_t>(blockIdx.x) * k + c] =
        __float2half(fmaf(row[c % prev_n], 1e-3f, 0.25f * (c % 7 - 3)));
  }
}

// The decode w4a4_linear pairs of eight 7B-shaped layers (q/k/v and gate/up
// fused) in one CUDA graph, each pair after a kernel that writes its x from
// the previous output, as in a decode step; replayed back to back. The pairs
// as launch_linear_decode runs them (the GEMM a programmatic dependent of the
// quantize kernel) and one kernel after the other: what the overlap of the
// weight stream with the quantizer gives. Both must give the same bits.
void chain(int) {
  std::printf("== decode chain: writer -> quantize -> GEMM, 8 x 7B layers in a graph\n");
  const int layer[][2] = {{4096, 12288}, {4096, 4096}, {4096, 22016}, {11008, 4096}};
  for (int m : {1, 16}) {
    std::vector<Problem> prs;
    std::vector<__half*> xs;
    for (int l = 0; l < 8; ++l) {
      for (const auto& s : layer) {
        prs.push_back(make_problem(m, s[1], s[0], 1));
        __half* x = nullptr;
        CUDA_OK(cudaMalloc(&x, int64_t{m} * s[0] * 2));
        xs.push_back(x);
      }
    }
    cudaStream_t stream;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    const auto record = [&](bool paired) {
      for (size_t i = 0; i < prs.size(); ++i) {
        const Problem& prev = prs[(i + prs.size() - 1) % prs.size()];
        const Problem& pr = prs[i];
        write_x<<<m, 256, 0, stream>>>(prev.out, prev.n, xs[i], pr.k);
        if (paired) {
          CUDA_OK(launch_linear_decode(pr.params(), xs[i], FloatKind::kF16, pr.k, 1.0f, stream));
        } else {
          CUDA_OK(launch_quantize(xs[i], FloatKind::kF16, m, pr.k, pr.k, pr.k, 1.0f, pr.a, pr.sa,
                                  false, stream));
          CUDA_OK(launch_gemm_decode(pr.params(), stream));
        }
      }
    };
    std::vector<float> ref;
    const std::pair<const char*, bool> variants[] = {{"one after the other", false},
                                                     {"paired (launch_linear_decode)", true}};
    for (const auto& [name, paired] : variants) {
      for (const Problem& pr : prs) {
        CUDA_OK(cudaMemsetAsync(pr.out, 0, int64_t{m} * pr.n * 4, stream));
      }
      cudaGraph_t graph;
      cudaGraphExec_t exec;
      CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
      record(paired);
      CUDA_OK(cudaStreamEndCapture(stream, &graph));
      CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
      CUDA_OK(cudaGraphLaunch(exec, stream));  // one step from zero outputs: the bits to compare
      CUDA_OK(cudaStreamSynchronize(stream));
      std::vector<float> got(int64_t{m} * prs.back().n);
      CUDA_OK(cudaMemcpy(got.data(), prs.back().out, got.size() * 4, cudaMemcpyDeviceToHost));
      bool ok = true;
      if (ref.empty()) {
        ref = got;
        for (float v : got) ok = ok && std::isfinite(v);
      } else {
        ok = std::memcmp(got.data(), ref.data(), got.size() * 4) == 0;
      }
      if (!ok) ++g_failures;
      cudaEvent_t e0, e1;
      CUDA_OK(cudaEventCreate(&e0));
      CUDA_OK(cudaEventCreate(&e1));
      std::vector<double> t;
      for (int r = 0; r < kReps; ++r) {
        CUDA_OK(cudaEventRecord(e0, stream));
        CUDA_OK(cudaGraphLaunch(exec, stream));
        CUDA_OK(cudaEventRecord(e1, stream));
        CUDA_OK(cudaEventSynchronize(e1));
        float ms = 0;
        CUDA_OK(cudaEventElapsedTime(&ms, e0, e1));
        t.push_back(ms * 1e3);
      }
      std::sort(t.begin(), t.end());
      std::printf("M=%2d  %-30s %8.1f us a graph, %6.2f us a layer's 4 linears %s\n", m, name,
                  t[t.size() / 2], t[t.size() / 2] / 8, ok ? "" : "MISMATCH");
      std::fflush(stdout);
      cudaEventDestroy(e0), cudaEventDestroy(e1);
      cudaGraphExecDestroy(exec), cudaGraphDestroy(graph);
    }
    cudaStreamDestroy(stream);
    for (Problem& pr : prs) free_problem(pr);
    for (__half* x : xs) cudaFree(x);
  }
}

}  // namespace

int main(int argc, char** argv) {
  int device = 0, sms = 0;
  CUDA_OK(cudaGetDevice(&device));
  CUDA_OK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  cudaDeviceProp prop;
  CUDA_OK(cudaGetDeviceProperties(&prop, device));
  std::printf("%s, %d SMs\n", prop.name, sms);
  CUDA_OK(cudaMalloc(&g_flush, kFlushBytes));
  std::vector<std::string> parts(argv + 1, argv + argc);
  if (parts.empty()) parts = {"splitk", "grouped", "wide", "decode", "rows", "stages", "chain"};
  for (const std::string& part : parts) {
    if (part == "splitk") splitk(sms);
    if (part == "grouped") grouped(sms);
    if (part == "wide") wide(sms);
    if (part == "decode") decode_vs_mma(sms);
    if (part == "rows") rows(sms);
    if (part == "stages") stages(sms);
    if (part == "chain") chain(sms);
  }
  std::printf("%d mismatches\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
