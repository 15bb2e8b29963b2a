"""The "apex4" torch.compile backend (registered through the
`torch_dynamo_backends` entry point in setup.py).

Dynamo hands over an FX graph in which every quantized linear layer is one
`apex4.w4a4_linear` call, or `apex4.w4a4_rotated_linear` for a layer whose
input is rotated online (what W4A4Linear.forward emits).
`rewrite_quantized_linears` is the single place where the backend decides how
each of them runs; today it lowers each into its activation quantizer
(`quantize_act`, or `hadamard_quantize_act` with the rotation fused) +
`w4a4_gemm` at the weight's granularity. The graph then goes to Inductor, which
compiles everything around the apex4 ops.
"""
import operator

import torch
from torch import fx

_ops = torch.ops.apex4
# Dynamo records the call as written: the op packet or its overload.
W4A4_LINEAR = (_ops.w4a4_linear, _ops.w4a4_linear.default)
W4A4_ROTATED_LINEAR = (_ops.w4a4_rotated_linear, _ops.w4a4_rotated_linear.default)
QUANTIZE_ACT = _ops.quantize_act.default
HADAMARD_QUANTIZE_ACT = _ops.hadamard_quantize_act.default
W4A4_GEMM = _ops.w4a4_gemm.default


def _meta(node):
    value = node.meta.get("example_value", node.meta.get("val"))
    if value is None:
        raise RuntimeError(f"apex4 backend: no shape information on graph node {node.name}")
    return value


def _group_size(w_q_node, w_s_node):
    groups = _meta(w_s_node).shape[1]
    return None if groups == 1 else _meta(w_q_node).shape[1] * 2 // groups


def rewrite_quantized_linears(gm: fx.GraphModule) -> int:
    """Rewrite each quantized linear node in place; returns how many."""
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in W4A4_LINEAR + W4A4_ROTATED_LINEAR:
            continue
        rotated = node.target in W4A4_ROTATED_LINEAR
        x, rotation, w_q, w_s, bias, act_clip = _linear_args(node, rotated)
        group_size = _group_size(w_q, w_s)
        with graph.inserting_before(node):
            if rotated:
                quantized = graph.call_function(HADAMARD_QUANTIZE_ACT,
                                                (x, rotation, group_size, act_clip))
            else:
                quantized = graph.call_function(QUANTIZE_ACT, (x, group_size, act_clip))
            a_q = graph.call_function(operator.getitem, (quantized, 0))
            a_s = graph.call_function(operator.getitem, (quantized, 1))
            out = graph.call_function(W4A4_GEMM, (a_q, a_s, w_q, w_s, bias, _meta(x).dtype))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
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


def apex4_backend(gm: fx.GraphModule, example_inputs, **kwargs):
    from torch._inductor.compile_fx import compile_fx

    rewrite_quantized_linears(gm)
    return compile_fx(gm, example_inputs, **kwargs)
