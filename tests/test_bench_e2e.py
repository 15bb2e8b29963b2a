"""The pieces of benchmarks/bench_e2e.py on the CPU, with a tiny LLaMA shape."""
import argparse
import importlib.util
import os

import pytest
import torch

import torch_apex4 as apex4
from torch_apex4 import backend as apex4_backend

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_e2e.py")
_spec = importlib.util.spec_from_file_location("bench_e2e", _PATH)
bench_e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_e2e)

TINY = dict(layers=2, vocab_size=96, hidden_size=128, intermediate_size=256,
            num_attention_heads=4, num_key_value_heads=4)


def tiny_model(dtype=torch.float32):
    return bench_e2e.build_model(bench_e2e.llama_config(**TINY), "cpu", dtype)


def test_config_is_llama2_7b_shaped():
    c = bench_e2e.llama_config()
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.vocab_size) == (32, 4096, 11008, 32, 32000)
    assert bench_e2e.llama_config(layers=3).num_hidden_layers == 3


def test_model_is_random_in_the_requested_dtype():
    model = tiny_model(torch.float16)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert all(p.count_nonzero() > 0 for p in model.parameters())
    weight = model.model.layers[0].mlp.up_proj.weight
    assert weight.float().std() > 0


def test_greedy_decode_with_static_cache_matches_generate():
    model = tiny_model()
    ids = torch.randint(0, TINY["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(0))
    cache = bench_e2e.make_cache(model, 7 + 6)
    with torch.no_grad():
        first = bench_e2e.next_tokens(model, ids, cache)
        rest = bench_e2e.greedy_decode(lambda t: bench_e2e.next_tokens(model, t, cache), first, 5)
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                  do_sample=False, min_new_tokens=6,
                                  pad_token_id=0)[:, 7:]
    assert torch.equal(torch.cat([first, rest], dim=1), expected)


def test_cache_reset_repeats_the_prefill():
    model = tiny_model()
    ids = torch.randint(0, TINY["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(1))
    cache = bench_e2e.make_cache(model, 9)
    with torch.no_grad():
        a = bench_e2e.next_tokens(model, ids, cache)
        cache.reset()
        b = bench_e2e.next_tokens(model, ids, cache)
    assert torch.equal(a, b)


def test_bench_model_records_and_table():
    model = tiny_model()
    args = argparse.Namespace(prefill=8, batch=[1, 2], context=4, steps=3, repeats=2,
                              cuda_graphs="manual", profile=0)  # no CUDA: no graphs
    records = bench_e2e.bench_model("fp16", model, {}, args, "cpu")
    fp16_bytes = apex4.linear_weight_bytes(model)
    apex4.quantize_(model, apex4.W4A4Config(group_size=None))
    records += bench_e2e.bench_model("w4a4 pc", model, {"backend": "eager"}, args, "cpu")
    assert [(r["model"], r["phase"], r["batch"], r["tokens"]) for r in records] == [
        ("fp16", "prefill", 1, 8), ("fp16", "decode", 1, 3), ("fp16", "decode", 2, 6),
        ("w4a4 pc", "prefill", 1, 8), ("w4a4 pc", "decode", 1, 3), ("w4a4 pc", "decode", 2, 6)]
    assert all(r["seconds"] > 0 and r["tokens_per_s"] > 0 and r["cuda_graphs"] == "none"
               for r in records)
    weights = [dict(model="fp16", linear_weight_bytes=fp16_bytes),
               dict(model="w4a4 pc", linear_weight_bytes=apex4.linear_weight_bytes(model))]
    table = bench_e2e.format_table(records, weights, "title").splitlines()
    assert table[0] == "title"
    assert table[1].split() == ["metric", "fp16", "tok/s", "w4a4", "pc", "tok/s", "w4a4", "pc",
                                "vs", "fp16"]
    assert table[2].split()[:3] == ["prefill", "8", "tokens"]
    assert [line.split()[:3] for line in table[3:5]] == [["decode", "batch", "1"],
                                                         ["decode", "batch", "2"]]
    ratio = float(table[-1].split()[-1])
    # Packed INT4 + fp32 per-channel scales: a bit over a quarter of fp32's... of the
    # float32 tiny model here, so about 1/8.
    assert ratio == pytest.approx(weights[1]["linear_weight_bytes"] / fp16_bytes, abs=1e-3)
    assert 0.12 < ratio < 0.14


def test_arguments():
    args = bench_e2e.parse_args(["--granularity", "pc", "g128", "--batch", "1", "--layers", "2"])
    assert args.granularity == ["pc", "g128"] and args.batch == [1] and args.layers == 2
    assert args.prefill == 2048 and args.cuda_graphs == "manual" and args.compile
    with pytest.raises(SystemExit):
        bench_e2e.parse_args(["--cuda-graphs", "sometimes"])


def test_run_reports_progress_and_plan_summary(monkeypatch):
    """run() on a tiny shape, eagerly: every record and the quantized weights reach
    progress as soon as they exist."""
    tiny, build = bench_e2e.llama_config(**TINY), bench_e2e.build_model
    monkeypatch.setattr(bench_e2e, "llama_config", lambda layers=None: tiny)
    monkeypatch.setattr(bench_e2e, "build_model",  # float32: the CPU's fp16 matmuls are slow
                        lambda config, device: build(config, device, torch.float32))
    seen = []
    args = bench_e2e.parse_args(["--granularity", "pc", "--prefill", "8", "--batch", "1",
                                 "--context", "4", "--steps", "2", "--repeats", "1",
                                 "--no-compile"])
    records, weights, plans = bench_e2e.run(
        args, "cpu", lambda r, w, p: seen.append((len(r), len(w))))
    assert [(r["model"], r["phase"]) for r in records] == [
        ("fp16", "prefill"), ("fp16", "decode"), ("w4a4 pc", "prefill"), ("w4a4 pc", "decode")]
    assert seen[0] == (1, 1) and (2, 2) in seen and seen[-1] == (4, 2)
    assert [w["model"] for w in weights] == ["fp16", "w4a4 pc"] and plans == {"w4a4 pc": []}


def test_variants_turn_prefetch_on_and_unfuse_last(monkeypatch):
    tiny, build = bench_e2e.llama_config(**TINY), bench_e2e.build_model
    monkeypatch.setattr(bench_e2e, "llama_config", lambda layers=None: tiny)
    monkeypatch.setattr(bench_e2e, "build_model",
                        lambda config, device: build(config, device, torch.float32))
    models, prefetching = [], []

    def bench_model(name, model, *rest):
        models.append((name, model))
        prefetching.append(apex4_backend.PREFETCH_NEXT_WEIGHTS)

    monkeypatch.setattr(bench_e2e, "bench_model", bench_model)
    args = bench_e2e.parse_args(["--granularity", "pc", "--no-compile",
                                 "--variants", "unfused", "prefetch"])
    bench_e2e.run(args, "cpu")
    assert [name for name, _ in models] == ["fp16", "w4a4 pc", "w4a4 pc prefetch",
                                            "w4a4 pc unfused"]
    assert prefetching == [False, False, True, False] and not apex4_backend.PREFETCH_NEXT_WEIGHTS
    attention = models[-1][1].model.layers[0].self_attn
    q, k = attention.q_proj.w_q, attention.k_proj.w_q
    assert not torch._C._is_alias_of(q, k)
    assert apex4.fuse_projections_(models[-1][1]) == 2 * tiny.num_hidden_layers


def test_plan_summary_counts():
    from torch_apex4.backend import KernelChoice

    choices = [KernelChoice("a", 1, 64, 64, None, "decode", 2.0, "decode", True),
               KernelChoice("b", 1, 64, 64, 128, "mma.sync", 3.0, "decode", False)]
    s = bench_e2e.plan_summary(choices)
    assert s == dict(m=[1], layers=2, kept_w4a4_linear=1, predicted_us=5.0,
                     planned={"decode": 1, "mma.sync": 1}, runs={"decode": 2})


def test_profile_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        bench_e2e.gpu_profile(None, 2, "cpu")


def test_kernel_summary_and_its_format():
    from torch.autograd.profiler_util import Interval

    class Kernel:
        def __init__(self, name, start, end):
            self.name, self.time_range = name, Interval(start, end)

    # Two steps: gemm 10 us + quantize 2 us each, 3 us idle between kernels.
    kernels = [Kernel("gemm", 0, 10), Kernel("quantize", 13, 15),
               Kernel("gemm", 18, 28), Kernel("quantize", 31, 33)]
    summary = bench_e2e.kernel_summary(kernels, steps=2, top=1)
    assert summary == dict(steps=2, span_us=16.5, busy_us=12.0, kernels={"gemm": [10.0, 1.0]})
    text = bench_e2e.format_profile(summary)
    assert "span 16.5 us" in text and "busy 12.0 us" in text and "gemm" in text
    assert "no kernels" in bench_e2e.format_profile(bench_e2e.kernel_summary([], 2))
