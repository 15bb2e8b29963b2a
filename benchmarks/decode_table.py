"""The decode table of docs/performance.md from a bench_gemm.py JSON of the
decode cells (--tokens 1 16 --cuda-graph): per shape and M the FP16, FP8 and
apex4 w4a4_gemm times, apex4's speed-up over FP16 and FP8, and the rate at
which it moves the bytes it must (bench_gemm.must_move_bytes) as a share of
the probe's copy rate and, where the JSON has the "copy" column, of a copy
of the same bytes timed in the same run.

    python benchmarks/decode_table.py RESULTS.json --probe-json PROBE.json
        [--granularity per-channel]
"""
import argparse
import json

from bench_gemm import must_move_bytes


def rows(records, granularity, copy_tbs):
    cells = {}
    for r in records:
        cells.setdefault((r["shape"], r["k"], r["n"], r["m"]), {})[
            (r["method"], r["granularity"])] = r["median_us"]
    group_size = None if granularity == "per-channel" else int(granularity[1:])
    for (shape, k, n, m), c in cells.items():
        fp16, fp8 = c.get(("fp16", None)), c.get(("fp8", None))
        gemm = c.get(("apex4 gemm", granularity))
        linear = c.get(("apex4 linear", granularity))
        copy = c.get(("copy", None))
        if None in (fp16, fp8, gemm):
            continue
        rate = must_move_bytes(m, n, k, group_size) / (gemm * 1e-6)
        copy_rate = None if copy is None else 2 * (must_move_bytes(m, n, k, None) // 2) / (copy * 1e-6)
        yield dict(shape=f"{shape.split()[0]} {k}->{n}", m=m, fp16=fp16, fp8=fp8, gemm=gemm,
                   x_fp16=fp16 / gemm, x_fp8=fp8 / gemm, of_probe=100 * rate / (copy_tbs * 1e12),
                   copy=copy, of_copy=None if copy is None else 100 * rate / copy_rate,
                   linear_x_fp16=None if linear is None else fp16 / linear)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--probe-json", required=True, help="the probe's JSON (its copy rate)")
    parser.add_argument("--granularity", default="per-channel")
    args = parser.parse_args()
    with open(args.results) as f:
        records = json.load(f)["records"]
    with open(args.probe_json) as f:
        copy_tbs = json.load(f)["probe"]["bandwidth_tbs"]
    table = list(rows(records, args.granularity, copy_tbs))
    with_copy = any(r["copy"] is not None for r in table)
    head = (f"| shape | M | FP16 us | FP8 us | apex4 gemm {args.granularity} us | x FP16 | x FP8 "
            f"| % of copy rate ({copy_tbs:.2f} TB/s) |")
    if with_copy:
        head += " same-bytes copy us | % of its rate |"
    print(head + " w4a4_linear x FP16 |")
    print("|---" * (9 + 2 * with_copy) + "|")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in table:
        line = (f"| {r['shape']} | {r['m']} | {r['fp16']:.1f} | {r['fp8']:.1f} | {r['gemm']:.1f} "
                f"| {r['x_fp16']:.2f} | {r['x_fp8']:.2f} | {r['of_probe']:.0f} |")
        if with_copy:
            line += f" {fmt(r['copy'], '.1f')} | {fmt(r['of_copy'], '.0f')} |"
        print(line + f" {fmt(r['linear_x_fp16'], '.2f')} |")


if __name__ == "__main__":
    main()
