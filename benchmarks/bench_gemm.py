"""GEMM speed on one GPU, side by side: FP16 F.linear (cuBLAS), INT8
torch._int_mm, FP8 torch._scaled_mm (e4m3, row-wise scales) and apex4 per
granularity -- w4a4_linear (the layer's real cost: fp16 x in, quantization of
x included, fp16 out) and w4a4_gemm alone (already quantized x) -- at the
LLaMA-2-7B/70B linear-layer shapes.

Eager times are the smaller of two medians of triton.testing.do_bench (which
also clears L2 before every call), or a median of CUDA events when Triton is
missing. With --cuda-graph every cell is GRAPH_CALLS calls captured in one
CUDA graph, replayed back to back between CUDA events, the way decode steps
run, so that the graph's own launch gap is spread over many calls; the
operand rotation alone keeps L2 cold there (--clear-l2 adds do_bench's 256 MB
memset before every replay, which leaves L2 full of dirty lines: on an H100
that moved the per-call times by 0.96-1.06x, median 1.01x). Inputs are
random and non-zero; for small problems several copies of every operand are
rotated so that none is served from L2. Prints a table last (microseconds
for FP16, then speedup over FP16 per cell) and writes every measurement as
JSON.

    python benchmarks/bench_gemm.py [--quick] [--json PATH] [--shapes NAME ...]
        [--tokens M ...] [--granularities G ...] [--compare-paths PATH ...]
        [--quant-gemm] [--cuda-graph [--clear-l2]]

--compare-paths adds w4a4_gemm columns with APEX4_GEMM_PATH forced to each
path (e.g. sm90mma), to compare kernels in one run; --quant-gemm adds
quantize_act + w4a4_gemm (what w4a4_linear costs unfused). With --cuda-graph
a "copy" column times a device copy that moves as many bytes as the per
channel W4A4 GEMM must (half read, half written): the copy rate at the
layer's size, which small layers cannot reach the probe's large-copy rate
at either.
"""
import argparse
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

import torch_apex4  # noqa: F401  (registers the ops)
from torch_apex4.plan import parse_granularity

ops = torch.ops.apex4

SHAPES = [  # (name, K, N) of y[M, N] = x[M, K] @ W[N, K]^T
    ("7B qkvo", 4096, 4096),
    ("7B up/gate", 4096, 11008),
    ("7B down", 11008, 4096),
    ("70B o", 8192, 8192),
    ("70B up/gate", 8192, 28672),
    ("70B down", 28672, 8192),
]
TOKENS = [1, 16, 128, 512, 2048, 8192]
GRANULARITIES = [None, 128, 64, 256]  # None: per channel (weights) / per token (activations)

QUICK_SHAPES = ["7B qkvo", "7B up/gate", "70B up/gate"]
QUICK_TOKENS = [1, 16, 2048, 8192]
QUICK_GRANULARITIES = [None, 128]

# Operand copies rotated per call: enough bytes that the next call's operands
# are not in L2 (50 MB on an H100) even without do_bench's cache clearing.
ROTATION_BYTES = 256 << 20
MAX_COPIES = 16
# Calls in one timed CUDA graph: a multiple of MAX_COPIES, and enough that the
# graph's launch gap is a small part of a replay.
GRAPH_CALLS = 32
GRAPH_REPLAYS = 4  # per timed interval


def granularity_name(group_size):
    return "per-channel" if group_size is None else f"g{group_size}"


def median_us(fn):
    """The smaller of two medians taken one after the other: a transient
    (a clock dip, another process) rarely spans both."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return min(do_bench(fn, warmup=10, rep=40, return_mode="median") for _ in range(2)) * 1e3
    return event_median_us(fn, warmup=5, intervals=100)


def event_median_us(fn, warmup, intervals, calls=1):
    """Median over `intervals` of `calls` calls of fn run back to back
    between two CUDA events, in microseconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(intervals):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def rotating(make):
    """A function that, called repeatedly, cycles through enough copies of
    make()'s operands (a tuple of tensors) to span ROTATION_BYTES."""
    first = make()
    size = sum(t.numel() * t.element_size() for t in first)
    copies = max(1, min(MAX_COPIES, math.ceil(ROTATION_BYTES / max(size, 1))))
    pool = [first] + [make() for _ in range(copies - 1)]
    state = {"i": 0}

    def next_operands():
        state["i"] = (state["i"] + 1) % copies
        return pool[state["i"]]

    return next_operands


def fp16_case(m, k, n):
    def make():
        return torch.randn(m, k, dtype=torch.float16, device="cuda"), \
            torch.randn(n, k, dtype=torch.float16, device="cuda") * 0.02
    operands = rotating(make)
    return lambda: F.linear(*operands())


def int8_case(m, k, n):
    def make():
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        return a, w.t()  # [K, N] column-major, the layout cuBLASLt wants
    operands = rotating(make)
    return lambda: torch._int_mm(*operands())


def fp8_case(m, k, n):
    e4m3 = torch.float8_e4m3fn

    def make():
        a = (torch.randn(m, k, device="cuda") * 4).to(e4m3)
        w = (torch.randn(n, k, device="cuda") * 4).to(e4m3)
        return a, w.t(), torch.rand(m, 1, device="cuda") + 0.5, torch.rand(1, n, device="cuda") + 0.5
    operands = rotating(make)

    def run():
        a, b, sa, sb = operands()
        return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    return run


def must_move_bytes(m, n, k, group_size):
    """Bytes a W4A4 GEMM must move: the packed weight and its scales, the
    packed activations and theirs, the fp16 output (K padded as packed)."""
    groups = 1 if group_size is None else -(-k // group_size)
    kp = -(-k // 64) * 64 if group_size is None else groups * group_size
    return n * kp // 2 + 4 * n * groups + m * kp // 2 + 4 * m * groups + 2 * m * n


def copy_case(shape, dtype):
    """y.copy_(x) on rotated copies: the copy rate at this size."""
    def make():
        x = (torch.randn(shape, device="cuda").to(dtype) if dtype.is_floating_point
             else torch.randint(1, 100, shape, device="cuda").to(dtype))
        return x, torch.empty_like(x)
    operands = rotating(make)

    def run():
        x, y = operands()
        return y.copy_(x)
    return run


def apex4_cases(m, k, n, group_size):
    """(w4a4_linear, w4a4_gemm, quantize_act + w4a4_gemm) for one granularity."""
    def make():
        x = torch.randn(m, k, dtype=torch.float16, device="cuda")
        w_q, w_s = ops.quantize_weight(torch.randn(n, k, device="cuda"), group_size)
        a_q, a_s = ops.quantize_act(x, group_size)
        return x, a_q, a_s, w_q, w_s
    operands = rotating(make)

    def linear():
        x, _, _, w_q, w_s = operands()
        return ops.w4a4_linear(x, w_q, w_s)

    def gemm():
        _, a_q, a_s, w_q, w_s = operands()
        return ops.w4a4_gemm(a_q, a_s, w_q, w_s, None, torch.float16)

    def quantize_and_gemm():
        x, _, _, w_q, w_s = operands()
        a_q, a_s = ops.quantize_act(x, group_size)
        return ops.w4a4_gemm(a_q, a_s, w_q, w_s, None, torch.float16)
    return linear, gemm, quantize_and_gemm


def with_gemm_path(path, fn):
    """fn run with APEX4_GEMM_PATH=path (the binding reads it on every call)."""
    def run():
        previous = os.environ.get("APEX4_GEMM_PATH")
        os.environ["APEX4_GEMM_PATH"] = path
        try:
            return fn()
        finally:
            if previous is None:
                del os.environ["APEX4_GEMM_PATH"]
            else:
                os.environ["APEX4_GEMM_PATH"] = previous
    return run


def graph_replay(fn):
    """fn called GRAPH_CALLS times in one CUDA graph, as decode steps run (no
    per-call launch cost on the CPU); every call still gets operands that are
    not in L2 (rotating's copies span ROTATION_BYTES)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # one-time setup (kernel attributes) outside the capture
        for _ in range(MAX_COPIES):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    return graph.replay


def measure(fn, cuda_graph, clear_l2=False):
    """Median microseconds per call, or None where the baseline does not
    support the shape (e.g. torch._int_mm needs M > 16)."""
    try:
        fn()
        torch.cuda.synchronize()
    except (RuntimeError, ValueError) as err:
        print(f"    unsupported: {str(err).splitlines()[0][:100]}", file=sys.stderr)
        return None
    if not cuda_graph:
        return median_us(fn)
    replay = graph_replay(fn)
    per_replay = (median_us(replay) if clear_l2
                  else event_median_us(replay, warmup=3, intervals=10, calls=GRAPH_REPLAYS))
    return per_replay / GRAPH_CALLS


def run(shapes, tokens, granularities, compare_paths, quant_gemm, cuda_graph, clear_l2):
    records = []
    for name, k, n in shapes:
        for m in tokens:
            print(f"{name} K={k} N={n} M={m}", file=sys.stderr)
            cases = [("fp16", None, fp16_case(m, k, n)), ("int8", None, int8_case(m, k, n)),
                     ("fp8", None, fp8_case(m, k, n))]
            if cuda_graph:  # a copy reading and writing half the per-channel GEMM's bytes each
                cases.append(("copy", None, copy_case((must_move_bytes(m, n, k, None) // 2,),
                                                      torch.uint8)))
            for g in granularities:
                linear, gemm, quantize_and_gemm = apex4_cases(m, k, n, g)
                cases += [("apex4 linear", granularity_name(g), linear),
                          ("apex4 gemm", granularity_name(g), gemm)]
                if quant_gemm:
                    cases.append(("apex4 quant+gemm", granularity_name(g), quantize_and_gemm))
                cases += [(f"apex4 gemm:{path}", granularity_name(g), with_gemm_path(path, gemm))
                          for path in compare_paths]
            row = []
            for method, granularity, fn in cases:
                us = measure(fn, cuda_graph, clear_l2)
                tops = None if us is None or method == "copy" else 2 * m * n * k / us / 1e6
                row.append(dict(shape=name, k=k, n=n, m=m, method=method, granularity=granularity,
                                median_us=us, tops=tops))
            fp16_us = row[0]["median_us"]
            for r in row:
                r["speedup_vs_fp16"] = (None if r["median_us"] is None or fp16_us is None
                                        else fp16_us / r["median_us"])
            records += row
            del cases
            torch.cuda.empty_cache()
    return records


def timing_label(cuda_graph, clear_l2):
    if not cuda_graph:
        return "eager"
    return "cuda-graph, L2 cleared per replay" if clear_l2 else "cuda-graph, back to back"


def print_table(records, timing):
    columns = []
    for r in records:
        key = (r["method"], r["granularity"])
        if key not in columns:
            columns.append(key)
    headers = ["shape", "M", "fp16 us"] + [
        m if g is None else f"{m.replace('apex4 ', '')} {g}" for m, g in columns[1:]]
    rows = {}
    for r in records:
        rows.setdefault((r["shape"], r["k"], r["n"], r["m"]), {})[(r["method"], r["granularity"])] = r
    lines = []
    for (shape, k, n, m), cells in rows.items():
        fp16 = cells[columns[0]]["median_us"]
        line = [f"{shape} {k}->{n}", str(m), "-" if fp16 is None else f"{fp16:.1f}"]
        for key in columns[1:]:
            s = cells.get(key, {}).get("speedup_vs_fp16")
            line.append("-" if s is None else f"{s:.2f}x")
        lines.append(line)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for line in lines:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
    print("cells: speedup over FP16 F.linear (higher is better); 'linear' = w4a4_linear on the "
          "fp16 input (activation quantization included), 'gemm' = w4a4_gemm on quantized input; "
          f"apex4 outputs fp16; timing: {timing}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    default_json = os.path.join(os.environ["OUT"], "bench_gemm.json") if os.environ.get("OUT") else None
    parser.add_argument("--json", default=default_json,
                        help="where to write the measurements (default: $OUT/bench_gemm.json)")
    parser.add_argument("--shapes", nargs="+", metavar="NAME",
                        help="shape names to run (default: all, or the quick ones)")
    parser.add_argument("--tokens", nargs="+", type=int, metavar="M", help="token counts M")
    parser.add_argument("--granularities", nargs="+", metavar="G", type=parse_granularity,
                        help="granularity labels: pc (per channel), g64, g128, ...")
    parser.add_argument("--compare-paths", nargs="+", default=[], metavar="PATH",
                        help="extra w4a4_gemm columns with APEX4_GEMM_PATH forced")
    parser.add_argument("--quant-gemm", action="store_true",
                        help="add a quantize_act + w4a4_gemm column (w4a4_linear unfused)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time every cell as CUDA-graph replays, the way decode steps run "
                             "(small-M cells are otherwise bound by the CPU's launch cost)")
    parser.add_argument("--clear-l2", action="store_true",
                        help="with --cuda-graph: do_bench's L2 clearing before every replay")
    args = parser.parse_args()
    if args.clear_l2 and not args.cuda_graph:
        parser.error("--clear-l2 goes with --cuda-graph (eager calls always clear L2)")
    if not torch.cuda.is_available():
        sys.exit("bench_gemm.py needs a CUDA GPU")
    names = args.shapes or (QUICK_SHAPES if args.quick else [s[0] for s in SHAPES])
    shapes = [s for s in SHAPES if s[0] in names]
    tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    granularities = (args.granularities
                     or (QUICK_GRANULARITIES if args.quick else GRANULARITIES))
    torch.manual_seed(0)
    records = run(shapes, tokens, granularities, args.compare_paths, args.quant_gemm,
                  args.cuda_graph, args.clear_l2)
    timing = timing_label(args.cuda_graph, args.clear_l2)
    if args.json:
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                    cuda=torch.version.cuda, gemm_path=os.environ.get("APEX4_GEMM_PATH", "auto"),
                    timing=timing)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, records=records), f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    print_table(records, timing)


if __name__ == "__main__":
    main()
