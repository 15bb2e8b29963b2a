"""rotate_: the rotated float model computes the same function; the rotated
quantized model runs the fused online rotation and compiles."""
import copy

import pytest
import torch

import torch_apex4 as apex4
from graphs import captured_graph
from torch_apex4.backend import W4A4_ROTATED_LINEAR, rewrite_quantized_linears
from torch_apex4.rotation import RotatedInputLinear, _smoothing_scales, rotate_, smooth_


def llama(tie=False, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = dict(vocab_size=256, hidden_size=192, intermediate_size=320, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=tie)
    config.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    # Non-trivial norm scales, so that folding them is exercised.
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = 1 + 0.3 * torch.randn_like(p)
    return model


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=192, intermediate_size=320,
                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2)
    return Qwen2ForCausalLM(config).eval()


def gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=256, hidden_size=192, intermediate_size=320,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=48, sliding_window=16)
    return Gemma3ForCausalLM(config).eval()


def logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("mode,online_per_layer", [("residual", 2), ("online", 7)])
@pytest.mark.parametrize("build", [llama, lambda: llama(tie=True), qwen2],
                         ids=["llama", "llama-tied", "qwen2"])
def test_rotation_preserves_the_float_model(build, mode, online_per_layer):
    model = build()
    ids = torch.randint(0, 256, (2, 24))
    before = logits(model, ids)
    info = rotate_(model, mode)
    assert info["mode"] == mode
    assert len(info["online_layers"]) == online_per_layer * 2
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)


def test_bad_rotation_mode():
    with pytest.raises(ValueError, match="mode"):
        rotate_(llama(), "sideways")


def test_unknown_architecture_falls_back_to_online_rotation():
    model = gemma3()
    ids = torch.randint(0, 256, (1, 20))
    before = logits(model, ids)
    with pytest.warns(UserWarning, match="online"):
        info = rotate_(model)
    assert info["mode"] == "online"
    assert len(info["online_layers"]) == 7 * 2
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)
    apex4.quantize_(model, apex4.W4A4Config(group_size=64))
    assert all(m.rotation is not None for m in model.modules() if isinstance(m, apex4.W4A4Linear))
    assert torch.isfinite(logits(model, ids)).all()


def test_rotating_twice_is_refused():
    model = llama()
    rotate_(model)
    with pytest.raises(ValueError, match="already rotated"):
        rotate_(model)


def test_rotation_makes_w4a4_more_accurate_on_outliers():
    # Outlier channels in the residual stream are what the rotation spreads out.
    model = llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :4] *= 30
    ids = torch.randint(0, 256, (2, 32))
    ref = logits(model, ids)
    plain, rotated = copy.deepcopy(model), copy.deepcopy(model)
    rotate_(rotated)
    config = apex4.W4A4Config(group_size=None)
    apex4.quantize_(plain, config)
    apex4.quantize_(rotated, config)
    err = lambda m: ((logits(m, ids) - ref).norm() / ref.norm()).item()  # noqa: E731
    assert err(rotated) < 0.7 * err(plain)


def test_rotated_quantized_layers_fuse_the_rotation():
    model = llama()
    rotate_(model)
    assert isinstance(model.model.layers[0].mlp.down_proj, RotatedInputLinear)
    apex4.quantize_(model, apex4.W4A4Config(group_size=64))
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, apex4.W4A4Linear) and down.rotation is not None
    assert model.model.layers[0].mlp.up_proj.rotation is None
    x = torch.randn(3, 320)
    a_q, a_s = apex4.ops.hadamard_quantize_act(x, down.rotation, 64, 1.0)
    assert torch.equal(down(x), apex4.ops.w4a4_gemm(a_q, a_s, down.w_q, down.w_s, None, x.dtype))


def test_backend_rewrites_rotated_linears_and_matches_eager():
    model = llama()
    rotate_(model)
    apex4.quantize_(model, apex4.W4A4Config(group_size=64))
    ids = torch.randint(0, 256, (1, 9))
    gm, inputs = captured_graph(model, ids)
    with torch.inference_mode():
        targets = [n.target for n in gm.graph.nodes]
        assert sum(t in W4A4_ROTATED_LINEAR for t in targets) == 4
        before = gm(*inputs)[0]
        assert rewrite_quantized_linears(gm) == 14
        targets = [n.target for n in gm.graph.nodes]
        assert targets.count(torch.ops.apex4.hadamard_quantize_act.default) == 4
        # The unrotated q/k/v and gate/up share a quantizer per layer.
        assert targets.count(torch.ops.apex4.quantize_act.default) == 4
        assert torch.equal(gm(*inputs)[0], before)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="apex4", fullgraph=True)
    eager, out = logits(model, ids), logits(compiled, ids)
    assert (out - eager).abs().mean() < 1e-3 * eager.abs().mean()


# --- smoothing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [llama, qwen2], ids=["llama-gqa", "qwen2-bias"])
def test_smoothing_preserves_the_float_model(build):
    model = build()
    ids = torch.randint(0, 256, (2, 24))
    before = logits(model, ids)
    norm_before = model.model.layers[0].input_layernorm.weight.clone()
    assert smooth_(model, torch.randint(0, 256, (4, 16)), alpha=0.5) == {"alpha": 0.5}
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, norm_before)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)
    rotate_(model, "online")
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)


def test_smoothing_scales_balance_activations_and_weights():
    rms = torch.tensor([1.0, 4.0, 16.0, 0.25])
    weight = torch.tensor([[1.0, 1.0, 4.0, 2.0], [1.0, 3.0, 0.0, 0.5]])
    w = weight.square().sum(0).sqrt() / weight.norm()
    scales = _smoothing_scales(rms, [weight], 0.5)
    expected = (rms / w).sqrt()
    torch.testing.assert_close(scales, expected / expected.log().mean().exp())
    assert torch.allclose(_smoothing_scales(rms, [weight], 1.0), rms / rms.log().mean().exp())


def test_smoothing_helps_w4a4_on_an_outlier_channel():
    # A massive down_proj input channel (large up_proj row, small down_proj column): the
    # rotation alone spreads it over the whole token; smoothing moves it into the weight first.
    model = llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[5] *= 40
            layer.mlp.down_proj.weight[:, 5] /= 40
    torch.manual_seed(1)
    hidden = torch.randn(64, 192)

    def mlp_output(m):  # the MLP of block 0, through its norm (where smoothing divides)
        layer = m.model.layers[0]
        with torch.no_grad():
            return layer.mlp(layer.post_attention_layernorm(hidden))

    ref = mlp_output(model)
    rotated, smoothed = copy.deepcopy(model), copy.deepcopy(model)
    smooth_(smoothed, torch.randint(0, 256, (4, 32)))
    for m in (rotated, smoothed):
        rotate_(m, "online")
        apex4.quantize_(m, apex4.W4A4Config(group_size=64))
    err = lambda m: ((mlp_output(m) - ref).norm() / ref.norm()).item()  # noqa: E731
    assert err(smoothed) < 0.8 * err(rotated)


def test_smoothing_refuses_or_skips_what_it_cannot_do():
    ids = torch.randint(0, 256, (2, 8))
    with pytest.raises(ValueError, match="alpha"):
        smooth_(llama(), ids, alpha=1.5)
    rotated = llama()
    rotate_(rotated, "online")
    with pytest.raises(ValueError, match="before rotating"):
        smooth_(rotated, ids)
    model = gemma3()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.warns(UserWarning, match="no smoothing"):
        assert smooth_(model, ids) == {"alpha": None}
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
