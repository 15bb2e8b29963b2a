"""One w4a4_gemm call per shape, for a profiler to read the decode and wgmma
kernels (the benchmarks launch each many times). Per channel; M = 1 and 16
take the decode kernel, M = 8192 the wgmma kernel. Shapes as M,K,N
arguments, or the default list. On the GPU machine:

    ncu --clock-control none -k regex:"gemm_decode|gemm_wgmma" \
        --section SpeedOfLight --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis python3 benchmarks/profile_kernels.py [M,K,N ...]
"""
import sys

import torch

import torch_apex4  # noqa: F401  (registers the ops)

SHAPES = [(1, 8192, 28672), (16, 8192, 28672), (1, 4096, 4096), (8192, 4096, 4096),
          (8192, 8192, 28672)]  # (M, K, N)


def main():
    if not torch.cuda.is_available():
        sys.exit("profile_kernels.py needs a CUDA GPU")
    ops = torch.ops.apex4
    torch.manual_seed(0)
    shapes = [tuple(int(v) for v in arg.split(",")) for arg in sys.argv[1:]] or SHAPES
    for m, k, n in shapes:
        w_q, w_s = ops.quantize_weight(torch.randn(n, k, device="cuda"), None)
        a_q, a_s = ops.quantize_act(torch.randn(m, k, dtype=torch.float16, device="cuda"), None)
        ops.w4a4_gemm(a_q, a_s, w_q, w_s, None, torch.float16)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
