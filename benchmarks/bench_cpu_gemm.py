"""CPU w4a4_gemm throughput (and quantize_act), against float32 torch.mm on the
same machine. Usage: python benchmarks/bench_cpu_gemm.py [--shapes MxKxN ...]"""
import argparse
import time

import torch

import torch_apex4  # noqa: F401

ops = torch.ops.apex4


def best_of(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=["2048x4096x4096", "1x4096x4096",
                                                         "512x576x1536"])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(f"threads: {torch.get_num_threads()}")
    print(f"{'M x K x N':>18} {'granularity':>12} {'quantize_act s':>15} {'w4a4_gemm s':>12} "
          f"{'GOP/s':>8} {'fp32 mm s':>10}")
    for shape in args.shapes:
        m, k, n = (int(v) for v in shape.split("x"))
        x, w = torch.randn(m, k), torch.randn(n, k)
        mm = best_of(lambda: x @ w.T, args.reps)
        for group_size in (128, None):
            a_q, a_s = ops.quantize_act(x, group_size)
            w_q, w_s = ops.quantize_weight(w, group_size)
            quant = best_of(lambda: ops.quantize_act(x, group_size), args.reps)
            gemm = best_of(lambda: ops.w4a4_gemm(a_q, a_s, w_q, w_s), args.reps)
            label = "per-channel" if group_size is None else f"g{group_size}"
            print(f"{shape:>18} {label:>12} {quant:15.4f} {gemm:12.4f} "
                  f"{2 * m * n * k / gemm / 1e9:8.1f} {mm:10.4f}")


if __name__ == "__main__":
    main()
