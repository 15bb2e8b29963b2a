"""Tensor parallelism: sharding rules on one process, and 2-process gloo runs
whose logits must match the single-process model's."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torch_apex4 as apex4
from torch_apex4.parallel import RowParallelLinear, parallelize_, tensor_parallel_shards

# Per-channel layers must gather their input; 704 = 5.5 groups of 128 makes
# uneven g128 shards with a zero-padded tail on the last rank.
CONFIG = dict(vocab_size=256, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
SCENARIOS = {
    "float": dict(rotate=None, group_size=None, quantize=False),
    "g128": dict(rotate=None, group_size=128, quantize=True),
    "per-channel": dict(rotate=None, group_size=None, quantize=True),
    "rotated-g64": dict(rotate="residual", group_size=64, quantize=True),
    "rotated-float": dict(rotate="online", group_size=None, quantize=False),
}


def _model(scenario, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**CONFIG, **config})).eval()
    spec = SCENARIOS[scenario]
    if spec["rotate"]:
        apex4.rotate_(model, spec["rotate"])
    if spec["quantize"]:
        apex4.quantize_(model, apex4.W4A4Config(group_size=spec["group_size"]))
    return model


def _logits(model, tokens):
    """Logits of a prefill, then of one decode step through the KV cache."""
    with torch.no_grad():
        first = model(tokens[:, :-1], use_cache=True)
        step = model(tokens[:, -1:], past_key_values=first.past_key_values, use_cache=True)
    return torch.cat([first.logits, step.logits], dim=1)


def _relative_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def _worker(rank, world, init_file, checkpoint, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        tokens = torch.randint(0, CONFIG["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
        errors = {}
        for scenario in SCENARIOS:
            want = _logits(_model(scenario), tokens)
            got = _logits(parallelize_(_model(scenario), tp_size=world), tokens)
            errors[scenario] = _relative_error(got, want)
        want = _logits(apex4.load_quantized(checkpoint), tokens)
        got = _logits(parallelize_(apex4.load_quantized(checkpoint)), tokens)
        errors["checkpoint"] = _relative_error(got, want)
        if rank == 0:
            with open(result_file, "w") as f:
                json.dump(errors, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path):
    checkpoint = tmp_path / "ckpt"
    apex4.save_quantized(_model("rotated-g64"), checkpoint, base_model="random tiny llama")
    result = tmp_path / "errors.json"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(checkpoint), str(result)), nprocs=2,
             join=True)
    errors = json.loads(result.read_text())
    # Activations are quantized from the same values as in one process; only
    # the order of the float sums across ranks differs.
    assert set(errors) == set(SCENARIOS) | {"checkpoint"}
    assert all(e < 1e-5 for e in errors.values()), errors


def test_shards_follow_heads_and_groups():
    model = _model("g128")
    shards = tensor_parallel_shards(model, 2)
    assert shards[0].query == (0, 128, 256) and shards[0].key_value == (0, 64, 128)
    assert shards[0].intermediate == (0, 384, 704)  # 6 groups of 128 (last one padded)
    assert tensor_parallel_shards(_model("per-channel"), 2)[0].intermediate == (0, 320, 704)


def test_bad_splits_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="heads cannot be split"):
        tensor_parallel_shards(tiny_llama, 4)  # 2 key/value heads
    # tiny_llama: head_dim 32, so 3 heads = 96 features: not a multiple of 128.
    apex4.quantize_(tiny_llama, apex4.W4A4Config(group_size=128))
    with pytest.raises(ValueError, match="straddle"):
        tensor_parallel_shards(tiny_llama, 2)
    with pytest.raises(ValueError, match="cannot give each"):
        tensor_parallel_shards(_model("g128", intermediate_size=64), 2)  # one K unit
    with pytest.raises(ValueError, match="positive int"):
        tensor_parallel_shards(tiny_llama, 0)


def test_parallelize_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(ValueError, match="not initialised"):
        parallelize_(_model("g128"))


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="Llama-style"):
        tensor_parallel_shards(torch.nn.Sequential(torch.nn.Linear(4, 4)), 2)


def test_row_parallel_layer_keeps_float32_scales():
    layer = _model("g128").model.layers[0].mlp.down_proj
    row = RowParallelLinear(layer, (0, 384, 704), 1, group=None).half()
    assert row.w_s.dtype == torch.float32 and row.w_q.dtype == torch.uint8
    assert row.w_q.shape == (256, (768 - 384) // 2) and row.w_s.shape == (256, 3)
