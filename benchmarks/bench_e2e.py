"""End to end on a LLaMA-2-7B-shaped LlamaForCausalLM (random fp16 weights, built
on the GPU): FP16 compiled by Inductor against the same model quantized to W4A4
(torch_apex4.quantize_ on the GPU) and compiled with backend="apex4". Measured
side by side in one run:

* prefill: one sequence of --prefill tokens into a static KV cache (tokens/s);
* decode: greedy decoding at each --batch after a --context-token prompt,
  one token per sequence per step, argmax inside the compiled step (tokens/s);
  each compiled step runs as one CUDA graph (--cuda-graphs manual: captured
  with torch.cuda.graph around the compiled function, the same for both
  models; "inductor": mode="reduce-overhead", which the apex4 backend passes
  on to compile_fx like backend="inductor" does);
* weight memory: bytes of the linear layers' weights (packed INT4 + scales
  against FP16), LM head excluded.

Each model is compiled once per shape (dynamic=False); compiling and capturing
happen in untimed warm-up calls. Prints a table last and writes JSON (default
$OUT/bench_e2e.json) after each model, so a run stopped part way keeps what
it measured.

    python benchmarks/bench_e2e.py [--json PATH] [--granularity pc g128 ...]
        [--layers 32] [--prefill 2048] [--batch 1 16] [--context 128] [--steps 64]
        [--cuda-graphs manual|inductor|none] [--no-compile]
        [--variants prefetch unfused]
        [--profile STEPS]
"""
import argparse
import contextlib
import gc
import inspect
import json
import os
import sys
import time

import torch

import torch_apex4 as apex4
from torch_apex4 import backend as apex4_backend
from torch_apex4.plan import parse_granularity

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, rms_norm_eps=1e-5)


def llama_config(layers=None, **overrides):
    """LLaMA-2-7B's shape (optionally fewer layers or other sizes, for tests)."""
    from transformers import LlamaConfig

    shape = dict(LLAMA2_7B, **overrides)
    if layers is not None:
        shape["num_hidden_layers"] = layers
    return LlamaConfig(**shape)


@contextlib.contextmanager
def _default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(config, device, dtype=torch.float16, seed=0):
    """A LlamaForCausalLM with random (never zero) weights, created directly on
    `device` in `dtype`; eval mode. ValueError if a parameter came out all zero
    or not finite."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = LlamaForCausalLM(config)
    bad = [n for n, p in model.named_parameters()
           if p.count_nonzero() == 0 or not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"parameters initialised to all zeros or non-finite values: {bad[:5]}")
    return model.eval()


def _cache_keyword(model):
    """transformers renamed `past_key_values` to `cache` (5.24 deprecates the old name)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def make_cache(model, max_len):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


def next_tokens(model, ids, cache):
    """Greedy next token of every sequence after feeding ids [B, T] into the
    static cache (which keeps its own position): [B, 1] int64."""
    logits = model(input_ids=ids, use_cache=True, logits_to_keep=1,
                   **{_cache_keyword(model): cache}).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def greedy_decode(advance, tokens, steps):
    """`steps` greedy tokens [B, steps] from tokens [B, 1]; advance(tokens)
    returns the next ones."""
    out = []
    for _ in range(steps):
        tokens = advance(tokens)
        out.append(tokens)
    return torch.cat(out, dim=1)


def graphed_decode_step(step, model, cache, tokens, warmup=3):
    """step(model, tokens, cache) captured as one CUDA graph, after `warmup`
    steps on a side stream (which also compile it; they advance the cache).
    Returns advance(tokens) -> next tokens (a copy of the graph's output)."""
    static_in = tokens.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            static_in.copy_(step(model, static_in, cache))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(model, static_in, cache)

    def advance(t):
        static_in.copy_(t)
        graph.replay()
        return static_out.clone()
    advance.graph = graph  # the graph and its memory pool live as long as advance
    return advance


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


def _cudagraph_skips():
    """How many compiled graphs Inductor ran without CUDA graphs so far."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def gpu_profile(run, steps, device):
    """Where the GPU time of `run` (`steps` prefills or decode steps) goes: the
    torch profiler around it, summarized per step by kernel_summary. CUDA only."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if torch.device(device).type != "cuda":
        raise ValueError(f"--profile times CUDA kernels; the device is {device}")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        _sync(device)
    return kernel_summary([e for e in prof.events() if e.device_type == DeviceType.CUDA], steps)


def kernel_summary(kernels, steps, top=12):
    """Profiler kernel events of `steps` steps (prefills or decode steps), per
    step: span_us (first kernel start to last kernel end), busy_us (kernel
    time; span - busy is the GPU idle between kernels) and the `top` kernels
    by time, {name: [us, launches]}."""
    if not kernels:
        return dict(steps=steps, span_us=None, busy_us=None, kernels={})
    per_name = {}
    for e in kernels:
        us, count = per_name.get(e.name, (0.0, 0))
        per_name[e.name] = (us + e.time_range.elapsed_us(), count + 1)
    span = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
    ranked = sorted(per_name.items(), key=lambda item: -item[1][0])[:top]
    return dict(steps=steps, span_us=span / steps,
                busy_us=sum(us for us, _ in per_name.values()) / steps,
                kernels={name: [us / steps, count / steps] for name, (us, count) in ranked})


def format_profile(profile):
    if profile["span_us"] is None:
        return "  profile: the profiler recorded no kernels"
    lines = [f"  profile per step: span {profile['span_us']:.1f} us, kernels busy "
             f"{profile['busy_us']:.1f} us"]
    lines += [f"    {us:9.1f} us {count:6.1f}x  {name[:110]}"
              for name, (us, count) in profile["kernels"].items()]
    return "\n".join(lines)


# --cuda-graphs: "manual" captures each compiled decode step with
# torch.cuda.graph; "inductor" compiles with mode="reduce-overhead" (Inductor's
# CUDA-graph trees, a new step marked before every call); "none" neither.
CUDA_GRAPHS = ("manual", "inductor", "none")


def bench_model(label, model, compile_kwargs, args, device, on_record=lambda record: None):
    """Prefill and decode measurements of one model: a list of records, each
    also passed to on_record as soon as it is measured. compile_kwargs:
    torch.compile's arguments (empty: eager)."""
    graphs = args.cuda_graphs if torch.device(device).type == "cuda" else "none"
    if compile_kwargs and graphs == "inductor":
        compile_kwargs = dict(compile_kwargs, mode="reduce-overhead")
    step = torch.compile(next_tokens, dynamic=False, **compile_kwargs) if compile_kwargs \
        else next_tokens

    def call(ids, cache):
        if graphs == "inductor":
            torch.compiler.cudagraph_mark_step_begin()
        return step(model, ids, cache).clone()

    vocab = model.config.vocab_size
    generator = torch.Generator(device="cpu").manual_seed(1)
    records = []

    def record(phase, batch, tokens, seconds, compile_s, graphed, skips, profile):
        records.append(dict(model=label, phase=phase, batch=batch, tokens=tokens,
                            seconds=seconds, tokens_per_s=tokens / seconds,
                            compile_and_warmup_s=compile_s, cuda_graphs=graphed,
                            cudagraph_skips=skips))
        if profile is not None:
            records[-1]["gpu_profile"] = profile
        on_record(records[-1])
        print(f"  {label:>18} {phase:>7} batch {batch:>2}: {tokens / seconds:10.1f} tokens/s "
              f"({seconds * 1e3:.2f} ms; compile+warm-up {compile_s:.1f} s; CUDA graphs "
              f"{graphed})", file=sys.stderr, flush=True)
        if profile is not None:
            print(format_profile(profile), file=sys.stderr, flush=True)

    if args.prefill:
        ids = torch.randint(0, vocab, (1, args.prefill), generator=generator).to(device)
        cache = make_cache(model, args.prefill)
        with torch.no_grad():
            next_tokens(model, ids, cache)  # eager: allocates the cache outside compiled code
            skips = _cudagraph_skips()
            start = time.perf_counter()
            for _ in range(3):  # compile (and CUDA-graph warm-up and recording)
                cache.reset()
                call(ids, cache)
            _sync(device)
            compile_s = time.perf_counter() - start
            times = []
            for _ in range(args.repeats):
                cache.reset()
                times.append(_timed(lambda: call(ids, cache), device)[1])
            profile = None
            if args.profile:
                cache.reset()
                profile = gpu_profile(lambda: call(ids, cache), 1, device)
        record("prefill", 1, args.prefill, min(times), compile_s,
               "inductor" if graphs == "inductor" else "none", _cudagraph_skips() - skips,
               profile)
        del cache
    for batch in args.batch:
        prompt = torch.randint(0, vocab, (batch, args.context), generator=generator).to(device)
        cache = make_cache(model, args.context + 3 + args.steps + args.profile)
        graphed = graphs
        with torch.no_grad():
            tokens = next_tokens(model, prompt, cache)  # eager prompt
            skips = _cudagraph_skips()
            start = time.perf_counter()
            advance = None
            if graphs == "manual":
                try:
                    advance = graphed_decode_step(step, model, cache, tokens)
                except RuntimeError as error:  # e.g. a host synchronisation in the step
                    print(f"  CUDA graph capture failed, timing without: {error}",
                          file=sys.stderr)
                    graphed = f"none (capture failed: {str(error).splitlines()[0][:200]})"
            if advance is None:
                advance = lambda t: call(t, cache)  # noqa: E731
                tokens = greedy_decode(advance, tokens, 3)[:, -1:]
            _sync(device)
            compile_s = time.perf_counter() - start
            _, seconds = _timed(lambda: greedy_decode(advance, tokens, args.steps), device)
            profile = gpu_profile(lambda: greedy_decode(advance, tokens, args.profile),
                                  args.profile, device) if args.profile else None
        record("decode", batch, batch * args.steps, seconds, compile_s, graphed,
               _cudagraph_skips() - skips, profile)
        del advance, cache
    return records


def _release(device):
    torch._dynamo.reset()
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run(args, device, progress=lambda records, weights, plans: None):
    """All measurements: (records, weights, apex4 kernel plans per model);
    progress(...) with them after each model, so that a run stopped part way
    still leaves what it measured."""
    config = llama_config(args.layers)
    print(f"building the FP16 model ({config.num_hidden_layers} layers)", file=sys.stderr, flush=True)
    model = build_model(config, device)
    records, plans = [], {}
    weights = [dict(model="fp16", linear_weight_bytes=apex4.linear_weight_bytes(model))]

    def on_record(record):
        records.append(record)
        progress(records, weights, plans)

    compile_fp16 = dict(backend=args.fp16_backend) if args.compile else {}
    bench_model("fp16", model, compile_fp16, args, device, on_record)
    for i, label in enumerate(args.granularity):
        _release(device)
        if i > 0:  # quantize_ replaced the FP16 weights: rebuild the same model
            del model
            _release(device)
            model = build_model(config, device)
        apex4.quantize_(model, apex4.W4A4Config(group_size=parse_granularity(label)))
        _release(device)
        name = f"w4a4 {label}"
        weights.append(dict(model=name, linear_weight_bytes=apex4.linear_weight_bytes(model)))
        progress(records, weights, plans)
        compile_apex4 = dict(backend="apex4") if args.compile else {}
        earlier = list(apex4_backend.kernel_plans)
        bench_model(name, model, compile_apex4, args, device, on_record)
        new = [p for p in apex4_backend.kernel_plans if not any(p is q for q in earlier)]
        plans[name] = [plan_summary(p) for p in new]
        for plan in new:
            print(apex4_backend.format_kernel_plan(plan[:4] + plan[-3:]), file=sys.stderr)
        progress(records, weights, plans)
        for variant in [v for v in VARIANTS if v in args.variants]:  # "unfused" last
            _release(device)
            if variant == "unfused":
                unfuse_projections_(model)
            default = apex4_backend.PREFETCH_NEXT_WEIGHTS
            apex4_backend.PREFETCH_NEXT_WEIGHTS = variant == "prefetch"
            try:
                bench_model(f"{name} {variant}", model, compile_apex4, args, device, on_record)
            finally:
                apex4_backend.PREFETCH_NEXT_WEIGHTS = default
    return records, weights, plans


# --variants: each W4A4 model measured again, for an A/B. "prefetch": the
# backend with prefetch_next_weights (off by default); "unfused": sibling
# projections as separate GEMMs (it changes the model, so it runs last).
VARIANTS = ("prefetch", "unfused")


def unfuse_projections_(model):
    """Give every W4A4Linear buffers of its own (undoing fuse_projections_), so the
    backend runs q/k/v and gate/up as separate GEMMs again: fusion's A/B."""
    for module in model.modules():
        if isinstance(module, apex4.W4A4Linear):
            for buffer in ("w_q", "w_s", "bias"):
                if getattr(module, buffer) is not None:
                    setattr(module, buffer, getattr(module, buffer).clone())


def plan_summary(choices):
    """Counts of one compiled graph's kernel plan (torch_apex4.backend.KernelChoice list)."""
    summary = dict(m=sorted({c.m for c in choices}), layers=len(choices),
                   kept_w4a4_linear=sum(c.kept for c in choices),
                   predicted_us=sum(c.predicted_us for c in choices), planned={}, runs={})
    for c in choices:
        summary["planned"][c.variant] = summary["planned"].get(c.variant, 0) + 1
        summary["runs"][c.runs] = summary["runs"].get(c.runs, 0) + 1
    return summary


def format_table(records, weights, title):
    """The results as a text table: one column per model, speed-ups against FP16."""
    models = list(dict.fromkeys(r["model"] for r in records))
    rows = list(dict.fromkeys((r["phase"], r["batch"], r["tokens"] // (r["batch"] if r["phase"] == "decode" else 1))
                              for r in records))
    cells = {(r["model"], r["phase"], r["batch"]): r for r in records}
    header = ["metric"] + [f"{m} tok/s" for m in models] + [f"{m} vs fp16" for m in models[1:]]
    lines = []
    for phase, batch, n in rows:
        name = f"prefill {n} tokens" if phase == "prefill" else f"decode batch {batch}"
        line = [name]
        base = cells.get(("fp16", phase, batch))
        for m in models:
            r = cells.get((m, phase, batch))
            line.append("-" if r is None else f"{r['tokens_per_s']:.1f}")
        for m in models[1:]:
            r = cells.get((m, phase, batch))
            line.append("-" if r is None or base is None
                        else f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x")
        lines.append(line)
    sizes = {w["model"]: w["linear_weight_bytes"] for w in weights}
    line = ["linear weights GB"] + [f"{sizes[m] / 1e9:.2f}" if m in sizes else "-" for m in models]
    line += [f"{sizes[m] / sizes['fp16']:.3f}" if m in sizes and "fp16" in sizes else "-"
             for m in models[1:]]
    lines.append(line)
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
    out = [title, "  ".join(h.rjust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(l, widths)) for l in lines]
    return "\n".join(out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_json = os.path.join(os.environ["OUT"], "bench_e2e.json") if os.environ.get("OUT") else None
    parser.add_argument("--json", default=default_json, help="where to write the results")
    parser.add_argument("--granularity", nargs="+", default=["pc"],
                        help="W4A4 granularities to measure, each a label of torch_apex4.plan "
                             "('pc' per channel, 'g128', ...); default: pc")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32)")
    parser.add_argument("--prefill", type=int, default=2048, help="prefill tokens (0: skip)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16], help="decode batch sizes")
    parser.add_argument("--context", type=int, default=128, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps")
    parser.add_argument("--repeats", type=int, default=5, help="timed prefills (best is kept)")
    parser.add_argument("--cuda-graphs", choices=CUDA_GRAPHS, default="manual",
                        help="how decode steps run as CUDA graphs (default: manual capture)")
    parser.add_argument("--fp16-backend", default="inductor")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="run both models eagerly")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after timing, profile one more prefill and STEPS more decode "
                             "steps (torch profiler): GPU time per step by kernel, and the "
                             "idle time between kernels")
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=[],
                        help="also measure each W4A4 model with the backend's weight "
                             "prefetch (prefetch) or with its sibling projections "
                             "(q/k/v, gate/up) as separate GEMMs (unfused)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_e2e.py needs a CUDA GPU")
    device = torch.device("cuda")
    start = time.perf_counter()
    config = llama_config(args.layers)

    def save(records, weights, plans):
        if not args.json:
            return
        import transformers

        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                    cuda=torch.version.cuda, transformers=transformers.__version__,
                    config={k: getattr(config, k) for k in LLAMA2_7B}, args=vars(args),
                    wall_s=time.perf_counter() - start)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, records=records, weights=weights, kernel_plans=plans),
                      f, indent=1)

    records, weights, _ = run(args, device, save)
    if args.json:
        print(f"wrote {args.json}", file=sys.stderr)
    title = (f"LLaMA-2-7B shape ({config.num_hidden_layers} layers, random fp16 weights) on "
             f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"{'torch.compile' if args.compile else 'eager'}, CUDA graphs {args.cuda_graphs}")
    print(format_table(records, weights, title))


if __name__ == "__main__":
    main()
