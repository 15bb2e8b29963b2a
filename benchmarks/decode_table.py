"""The decode table of docs/performance.md from a bench_gemm.py JSON of the
decode cells (--tokens 1 16 --cuda-graph): per shape and M the FP16, FP8 and
apex4 w4a4_gemm times, apex4's speed-up over FP16 and FP8, and the share of
the copy rate it reaches counting the bytes that must move (packed weight,
its scales, the packed activations and theirs, the fp16 output).

    python benchmarks/decode_table.py RESULTS.json --probe-json PROBE.json
        [--granularity per-channel]
"""
import argparse
import json


def must_move_bytes(m, n, k, group_size):
    groups = 1 if group_size is None else -(-k // group_size)
    kp = -(-k // 64) * 64 if group_size is None else groups * group_size
    return n * kp // 2 + 4 * n * groups + m * kp // 2 + 4 * m * groups + 2 * m * n


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
        if None in (fp16, fp8, gemm):
            continue
        copy_share = must_move_bytes(m, n, k, group_size) / (gemm * 1e-6) / (copy_tbs * 1e12)
        yield (f"{shape.split()[0]} {k}->{n}", m, fp16, fp8, gemm, fp16 / gemm, fp8 / gemm,
               100 * copy_share, None if linear is None else fp16 / linear)


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
    print(f"| shape | M | FP16 us | FP8 us | apex4 gemm {args.granularity} us | x FP16 | x FP8 "
          f"| % of copy rate ({copy_tbs:.2f} TB/s) | w4a4_linear x FP16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, m, fp16, fp8, gemm, x16, x8, share, lin in rows(records, args.granularity,
                                                                copy_tbs):
        lin_s = "-" if lin is None else f"{lin:.2f}"
        print(f"| {shape} | {m} | {fp16:.1f} | {fp8:.1f} | {gemm:.1f} | {x16:.2f} | {x8:.2f} "
              f"| {share:.0f} | {lin_s} |")


if __name__ == "__main__":
    main()
