"""rho table and cache, the cost model, the planner, the backend's use of it,
and benchmarks/cost_model_check.py (all on the CPU: GPU rates come from the
table or from made-up probe results)."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import torch_apex4 as apex4
from torch_apex4 import backend, costmodel, rho
from torch_apex4.costmodel import DECODE, MMA_SYNC, WGMMA, CostModel
from torch_apex4.plan import GranularityPlan
from torch_apex4.planner import Planner, linear_shapes

from graphs import captured_graph

ROOT = os.path.join(os.path.dirname(__file__), "..")
# The grid the default calibration was fitted to (one H100 SXM, two bench runs).
H100_JSONS = [os.path.join(ROOT, "benchmarks", "results", name) for name in
              ("h100_bench_gemm_m1_16_8192.json", "h100_bench_gemm_m128_512_2048.json")]
H100_JSON = H100_JSONS[0]
H100 = rho.known_gpu("NVIDIA H100 80GB HBM3")
A100 = rho.known_gpu("NVIDIA A100-SXM4-80GB")
RTX3090 = rho.known_gpu("NVIDIA GeForce RTX 3090")


# ------------------------------------------------------------------ rho

@pytest.mark.parametrize("device_name,table_name,rho_value", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM5", 29.6), ("NVIDIA H100 PCIe", "H100 PCIe", 29.6),
    ("NVIDIA H200", "H200 SXM", 29.6), ("NVIDIA A100-SXM4-80GB", "A100 SXM4 80GB", 64.0),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe", 64.0), ("NVIDIA A100-PCIE-40GB", "A100 40GB", 64.0),
    ("NVIDIA GeForce RTX 3090", "GeForce RTX 3090", 16.0), ("NVIDIA A40", "A40", 16.0),
    ("NVIDIA A10", "A10", 16.0), ("NVIDIA L40S", "L40S", 8.0),
    ("NVIDIA GeForce RTX 4090", "GeForce RTX 4090", 16.0)])
def test_rho_table(device_name, table_name, rho_value):
    spec = rho.known_gpu(device_name)
    assert spec.name == table_name and spec.rho == pytest.approx(rho_value, abs=0.1)
    assert spec.source and spec.bandwidth_tbs > 0 and spec.i2f_tops > 0
    assert spec.has_wgmma == table_name.startswith("H")
    assert spec.tensor_kind == ("int8" if spec.has_wgmma else "int4")


def test_unknown_gpu_is_not_in_the_table():
    assert rho.known_gpu("NVIDIA B200") is None


def fake_probe(**changes):
    hopper = dict(device="Fake GPU", driver="1.0", sms=100, ffma_tflops=50.0, i2f_tops=12.5,
                  mma_s8_tops=1000.0, mma_s4_tops=40.0, wgmma_s8_tops=1500.0,
                  fp16_mm_tflops=600.0, bandwidth_tbs=3.0)
    return rho.ProbeResult(**{**hopper, **changes})


def test_probe_result_spec_picks_the_fastest_mma():
    hopper = fake_probe().spec()
    assert (hopper.tensor_kind, hopper.tensor_tops, hopper.rho) == ("int8", 1500.0, 30.0)
    assert hopper.has_wgmma and hopper.mma_sync_fraction == pytest.approx(1000 / 1500)
    ampere = fake_probe(mma_s4_tops=2000.0, wgmma_s8_tops=None).spec()
    assert (ampere.tensor_kind, ampere.tensor_tops, ampere.rho) == ("int4", 2000.0, 40.0)
    assert not ampere.has_wgmma and ampere.mma_sync_fraction == 1.0


def test_probe_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_APEX4_CACHE", str(tmp_path))
    assert rho.cache_path() == tmp_path / "rho.json"
    assert rho.cached_probe("Fake GPU", "1.0") is None
    result = fake_probe()
    rho.store_probe(result)
    rho.store_probe(fake_probe(device="Other GPU"))
    assert rho.cached_probe("Fake GPU", "1.0") == result
    assert rho.cached_probe("Fake GPU", "2.0") is None  # another driver: probe again
    assert len(rho.read_cache()) == 2
    (tmp_path / "rho.json").write_text("{not json")
    assert rho.read_cache() == {} and rho.cached_probe("Fake GPU", "1.0") is None


def test_spec_dict_round_trip():
    assert rho.GpuSpec.from_dict(H100.to_dict()) == H100
    with pytest.raises(ValueError, match="GpuSpec"):
        rho.GpuSpec.from_dict({"name": "x"})


def test_gpu_spec_and_probe_need_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        rho.gpu_spec("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA GPU"):
            rho.probe()


# ------------------------------------------------------------ cost model

@pytest.mark.parametrize("k", [64, 576, 4096, 11008, 100])
@pytest.mark.parametrize("group_size", [None, 64, 128, 256])
def test_padded_k_matches_the_layout_header(k, group_size):
    assert costmodel.padded_k(k, group_size) == apex4.padded_k(k, group_size)


def test_auto_variant_mirrors_the_binding():
    h100, a100 = CostModel(H100), CostModel(A100)
    assert h100.auto_variant(16, None) == DECODE and h100.auto_variant(17, None) == WGMMA
    assert h100.auto_variant(2048, 128) == WGMMA and h100.auto_variant(2048, 64) == MMA_SYNC
    assert a100.auto_variant(2048, 128) == MMA_SYNC and a100.variants() == (DECODE, MMA_SYNC)
    assert h100.path_variant("sm80", None) is None  # emulated INT4 MMA: not modelled
    assert a100.path_variant("sm90", 128) == MMA_SYNC and h100.path_variant("sm90", 64) == MMA_SYNC
    with pytest.raises(ValueError, match="APEX4_GEMM_PATH"):
        h100.path_variant("sm100", None)
    with pytest.raises(ValueError, match="does not run"):
        a100.gemm(2048, 4096, 4096, None, WGMMA)


@pytest.mark.parametrize("args", [(0, 4096, 4096, None), (1, 4096, 4096, 96), (1, 4096, 4096, 0),
                                  (1.0, 4096, 4096, None), (1, 4096, 4096, True)])
def test_cost_model_rejects_bad_problems(args):
    with pytest.raises(ValueError, match="cost model"):
        CostModel(H100).gemm(*args)


def test_decode_for_one_token_tiled_for_many():
    model = CostModel(H100)
    assert model.best(1, 4096, 4096, None).variant == DECODE
    assert model.best(2048, 4096, 4096, None).variant in (WGMMA, MMA_SYNC)
    one = model.gemm(1, 4096, 4096, None)
    assert one.memory > one.mma  # decode is memory-bound


def test_group_cost_grows_with_rho():
    """The heart of APEX4: the per-group penalty relative to per channel rises with rho."""
    ratios = []
    for scale in (0.5, 1.0, 2.0):
        spec = dataclasses.replace(H100, tensor_tops=H100.tensor_tops * scale)
        model = CostModel(spec)
        ratios.append(model.gemm(8192, 4096, 4096, 128).total / model.gemm(8192, 4096, 4096, None).total)
    assert 1 < ratios[0] < ratios[1] < ratios[2]


def test_paper_direction_on_vendor_rates():
    """W4A4-g128 GEMMs beat FP16 at rho = 16 and lose at rho = 64 (4096^3)."""
    speedup = {}
    for spec in (RTX3090, A100):
        model = CostModel(spec)
        speedup[spec.name] = model.fp16(4096, 4096, 4096) / model.best(4096, 4096, 4096, 128, layer=False).total
    assert speedup[RTX3090.name] > 1.5 and speedup[A100.name] < 0.6


def h100_measurements():
    records = []
    for path in H100_JSONS:
        with open(path) as f:
            records += json.load(f)["records"]
    return [(r["method"], r["m"], r["n"], r["k"],
             None if r["granularity"] == "per-channel" else
             (int(r["granularity"][1:]) if r["granularity"] else None), r["median_us"] * 1e-6)
            for r in records if r["median_us"] is not None]


def test_predictions_against_the_stored_h100_grid():
    model = CostModel(H100)
    covered = 0
    for method, m, n, k, g, seconds in h100_measurements():
        predicted = model.predict_method(method, m, n, k, g)
        if predicted is None:
            continue
        covered += 1
        assert 0.67 < predicted / seconds < 1.5, (method, m, n, k, g)
    assert covered >= 50


def test_fit_does_not_increase_the_error():
    model = CostModel(H100, costmodel.Calibration(wgmma_mma=0.6, tiled_dequant=0.6))
    data = h100_measurements()

    def loss(cal):
        m2 = model.with_calibration(cal)
        return sum((m2.predict_method(*d[:5]) / d[5] - 1) ** 2 for d in data
                   if m2.predict_method(*d[:5]) is not None)
    fitted = costmodel.fit(model, data, rounds=2)
    assert loss(fitted) < 0.5 * loss(model.cal)
    with pytest.raises(ValueError, match="no measurement"):
        costmodel.fit(model, [("int8", 16, 4096, 4096, None, 1e-5)])


# ---------------------------------------------------------------- planner

SHAPES = {"a.q_proj": (4096, 4096), "a.down_proj": (4096, 11008)}
SENSITIVITY = {"a.q_proj": {"pc": 0.010, "g128": 0.004, "g64": 0.003},
               "a.down_proj": {"pc": 0.200, "g128": 0.020, "g64": 0.015}}


def test_plan_without_accuracy_pressure_is_the_fastest():
    planner = Planner(CostModel(H100))
    plan = planner.plan_granularities(SHAPES, SENSITIVITY, budget=1.0)
    assert plan.layers == {"a.q_proj": None, "a.down_proj": None}  # per channel on an H100
    assert plan.sensitivity == SENSITIVITY


def test_plan_spends_time_where_it_buys_most_accuracy():
    planner = Planner(CostModel(H100))
    # Per channel everywhere gives 0.21; down_proj's error drops far more per
    # microsecond than q_proj's, so it alone moves to groups.
    plan = planner.plan_granularities(SHAPES, SENSITIVITY, budget=0.03)
    assert plan.layers == {"a.q_proj": None, "a.down_proj": 128}
    # The default budget: the total error of g128 everywhere.
    plan = planner.plan_granularities(SHAPES, SENSITIVITY)
    errors = sum(SENSITIVITY[n][("pc" if g is None else f"g{g}")] for n, g in plan.layers.items())
    assert errors <= 0.024 + 1e-12
    text = planner.describe(plan, SHAPES)
    assert "planned" in text and "all    pc" in text and "all  g128" in text


def test_plan_errors():
    planner = Planner(CostModel(H100))
    with pytest.raises(ValueError, match="cannot be met"):
        planner.plan_granularities(SHAPES, SENSITIVITY, budget=0.001)
    with pytest.raises(ValueError, match="no sensitivity"):
        planner.plan_granularities({**SHAPES, "b": (64, 64)}, SENSITIVITY, budget=1.0)
    with pytest.raises(ValueError, match="g256"):
        planner.plan_granularities(SHAPES, SENSITIVITY, reference="g256")
    with pytest.raises(ValueError, match="workload"):
        Planner(CostModel(H100), {0: 1.0})


def test_dominated_options_are_dropped():
    planner = Planner(CostModel(H100))
    # g64 slower than g128 on an H100 and here also less accurate: never a candidate.
    options = planner.layer_options(4096, 4096, {"pc": 0.1, "g128": 0.01, "g64": 0.02})
    assert [o.label for o in options] == ["pc", "g128"]


def test_plan_quantizes_a_model(tiny_llama):
    shapes = {n: s for n, s in linear_shapes(tiny_llama).items() if "lm_head" not in n}
    sensitivity = {n: {"pc": 0.05 if "down" in n else 0.001, "g64": 0.01} for n in shapes}
    plan = Planner(CostModel(A100)).plan_granularities(shapes, sensitivity, reference="g64")
    assert isinstance(plan, GranularityPlan)
    apex4.quantize_(tiny_llama, apex4.W4A4Config(group_size=None), plan=plan)
    for name, g in plan.layers.items():
        assert tiny_llama.get_submodule(name).group_size == g


def test_kernel_table_lists_every_variant():
    text = Planner(CostModel(H100)).kernel_table(4096, 4096, 128, [1, 2048])
    lines = text.splitlines()
    assert lines[1].split() == ["M", DECODE, WGMMA, MMA_SYNC, "pick"]
    assert lines[2].split()[-1] == DECODE and lines[3].split()[-1] in (WGMMA, MMA_SYNC)


# ---------------------------------------------------------------- backend

@pytest.mark.parametrize("tokens,kept", [(1, True), (40, False)])
def test_backend_keeps_decode_linears_and_lowers_the_rest(tiny_llama, tokens, kept):
    apex4.quantize_(tiny_llama, apex4.W4A4Config(group_size=64))
    ids = torch.randint(0, 256, (1, tokens))
    gm, inputs = captured_graph(tiny_llama, ids)
    with torch.inference_mode():
        before = gm(*inputs)
    lowered = backend.rewrite_quantized_linears(gm, Planner(CostModel(H100)))
    plan = gm.meta["apex4_kernel_plan"]
    assert len(plan) == 14 and lowered == (0 if kept else 14)
    assert all(c.kept == kept and c.m == tokens for c in plan)
    # What w4a4_gemm runs by itself: decode up to 16 tokens; g64 is not wgmma's.
    assert all(c.runs == (DECODE if kept else MMA_SYNC) for c in plan)
    assert all(c.variant == DECODE for c in plan) or not kept
    assert "w4a4_linear" in backend.format_kernel_plan(plan) or not kept
    with torch.inference_mode():
        after = gm(*inputs)
    assert torch.equal(before[0], after[0])


def test_no_planner_on_the_cpu(tiny_llama):
    apex4.quantize_(tiny_llama, apex4.W4A4Config(group_size=None))
    gm, _ = captured_graph(tiny_llama, torch.randint(0, 256, (1, 3)))
    assert backend.planner_for(gm) is None


def test_backend_modes():
    assert backend.inductor_config() == {}
    assert backend.inductor_config("reduce-overhead") == {"triton.cudagraphs": True}
    assert backend.inductor_config("default", {"max_autotune": True}) == {"max_autotune": True}
    with pytest.raises(ValueError, match="unknown torch.compile mode"):
        backend.inductor_config("fastest")
    with pytest.raises(TypeError, match="options"):
        backend.inductor_config(None, ["max_autotune"])


def test_compile_with_a_mode_on_the_cpu(tiny_llama):
    apex4.quantize_(tiny_llama, apex4.W4A4Config(group_size=None))
    torch._dynamo.reset()
    compiled = torch.compile(tiny_llama, backend="apex4", mode="reduce-overhead")
    ids = torch.randint(0, 256, (1, 5))
    with torch.inference_mode():
        torch.testing.assert_close(compiled(ids).logits, tiny_llama(ids).logits,
                                   rtol=0, atol=1e-1)


# ------------------------------------------------------ command line tools

def test_cost_model_check_passes_on_the_stored_grid(capsys):
    spec = importlib.util.spec_from_file_location(
        "cost_model_check", os.path.join(ROOT, "benchmarks", "cost_model_check.py"))
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    with pytest.raises(SystemExit) as exit_info:
        check.main([H100_JSON])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out
    assert "planner check: PASSED" in out and "A100 SXM4 80GB" in out
    assert "error per method" in out


def test_decode_table_reproduces_the_stored_decode_grid():
    # The table of 2026-12-07b was worked out by hand from the same JSON (the
    # probe's 3.02 TB/s); the script must agree with it.
    script = os.path.join(ROOT, "benchmarks", "decode_table.py")
    out = subprocess.run(
        [sys.executable, script,
         os.path.join(ROOT, "benchmarks", "results", "2026-12-07b", "h100_bench_decode_graph.json"),
         "--probe-json", os.path.join(ROOT, "benchmarks", "results", "2026-12-07", "h100_probe.json")],
        capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=ROOT)).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines()[2:]]
    assert len(rows) == 12
    first, last = [c.strip() for c in rows[0]], [c.strip() for c in rows[-1]]
    assert first[:8] == ["7B 4096->4096", "1", "16.8", "16.0", "8.2", "2.05", "1.96", "34"]
    assert last[:8] == ["70B 28672->8192", "16", "157.6", "118.1", "66.2", "2.38", "1.79", "59"]


def test_cli_rho_and_plan():
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "torch_apex4", "rho"], capture_output=True,
                         text=True, env=env, check=True).stdout
    assert "H100 SXM5" in out and "64.0" in out
    out = subprocess.run([sys.executable, "-m", "torch_apex4", "plan", "--gpu", "RTX 3090",
                          "--shape", "4096", "4096", "--tokens", "1", "4096",
                          "--granularities", "g128"], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert "GeForce RTX 3090: N=4096 K=4096 g128" in out
    bad = subprocess.run([sys.executable, "-m", "torch_apex4", "plan", "--gpu", "B200"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "B200" in bad.stderr
