"""Per-layer granularity plans: which quantization granularity each linear layer uses, with the
per-layer sensitivity measured on calibration data that the choice was made from.

    plan = GranularityPlan({"model.layers.0.self_attn.v_proj": 128}, sensitivity)
    quantize_(model, W4A4Config(group_size=None), plan=plan)   # v_proj g128, the rest per channel
    plan.save("plan.json"); GranularityPlan.load("plan.json")

A granularity is None (per-channel weights with per-token activations) or a group size along K
(weights and activations share it; the kernels' rule: a positive multiple of 64). Labels: "pc",
"g64", "g128", ...
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from .ops import num_groups, padded_k

Granularity = Optional[int]
PER_CHANNEL = "pc"


def check_granularity(g) -> Granularity:
    """g itself if it is a granularity the kernels accept, else ValueError/TypeError."""
    if g is None:
        return None
    if not isinstance(g, int) or isinstance(g, bool):
        raise TypeError(f"a granularity is None (per channel) or an int group size, got {g!r}")
    if g <= 0:
        raise ValueError(f"a group size must be a positive multiple of 64, got {g}")
    padded_k(g, g)  # the layout header's rule (multiple of 64): ValueError otherwise
    return g


def same_layout(in_features: int, a: Granularity, b: Granularity) -> bool:
    """Whether granularities a and b quantize K = in_features alike: one group spanning all of
    K is per channel (g128 on K = 128, for instance)."""
    return (padded_k(in_features, a), num_groups(in_features, a)) == \
        (padded_k(in_features, b), num_groups(in_features, b))


def granularity_label(g: Granularity) -> str:
    """"pc" for per channel, "g<size>" for groups."""
    return PER_CHANNEL if check_granularity(g) is None else f"g{g}"


def parse_granularity(label: str) -> Granularity:
    """The inverse of granularity_label; ValueError on anything else."""
    if not isinstance(label, str):
        raise TypeError(f"a granularity label is a string, got {label!r}")
    if label == PER_CHANNEL:
        return None
    match = re.fullmatch(r"g([1-9][0-9]*)", label)
    if match is None:
        raise ValueError(f"granularity label {label!r} is neither 'pc' nor 'g<group size>'")
    return check_granularity(int(match.group(1)))


@dataclass
class GranularityPlan:
    """layers: quantized module name -> granularity. sensitivity: module name -> {granularity
    label: relative MSE of the layer output on calibration data, ‖Y − Ŷ‖² / ‖Y‖²}; may be
    empty, and may cover granularities the plan did not pick."""

    layers: Dict[str, Granularity]
    sensitivity: Dict[str, Dict[str, float]] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.layers, dict) or not isinstance(self.sensitivity, dict):
            raise TypeError("GranularityPlan: layers and sensitivity must be dicts")
        for name, g in self.layers.items():
            _check_name(name)
            try:
                check_granularity(g)
            except (TypeError, ValueError) as error:
                raise ValueError(f"GranularityPlan: layer {name}: {error}") from None
        for name, errors in self.sensitivity.items():
            _check_name(name)
            if not isinstance(errors, dict):
                raise ValueError(f"GranularityPlan: sensitivity of {name} must be a dict "
                                 f"{{label: error}}, got {errors!r}")
            for label, value in errors.items():
                try:
                    parse_granularity(label)
                except (TypeError, ValueError) as error:
                    raise ValueError(f"GranularityPlan: sensitivity of {name}: {error}") from None
                if (not isinstance(value, (int, float)) or isinstance(value, bool)
                        or not value >= 0 or value == float("inf")):
                    raise ValueError(f"GranularityPlan: sensitivity of {name} at {label} must "
                                     f"be a finite non-negative number, got {value!r}")

    def granularity(self, name: str, default: Granularity) -> Granularity:
        """The planned granularity of layer `name`, or `default` if the plan does not name it."""
        return self.layers.get(name, default)

    def to_dict(self) -> dict:
        return {"layers": {n: granularity_label(g) for n, g in self.layers.items()},
                "sensitivity": {n: {label: float(v) for label, v in e.items()}
                                for n, e in self.sensitivity.items()}}

    @classmethod
    def from_dict(cls, d) -> "GranularityPlan":
        if not isinstance(d, dict):
            raise ValueError(f"a granularity plan is a dict, got {type(d).__name__}")
        unknown = set(d) - {"layers", "sensitivity"}
        if unknown or "layers" not in d:
            raise ValueError(f"a granularity plan has keys 'layers' and optionally "
                             f"'sensitivity', got {sorted(d)}")
        layers, sensitivity = d["layers"], d.get("sensitivity", {})
        if not isinstance(layers, dict) or not isinstance(sensitivity, dict):
            raise ValueError("a granularity plan's 'layers' and 'sensitivity' must be dicts")
        parsed = {}
        for name, label in layers.items():
            try:
                parsed[name] = parse_granularity(label)
            except (TypeError, ValueError) as error:
                raise ValueError(f"granularity plan, layer {name}: {error}") from None
        return cls(parsed, {n: dict(e) if isinstance(e, dict) else e
                            for n, e in sensitivity.items()})

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "GranularityPlan":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        return cls.from_dict(d)

    def counts(self) -> Dict[str, int]:
        """{label: number of layers} of the plan."""
        counts = {}
        for g in self.layers.values():
            counts[granularity_label(g)] = counts.get(granularity_label(g), 0) + 1
        return counts

    def __str__(self):
        labels = sorted({label for e in self.sensitivity.values() for label in e},
                        key=lambda label: (parse_granularity(label) or 0))
        width = max([5, *map(len, self.layers), *map(len, self.sensitivity)])
        lines = [f"{'layer':<{width}}  {'plan':>5}" + "".join(f"{'err ' + l:>11}" for l in labels)]
        for name in [*self.layers, *(n for n in self.sensitivity if n not in self.layers)]:
            planned = granularity_label(self.layers[name]) if name in self.layers else "-"
            errors = self.sensitivity.get(name, {})
            lines.append(f"{name:<{width}}  {planned:>5}" + "".join(
                f"{errors[l]:>11.4g}" if l in errors else f"{'-':>11}" for l in labels))
        summary = ", ".join(f"{c} {label}" for label, c in sorted(self.counts().items()))
        lines.append(f"{len(self.layers)} layers: {summary or 'none'}")
        return "\n".join(lines)


def _check_name(name):
    if not isinstance(name, str) or not name:
        raise ValueError(f"GranularityPlan: layer names must be non-empty strings, got {name!r}")


def select_granularities(sensitivity: Dict[str, Dict[str, float]], budget: float,
                         fine: Granularity = 128, coarse: Granularity = None
                         ) -> Dict[str, Granularity]:
    """A mixed plan from per-layer sensitivity: the `budget` fraction of the layers (rounded
    to nearest) whose output error drops most from `coarse` to `fine` get `fine`, the others
    `coarse` (e.g. per channel everywhere but the layers that need groups most). Every layer
    of `sensitivity` must have an error at both granularities. Ties go by layer name."""
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"select_granularities: budget must be a fraction in [0, 1], got {budget}")
    fine_label, coarse_label = granularity_label(fine), granularity_label(coarse)
    gain = {}
    for name, errors in sensitivity.items():
        missing = [label for label in (fine_label, coarse_label) if label not in errors]
        if missing:
            raise ValueError(f"select_granularities: no sensitivity of {name} at {missing}")
        gain[name] = errors[coarse_label] - errors[fine_label]
    ranked = sorted(gain, key=lambda name: (-gain[name], name))
    chosen = set(ranked[:round(budget * len(ranked))])
    return {name: fine if name in chosen else coarse for name in sensitivity}
