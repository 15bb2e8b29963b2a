"""GPTQ on the apex4 grid, clip-ratio searches, and the sequential calibration pass (CPU)."""
import copy
import math

import pytest
import torch
from torch import nn

import torch_apex4 as apex4
from torch_apex4.gptq import (CLIP_CANDIDATES, calibrate_gptq_, dequantize, gptq_quantize,
                              hessian_from_inputs, output_error, row_output_errors,
                              search_act_clip, search_weight_clip)
from torch_apex4.rotation import RotatedInputLinear

ops = torch.ops.apex4
N, K = 64, 200  # K = 200 is not a multiple of 64: g64 pads to 256, per channel too


def correlated_inputs(tokens=2048, k=K, seed=0):
    """Inputs whose features are strongly correlated, as a transformer's are."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=generator) / math.sqrt(k) + 0.3 * torch.eye(k)
    return torch.randn(tokens, k, generator=generator) @ mixing


@pytest.fixture
def layer():
    torch.manual_seed(0)
    x = correlated_inputs()
    return torch.randn(N, K), x, hessian_from_inputs(x)


def rtn(weight, group_size, clip=1.0):
    w_q, w_s = ops.quantize_weight(weight, group_size, clip)
    return ops.unpack_int4(w_q), w_s


@pytest.mark.parametrize("group_size", [64, None])
def test_layout_padding_and_gemm(layer, group_size):
    weight, x, hessian = layer
    values, scales = gptq_quantize(weight, hessian, group_size)
    kp = apex4.padded_k(K, group_size)
    assert values.dtype == torch.int8 and values.shape == (N, kp)
    assert scales.dtype == torch.float32 and scales.shape == (N, apex4.num_groups(K, group_size))
    assert values.abs().max() <= 7 and torch.all(values[:, K:] == 0)

    a_q, a_s = ops.quantize_act(x[:16], group_size)
    out = ops.w4a4_gemm(a_q, a_s, ops.pack_int4(values), scales)
    expected = dequantize(ops.unpack_int4(a_q), a_s) @ dequantize(values, scales).T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("group_size", [64, 128, None])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(layer, group_size, act_order):
    weight, _, hessian = layer
    values, scales = gptq_quantize(weight, hessian, group_size, act_order=act_order)
    gptq_error = output_error(weight, dequantize(values, scales), hessian)
    rtn_error = output_error(weight, dequantize(*rtn(weight, group_size)), hessian)
    assert gptq_error <= 0.8 * rtn_error, (gptq_error, rtn_error)


@pytest.mark.parametrize("group_size", [64, None])
@pytest.mark.parametrize("clip", [1.0, 0.85])
def test_identity_hessian_gives_rtn_exactly(layer, group_size, clip):
    # Uncorrelated inputs: no error feedback, so GPTQ must reproduce the kernels' rounding.
    weight = layer[0]
    values, scales = gptq_quantize(weight, torch.eye(K), group_size, clip)
    rtn_values, rtn_scales = rtn(weight, group_size, clip)
    assert torch.equal(values, rtn_values) and torch.equal(scales, rtn_scales)


def test_act_order_keeps_groups_in_natural_order(layer):
    # Static groups: the scales are those of the original weights' groups, in K order.
    weight, _, hessian = layer
    _, scales = gptq_quantize(weight, hessian, 64, act_order=True)
    assert torch.equal(scales, rtn(weight, 64)[1])


@pytest.mark.parametrize("group_size", [64, None])
def test_block_size_does_not_change_the_result(layer, group_size):
    weight, _, hessian = layer
    reference = gptq_quantize(weight, hessian, group_size, block_size=128)[0]
    for block_size in (1, 32, 200):
        assert torch.equal(gptq_quantize(weight, hessian, group_size, block_size=block_size)[0],
                           reference)


def test_dead_inputs_get_zero_weights(layer):
    weight, x, _ = layer
    x[:, [3, 150]] = 0  # inputs never active in calibration
    values, scales = gptq_quantize(weight, hessian_from_inputs(x), 64)
    assert torch.all(values[:, [3, 150]] == 0) and torch.isfinite(scales).all()


def test_per_row_clip_ratios(layer):
    weight, _, hessian = layer
    clips = torch.linspace(0.7, 1.0, N)
    values, scales = gptq_quantize(weight, hessian, None, clips)
    amax = weight.abs().amax(1)
    torch.testing.assert_close(scales[:, 0], amax * clips / 7, rtol=0, atol=0)


@pytest.mark.parametrize("group_size", [64, None])
def test_weight_clip_search(layer, group_size):
    weight, _, hessian = layer

    def error(clip):
        quantized = dequantize(*gptq_quantize(weight, hessian, group_size, clip))
        return row_output_errors(weight, quantized, hessian)

    best = search_weight_clip(weight, hessian, group_size)
    assert best in CLIP_CANDIDATES
    assert error(best).sum() <= error(1.0).sum()
    per_row = search_weight_clip(weight, hessian, group_size, per_row=True)
    assert per_row.shape == (N,) and torch.isin(per_row, torch.tensor(CLIP_CANDIDATES)).all()
    assert error(per_row).sum() <= error(best).sum() * (1 + 1e-6)


@pytest.mark.parametrize("group_size", [64, None])
def test_act_clip_search(group_size):
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((512, K))  # heavy tails: clipping pays
    weight = torch.randn(N, K)

    def error(clip):
        a_q, a_s = ops.quantize_act(x, group_size, clip)
        w_q, w_s = ops.quantize_weight(weight, group_size)
        return (ops.w4a4_gemm(a_q, a_s, w_q, w_s) - x @ weight.T).norm()

    quantized_weight = dequantize(*rtn(weight, group_size))[:, :K]
    best = search_act_clip(x, weight, group_size, quantized_weight=quantized_weight)
    assert best in CLIP_CANDIDATES and best < 1.0
    assert error(best) <= error(1.0)


@pytest.mark.parametrize("call,error", [
    (lambda h: gptq_quantize(torch.randn(2, 3, K), h, 64), ValueError),
    (lambda h: gptq_quantize(torch.randn(N, K), h[:-1, :-1], 64), ValueError),
    (lambda h: gptq_quantize(torch.randint(0, 5, (N, K)), h, 64), TypeError),
    (lambda h: gptq_quantize(torch.randn(N, K), h, 96), ValueError),
    (lambda h: gptq_quantize(torch.randn(N, K), h, 64, clip_ratio=1.5), ValueError),
    (lambda h: gptq_quantize(torch.randn(N, K), h * float("nan"), 64), ValueError),
    (lambda h: search_weight_clip(torch.randn(N, K), h, 64, candidates=()), ValueError),
    (lambda h: search_act_clip(torch.randn(8, K + 1), torch.randn(N, K), 64), ValueError),
])
def test_bad_input(layer, call, error):
    with pytest.raises(error):
        call(layer[2])


# --- the sequential calibration pass --------------------------------------------------------


def tiny_llama_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def logits_error(model, reference, ids):
    with torch.no_grad():
        out, ref = model(ids).logits, reference(ids).logits
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("group_size,search", [(64, True), (None, False)])
def test_calibrate_tiny_llama(group_size, search):
    original = tiny_llama_model()
    calibration = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(1))
    held_out = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(2))
    config = apex4.W4A4Config(group_size=group_size)
    candidates = (1.0, 0.9, 0.8) if search else None

    model = copy.deepcopy(original)
    stats = calibrate_gptq_(model, calibration, config, progress=False,
                            weight_clip_candidates=candidates, act_clip_candidates=candidates)

    quantized = {n for n, m in model.named_modules() if isinstance(m, apex4.W4A4Linear)}
    linears = {n for n, m in original.named_modules() if isinstance(m, nn.Linear)}
    assert quantized == linears - {"lm_head"} and len(quantized) == 14
    assert type(model.lm_head) is nn.Linear
    assert set(stats) == quantized
    for layer_stats in stats.values():
        assert 0 < layer_stats["output_error"] < 1 and 0 < layer_stats["weight_error"] < 1
        assert layer_stats["weight_clip"] in (candidates or (1.0,))
        assert layer_stats["act_clip"] in (candidates or (1.0,))

    rtn_model = apex4.quantize_(copy.deepcopy(original), config)
    assert logits_error(model, original, held_out) < logits_error(rtn_model, original, held_out)


def test_calibrate_follows_a_plan_and_measures_sensitivity():
    from torch_apex4.plan import GranularityPlan

    original = tiny_llama_model()
    calibration = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    planned = {"model.layers.0.self_attn.v_proj": 64, "model.layers.1.mlp.down_proj": 128}
    model = copy.deepcopy(original)
    stats = calibrate_gptq_(model, calibration, apex4.W4A4Config(group_size=None), progress=False,
                            plan=GranularityPlan(planned), sensitivity_granularities=(None, 64))
    sizes = {n: m.group_size for n, m in model.named_modules() if isinstance(m, apex4.W4A4Linear)}
    assert sizes == {n: planned.get(n) for n in sizes}
    for name, layer_stats in stats.items():
        assert layer_stats["granularity"] == ("pc" if sizes[name] is None else f"g{sizes[name]}")
        assert set(layer_stats["sensitivity"]) == {"pc", "g64"}
        if sizes[name] in (None, 64):  # the deployed granularity is measured once
            label = layer_stats["granularity"]
            assert layer_stats["sensitivity"][label] == layer_stats["output_error"]
    # Groups beat per channel on most layers.
    gains = [s["sensitivity"]["pc"] > s["sensitivity"]["g64"] for s in stats.values()]
    assert sum(gains) >= 0.75 * len(gains)
    # Block 0 sees the same inputs whatever the plan: its per-channel sensitivity is the error of
    # a per-channel calibration.
    per_channel = calibrate_gptq_(copy.deepcopy(original), calibration,
                                  apex4.W4A4Config(group_size=None), progress=False)
    for name in [n for n in stats if n.startswith("model.layers.0.")]:
        assert stats[name]["sensitivity"]["pc"] == pytest.approx(
            per_channel[name]["output_error"], rel=1e-6)


def test_calibrate_rejects_a_plan_for_other_layers():
    from torch_apex4.plan import GranularityPlan

    with pytest.raises(ValueError, match="not linear layers to quantize"):
        calibrate_gptq_(tiny_llama_model(), torch.zeros(2, 8, dtype=torch.long),
                        apex4.W4A4Config(), plan=GranularityPlan({"lm_head": 128}))


class Block(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.rotated = RotatedInputLinear.from_linear(nn.Linear(features, features))
        self.plain = nn.Linear(features, features)

    def forward(self, x):
        return x + self.plain(torch.relu(self.rotated(x)))


class ToyModel(nn.Module):
    """Not a Hugging Face model: blocks in a ModuleList, forward without use_cache."""

    def __init__(self, vocab=64, features=128, blocks=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, features)
        self.blocks = nn.ModuleList(Block(features) for _ in range(blocks))
        self.head = nn.Linear(features, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_sequential_pass_with_rotated_inputs():
    torch.manual_seed(0)
    model = ToyModel()
    original = copy.deepcopy(model)
    ids = torch.randint(0, 64, (4, 32))
    calibrate_gptq_(model, ids, apex4.W4A4Config(group_size=64), progress=False,
                    filter_fn=lambda m, name: name != "head", batch_size=4)

    rotated, last = original.blocks[1].rotated, model.blocks[1].rotated
    assert isinstance(last, apex4.W4A4Linear) and torch.equal(last.rotation, rotated.rotation)
    # Block 1 was calibrated on the outputs of the *quantized* block 0, through its rotation.
    with torch.no_grad():
        block_input = model.blocks[0](model.embed(ids))
        hessian = hessian_from_inputs(rotated.input_rotation(block_input))
    values, scales = gptq_quantize(rotated.weight, hessian, 64)
    assert torch.equal(last.w_q, ops.pack_int4(values)) and torch.equal(last.w_s, scales)
    # The quantized layer rotates online like the float one.
    x = torch.randn(3, 128)
    with torch.no_grad():
        expected = ops.w4a4_linear(rotated.input_rotation(x), last.w_q, last.w_s, last.bias)
    torch.testing.assert_close(last(x), expected, rtol=1e-4, atol=1e-4)


def test_calibrate_bad_input():
    model = tiny_llama_model()
    with pytest.raises(TypeError, match="W4A4Config"):
        calibrate_gptq_(model, torch.zeros(2, 8, dtype=torch.long), {"group_size": 128})
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        calibrate_gptq_(model, torch.zeros(8, dtype=torch.long), apex4.W4A4Config())
    with pytest.raises(TypeError, match="token ids"):
        calibrate_gptq_(model, torch.zeros(2, 8), apex4.W4A4Config())
