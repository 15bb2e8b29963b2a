"""The rho-aware planner: from the cost model (costmodel.py) and per-layer
sensitivity, which granularity each layer is quantized at (the mixed-granularity
mode) and which kernel variant runs it at each token count.

    planner = Planner(CostModel(rho.gpu_spec()))
    plan = planner.plan_granularities(shapes, sensitivity)   # a plan.GranularityPlan
    quantize_(model, W4A4Config(group_size=None), plan=plan)
    print(planner.describe(plan, shapes))

Granularity: each layer has a few candidate granularities with a measured
error (GranularityPlan.sensitivity: relative output MSE on calibration data)
and a predicted time (the layer's cost over a workload of token counts). The
plan minimises the total time subject to the total error staying within a
budget, by default the total error of g128 everywhere: start every layer at
its fastest candidate, then while over budget make the move that buys the
most error reduction per second added (greedy on the time/error trade-off).

Kernel variant: the cost model's fastest variant for the layer at a token
count. The apex4 backend (backend.py) asks for it per quantized linear.
"""
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

from .costmodel import CostModel, Estimate
from .plan import GranularityPlan, granularity_label, parse_granularity

# Calls per token count the layer time is summed over (the bench_gemm grid,
# one call each) unless the caller gives its own workload.
DEFAULT_WORKLOAD = {1: 1.0, 16: 1.0, 128: 1.0, 512: 1.0, 2048: 1.0, 8192: 1.0}
DEFAULT_CANDIDATES = ("pc", "g64", "g128", "g256")
# Token counts that bound the buckets of a printed kernel plan.
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class LayerOption:
    label: str
    seconds: float  # over the workload
    error: float


class Planner:
    def __init__(self, model: CostModel, workload: Optional[Mapping[int, float]] = None):
        workload = dict(DEFAULT_WORKLOAD if workload is None else workload)
        if not workload or any(not isinstance(m, int) or m <= 0 or not w >= 0
                               for m, w in workload.items()):
            raise ValueError(f"workload must map positive token counts to non-negative "
                             f"weights, got {workload!r}")
        self.model = model
        self.workload = workload

    # --------------------------------------------------------------- kernels
    def kernel_for(self, m: int, n: int, k: int, group_size) -> Estimate:
        """The fastest variant for the layer (fp16 x in) at M tokens."""
        return self.model.best(m, n, k, group_size, layer=True)

    def layer_seconds(self, n: int, k: int, group_size) -> float:
        """The layer's predicted time over the workload, best variant per count."""
        return sum(w * self.kernel_for(m, n, k, group_size).total
                   for m, w in self.workload.items())

    def fastest_granularity(self, m: int, n: int, k: int, candidates=DEFAULT_CANDIDATES):
        """The candidate label with the least predicted layer time at M tokens."""
        return min(candidates,
                   key=lambda label: self.kernel_for(m, n, k, parse_granularity(label)).total)

    def kernel_table(self, n: int, k: int, group_size, tokens: Sequence[int] = TOKEN_BUCKETS) -> str:
        """Printable: per token count, each variant's predicted layer time and the pick."""
        variants = self.model.variants()
        head = (f"{self.model.spec.name}: N={n} K={k} {granularity_label(group_size)}, "
                f"predicted layer time (us) per variant")
        lines = [head, f"{'M':>6} " + "".join(f"{v:>10}" for v in variants) + f"{'pick':>10}"]
        for m in tokens:
            times = {v: self.model.linear(m, n, k, group_size, v).total for v in variants}
            pick = min(times, key=times.get)
            lines.append(f"{m:>6} " + "".join(f"{times[v] * 1e6:>10.1f}" for v in variants)
                         + f"{pick:>10}")
        return "\n".join(lines)

    # ---------------------------------------------------------- granularity
    def layer_options(self, n: int, k: int, errors: Mapping[str, float],
                      candidates=DEFAULT_CANDIDATES) -> Tuple[LayerOption, ...]:
        """The layer's candidates with a measured error, fastest first, without
        those another candidate beats in both time and error."""
        options = sorted((LayerOption(label, self.layer_seconds(n, k, parse_granularity(label)),
                                      float(errors[label]))
                          for label in candidates if label in errors),
                         key=lambda o: (o.seconds, o.error))
        kept = []
        for o in options:  # fastest first: keep each that is more accurate than all faster
            if not kept or o.error < kept[-1].error:
                kept.append(o)
        return tuple(kept)

    def plan_granularities(self, shapes: Mapping[str, Tuple[int, int]],
                           sensitivity: Mapping[str, Mapping[str, float]],
                           budget: Optional[float] = None, reference: str = "g128",
                           candidates=DEFAULT_CANDIDATES) -> GranularityPlan:
        """shapes: {layer name: (N, K)}; sensitivity: {layer name: {label: error}}.
        The fastest plan whose total error is at most `budget` (default: the
        total error with `reference` everywhere). ValueError where a layer has
        no candidate with an error, or the budget cannot be met."""
        for label in candidates:
            parse_granularity(label)
        missing = [name for name in shapes if not set(candidates) & set(sensitivity.get(name, {}))]
        if missing:
            raise ValueError(f"planner: no sensitivity for any of {list(candidates)} on layers "
                             f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if budget is None:
            without = [name for name in shapes if reference not in sensitivity[name]]
            if without:
                raise ValueError(f"planner: the default budget is the total error at "
                                 f"{reference}, which layers {without[:5]} have not measured")
            budget = sum(sensitivity[name][reference] for name in shapes)
        options = {name: self.layer_options(n, k, sensitivity[name], candidates)
                   for name, (n, k) in shapes.items()}
        chosen = {name: 0 for name in shapes}  # index into options: fastest first
        total = sum(options[name][0].error for name in shapes)
        while total > budget * (1 + 1e-12):
            move = None  # (seconds added per error removed, layer, option index)
            for name, i in chosen.items():
                current = options[name][i]
                for j in range(i + 1, len(options[name])):
                    o = options[name][j]
                    cost = (o.seconds - current.seconds) / (current.error - o.error)
                    if move is None or cost < move[0]:
                        move = (cost, name, j)
            if move is None:
                raise ValueError(f"planner: the accuracy budget {budget:.4g} cannot be met: "
                                 f"the most accurate candidates give {total:.4g}")
            _, name, j = move
            total += options[name][j].error - options[name][chosen[name]].error
            chosen[name] = j
        layers = {name: parse_granularity(options[name][i].label) for name, i in chosen.items()}
        return GranularityPlan(layers, {name: dict(sensitivity[name]) for name in shapes})

    def describe(self, plan: GranularityPlan, shapes: Mapping[str, Tuple[int, int]]) -> str:
        """The plan's table (plan.py) followed by its predicted time against each
        candidate used uniformly."""
        planned = sum(self.layer_seconds(n, k, plan.layers[name])
                      for name, (n, k) in shapes.items() if name in plan.layers)
        lines = [str(plan), f"predicted time over the workload {self.workload}: "
                            f"{planned * 1e3:.3f} ms (planned)"]
        labels = sorted({label for e in plan.sensitivity.values() for label in e},
                        key=lambda label: parse_granularity(label) or 0)
        for label in labels:
            g = parse_granularity(label)
            seconds = sum(self.layer_seconds(n, k, g) for n, k in shapes.values())
            covered = [name for name in shapes if label in plan.sensitivity.get(name, {})]
            error = sum(plan.sensitivity[name][label] for name in covered)
            lines.append(f"  all {label:>5}: {seconds * 1e3:.3f} ms, total error "
                         f"{error:.4g}" + ("" if len(covered) == len(shapes) else " (partial)"))
        chosen_error = sum(plan.sensitivity[name][granularity_label(g)]
                           for name, g in plan.layers.items()
                           if granularity_label(g) in plan.sensitivity.get(name, {}))
        lines.append(f"  planned total error {chosen_error:.4g}")
        return "\n".join(lines)


def linear_shapes(model) -> Dict[str, Tuple[int, int]]:
    """{name: (N, K)} of a model's nn.Linear and W4A4Linear layers."""
    from torch import nn

    from .quantize import W4A4Linear

    return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, W4A4Linear))}
