"""quantize_act speed on one GPU against a plain copy of the same input:
microseconds and GB/s (bytes read + written) per token count, K, dtype and
granularity, timed like bench_gemm.py (do_bench medians with L2 cleared
before every call, operands rotated over copies for small problems).

    python benchmarks/bench_quantize.py [--tokens M ...] [--ks K ...]
        [--dtypes float16 ...] [--granularities none 128 ...] [--json PATH]
"""
import argparse
import json
import sys

import torch

import torch_apex4  # noqa: F401  (registers the ops)
from bench_gemm import copy_case, median_us, rotating

ops = torch.ops.apex4


def quantize_case(m, k, dtype, group_size):
    operands = rotating(lambda: (torch.randn(m, k, dtype=dtype, device="cuda"),))
    return lambda: ops.quantize_act(operands()[0], group_size)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 8192])
    parser.add_argument("--ks", nargs="+", type=int, default=[4096, 11008, 28672])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float32"])
    parser.add_argument("--granularities", nargs="+", default=["none", "128"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_quantize.py needs a CUDA GPU")
    torch.manual_seed(0)
    records = []
    print(f"{'M':>5} {'K':>6} {'dtype':>9} {'gran':>5} {'us':>8} {'GB/s':>7} "
          f"{'copy us':>8} {'copy GB/s':>9}")
    for m in args.tokens:
        for k in args.ks:
            for name in args.dtypes:
                dtype = getattr(torch, name)
                x_bytes = m * k * dtype.itemsize
                copy_us = median_us(copy_case((m, k), dtype))
                for g in args.granularities:
                    group_size = None if g == "none" else int(g)
                    groups = 1 if group_size is None else -(-k // group_size)
                    kp = -(-k // (group_size or 64)) * (group_size or 64)
                    moved = x_bytes + m * kp // 2 + m * groups * 4
                    us = median_us(quantize_case(m, k, dtype, group_size))
                    rec = dict(m=m, k=k, dtype=name, granularity=g, median_us=us,
                               gb_per_s=moved / us / 1e3, copy_us=copy_us,
                               copy_gb_per_s=2 * x_bytes / copy_us / 1e3)
                    records.append(rec)
                    print(f"{m:>5} {k:>6} {name:>9} {g:>5} {us:>8.1f} {rec['gb_per_s']:>7.0f} "
                          f"{copy_us:>8.1f} {rec['copy_gb_per_s']:>9.0f}", flush=True)
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), records=records), f, indent=1)


if __name__ == "__main__":
    main()
