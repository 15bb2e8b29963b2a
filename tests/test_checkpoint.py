"""save_quantized / load_quantized round trips, their errors, and the command line."""
import json

import pytest
import torch
from torch import nn

import torch_apex4 as apex4
from torch_apex4 import checkpoint
from torch_apex4.checkpoint import load_quantized, save_quantized
from torch_apex4.plan import GranularityPlan
from torch_apex4.quantize import consecutive_rows
from torch_apex4.rotation import RotatedInputLinear, rotate_


def tiny_quantized_llama(tie_word_embeddings=True, group_size=64, plan=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, tie_word_embeddings=tie_word_embeddings)
    model = LlamaForCausalLM(config).eval()
    return apex4.quantize_(model, apex4.W4A4Config(group_size=group_size), plan=plan)


def logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


def unique_tensor_bytes(model):
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in model.state_dict().values()}
    return sum(storages.values())


@pytest.mark.parametrize("group_size", [64, None])
@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_is_exact(tmp_path, tie, group_size):
    plan = GranularityPlan({"model.layers.0.mlp.down_proj": None, "model.layers.1.mlp.down_proj": 128},
                           {"model.layers.0.mlp.down_proj": {"pc": 0.03, "g128": 0.01}})
    model = tiny_quantized_llama(tie, group_size, plan)
    model.generation_config.max_new_tokens = 7
    save_quantized(model, tmp_path, base_model="tiny-llama", plan=plan)
    loaded = load_quantized(tmp_path)

    ids = torch.randint(0, 256, (2, 23))
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    for name, tensor in saved_state.items():
        assert tensor.dtype == loaded_state[name].dtype and torch.equal(tensor, loaded_state[name]), name
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    assert unique_tensor_bytes(loaded) == unique_tensor_bytes(model)
    assert apex4.linear_weight_bytes(loaded) == apex4.linear_weight_bytes(model)
    layers = {n: m.group_size for n, m in loaded.named_modules() if isinstance(m, apex4.W4A4Linear)}
    assert len(layers) == 14 and layers == {n: plan.granularity(n, group_size) for n in layers}
    assert not loaded.training
    assert loaded.generation_config.max_new_tokens == 7
    assert loaded.apex4_checkpoint == {"base_model": "tiny-llama", "plan": plan, "rotation": None}
    for layer in loaded.model.layers:  # stored apart, fused again on loading
        attn = layer.self_attn
        assert consecutive_rows([attn.q_proj.w_q, attn.k_proj.w_q, attn.v_proj.w_q])


@pytest.mark.parametrize("quantize_down_proj", [True, False])
def test_rotated_model_round_trip_is_exact(tmp_path, quantize_down_proj):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4)).eval()
    rotation = rotate_(model)
    # Skipping down_proj leaves float RotatedInputLinear layers in the model.
    apex4.quantize_(model, apex4.W4A4Config(group_size=64), filter_fn=lambda m, name: (
        name != "lm_head" and (quantize_down_proj or "down_proj" not in name)))
    save_quantized(model, tmp_path, base_model="tiny-llama", rotation=rotation)
    loaded = load_quantized(tmp_path)

    ids = torch.randint(0, 256, (2, 23))
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    rotated = {name for name, m in loaded.named_modules() if getattr(m, "rotation", None) is not None}
    assert rotated == set(rotation["online_layers"])
    down_proj = loaded.model.layers[1].mlp.down_proj
    assert isinstance(down_proj, apex4.W4A4Linear if quantize_down_proj else RotatedInputLinear)
    assert torch.equal(down_proj.rotation, model.model.layers[1].mlp.down_proj.rotation)
    assert loaded.apex4_checkpoint["rotation"] == rotation
    config = checkpoint.read_checkpoint_config(tmp_path)
    online = rotation["online_layers"]
    assert [n for n, e in config["layers"].items() if e["act_rotation"]] == [
        n for n in online if quantize_down_proj or "o_proj" in n]
    assert config["rotated_float_layers"] == [
        n for n in online if not quantize_down_proj and "down_proj" in n]


def test_loaded_model_compiles_with_the_apex4_backend(tmp_path):
    save_quantized(tiny_quantized_llama(), tmp_path, base_model="tiny-llama")
    loaded = load_quantized(tmp_path)
    ids = torch.randint(0, 256, (1, 19))
    torch._dynamo.reset()
    compiled = torch.compile(loaded, backend="apex4", fullgraph=True)
    eager, out = logits(loaded, ids), logits(compiled, ids)
    # Inductor may reorder float reductions: close, not bit-identical (see test_model.py).
    torch.testing.assert_close(out, eager, rtol=0, atol=2e-2 * eager.abs().max().item())


def test_tied_and_overlapping_tensors_are_stored_once():
    base = torch.arange(12.0).reshape(3, 4)
    state = {"a": base, "b": base, "c": base[1:], "d": base.t(), "e": torch.empty(0), "f": torch.empty(0)}
    tensors, tied = checkpoint._deduplicated_state_dict(state)
    assert tied == {"b": "a"}
    assert tensors.keys() == {"a", "c", "d", "e", "f"}
    assert tensors["a"] is base
    for name, expected in (("c", base[1:]), ("d", base.t())):
        assert tensors[name].is_contiguous() and torch.equal(tensors[name], expected)
        assert tensors[name].untyped_storage().data_ptr() != base.untyped_storage().data_ptr()


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="rotation must be JSON-serializable"):
        save_quantized(tiny_quantized_llama(), tmp_path, base_model="x", rotation={"a": torch.ones(1)})


def test_plan_must_match_the_model(tmp_path):
    model = tiny_quantized_llama(group_size=64)
    with pytest.raises(TypeError, match="GranularityPlan"):
        save_quantized(model, tmp_path, base_model="x", plan={"model.layers.0.mlp.up_proj": 64})
    with pytest.raises(ValueError, match="up_proj pc, but the layer is g64"):
        save_quantized(model, tmp_path, base_model="x",
                       plan=GranularityPlan({"model.layers.0.mlp.up_proj": None}))
    with pytest.raises(ValueError, match="lm_head, which is not a quantized layer"):
        save_quantized(model, tmp_path, base_model="x", plan=GranularityPlan({"lm_head": 64}))


# ----------------------------------------------------------------------------- errors

@pytest.fixture
def saved(tmp_path):
    directory = tmp_path / "ckpt"
    save_quantized(tiny_quantized_llama(), directory, base_model="tiny-llama")
    return directory


def edit_config(directory, edit):
    path = directory / checkpoint.CONFIG_FILE
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def record_weights_file_as_valid(directory):
    """Make the config's size and checksum agree with the weights file, so the
    load gets past them to the checks behind."""
    weights = directory / checkpoint.WEIGHTS_FILE

    def update(config):
        config["weights"].update(bytes=weights.stat().st_size, sha256=checkpoint._sha256(weights))

    edit_config(directory, update)


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_missing_directory_or_files(tmp_path, saved):
    with pytest.raises(ValueError, match="does not exist"):
        load_quantized(tmp_path / "nowhere")
    (saved / checkpoint.WEIGHTS_FILE).unlink()
    with pytest.raises(ValueError, match="model.safetensors is missing"):
        load_quantized(saved)
    (saved / checkpoint.CONFIG_FILE).unlink()
    with pytest.raises(ValueError, match="apex4_config.json is missing"):
        load_quantized(saved)


def test_corrupted_weights_fail_the_checksum(saved):
    weights = saved / checkpoint.WEIGHTS_FILE
    flip_byte(weights, weights.stat().st_size // 2)
    with pytest.raises(ValueError, match="checksum"):
        load_quantized(saved)


def test_truncated_weights(saved):
    weights = saved / checkpoint.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="truncated"):
        load_quantized(saved)


def test_corrupted_safetensors_header(saved):
    # Byte 8 opens the JSON header; a checksum recomputed after the damage
    # leaves the safetensors parser to notice.
    flip_byte(saved / checkpoint.WEIGHTS_FILE, 8)
    record_weights_file_as_valid(saved)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_quantized(saved)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(format_version=99), "format_version 99, newer"),
    (lambda c: c.update(format="something-else"), "not a torch_apex4 checkpoint"),
    (lambda c: c.pop("layers"), "lacks the fields \\['layers'\\]"),
])
def test_config_not_ours_or_too_new(saved, edit, message):
    edit_config(saved, edit)
    with pytest.raises(ValueError, match=message):
        load_quantized(saved)


@pytest.mark.parametrize("plan,message", [
    ({"layers": {"model.layers.0.mlp.up_proj": "g96"}}, "up_proj: .*multiple of 64"),
    ({"layers": {"model.layers.0.mlp.up_proj": "pc"}}, "plan gives model.layers.0.mlp.up_proj pc"),
    ({"layers": {}, "sensitivity": {"x": {"g64": -1.0}}}, "non-negative"),
])
def test_stored_plan_is_checked(saved, plan, message):
    edit_config(saved, lambda c: c.update(plan=plan))
    with pytest.raises(ValueError, match=message):
        load_quantized(saved)


def test_config_that_is_not_json(saved):
    (saved / checkpoint.CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_quantized(saved)


def test_layer_group_size_disagreeing_with_the_tensors(saved):
    edit_config(saved, lambda c: c["layers"]["model.layers.0.self_attn.q_proj"].update(group_size=128))
    with pytest.raises(ValueError, match=r"q_proj.w_s has shape \[128, 2\] in the weights file but \[128, 1"):
        load_quantized(saved)


def test_layer_features_disagreeing_with_the_model(saved):
    edit_config(saved, lambda c: c["layers"]["model.layers.0.mlp.up_proj"].update(out_features=512))
    with pytest.raises(ValueError, match="up_proj: the checkpoint says in/out features 128/512"):
        load_quantized(saved)


def test_layer_missing_from_the_model(saved):
    def rename(config):
        config["layers"]["model.layers.7.mlp.up_proj"] = config["layers"].pop("model.layers.0.mlp.up_proj")

    edit_config(saved, rename)
    with pytest.raises(ValueError, match="layers.7.mlp.up_proj, which the rebuilt LlamaForCausalLM does not"):
        load_quantized(saved)


@pytest.mark.parametrize("tie,group_size,message", [
    (False, 64, "does not match the config's tied_weights"),
    (True, None, r"w_s has shape \[128, 1\] in the weights file but \[128, [24]\]"),
])
def test_weights_file_of_another_model(tmp_path, saved, tie, group_size, message):
    other = tmp_path / "other"
    save_quantized(tiny_quantized_llama(tie, group_size), other, base_model="tiny-llama")
    (other / checkpoint.WEIGHTS_FILE).replace(saved / checkpoint.WEIGHTS_FILE)
    record_weights_file_as_valid(saved)
    with pytest.raises(ValueError, match=message):
        load_quantized(saved)


# ----------------------------------------------------------------------------- command line

def test_command_line_quantize_and_info(tmp_path, monkeypatch, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    import torch_apex4.models

    torch.manual_seed(0)
    float_model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                               num_hidden_layers=2, num_attention_heads=4)).eval()
    monkeypatch.setattr(torch_apex4.models, "load_model", lambda path, dtype: (float_model, None))
    out = tmp_path / "ckpt"
    plan = GranularityPlan({"model.layers.1.self_attn.v_proj": 64}).save(tmp_path / "plan.json")
    checkpoint.main(["quantize", "--model", "tiny", "--group-size", "channel", "--plan", str(plan),
                     "--out", str(out)])
    assert f"wrote {out}" in capsys.readouterr().out
    loaded = load_quantized(out)
    assert {n: m.group_size for n, m in loaded.named_modules() if isinstance(m, apex4.W4A4Linear)
            if m.group_size is not None} == {"model.layers.1.self_attn.v_proj": 64}
    assert loaded.apex4_checkpoint["plan"] == GranularityPlan.load(plan)
    checkpoint.main(["info", str(out)])
    info = capsys.readouterr().out
    assert "W4A4 layers:   14 (1 g64, 13 per-channel)" in info and "base model:    tiny" in info
    assert "plan:          {'g64': 1}" in info


def test_float_layers_stay_float(tmp_path, saved):
    loaded = load_quantized(saved)
    assert type(loaded.lm_head) is nn.Linear
