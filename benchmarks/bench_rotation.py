"""Online rotation speed on one GPU, side by side: quantize_act (no rotation)
against hadamard_quantize_act (rotation fused into the quantization) and
hadamard alone, fp16 activations, at LLM row sizes. Prints microseconds and
the effective bandwidth (bytes of x read plus packed values and scales
written, per second); --json writes the measurements.

Times are bench_gemm.py's (do_bench medians, L2 cleared before every call),
or of CUDA events when Triton is missing.

    python benchmarks/bench_rotation.py [--tokens M ...] [--k K ...] [--group-size G] [--json PATH]
"""
import argparse
import json

import torch

import torch_apex4  # noqa: F401  (registers the ops)
from bench_gemm import median_us
from torch_apex4.hadamard import rotation_factor

ops = torch.ops.apex4


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192])
    parser.add_argument("--k", type=int, nargs="+", default=[4096, 11008, 1536, 28672])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--json")
    args = parser.parse_args()
    group = args.group_size or None
    results = []
    print(f"{torch.cuda.get_device_name()}, fp16 x, group_size={group}")
    print(f"{'M':>6} {'K':>6} {'m':>4} | {'quantize_act':>14} {'hadamard_quant':>14} "
          f"{'hadamard':>10} | fused/plain  fused GB/s")
    for m_tokens in args.tokens:
        for k in args.k:
            x = torch.randn(m_tokens, k, dtype=torch.float16, device="cuda")
            factor = rotation_factor(k, "cuda")
            plain = median_us(lambda: ops.quantize_act(x, group))
            fused = median_us(lambda: ops.hadamard_quantize_act(x, factor, group))
            rotate = median_us(lambda: ops.hadamard(x, factor))
            packed, scales = ops.quantize_act(x, group)
            moved = x.numel() * x.element_size() + packed.numel() + scales.numel() * 4
            row = dict(tokens=m_tokens, k=k, factor=factor.shape[0], group_size=group,
                       quantize_act_us=plain, hadamard_quantize_act_us=fused, hadamard_us=rotate,
                       fused_gb_s=moved / fused / 1e3, device=torch.cuda.get_device_name())
            results.append(row)
            print(f"{m_tokens:>6} {k:>6} {factor.shape[0]:>4} | {plain:>12.1f}us {fused:>12.1f}us "
                  f"{rotate:>8.1f}us | {fused / plain:>10.2f}x {row['fused_gb_s']:>10.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
