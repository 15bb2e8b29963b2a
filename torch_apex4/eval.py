"""Perplexity of a causal LM under several W4A4 recipes, on the real apex4 ops.

    python -m torch_apex4.eval [--model PATH_OR_GGUF] [--text FILE] [--tokens 16384]
        [--calibration FILE] [--recipes fp32 rtn-g128 apex4-g128 ...] [--json out.json]

Each recipe starts from a fresh copy of the float model; calibration text must
differ from the evaluation text (defaults: Pride and Prejudice / Emma).
Prints a table (perplexity, ratio to the float model, granularities,
linear-weight memory, time) and writes JSON, with each recipe's granularity
plan and measured per-layer sensitivity (plan.py). A mixed recipe reuses the
sensitivity measured by its `sensitivity_from` recipe when that one ran before
it in the same command.
"""
import argparse
import copy
import json
import time
from pathlib import Path

from .models import load_model
from .perplexity import perplexity, tokenize_text
from .quantize import W4A4Linear, linear_weight_bytes
from .recipes import BASELINES, RECIPES

DATA = Path(__file__).parent / "data"
ALL = ["fp32", *RECIPES, *BASELINES]


# Calibration text: a different book than the evaluation's default (Emma).
DEFAULT_CALIBRATION = DATA / "pride_and_prejudice.txt"


def calibration_batch(tokenizer, path, sequences, length):
    ids = tokenize_text(tokenizer, Path(path).read_text(encoding="utf-8"), sequences * length)
    usable = ids.shape[1] // length * length
    if usable == 0:
        raise ValueError(f"calibration text {path} has fewer than {length} tokens")
    return ids[:, :usable].reshape(-1, length)


def run(args):
    base, tokenizer = load_model(args.model)
    eval_ids = tokenize_text(tokenizer, Path(args.text).read_text(encoding="utf-8"), args.tokens)
    calib = calibration_batch(tokenizer, args.calibration, args.calib_sequences, args.calib_length)
    fp16_bytes = linear_weight_bytes(base) // base.dtype.itemsize * 2
    rows, sensitivity_of = [], {}
    for name in args.recipes:
        if name not in ALL:
            raise ValueError(f"unknown recipe {name!r}; known: {', '.join(ALL)}")
        model = base if name == "fp32" else copy.deepcopy(base)
        start = time.perf_counter()
        stats, plan = {}, None
        if name in RECIPES:
            recipe = RECIPES[name]
            plan, stats = recipe.apply(model, calib, progress=not args.quiet,
                                       sensitivity=sensitivity_of.get(recipe.sensitivity_from))
            if plan.sensitivity:
                sensitivity_of[name] = plan.sensitivity
        elif name in BASELINES:
            BASELINES[name](model, calib)
        prepare_s = time.perf_counter() - start
        ppl, tokens_per_s = perplexity(model, eval_ids, args.window, progress=not args.quiet,
                                       desc=name)
        rows.append({"recipe": name, "perplexity": ppl,
                     "description": RECIPES[name].description if name in RECIPES else
                     ("float model" if name == "fp32" else "baseline"),
                     "linear_weight_percent_of_fp16": 100 * linear_weight_bytes(model) / fp16_bytes,
                     "prepare_s": prepare_s, "eval_tokens_per_s": tokens_per_s,
                     "granularities": _granularities(plan),
                     "grouped_mac_percent": _grouped_mac_percent(model),
                     "plan": None if plan is None else plan.to_dict(), "layers": stats})
        print(f"{name}: perplexity {ppl:.2f} (prepared in {prepare_s:.0f} s)", flush=True)
        if model is not base:
            del model
        result = _result(args, eval_ids, calib, rows)
        if args.json:  # after every recipe: a long run keeps what it measured
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    return _result(args, eval_ids, calib, rows)


def _result(args, eval_ids, calib, rows):
    reference = next((r["perplexity"] for r in rows if r["recipe"] == "fp32"), None)
    for row in rows:
        row["ratio_to_fp32"] = row["perplexity"] / reference if reference else None
    return {"model": args.model or "SmolLM2-135M-Instruct (GGUF, default)", "text": str(args.text),
            "tokens": eval_ids.shape[1], "window": args.window,
            "calibration": f"{args.calibration}: {calib.shape[0]} x {calib.shape[1]} tokens",
            "rows": rows}


def _granularities(plan):
    if plan is None:  # the float model, or a baseline with its own layer types
        return "-"
    counts = plan.counts()
    if len(counts) == 1:
        return next(iter(counts))
    return " + ".join(f"{c} {label}" for label, c in sorted(counts.items()))


def _grouped_mac_percent(model):
    """Share of the W4A4 layers' multiply-adds that run per group (the slower kernels on
    Hopper, docs/design.md) rather than per channel; None without W4A4 layers."""
    macs = {True: 0, False: 0}
    for m in model.modules():
        if isinstance(m, W4A4Linear):
            macs[m.group_size is not None] += m.in_features * m.out_features
    total = macs[True] + macs[False]
    return 100 * macs[True] / total if total else None


def print_table(result):
    print(f"model: {result['model']}\ntext: {result['text']} ({result['tokens']} tokens, "
          f"windows of {result['window']})\ncalibration: {result['calibration']}\n")
    print(f"{'recipe':<16}{'ppl':>10}{'x fp32':>8}  {'granularity':<16}{'grp MAC':>8}{'lin. mem':>9}"
          f"{'prep s':>8}  description")
    for r in result["rows"]:
        ratio = f"{r['ratio_to_fp32']:.3f}" if r["ratio_to_fp32"] else "-"
        grouped = "-" if r["grouped_mac_percent"] is None else f"{r['grouped_mac_percent']:.0f}%"
        print(f"{r['recipe']:<16}{r['perplexity']:>10.2f}{ratio:>8}  {r['granularities']:<16}"
              f"{grouped:>8}{r['linear_weight_percent_of_fp16']:>8.1f}%{r['prepare_s']:>8.0f}"
              f"  {r['description']}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m torch_apex4.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF folder or .gguf file (default: SmolLM2-135M GGUF)")
    parser.add_argument("--text", default=str(DATA / "emma.txt"))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--calibration", default=str(DEFAULT_CALIBRATION))
    parser.add_argument("--calib-sequences", type=int, default=16)
    parser.add_argument("--calib-length", type=int, default=512)
    parser.add_argument("--recipes", nargs="+", default=ALL, metavar="NAME",
                        help=f"any of: {', '.join(ALL)}")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    result = run(args)
    print_table(result)
    if args.json:
        print(f"\nresults written to {args.json}")


if __name__ == "__main__":
    main()
