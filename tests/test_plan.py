"""GranularityPlan: labels, validation, JSON round trip, and quantize_ following a plan."""
import copy

import pytest
import torch

import torch_apex4 as apex4
from torch_apex4.plan import (GranularityPlan, granularity_label, parse_granularity,
                             same_layout, select_granularities)

V_PROJ = "model.layers.0.self_attn.v_proj"
UP_PROJ = "model.layers.1.mlp.up_proj"


@pytest.mark.parametrize("g,label", [(None, "pc"), (64, "g64"), (128, "g128"), (256, "g256"),
                                     (4096, "g4096")])
def test_labels_round_trip(g, label):
    assert granularity_label(g) == label and parse_granularity(label) == g


@pytest.mark.parametrize("label", ["g96", "g0", "g-64", "g064", "G128", "128", "pc ", "", "per-channel"])
def test_bad_labels(label):
    with pytest.raises(ValueError):
        parse_granularity(label)


@pytest.mark.parametrize("g,error", [(96, ValueError), (0, ValueError), (-64, ValueError),
                                     (True, TypeError), (128.0, TypeError), ("g128", TypeError)])
def test_bad_granularities(g, error):
    with pytest.raises(error):
        granularity_label(g)


def sample_plan():
    return GranularityPlan({V_PROJ: 64, UP_PROJ: None},
                           {V_PROJ: {"pc": 0.2, "g128": 0.05, "g64": 0.04}, UP_PROJ: {"pc": 0.01}})


def test_dict_and_file_round_trip(tmp_path):
    plan = sample_plan()
    d = plan.to_dict()
    assert d["layers"] == {V_PROJ: "g64", UP_PROJ: "pc"}
    assert GranularityPlan.from_dict(d) == plan
    assert GranularityPlan.load(plan.save(tmp_path / "plan.json")) == plan
    assert plan.granularity(V_PROJ, 128) == 64 and plan.granularity(UP_PROJ, 128) is None
    assert plan.granularity("model.layers.0.mlp.up_proj", 128) == 128
    assert plan.counts() == {"g64": 1, "pc": 1}


def test_str_is_a_table():
    lines = str(sample_plan()).splitlines()
    assert lines[0].split() == ["layer", "plan", "err", "pc", "err", "g64", "err", "g128"]
    assert lines[1].split() == [V_PROJ, "g64", "0.2", "0.04", "0.05"]
    assert lines[2].split() == [UP_PROJ, "pc", "0.01", "-", "-"]
    assert lines[-1] == "2 layers: 1 g64, 1 pc"


@pytest.mark.parametrize("d,message", [
    ([], "is a dict"),
    ({"sensitivity": {}}, "keys 'layers'"),
    ({"layers": {}, "extra": 1}, "keys 'layers'"),
    ({"layers": []}, "must be dicts"),
    ({"layers": {V_PROJ: "g100"}}, "v_proj: .*multiple of 64"),
    ({"layers": {V_PROJ: 128}}, "v_proj: .*label is a string"),
    ({"layers": {"": "pc"}}, "non-empty strings"),
    ({"layers": {}, "sensitivity": {V_PROJ: {"g7": 0.1}}}, "sensitivity of .*v_proj"),
    ({"layers": {}, "sensitivity": {V_PROJ: {"pc": float("nan")}}}, "finite non-negative"),
    ({"layers": {}, "sensitivity": {V_PROJ: {"pc": "0.1"}}}, "finite non-negative"),
    ({"layers": {}, "sensitivity": {V_PROJ: 0.1}}, "must be a dict"),
])
def test_from_dict_names_the_problem(d, message):
    with pytest.raises(ValueError, match=message):
        GranularityPlan.from_dict(d)


def test_load_of_a_file_that_is_not_json(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        GranularityPlan.load(path)


def test_quantize_follows_the_plan(tiny_llama):
    plan = GranularityPlan({V_PROJ: 64, UP_PROJ: 128})
    model = apex4.quantize_(copy.deepcopy(tiny_llama), apex4.W4A4Config(group_size=None), plan=plan)
    sizes = {n: m.group_size for n, m in model.named_modules() if isinstance(m, apex4.W4A4Linear)}
    assert len(sizes) == 14
    assert sizes == {n: plan.granularity(n, None) for n in sizes}
    # The planned layer is exactly what a model-wide quantize_ at its granularity makes.
    uniform = apex4.quantize_(copy.deepcopy(tiny_llama), apex4.W4A4Config(group_size=64))
    planned, reference = model.get_submodule(V_PROJ), uniform.get_submodule(V_PROJ)
    assert torch.equal(planned.w_q, reference.w_q) and torch.equal(planned.w_s, reference.w_s)


@pytest.mark.parametrize("layers,message", [
    ({"model.layers.9.mlp.up_proj": 64}, "not linear layers to quantize"),
    ({"lm_head": 64}, "not linear layers to quantize"),  # filtered out by default
])
def test_quantize_rejects_a_plan_for_another_model(tiny_llama, layers, message):
    with pytest.raises(ValueError, match=message):
        apex4.quantize_(tiny_llama, apex4.W4A4Config(), plan=GranularityPlan(layers))
    assert not any(isinstance(m, apex4.W4A4Linear) for m in tiny_llama.modules())


def test_quantize_rejects_a_plan_that_is_a_dict(tiny_llama):
    with pytest.raises(TypeError, match="GranularityPlan"):
        apex4.quantize_(tiny_llama, apex4.W4A4Config(), plan={V_PROJ: 64})


def test_select_granularities_gives_the_budget_to_the_largest_gains():
    sensitivity = {"a": {"pc": 0.30, "g128": 0.10},   # gain 0.20
                   "b": {"pc": 0.05, "g128": 0.04},   # gain 0.01
                   "c": {"pc": 0.50, "g128": 0.45, "g64": 0.3},  # gain 0.05
                   "d": {"pc": 0.20, "g128": 0.08}}   # gain 0.12
    assert select_granularities(sensitivity, 0.5) == {"a": 128, "b": None, "c": None, "d": 128}
    assert select_granularities(sensitivity, 0.0) == dict.fromkeys(sensitivity, None)
    assert select_granularities(sensitivity, 1.0) == dict.fromkeys(sensitivity, 128)
    assert select_granularities(sensitivity, 0.25) == {"a": 128, "b": None, "c": None, "d": None}
    with pytest.raises(ValueError, match="no sensitivity of a at \\['g64'\\]"):
        select_granularities(sensitivity, 0.5, fine=64)
    with pytest.raises(ValueError, match="budget"):
        select_granularities(sensitivity, 1.5)


def test_one_group_over_all_of_k_is_per_channel():
    assert same_layout(128, 128, None) and same_layout(100, 128, None)
    assert not same_layout(576, 128, None) and not same_layout(192, 128, None)
    assert same_layout(576, 64, 64) and not same_layout(576, 64, 192)
