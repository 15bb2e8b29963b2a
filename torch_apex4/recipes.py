"""Quantization recipes: named ways to turn a float model into a W4A4 one.

Product recipes compose rotation (rotation.py), GPTQ with clip search
(gptq.py) and a granularity. Peer baselines (`atom-g128`, `quarot-pc`) are
reimplemented on the same ops for comparison only; they are not product modes.
Every recipe runs the real apex4 kernels at evaluation time, except the INT8
outlier channels of the Atom baseline, for which apex4 has no kernel (they are
quantized to INT8 and multiplied in float, which is exact for INT8 products).
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import nn

from .gptq import CLIP_CANDIDATES, calibrate_gptq_
from .quantize import W4A4Config, W4A4Linear, _default_filter, quantize_
from .rotation import rotate_


@dataclass(frozen=True)
class Recipe:
    """rotation: None, "residual" or "online" (rotation.rotate_ modes).
    weights: "rtn" or "gptq". Clips: a ratio, or "search" (per layer, on
    calibration data; GPTQ only)."""

    name: str
    group_size: Optional[int]
    rotation: Optional[str] = None
    weights: str = "rtn"
    weight_clip: object = 1.0
    act_clip: object = 1.0
    act_order: bool = False
    description: str = ""

    @property
    def needs_calibration(self) -> bool:
        return self.weights == "gptq"

    def apply(self, model: nn.Module, calibration_ids=None, progress=True) -> Dict[str, dict]:
        """Quantizes model in place; returns per-layer statistics (empty for RTN)."""
        if self.rotation:
            rotate_(model, self.rotation)
        fixed = W4A4Config(self.group_size,
                           act_clip=1.0 if self.act_clip == "search" else self.act_clip,
                           weight_clip=1.0 if self.weight_clip == "search" else self.weight_clip)
        if self.weights == "rtn":
            quantize_(model, fixed)
            return {}
        if calibration_ids is None:
            raise ValueError(f"recipe {self.name!r} needs calibration ids")
        return calibrate_gptq_(
            model, calibration_ids, fixed, progress=progress,
            weight_clip_candidates=CLIP_CANDIDATES if self.weight_clip == "search" else None,
            act_clip_candidates=CLIP_CANDIDATES if self.act_clip == "search" else None,
            act_order=self.act_order)


class AtomLinear(nn.Module):
    """Atom-style mixed-precision layer (baseline): the `outliers` input channels
    with the largest calibration activations stay INT8 (per-token activations,
    per-channel weights, symmetric), the rest are W4A4 with groups."""

    def __init__(self, linear: nn.Linear, channel_scale: torch.Tensor, outliers: int,
                 group_size: int, act_clip: float, weight_clip: float):
        super().__init__()
        order = torch.argsort(channel_scale, descending=True)
        self.register_buffer("outlier_idx", order[:outliers].sort().values)
        self.register_buffer("normal_idx", order[outliers:].sort().values)
        weight = linear.weight.detach()
        normal = nn.Linear(len(self.normal_idx), linear.out_features, linear.bias is not None)
        normal.weight.data = weight[:, self.normal_idx].contiguous()
        if linear.bias is not None:
            normal.bias.data = linear.bias.detach().clone()
        self.normal = W4A4Linear.from_linear(normal, W4A4Config(group_size, act_clip, weight_clip))
        w8 = weight[:, self.outlier_idx].float()
        self.register_buffer("w8_scale", w8.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127)
        self.register_buffer("w8", torch.round(w8 / self.w8_scale).clamp(-127, 127))

    def forward(self, x):
        xo = x[..., self.outlier_idx].float()
        scale = xo.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
        x8 = torch.round(xo / scale).clamp(-127, 127)
        outlier_part = (x8 @ self.w8.T) * scale * self.w8_scale.T
        return self.normal(x[..., self.normal_idx].contiguous()) + outlier_part.to(x.dtype)


def atom_quantize_(model, calibration_ids, group_size=128, outliers=128, act_clip=0.9,
                   weight_clip=0.85, filter_fn: Optional[Callable] = None):
    """Atom-style baseline: per layer, channels reordered by calibration
    activation magnitude, the top `outliers` kept in INT8."""
    accept = filter_fn or _default_filter(model)
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and accept(m, n)}
    magnitude = {n: torch.zeros(m.in_features) for n, m in targets.items()}

    def record(name):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, module.in_features)
            magnitude[name] = torch.maximum(magnitude[name], x.abs().amax(0))
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in targets.items()]
    with torch.inference_mode():
        for batch in calibration_ids.split(4):
            model(batch)
    for h in handles:
        h.remove()
    for name, linear in targets.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        count = min(outliers, linear.in_features // 2)
        setattr(parent, child, AtomLinear(linear, magnitude[name], count, group_size, act_clip,
                                          weight_clip))
    return {}


RECIPES = {r.name: r for r in [
    Recipe("rtn-pc", None, description="RTN W4A4, per-channel weights, per-token activations"),
    Recipe("rtn-g128", 128, description="RTN W4A4, groups of 128"),
    Recipe("rot-rtn-pc", None, rotation="online", act_clip=0.9,
           description="online Hadamard on every linear input, RTN, act clip 0.9"),
    Recipe("rot-rtn-g128", 128, rotation="online", act_clip=0.9,
           description="online Hadamard on every linear input, RTN, act clip 0.9"),
    # The best measured on SmolLM2 (8,192 tokens of Emma, FP32 31.38): residual
    # rotation + GPTQ (act_order) + per-layer clip searches, g128 44.17 (1.41x),
    # per-channel 49.21 (1.57x). Without rotation the clip search hurts instead.
    Recipe("apex4-pc", None, rotation="residual", weights="gptq", weight_clip="search",
           act_clip="search", act_order=True,
           description="residual Hadamard + GPTQ (act order) + per-layer clip search"),
    Recipe("apex4-g128", 128, rotation="residual", weights="gptq", weight_clip="search",
           act_clip="search", act_order=True,
           description="residual Hadamard + GPTQ (act order) + per-layer clip search"),
    Recipe("quarot-pc", None, rotation="residual", weights="gptq", act_clip=0.9,
           description="baseline: QuaRot-style residual rotation + GPTQ, act clip 0.9"),
]}
BASELINES = {"atom-g128": atom_quantize_}
