"""The "apex4" torch.compile backend (registered through the
`torch_dynamo_backends` entry point in setup.py).

Dynamo hands over an FX graph in which every quantized linear layer is one
`apex4.w4a4_linear` call, or `apex4.w4a4_rotated_linear` for a layer whose
input is rotated online (what W4A4Linear.forward emits).
`fuse_sibling_linears` first merges the calls of sibling layers (q/k/v,
gate/up) whose weights quantize.fuse_projections_ keeps in one tensor into
one call. `rewrite_quantized_linears` is then the single place where the
backend decides how each of them runs. Given a planner (planner.py; the backend builds one for the
graph's GPU from the rho table or a cached probe), a layer whose token count
is static and whose planned variant is the decode kernel stays a
`w4a4_linear` call: on CUDA that op quantizes x and runs the decode GEMM as a
dependent launch pair. Every other layer is lowered into its activation
quantizer (`quantize_act`, or `hadamard_quantize_act` with the rotation fused)
+ `w4a4_gemm` at the weight's granularity, whose kernel w4a4_gemm picks by the
token count (APEX4_GEMM_PATH=auto); layers that read the same input at the
same quantization (q/k/v, gate/up) share one quantizer call. w4a4_gemm takes
no per-call kernel argument, so where the planner's variant is not the one w4a4_gemm picks,
the plan records both (`KernelChoice.runs`). On CUDA, with
PREFETCH_NEXT_WEIGHTS set (off by default: it measured slower),
`prefetch_next_weights` then gives each decode-sized GEMM the next GEMM's
weight to bring into L2 (the ops' `prefetch` argument). The graph then goes to Inductor, which
compiles everything around the apex4 ops.

`torch.compile(model, backend="apex4", mode=..., options=...)` takes the
modes and options of backend="inductor" (mode="reduce-overhead": CUDA graphs).
"""
import functools
import logging
import math
import operator
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import fx

_ops = torch.ops.apex4
# Dynamo records the call as written: the op packet or its overload.
W4A4_LINEAR = (_ops.w4a4_linear, _ops.w4a4_linear.default)
W4A4_ROTATED_LINEAR = (_ops.w4a4_rotated_linear, _ops.w4a4_rotated_linear.default)
QUANTIZE_ACT = _ops.quantize_act.default
HADAMARD_QUANTIZE_ACT = _ops.hadamard_quantize_act.default
W4A4_GEMM = _ops.w4a4_gemm.default
# Whether the backend runs prefetch_next_weights on CUDA graphs. Off: on the
# H100 it made the 7B-shaped decode step slower (batch 1: 311 tokens/s with it,
# 323 without, one run; benchmarks/NOTES.md v10); `bench_e2e.py --variants
# prefetch` measures it against the same model without.
PREFETCH_NEXT_WEIGHTS = False

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelChoice:
    """The plan of one quantized linear: `variant` is the planner's pick for
    its M tokens (predicted_us, the layer with its activation quantization),
    `runs` the kernel it gets, `kept` whether the w4a4_linear call stayed."""

    node: str
    m: int
    n: int
    k: int
    group_size: Optional[int]
    variant: str
    predicted_us: float
    runs: str
    kept: bool


# The plans of the most recent apex4 compilations, newest last (for printing).
kernel_plans: List[List[KernelChoice]] = []
_MAX_PLANS = 16


def format_kernel_plan(choices: List[KernelChoice]) -> str:
    from .plan import granularity_label

    lines = [f"{'node':<28} {'M':>6} {'N':>6} {'K':>6} {'gran':>5} {'planned':>9} "
             f"{'pred us':>8} {'runs':>9}  graph"]
    for c in choices:
        lines.append(f"{c.node[:28]:<28} {c.m:>6} {c.n:>6} {c.k:>6} "
                     f"{granularity_label(c.group_size):>5} {c.variant:>9} "
                     f"{c.predicted_us:>8.1f} {c.runs:>9}  "
                     f"{'w4a4_linear' if c.kept else 'quantize_act + w4a4_gemm'}")
    total = sum(c.predicted_us for c in choices)
    lines.append(f"{len(choices)} planned layers, {total:.1f} us predicted in all")
    return "\n".join(lines)


def _meta(node):
    value = node.meta.get("example_value", node.meta.get("val"))
    if value is None:
        raise RuntimeError(f"apex4 backend: no shape information on graph node {node.name}")
    return value


def _group_size(w_q_node, w_s_node):
    groups = _meta(w_s_node).shape[1]
    return None if groups == 1 else _meta(w_q_node).shape[1] * 2 // groups


def _static_tokens(x_node) -> Optional[int]:
    """M = the product of x's leading dimensions, if none is symbolic."""
    dims = _meta(x_node).shape[:-1]
    if not all(isinstance(d, int) for d in dims):
        return None
    return math.prod(dims)


def fuse_sibling_linears(gm: fx.GraphModule) -> List[List[str]]:
    """Replace each set of w4a4_linear calls on the same x and act_clip whose
    weights, scales and biases are consecutive rows of one tensor each
    (quantize.fuse_projections_) with one call on the whole tensors, and each
    call's result with a narrow of that output. Returns, per fused tensor,
    the names of the graph inputs it is made of, in row order: the compiled
    graph reads the whole tensor through the first of them, which
    `checked_fusion` verifies at every call."""
    from .quantize import consecutive_rows

    graph = gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    sets = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in W4A4_LINEAR:
            continue
        x, _, w_q, _, _, act_clip = _linear_args(node, False)
        same_input = sets.setdefault((x, act_clip), [])
        for members in same_input:
            if torch._C._is_alias_of(_meta(_linear_args(members[0], False)[2]), _meta(w_q)):
                members.append(node)
                break
        else:
            same_input.append([node])
    fused_inputs = []
    for same_input in sets.values():
        _warn_if_fusable(same_input)
        for members in same_input:
            if len(members) < 2:
                continue
            args = [_linear_args(node, False) for node in members]
            rows = sorted(range(len(members)), key=lambda i: _meta(args[i][2]).storage_offset())
            parts = {name: [args[i][index] for i in rows]
                     for name, index in (("w_q", 2), ("w_s", 3), ("bias", 4))}
            if all(bias is None for bias in parts["bias"]):
                del parts["bias"]
            if not all(all(isinstance(p, fx.Node) and p.op == "placeholder" for p in nodes)
                       and consecutive_rows([_meta(p) for p in nodes]) for nodes in parts.values()):
                continue
            x, act_clip = args[0][0], args[0][5]
            with graph.inserting_before(min(members, key=order.__getitem__)):
                whole = {name: _whole_tensor(graph, nodes) for name, nodes in parts.items()}
                out = graph.call_function(
                    _ops.w4a4_linear.default,
                    (x, whole["w_q"], whole["w_s"], whole.get("bias"), act_clip))
                out.meta["example_value"] = _fake_call(_ops.w4a4_linear.default, out.args)
                row, outputs = 0, []
                for i in rows:
                    n = _meta(args[i][2]).shape[0]
                    outputs.append(graph.call_function(torch.narrow, (out, -1, row, n)))
                    outputs[-1].meta.update(members[i].meta)
                    row += n
            for i, output in zip(rows, outputs):
                members[i].replace_all_uses_with(output)
                graph.erase_node(members[i])
            fused_inputs += [[p.target for p in nodes] for nodes in parts.values()]
    graph.lint()
    gm.recompile()
    return fused_inputs


def _warn_if_fusable(same_input):
    """Warns where layers on one input with one layout keep separate weights."""
    loose = [members[0] for members in same_input if len(members) == 1]
    layouts = {tuple(_meta(arg).shape[1] for arg in _linear_args(node, False)[2:4])
               for node in loose}
    if len(loose) > 1 and len(layouts) == 1:
        log.warning("apex4 backend: %d quantized layers read %s at one granularity but keep "
                    "separate weights, so they run as separate GEMMs; call "
                    "torch_apex4.fuse_projections_(model) before compiling (after any .to(), "
                    "which copies fused weights apart)", len(loose),
                    _linear_args(loose[0], False)[0].name)


def _whole_tensor(graph, parts):
    """The tensor whose consecutive rows `parts` (graph inputs) are, as a
    view through the first of them."""
    first = _meta(parts[0])
    shape = (sum(_meta(p).shape[0] for p in parts),) + tuple(first.shape[1:])
    stride = tuple(first.stride())
    node = graph.call_function(torch.as_strided, (parts[0], shape, stride, first.storage_offset()))
    node.meta["example_value"] = _fake_call(torch.as_strided, node.args)
    return node


def _fake_call(fn, args):
    """fn on the graph nodes' example values (under their fake mode)."""
    values = [_meta(a) if isinstance(a, fx.Node) else a for a in args]
    fake_mode = next(v.fake_mode for v in values if hasattr(v, "fake_mode"))
    with fake_mode:
        return fn(*values)


def checked_fusion(compiled, gm: fx.GraphModule, fused_inputs: List[List[str]]):
    """`compiled`, checking first at every call that the inputs fused at
    compile time still lie where the graph reads them: the first at its
    storage offset, the others right after it (a model moved or given new
    buffers after torch.compile would otherwise be read wrongly). Data
    pointers only, so the check costs about a microsecond per fused tensor."""
    if not fused_inputs:
        return compiled
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = {node.target: i for i, node in enumerate(placeholders)}
    checks = []
    for names in fused_inputs:
        values = [_meta(placeholders[index[name]]) for name in names]
        deltas, delta = [], 0
        for name, value in zip(names, values):
            deltas.append((index[name], delta))
            delta += value.numel() * value.element_size()
        checks.append((index[names[0]], values[0].storage_offset(), deltas[1:], names[0]))

    @functools.wraps(compiled)
    def run(*args):
        # Dynamo passes the inputs as arguments; callers of the boxed
        # convention (compiled._boxed_call) as one list.
        inputs = args[0] if len(args) == 1 and isinstance(args[0], list) else args
        for first, offset, rest, name in checks:
            base = inputs[first].data_ptr()
            if inputs[first].storage_offset() != offset or any(
                    inputs[i].data_ptr() != base + delta for i, delta in rest):
                raise RuntimeError(
                    "apex4 backend: the sibling layers fused at compile time no longer keep their "
                    f"weights in one tensor ({name} ...): the model was moved or its buffers "
                    "replaced after torch.compile. Call torch_apex4.fuse_projections_(model) and "
                    "torch._dynamo.reset(), then compile again.")
        return compiled(*args)

    return run


def rewrite_quantized_linears(gm: fx.GraphModule, planner=None) -> int:
    """Rewrite the quantized linear nodes in place (all of them without a
    planner; see the module docstring); returns how many were lowered. With a
    planner, gm.meta["apex4_kernel_plan"] lists a KernelChoice per planned layer."""
    from .costmodel import DECODE, DECODE_MAX_TOKENS

    graph = gm.graph
    count = 0
    choices = []
    # Layers that read the same input at the same quantization (q/k/v, gate/up)
    # share one quantizer call: (x, rotation, group_size, act_clip) -> (a_q, a_s).
    quantized_inputs = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in W4A4_LINEAR + W4A4_ROTATED_LINEAR:
            continue
        rotated = node.target in W4A4_ROTATED_LINEAR
        x, rotation, w_q, w_s, bias, act_clip = _linear_args(node, rotated)
        group_size = _group_size(w_q, w_s)
        m = _static_tokens(x)
        if planner is not None and m is not None and m > 0:
            n, k = _meta(w_q).shape[0], _meta(x).shape[-1]
            estimate = planner.kernel_for(m, n, k, group_size)
            # The decode pair exists only for unrotated layers (w4a4_linear on CUDA).
            keep = estimate.variant == DECODE and m <= DECODE_MAX_TOKENS and not rotated
            runs = planner.model.auto_variant(m, group_size)
            choices.append(KernelChoice(node.name, m, n, k, group_size, estimate.variant,
                                        estimate.total * 1e6, runs, keep))
            if keep:
                continue
        with graph.inserting_before(node):
            key = (x, rotation, group_size, act_clip)
            if key not in quantized_inputs:
                if rotated:
                    quantized = graph.call_function(HADAMARD_QUANTIZE_ACT,
                                                    (x, rotation, group_size, act_clip))
                else:
                    quantized = graph.call_function(QUANTIZE_ACT, (x, group_size, act_clip))
                quantized_inputs[key] = (graph.call_function(operator.getitem, (quantized, 0)),
                                         graph.call_function(operator.getitem, (quantized, 1)))
            a_q, a_s = quantized_inputs[key]
            out = graph.call_function(W4A4_GEMM, (a_q, a_s, w_q, w_s, bias, _meta(x).dtype))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        count += 1
    if planner is not None:
        gm.meta["apex4_kernel_plan"] = choices
    graph.lint()
    gm.recompile()
    return count


def prefetch_next_weights(gm: fx.GraphModule) -> int:
    """Pass every GEMM node (w4a4_gemm, or a w4a4_linear the rewrite kept) with
    a static token count of at most DECODE_MAX_TOKENS, which runs the
    memory-bound decode kernel, the weight of the GEMM after it in the graph
    as `prefetch`: DRAM, otherwise idle during the norms, attention and
    quantizer between two GEMMs, then streams that weight into L2. Changes no
    result. A fused weight (an as_strided view) is viewed again before the
    node that prefetches it. Returns how many GEMMs got one."""
    from .costmodel import DECODE_MAX_TOKENS

    graph = gm.graph
    gemms = [node for node in graph.nodes
             if node.op == "call_function" and node.target in (W4A4_GEMM,) + W4A4_LINEAR]
    count = 0
    for node, following in zip(gemms, gemms[1:]):
        m = _static_tokens(node)
        if m is None or m > DECODE_MAX_TOKENS:
            continue
        weight = following.args[2] if following.target == W4A4_GEMM else \
            _linear_args(following, False)[2]
        if weight.op == "call_function":
            if any(isinstance(a, fx.Node) and a.op != "placeholder" for a in weight.args):
                continue
            with graph.inserting_before(node):
                view = graph.call_function(weight.target, weight.args, weight.kwargs)
            view.meta.update(weight.meta)
            weight = view
        node.kwargs = {**node.kwargs, "prefetch": weight}
        count += 1
    graph.lint()
    gm.recompile()
    return count


def _linear_args(node, rotated):
    """(x, rotation or None, w_q, w_s, bias, act_clip) of either linear op."""
    names = ["x", "rotation", "w_q", "w_s", "bias", "act_clip"] if rotated else \
        ["x", "w_q", "w_s", "bias", "act_clip"]
    values = {"bias": None, "act_clip": 1.0, "rotation": None}
    values.update(zip(names, node.args))
    values.update(node.kwargs)
    return tuple(values[n] for n in ["x", "rotation", "w_q", "w_s", "bias", "act_clip"])


def _quantized_device(gm: fx.GraphModule) -> Optional[torch.device]:
    """The device of the graph's first quantized weight (None without one)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in W4A4_LINEAR + W4A4_ROTATED_LINEAR:
            return _meta(_linear_args(node, node.target in W4A4_ROTATED_LINEAR)[2]).device
    return None


def planner_for(gm: fx.GraphModule):
    """A Planner for the GPU the graph's quantized weights are on: its rho
    table entry, else its cached probe. None on the CPU, for graphs without
    quantized layers, and for an unknown, unprobed GPU (with a warning: probing
    takes seconds, so compilation does not do it)."""
    from . import rho
    from .costmodel import CostModel
    from .planner import Planner

    device = _quantized_device(gm)
    if device is None or device.type != "cuda":
        return None
    try:
        return Planner(CostModel(rho.gpu_spec(device, allow_probe=False)))
    except LookupError as error:
        log.warning("apex4 backend: no kernel plan (%s)", error)
        return None


def inductor_config(mode=None, options=None) -> dict:
    """The Inductor config patches of torch.compile's `mode` and `options`, as
    backend="inductor" derives them (mode="reduce-overhead": CUDA graphs)."""
    from torch._inductor import list_mode_options

    patches = {}
    if mode not in (None, "default"):
        modes = list_mode_options()
        if mode not in modes:
            raise ValueError(f"apex4 backend: unknown torch.compile mode {mode!r}; "
                             f"one of {sorted(modes)}")
        patches.update(modes[mode])
    if options is not None:
        if not isinstance(options, dict):
            raise TypeError(f"apex4 backend: options must be a dict, got {type(options).__name__}")
        patches.update(options)
    return patches


def apex4_backend(gm: fx.GraphModule, example_inputs, mode=None, options=None):
    """torch.compile(model, backend="apex4", mode=..., options=...): the rewrite
    (planned for the graph's GPU), then Inductor with the config that
    mode/options give backend="inductor"."""
    from torch._inductor.compile_fx import compile_fx

    config = inductor_config(mode, options)
    planner = planner_for(gm)
    on_cuda = getattr(_quantized_device(gm), "type", None) == "cuda"
    fused_inputs = fuse_sibling_linears(gm)
    rewrite_quantized_linears(gm, planner)
    if PREFETCH_NEXT_WEIGHTS and on_cuda:
        prefetch_next_weights(gm)
    if planner is not None:
        kernel_plans.append(gm.meta["apex4_kernel_plan"])
        del kernel_plans[:-_MAX_PLANS]
        log.info("apex4 kernel plan on %s:\n%s", planner.model.spec.name,
                 format_kernel_plan(kernel_plans[-1]))
    return checked_fusion(compile_fx(gm, example_inputs, config_patches=config), gm,
                          fused_inputs)
