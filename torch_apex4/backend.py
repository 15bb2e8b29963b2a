"""The "apex4" torch.compile backend (registered through the
`torch_dynamo_backends` entry point in setup.py).

Dynamo hands over an FX graph in which every quantized linear layer is one
`apex4.w4a4_linear` call (what W4A4Linear.forward emits). `rewrite_quantized_linears`
is the single place where the backend decides how each of them runs; today it
lowers each into `quantize_act` + `w4a4_gemm` at the weight's granularity. The
graph then goes to Inductor, which compiles everything around the apex4 ops.
"""
import operator

import torch
from torch import fx

# Dynamo records the call as written: the op packet or its overload.
W4A4_LINEAR = (torch.ops.apex4.w4a4_linear, torch.ops.apex4.w4a4_linear.default)
QUANTIZE_ACT = torch.ops.apex4.quantize_act.default
W4A4_GEMM = torch.ops.apex4.w4a4_gemm.default


def _meta(node):
    value = node.meta.get("example_value", node.meta.get("val"))
    if value is None:
        raise RuntimeError(f"apex4 backend: no shape information on graph node {node.name}")
    return value


def _group_size(w_q_node, w_s_node):
    groups = _meta(w_s_node).shape[1]
    return None if groups == 1 else _meta(w_q_node).shape[1] * 2 // groups


def rewrite_quantized_linears(gm: fx.GraphModule) -> int:
    """Rewrite each apex4.w4a4_linear node in place; returns how many."""
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in W4A4_LINEAR:
            continue
        x, w_q, w_s, bias, act_clip = _linear_args(node)
        out_dtype = _meta(x).dtype
        with graph.inserting_before(node):
            quantized = graph.call_function(QUANTIZE_ACT, (x, _group_size(w_q, w_s), act_clip))
            a_q = graph.call_function(operator.getitem, (quantized, 0))
            a_s = graph.call_function(operator.getitem, (quantized, 1))
            out = graph.call_function(W4A4_GEMM, (a_q, a_s, w_q, w_s, bias, out_dtype))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        count += 1
    graph.lint()
    gm.recompile()
    return count


def _linear_args(node):
    defaults = {"bias": None, "act_clip": 1.0}
    names = ["x", "w_q", "w_s", "bias", "act_clip"]
    values = dict(zip(names, node.args))
    values.update(node.kwargs)
    return tuple(values.get(n, defaults.get(n)) for n in names)


def apex4_backend(gm: fx.GraphModule, example_inputs, **kwargs):
    from torch._inductor.compile_fx import compile_fx

    rewrite_quantized_linears(gm)
    return compile_fx(gm, example_inputs, **kwargs)
