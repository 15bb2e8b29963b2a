"""QuaRot-style rotation of a causal LM before W4A4 quantization.

An orthogonal rotation Q spreads activation outliers over all channels, so a
4-bit grid fits them far better; since x Wᵀ = (x Q)(W Q)ᵀ the float model's
function is unchanged. `rotate_(model)`:

1. folds every RMSNorm scale into the linears that read the norm's output
   (the norm becomes a pure RMS normalisation, which commutes with Q);
2. rotates the residual stream offline: embeddings and the outputs of o_proj
   and down_proj by Q, the inputs of q/k/v, gate/up and the LM head by Q;
3. rotates the inputs of o_proj and down_proj online (`RotatedInputLinear`:
   the activation is rotated at run time, fused with its INT4 quantization in
   the quantized model, and the weight offline).

`rotate_(model, mode="online")` does step 3 alone, on every linear layer but
the LM head: exact for any architecture, at the price of one online rotation
per layer. It is also what models of unknown block structure (see
KNOWN_MODEL_TYPES) get. It keeps the RMSNorm scales on the activations instead
of folding them into the weights, which measured better with round-to-nearest
weights on SmolLM2 (W4A4-g128, 1024 tokens of Emma: ppl 89 online against 156
residual, 387 unrotated). Rotations are `torch_apex4.hadamard` matrices.
"""
import warnings

import torch
from torch import nn

from .hadamard import rotation_factor
from .ops import ops

# Llama-style decoders: pre-norm blocks with RMSNorm(x) * w, residual adds only.
KNOWN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class RotatedInputLinear(nn.Linear):
    """A float linear layer whose input is rotated online: y = (x R) Wᵀ + b,
    R = kron(F, H) from `rotation_factor(in_features)`; W already holds W R.
    quantize_ turns it into a W4A4Linear that fuses R into the activation
    quantization."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer("rotation", rotation_factor(in_features, device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "RotatedInputLinear":
        """Moves `linear`'s parameters into a rotated layer with the same function."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device="meta")
        layer.rotation = rotation_factor(linear.in_features, linear.weight.device)
        layer.weight = nn.Parameter(_rotate_rows(linear.weight.data, layer.rotation),
                                    requires_grad=False)
        layer.bias = linear.bias
        return layer

    def input_rotation(self, x):
        return ops.hadamard(x, self.rotation.to(x.device))

    def forward(self, x):
        return nn.functional.linear(self.input_rotation(x), self.weight, self.bias)


def _rotate_rows(t, factor):
    """t @ R for the rows of t, in float32 (the op's arithmetic), back in t's dtype."""
    return ops.hadamard(t.float(), factor.to(t.device)).to(t.dtype)


def _rotate_cols(t, factor):
    """Rᵀ t: rotates the output side of a weight [out, in]."""
    return _rotate_rows(t.T.contiguous(), factor).T.contiguous()


def _is_rms_norm(module):
    return "RMSNorm" in type(module).__name__ and getattr(module, "bias", None) is None


def _decoder_layers(model):
    inner = getattr(model, "model", None)
    return getattr(inner, "layers", None) if inner is not None else None


def _structure_known(model) -> bool:
    config = getattr(model, "config", None)
    layers = _decoder_layers(model)
    if getattr(config, "model_type", None) not in KNOWN_MODEL_TYPES or layers is None:
        return False
    return all(
        _is_rms_norm(layer.input_layernorm) and _is_rms_norm(layer.post_attention_layernorm)
        and all(isinstance(getattr(layer.self_attn, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        and all(isinstance(getattr(layer.mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
        for layer in layers
    ) and _is_rms_norm(model.model.norm) and isinstance(model.get_output_embeddings(), nn.Linear)


def _fold_norm(norm, readers):
    """Moves the norm's scale into the readers' input columns: W diag(w)."""
    scale = norm.weight.data.float()
    for linear in readers:
        linear.weight.data = (linear.weight.data.float() * scale).to(linear.weight.dtype)
    norm.weight.data = torch.ones_like(norm.weight.data)


def _untie_lm_head(model):
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False


def _replace(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _rotate_online(model, names):
    for name in names:
        _replace(model, name, RotatedInputLinear.from_linear(model.get_submodule(name)))


@torch.no_grad()
def rotate_(model: nn.Module, mode: str = "residual") -> dict:
    """Rotates `model` in place (float weights; before quantize_). mode:
    "residual" (offline residual rotation + online before o_proj/down_proj) or
    "online" (online before every linear). Returns a description of what was
    done, for checkpoints: {"mode": ..., "online_layers": [names]}."""
    if mode not in ("residual", "online"):
        raise ValueError(f"rotate_: mode must be 'residual' or 'online', got {mode!r}")
    if any(isinstance(m, RotatedInputLinear) for m in model.modules()):
        raise ValueError("rotate_: the model is already rotated")
    if mode == "residual" and not _structure_known(model):
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        warnings.warn(f"rotate_: no residual-stream folding for model type {model_type!r}; "
                      "rotating every linear input online instead (exact, but one online "
                      "rotation per layer)", stacklevel=2)
        mode = "online"
    if mode == "online":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n, m in model.named_modules()
                 if type(m) is nn.Linear and m is not head and n.split(".")[-1] != "lm_head"]
        _rotate_online(model, names)
        return {"mode": "online", "online_layers": names}

    _untie_lm_head(model)
    layers = _decoder_layers(model)
    head = model.get_output_embeddings()
    q = rotation_factor(model.config.hidden_size)
    embed = model.get_input_embeddings()
    embed.weight.data = _rotate_rows(embed.weight.data, q)
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        _fold_norm(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        _fold_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for reader in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            reader.weight.data = _rotate_rows(reader.weight.data, q)
        for writer in (attn.o_proj, mlp.down_proj):
            writer.weight.data = _rotate_cols(writer.weight.data, q)
            if writer.bias is not None:
                writer.bias.data = _rotate_rows(writer.bias.data[None], q)[0]
    _fold_norm(model.model.norm, [head])
    head.weight.data = _rotate_rows(head.weight.data, q)
    names = [n for n, m in model.named_modules() if n.endswith((".o_proj", ".down_proj"))]
    _rotate_online(model, names)
    return {"mode": "residual", "online_layers": names}


# ------------------------------------------------------------------------------------------
# Smoothing: per-channel input scales moved between activations and weights (SmoothQuant),
# placed before the online rotation (as in SmoothRot).


def _smoothing_scales(rms: torch.Tensor, readers, alpha: float) -> torch.Tensor:
    """s_j = a_j^α / w_j^(1−α), normalised to geometric mean 1: a_j the RMS of input channel j
    over calibration tokens, w_j the norm of the readers' column j, each reader's columns
    weighted by 1 / its Frobenius norm (an error relative to each reader's output counts
    alike). After a rotation, the INT4 noise of activations and weights both scale with
    (Σ a_j² / s_j²)(Σ w_j² s_j²), which α = 0.5 minimises."""
    w2 = sum(r.float().square().sum(0) / r.float().square().sum() for r in readers)
    a, w = rms.float(), w2.sqrt()
    a = a.clamp_min(a.max() * 1e-5)
    w = w.clamp_min(w.max() * 1e-5)
    scales = a.pow(alpha) / w.pow(1.0 - alpha)
    return scales / scales.log().mean().exp()


def _scale_columns(linear, scales):
    linear.weight.data = (linear.weight.data.float() * scales).to(linear.weight.dtype)


def _scale_rows(linear, scales):
    linear.weight.data = (linear.weight.data.float() / scales[:, None]).to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias.data = (linear.bias.data.float() / scales).to(linear.bias.dtype)


def _input_rms(model, calibration_ids, modules, batch_size):
    """RMS over the calibration tokens of each input channel of each module."""
    sums = {m: torch.zeros(m.in_features, dtype=torch.float64) for m in modules}
    count = [0]

    def hook(module, args):
        x = args[0].detach().reshape(-1, module.in_features)
        sums[module] += x.double().square().sum(0).cpu()
        if module is modules[0]:
            count[0] += x.shape[0]

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        for batch in calibration_ids.split(batch_size):
            model(batch.to(modules[0].weight.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {m: (total / count[0]).sqrt().to(m.weight.device) for m, total in sums.items()}


@torch.no_grad()
def smooth_(model: nn.Module, calibration_ids: torch.Tensor, alpha: float = 0.5,
            batch_size: int = 8) -> dict:
    """Moves per-channel scales s (see _smoothing_scales) from every linear input of a
    Llama-style model into the weights, exactly in float: x → x / s, W → W diag(s), with
    1 / s folded into the producer of x: the RMSNorm weight (q/k/v and gate/up inputs), the
    v_proj rows (o_proj input, per key/value head channel) and the up_proj rows (down_proj
    input). Before `rotate_(model, "online")` (the residual mode would fold the norm scales
    back into the weights). Returns {"alpha": alpha}, for checkpoints; other architectures
    are left as they are, with a warning, and get {"alpha": None}."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth_: alpha must be in [0, 1], got {alpha}")
    if any(isinstance(m, RotatedInputLinear) for m in model.modules()):
        raise ValueError("smooth_: smooth before rotating, not after")
    if not _structure_known(model):
        # As rotate_ does for structures it cannot fold: run without it, never wrong.
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        warnings.warn(f"smooth_: no smoothing for model type {model_type!r} (it folds scales "
                      f"into Llama-style blocks only: {', '.join(KNOWN_MODEL_TYPES)})",
                      stacklevel=2)
        return {"alpha": None}
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = _decoder_layers(model)
    modules = [m for layer in layers for m in (layer.self_attn.q_proj, layer.self_attn.o_proj,
                                               layer.mlp.gate_proj, layer.mlp.down_proj)]
    rms = _input_rms(model, calibration_ids, modules, batch_size)
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm, readers in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                              (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
            scales = _smoothing_scales(rms[readers[0]], [r.weight.data for r in readers], alpha)
            norm.weight.data = (norm.weight.data.float() / scales).to(norm.weight.dtype)
            for reader in readers:
                _scale_columns(reader, scales)
        # o_proj input channel (h, d) is value channel (h // (heads / kv_heads), d).
        grouped = (heads // kv_heads, head_dim)
        o_rms = rms[attn.o_proj].reshape(kv_heads, *grouped).square().mean(1).sqrt().reshape(-1)
        o_columns = attn.o_proj.weight.data.float().reshape(-1, kv_heads, *grouped)
        o_columns = o_columns.square().sum(2).sqrt().reshape(-1, kv_heads * head_dim)
        value_scales = _smoothing_scales(o_rms, [o_columns], alpha)
        _scale_rows(attn.v_proj, value_scales)
        _scale_columns(attn.o_proj, value_scales.reshape(kv_heads, 1, head_dim)
                       .expand(kv_heads, grouped[0], head_dim).reshape(-1))
        scales = _smoothing_scales(rms[mlp.down_proj], [mlp.down_proj.weight.data], alpha)
        _scale_rows(mlp.up_proj, scales)
        _scale_columns(mlp.down_proj, scales)
    return {"alpha": alpha}
