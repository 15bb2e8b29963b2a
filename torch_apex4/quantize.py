"""Model-level quantization: `quantize_(model, W4A4Config(...))` swaps the
selected nn.Linear layers for W4A4Linear, whose weight is packed INT4 plus fp32
scales (layout in docs/design.md) and whose forward runs the apex4 ops."""
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import nn

from .ops import ops
from .plan import GranularityPlan
from .rotation import RotatedInputLinear


@dataclass(frozen=True)
class W4A4Config:
    """group_size: scale group along K for weights and activations (a positive
    multiple of 64), or None for per-channel weights with per-token activations.
    act_clip / weight_clip: fraction of each group's absolute maximum mapped to
    the top of the INT4 grid (1.0 = no clipping)."""

    group_size: Optional[int] = 128
    act_clip: float = 1.0
    weight_clip: float = 1.0

    def __post_init__(self):
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
        ):
            raise TypeError(f"W4A4Config.group_size must be an int or None, got {self.group_size!r}")
        for name in ("act_clip", "weight_clip"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"W4A4Config.{name} must be in (0, 1], got {value}")


class Float32Buffers(nn.Module):
    """Keeps the buffers `w_s` and `rotation` in float32 under model.half() /
    .to(dtype): scales and the rotation factor are float32 by contract (the
    kernels' arithmetic), so dtype casts must move them, not round them."""

    def _apply(self, fn, recurse=True):
        kept = {n: self._buffers[n] for n in ("w_s", "rotation") if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            self._buffers[name] = before.to(self._buffers[name].device)
        return self


class W4A4Linear(Float32Buffers):
    """A linear layer with INT4 weights that quantizes its input to INT4 on the
    fly. Buffers: w_q uint8 [out, Kp/2], w_s float32 [out, G], optional bias,
    and optionally `rotation`, the factor of an online rotation of the input
    (see rotation.py) fused into the activation quantization."""

    def __init__(self, w_q, w_s, bias, in_features, act_clip=1.0, rotation=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = w_q.shape[0]
        self.act_clip = act_clip
        self.register_buffer("w_q", w_q)
        self.register_buffer("w_s", w_s)
        self.register_buffer("bias", bias)
        self.register_buffer("rotation", rotation)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: W4A4Config) -> "W4A4Linear":
        w_q, w_s = ops.quantize_weight(linear.weight.detach(), config.group_size, config.weight_clip)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        rotation = linear.rotation if isinstance(linear, RotatedInputLinear) else None
        return cls(w_q, w_s, bias, linear.in_features, config.act_clip, rotation)

    @property
    def group_size(self) -> Optional[int]:
        groups = self.w_s.shape[1]
        return None if groups == 1 else self.w_q.shape[1] * 2 // groups

    def forward(self, x):
        if self.rotation is None:
            return ops.w4a4_linear(x, self.w_q, self.w_s, self.bias, self.act_clip)
        return ops.w4a4_rotated_linear(x, self.rotation, self.w_q, self.w_s, self.bias,
                                       self.act_clip)

    def extra_repr(self):
        granularity = "per-channel" if self.group_size is None else f"g{self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{granularity}, act_clip={self.act_clip}, bias={self.bias is not None}, "
                f"online_rotation={self.rotation is not None}")


def _output_embeddings(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _default_filter(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    # The LM head stays in full precision: its error lands directly on logits.
    head = _output_embeddings(model)
    return lambda module, name: module is not head and name.split(".")[-1] != "lm_head"


def quantize_targets(model: nn.Module, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                     plan: Optional[GranularityPlan] = None) -> dict:
    """{name: nn.Linear} of the layers quantize_ replaces; ValueError if `plan` names a layer
    that is not one of them."""
    accept = filter_fn or _default_filter(model)
    targets = {name: m for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and accept(m, name)}
    if plan is not None:
        if not isinstance(plan, GranularityPlan):
            raise TypeError(f"plan must be a GranularityPlan, got {type(plan).__name__}")
        unknown = sorted(set(plan.layers) - set(targets))
        if unknown:
            raise ValueError(f"the plan names layers that are not linear layers to quantize in "
                             f"this model: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    return targets


def layer_config(config: W4A4Config, plan: Optional[GranularityPlan], name: str) -> W4A4Config:
    """config with the plan's granularity for layer `name` (config.group_size if unplanned)."""
    if plan is None or name not in plan.layers:
        return config
    return replace(config, group_size=plan.layers[name])


def quantize_(model: nn.Module, config: W4A4Config,
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
              plan: Optional[GranularityPlan] = None) -> nn.Module:
    """Replace, in place, every nn.Linear that filter_fn(module, name) accepts
    (default: all but the LM head) with a W4A4Linear, at the granularity `plan`
    gives the layer (plan.py), else config.group_size; then fuse_projections_.
    Returns the model."""
    if not isinstance(config, W4A4Config):
        raise TypeError(f"quantize_ expects a W4A4Config, got {type(config).__name__}")
    for name, linear in quantize_targets(model, filter_fn, plan).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, W4A4Linear.from_linear(linear, layer_config(config, plan, name)))
    fuse_projections_(model)
    return model


# Children of one module that read the same input, by their Hugging Face
# names (LLaMA, Mistral, Qwen and others use them).
SIBLING_LAYERS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def consecutive_rows(parts) -> bool:
    """Whether `parts` are consecutive row blocks, in order, of one contiguous
    tensor: same storage, same trailing shape, each starting where the last
    ends. Works on fake tensors too (the backend checks graph inputs)."""
    first = parts[0]
    offset = first.storage_offset()
    for part in parts:
        if (not part.is_contiguous() or part.shape[1:] != first.shape[1:]
                or not torch._C._is_alias_of(part, first) or part.storage_offset() != offset):
            return False
        offset += part.numel()
    return True


def fuse_projections_(model: nn.Module) -> int:
    """Store the weights, scales and biases of each set of sibling W4A4Linear
    layers (SIBLING_LAYERS: q/k/v, gate/up) in one tensor each, every layer's
    buffers being views of its consecutive rows. Eager results and memory are
    unchanged; the apex4 backend runs such a set as one GEMM (one activation
    quantization and one launch over the summed N). Layers that differ in
    input size, granularity, act_clip, rotation, bias or device are left
    alone. quantize_ calls it; call it again after moving a model (`.to()`
    copies the views one by one). Returns how many sets are fused."""
    fused = 0
    for parent in model.modules():
        for names in SIBLING_LAYERS:
            layers = [getattr(parent, name, None) for name in names]
            if not _fusable(layers):
                continue
            for buffer in ("w_q", "w_s", "bias"):
                parts = [getattr(layer, buffer) for layer in layers]
                if parts[0] is None or consecutive_rows(parts):
                    continue
                whole = torch.cat(parts)
                row = 0
                for layer, part in zip(layers, parts):
                    setattr(layer, buffer, whole[row:row + part.shape[0]])
                    row += part.shape[0]
            fused += 1
    return fused


def _fusable(layers) -> bool:
    if not all(isinstance(layer, W4A4Linear) for layer in layers):
        return False
    first = layers[0]

    def bias_kind(layer):
        return None if layer.bias is None else (layer.bias.dtype, layer.bias.device)

    return all(layer.in_features == first.in_features and layer.group_size == first.group_size
               and layer.act_clip == first.act_clip and layer.rotation is first.rotation
               and bias_kind(layer) == bias_kind(first) and layer.w_q.device == first.w_q.device
               for layer in layers[1:])


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the weights of the linear layers (packed weights and scales
    for quantized ones), excluding the LM head."""
    head = _output_embeddings(model)
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, W4A4Linear):
            total += m.w_q.nbytes + m.w_s.nbytes
        elif isinstance(m, nn.Linear) and m is not head and name.split(".")[-1] != "lm_head":
            total += m.weight.nbytes
    return total
