"""The cost model (torch_apex4/costmodel.py) against a bench_gemm.py JSON, and
the planner's choices against the measured grid. Needs no GPU.

    python benchmarks/cost_model_check.py RESULTS.json [--probe-json PROBE.json] [--fit]

1. predicted vs measured time of every cell the model covers (FP16, apex4
   gemm / linear / quant+gemm, forced kernel paths), with its calibration
   (--fit: refitted to this JSON, printed as a Calibration literal);
2. the planner: per shape and M, the granularity it predicts fastest, its
   measured time against the best measured granularity of the cell, and over
   the whole grid against the best single granularity; it must never be more
   than 5% slower (exit status 1 otherwise). With forced-path columns, the
   same for the kernel variant;
3. on paper, with the rho table's vendor rates: W4A4 against FP16 on other
   GPUs (the paper's direction: about 2x faster at rho = 16, 0.45x at 64).

The GPU is the rho table's entry for the JSON's device name, or the probe's
measurement (--probe-json: what `python -m torch_apex4 probe --json` wrote).
"""
import argparse
import json
import math
import statistics
import sys
from collections import defaultdict

from torch_apex4 import costmodel, rho
from torch_apex4.planner import Planner

TOLERANCE = 1.05
LAYER_METHODS = ("apex4 linear", "apex4 quant+gemm", "apex4 gemm")  # preferred first
PAPER_GPUS = ("RTX 3090", "A40", "RTX 4090", "L40S", "A100-SXM4-80GB", "H100")
PAPER_SHAPES = ((4096, 4096, 4096), (2048, 11008, 4096), (8192, 8192, 8192))


def granularity(label):
    return None if label in (None, "per-channel", "pc") else int(label.lstrip("g"))


def label(group_size):
    return "pc" if group_size is None else f"g{group_size}"


def load(path):
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "records" not in data:
        raise SystemExit(f"{path} is not a bench_gemm.py JSON (no 'records')")
    records = [r for r in data["records"] if r.get("median_us") is not None]
    return data.get("meta", {}), records


def gpu_spec(meta, probe_json):
    if probe_json:
        with open(probe_json) as f:
            d = json.load(f)
        return rho.ProbeResult(**d["probe"]).spec()
    spec = rho.known_gpu(meta.get("device", ""))
    if spec is None:
        raise SystemExit(f"device {meta.get('device')!r} is not in the rho table: pass --probe-json")
    return spec


def measurements(records):
    return [(r["method"], r["m"], r["n"], r["k"], granularity(r["granularity"]),
             r["median_us"] * 1e-6) for r in records]


def prediction_table(model, records):
    """(per-cell lines, error summary lines)."""
    lines = [f"{'shape':<14} {'M':>5} {'method':<22} {'gran':>5} {'measured':>10} "
             f"{'predicted':>10} {'pred/meas':>9}"]
    errors = defaultdict(list)
    for r in records:
        g = granularity(r["granularity"])
        p = model.predict_method(r["method"], r["m"], r["n"], r["k"], g)
        if p is None:
            continue
        ratio = p * 1e6 / r["median_us"]
        errors[r["method"]].append(abs(math.log(ratio)))
        lines.append(f"{r['shape']:<14} {r['m']:>5} {r['method']:<22} {label(g):>5} "
                     f"{r['median_us']:>10.1f} {p * 1e6:>10.1f} {ratio:>9.2f}")
    summary = ["error per method (|log(pred/meas)| as a factor): median, max, cells"]
    for method, e in errors.items():
        summary.append(f"  {method:<22} {math.exp(statistics.median(e)):.3f}x  "
                     f"{math.exp(max(e)):.3f}x  {len(e)}")
    everything = [x for e in errors.values() for x in e]
    summary.append(f"  {'all':<22} {math.exp(statistics.median(everything)):.3f}x  "
                   f"{math.exp(max(everything)):.3f}x  {len(everything)}")
    return lines, summary


def planner_check(model, records):
    """(text, passed): the planner's granularity (and variant) picks, measured."""
    planner = Planner(model)
    cells = defaultdict(dict)  # (shape, k, n, m) -> {method: {label: us}}
    for r in records:
        cells[(r["shape"], r["k"], r["n"], r["m"])].setdefault(r["method"], {})[
            label(granularity(r["granularity"]))] = r["median_us"]
    method = next((mm for mm in LAYER_METHODS
                   if any(mm in c and len(c[mm]) > 1 for c in cells.values())), None)
    if method is None:
        return "planner: the JSON has no cell with two apex4 granularities", True
    lines = [f"planner: granularity per cell by predicted {method!r} time, measured "
             f"(us); limit {TOLERANCE:.2f}x the cell's best",
             f"{'shape':<14} {'M':>5} {'pick':>5} {'measured':>10} {'best':>5} {'best us':>10} "
             f"{'ratio':>6}"]
    passed = True
    totals, planned_total = defaultdict(float), 0.0
    for (shape, k, n, m), c in cells.items():
        measured = c.get(method, {})
        if len(measured) < 2:
            continue
        pick = planner.fastest_granularity(m, n, k, tuple(measured))
        best = min(measured, key=measured.get)
        ratio = measured[pick] / measured[best]
        passed &= ratio <= TOLERANCE
        planned_total += measured[pick]
        for g, us in measured.items():
            totals[g] += us
        lines.append(f"{shape:<14} {m:>5} {pick:>5} {measured[pick]:>10.1f} {best:>5} "
                     f"{measured[best]:>10.1f} {ratio:>6.3f}{'' if ratio <= TOLERANCE else '  FAIL'}")
    complete = {g: t for g, t in totals.items()
                if all(g in c.get(method, {}) for c in cells.values() if len(c.get(method, {})) > 1)}
    if complete:
        fixed = min(complete, key=complete.get)
        ratio = planned_total / complete[fixed]
        passed &= ratio <= TOLERANCE
        lines.append(f"grid total: planned {planned_total:.1f} us; best fixed granularity "
                     f"{fixed} {complete[fixed]:.1f} us; ratio {ratio:.3f} "
                     f"({'ok' if ratio <= TOLERANCE else 'FAIL'}); "
                     + ", ".join(f"{g} {t:.1f}" for g, t in sorted(complete.items())))
    # Kernel variants, where the JSON forced paths side by side.
    variant_lines = []
    for (shape, k, n, m), c in cells.items():
        for g_label in {g for mm, v in c.items() if mm.startswith("apex4 gemm:") for g in v}:
            g = granularity(g_label)
            by_variant = {}
            for mm, v in c.items():
                if mm.startswith("apex4 gemm:") and g_label in v:
                    variant = model.path_variant(mm.split(":", 1)[1], g)
                    if variant is not None:
                        by_variant[variant] = min(v[g_label], by_variant.get(variant, math.inf))
            if "apex4 gemm" in c and g_label in c["apex4 gemm"]:
                auto = model.auto_variant(m, g)
                by_variant[auto] = min(c["apex4 gemm"][g_label], by_variant.get(auto, math.inf))
            if len(by_variant) < 2:
                continue
            pick = model.best(m, n, k, g, layer=False, variants=tuple(by_variant)).variant
            best = min(by_variant, key=by_variant.get)
            ratio = by_variant[pick] / by_variant[best]
            passed &= ratio <= TOLERANCE
            variant_lines.append(f"{shape:<14} {m:>5} {g_label:>5} {pick:>9} {best:>9} "
                                 f"{ratio:>6.3f}{'' if ratio <= TOLERANCE else '  FAIL'}")
    if variant_lines:
        lines += ["planner: GEMM variant per cell (forced paths), measured pick / best",
                  f"{'shape':<14} {'M':>5} {'gran':>5} {'pick':>9} {'best':>9} {'ratio':>6}"]
        lines += variant_lines
    lines.append(f"planner check: {'PASSED' if passed else 'FAILED'}")
    return "\n".join(lines), passed


def paper_table(calibration):
    lines = ["on paper: predicted speed-up over FP16 (GEMM alone, quantized inputs), "
             "vendor rates, this calibration",
             f"{'GPU':<18} {'rho':>5} " + "".join(f"{f'{m}x{n}x{k} pc':>19} {'g128':>6}"
                                                  for m, n, k in PAPER_SHAPES)]
    for name in PAPER_GPUS:
        spec = rho.known_gpu(name)
        model = costmodel.CostModel(spec, calibration)
        row = f"{spec.name:<18} {spec.rho:>5.1f} "
        for m, n, k in PAPER_SHAPES:
            fp16 = model.fp16(m, n, k)
            row += f"{fp16 / model.best(m, n, k, None, layer=False).total:>18.2f}x"
            row += f"{fp16 / model.best(m, n, k, 128, layer=False).total:>6.2f}x"
        lines.append(row)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a bench_gemm.py JSON")
    parser.add_argument("--probe-json", help="GPU rates from `python -m torch_apex4 probe --json`")
    parser.add_argument("--fit", action="store_true", help="refit the calibration to this JSON")
    args = parser.parse_args(argv)
    meta, records = load(args.results)
    spec = gpu_spec(meta, args.probe_json)
    model = costmodel.CostModel(spec)
    print(f"{args.results}: {meta.get('device', '?')}, {len(records)} measurements; "
          f"rates of {spec.name} ({spec.source}), rho {spec.rho:.1f}")
    lines, summary = prediction_table(model, records)
    print("\n".join(lines + summary))
    if args.fit:
        fitted = costmodel.fit(model, measurements(records))
        print(f"\nfitted: {fitted!r}")
        model = model.with_calibration(fitted)
        print("after the fit, " + "\n".join(prediction_table(model, records)[1]))
    text, passed = planner_check(model, records)
    print("\n" + text)
    print("\n" + paper_table(model.cal))
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
