"""Quantization recipes: named ways to turn a float model into a W4A4 one.

Product recipes compose smoothing and rotation (rotation.py), GPTQ with clip
search (gptq.py) and a granularity, or a per-layer plan of granularities
chosen from measured sensitivity (plan.py). Peer baselines (`atom-g128`, `quarot-pc`) are
reimplemented on the same ops for comparison only; they are not product modes.
Every recipe runs the real apex4 kernels at evaluation time, except the INT8
outlier channels of the Atom baseline, for which apex4 has no kernel (they are
quantized to INT8 and multiplied in float, which is exact for INT8 products).
"""
import copy
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .gptq import CLIP_CANDIDATES, calibrate_gptq_
from .plan import Granularity, GranularityPlan, select_granularities
from .quantize import W4A4Config, W4A4Linear, _default_filter, quantize_
from .rotation import rotate_, smooth_


@dataclass(frozen=True)
class Recipe:
    """smooth: None, or the α of rotation.smooth_ (per-channel scales moved from the
    activations into the weights on calibration statistics), applied before the rotation.
    rotation: None, "residual" or "online" (rotation.rotate_ modes).
    weights: "rtn" or "gptq". Clips: a ratio, or "search" (per layer, on
    calibration data; GPTQ only). sensitivity: granularities at which the
    calibration also measures each layer's output error (saved in the plan).
    mixed_budget: a per-layer plan instead of one granularity: that fraction of
    the layers, those whose error drops most (plan.select_granularities), get
    mixed_fine, the others group_size; the sensitivity comes from the recipe
    named by sensitivity_from when the caller passes it, else from a probe
    calibration at group_size. GPTQ only."""

    name: str
    group_size: Optional[int]
    rotation: Optional[str] = None
    smooth: Optional[float] = None
    weights: str = "rtn"
    weight_clip: object = 1.0
    act_clip: object = 1.0
    act_order: bool = False
    sensitivity: Tuple[Granularity, ...] = ()
    mixed_budget: Optional[float] = None
    mixed_fine: Granularity = 128
    sensitivity_from: Optional[str] = None
    description: str = ""

    def __post_init__(self):
        if self.weights == "rtn" and (self.sensitivity or self.mixed_budget is not None):
            raise ValueError(f"recipe {self.name!r}: sensitivity and mixed plans need GPTQ")

    @property
    def needs_calibration(self) -> bool:
        return self.weights == "gptq" or self.smooth is not None

    def apply(self, model: nn.Module, calibration_ids=None, progress=True,
              sensitivity: Optional[Dict[str, Dict[str, float]]] = None
              ) -> Tuple[GranularityPlan, Dict[str, dict]]:
        """Quantizes model in place; returns (the plan it followed, with the sensitivity
        measured, and per-layer statistics: empty for RTN). `sensitivity`: for a mixed recipe,
        that measured by its sensitivity_from recipe (skips the probe calibration)."""
        if self.needs_calibration and calibration_ids is None:
            raise ValueError(f"recipe {self.name!r} needs calibration ids")
        if self.smooth is not None:
            smooth_(model, calibration_ids, self.smooth)
        if self.rotation:
            rotate_(model, self.rotation)
        fixed = W4A4Config(self.group_size,
                           act_clip=1.0 if self.act_clip == "search" else self.act_clip,
                           weight_clip=1.0 if self.weight_clip == "search" else self.weight_clip)
        stats, plan = {}, None
        if self.weights == "rtn":
            quantize_(model, fixed)
        else:
            options = dict(
                progress=progress, act_order=self.act_order,
                weight_clip_candidates=CLIP_CANDIDATES if self.weight_clip == "search" else None,
                act_clip_candidates=CLIP_CANDIDATES if self.act_clip == "search" else None)
            if self.mixed_budget is not None:
                if sensitivity is None:
                    probe = calibrate_gptq_(copy.deepcopy(model), calibration_ids, fixed,
                                            sensitivity_granularities=(self.group_size,
                                                                       self.mixed_fine),
                                            **options)
                    sensitivity = {name: s["sensitivity"] for name, s in probe.items()}
                plan = GranularityPlan(select_granularities(
                    sensitivity, self.mixed_budget, self.mixed_fine, self.group_size), sensitivity)
            stats = calibrate_gptq_(model, calibration_ids, fixed, plan=plan,
                                    sensitivity_granularities=self.sensitivity, **options)
        layers = {n: m.group_size for n, m in model.named_modules() if isinstance(m, W4A4Linear)}
        measured = plan.sensitivity if plan is not None else {
            name: s["sensitivity"] for name, s in stats.items() if "sensitivity" in s}
        return GranularityPlan(layers, measured), stats


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
    # Measured on SmolLM2 (docs/accuracy.md): smoothing (α = 0.5) before an online Hadamard
    # rotation of every linear input, then GPTQ (act order) with per-layer clip searches.
    Recipe("apex4-pc", None, smooth=0.5, rotation="online", weights="gptq", weight_clip="search",
           act_clip="search", act_order=True, sensitivity=(None, 128),
           description="smoothing + online Hadamard + GPTQ (act order) + clip search; "
                       "measures pc/g128 sensitivity"),
    Recipe("apex4-g128", 128, smooth=0.5, rotation="online", weights="gptq",
           weight_clip="search", act_clip="search", act_order=True,
           description="smoothing + online Hadamard + GPTQ (act order) + clip search"),
    Recipe("apex4-mixed", None, smooth=0.5, rotation="online", weights="gptq",
           weight_clip="search", act_clip="search", act_order=True, mixed_budget=0.25,
           mixed_fine=128, sensitivity_from="apex4-pc",
           description="as apex4-pc, g128 on the 25% of layers whose error drops most"),
    Recipe("quarot-pc", None, rotation="residual", weights="gptq", act_clip=0.9,
           description="baseline: QuaRot-style residual rotation + GPTQ, act clip 0.9"),
]}
BASELINES = {"atom-g128": atom_quantize_}
