"""Tensor parallelism (Megatron-style) for Llama-style apex4 models, on
torch.distributed collectives.

`parallelize_(model)` shards every decoder block over the ranks of a process
group. Column-parallel layers (q/k/v_proj, gate/up_proj) keep the output rows
of this rank and read the replicated input; row-parallel layers (o_proj,
down_proj) keep the matching input columns and sum their float outputs with
an all_reduce. Attention splits by heads (query and key/value heads must
divide evenly), the MLP by its intermediate features. Embeddings, norms and
the LM head are replicated.

Sharding a quantized layer moves no values: rows of w_q/w_s for column
parallelism, packed bytes and scale columns for row parallelism. Shard edges
along a row-parallel layer's K fall on multiples of its quantization unit
(the group size, or the kernels' K alignment per channel), so a scale group
never straddles two ranks; the last shard keeps K's zero-padded tail.

Activation quantization sees what it would see in one process:
- grouped, unrotated layers quantize their local input slice (its groups are
  local), so the INT4 activations are exactly those of one process;
- per-channel layers (one scale per token over all of K) and online-rotated
  layers (the rotation mixes all of K) all-gather the input, quantize it
  whole and keep their columns: exact as well, for one extra collective.
What differs from one process is only the order of the float summation of
the row-parallel partial outputs.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .ops import num_groups, ops, padded_k
from .quantize import Float32Buffers, W4A4Linear, fuse_projections_
from .rotation import KNOWN_MODEL_TYPES, RotatedInputLinear

COLUMN_ATTENTION = ("q_proj", "k_proj", "v_proj")
COLUMN_MLP = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class LayerShards:
    """How one block is split: edges[r]..edges[r + 1] are rank r's features."""
    query: tuple        # q_proj rows = o_proj columns
    key_value: tuple    # k_proj / v_proj rows
    intermediate: tuple  # gate/up rows = down_proj columns


def _unit(layer: nn.Module) -> int:
    """Smallest K step a row-parallel shard of `layer` may take."""
    if isinstance(layer, W4A4Linear):
        return padded_k(1, layer.group_size)  # the group, or the K alignment
    return 1


def _even_edges(total: int, parts: int, unit: int, what: str) -> tuple:
    units = -(-total // unit)
    if units < parts:
        raise ValueError(f"parallelize_: {what} has {total} features = {units} units of {unit}; "
                         f"cannot give each of {parts} ranks a share")
    return tuple(min(total, (r * units // parts) * unit) for r in range(parts + 1))


def _check_edges(edges: tuple, unit: int, what: str):
    inner = [e for e in edges[1:-1] if e % unit]
    if inner:
        raise ValueError(f"parallelize_: {what} would be cut at feature {inner[0]}, not a multiple "
                         f"of its quantization unit {unit}; a scale group cannot straddle two ranks")


def tensor_parallel_shards(model: nn.Module, tp: int) -> list:
    """The LayerShards of every decoder block for `tp` ranks; ValueError when
    the model cannot be split that way."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"parallelize_: tp_size must be a positive int, got {tp!r}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if model_type not in KNOWN_MODEL_TYPES or layers is None:
        raise ValueError(f"parallelize_: supports Llama-style models {KNOWN_MODEL_TYPES}, "
                         f"got {model_type or type(model).__name__}")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % tp or kv_heads % tp:
        raise ValueError(f"parallelize_: {heads} query and {kv_heads} key/value heads cannot be "
                         f"split evenly over {tp} ranks")
    shards = []
    for i, layer in enumerate(layers):
        query = tuple(r * heads // tp * head_dim for r in range(tp + 1))
        key_value = tuple(r * kv_heads // tp * head_dim for r in range(tp + 1))
        _check_edges(query, _unit(layer.self_attn.o_proj), f"layer {i} o_proj")
        down = layer.mlp.down_proj
        intermediate = _even_edges(down.in_features, tp, _unit(down), f"layer {i} down_proj")
        shards.append(LayerShards(query, key_value, intermediate))
    return shards


def _column_shard(layer: nn.Module, lo: int, hi: int) -> nn.Module:
    """The output rows lo:hi of `layer`, as a layer of the same kind."""
    bias = None if layer.bias is None else layer.bias[lo:hi].clone()
    if isinstance(layer, W4A4Linear):
        return W4A4Linear(layer.w_q[lo:hi].clone(), layer.w_s[lo:hi].clone(), bias,
                          layer.in_features, layer.act_clip, layer.rotation)
    shard = type(layer)(layer.in_features, hi - lo, bias is not None, device="meta")
    shard.weight = nn.Parameter(layer.weight[lo:hi].clone(), requires_grad=False)
    shard.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    if isinstance(layer, RotatedInputLinear):
        shard.rotation = layer.rotation
    return shard


class RowParallelLinear(Float32Buffers):
    """Input columns edges[rank]:edges[rank + 1] of a linear layer (float,
    online-rotated float, or W4A4), summing the float outputs over the group.
    The bias is added once, after the sum."""

    def __init__(self, layer: nn.Module, edges: tuple, rank: int, group):
        super().__init__()
        self.edges, self.rank, self.group = edges, rank, group
        lo, hi = edges[rank], edges[rank + 1]
        self.in_features, self.out_features = hi - lo, layer.out_features
        self.quantized = isinstance(layer, W4A4Linear)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.register_buffer("rotation", getattr(layer, "rotation", None))
        if not self.quantized:
            self.register_buffer("weight", layer.weight.detach()[:, lo:hi].contiguous())
            self.gather = self.rotation is not None
            return
        self.group_size, self.act_clip = layer.group_size, layer.act_clip
        # Packed bytes and scale groups of this shard; lo is a multiple of the
        # unit, so padded_k(hi - lo) reaches K's padding on the last rank.
        self.packed = (lo // 2, (lo + padded_k(hi - lo, self.group_size)) // 2)
        grouped = self.group_size is not None
        self.groups = (lo // self.group_size, lo // self.group_size
                       + num_groups(hi - lo, self.group_size)) if grouped else (0, 1)
        self.register_buffer("w_q", layer.w_q[:, slice(*self.packed)].contiguous())
        self.register_buffer("w_s", layer.w_s[:, slice(*self.groups)].contiguous())
        self.gather = not grouped or self.rotation is not None

    def _gather_input(self, x):
        """The whole input row from every rank's slice (slices may differ in
        width: padded to the widest for the collective, then trimmed)."""
        widths = [b - a for a, b in zip(self.edges, self.edges[1:])]
        rows = x.reshape(-1, x.shape[-1])
        padded = nn.functional.pad(rows, (0, max(widths) - rows.shape[-1])).contiguous()
        gathered = padded.new_empty((len(widths) * padded.shape[0], padded.shape[1]))
        dist.all_gather_into_tensor(gathered, padded, group=self.group)
        gathered = gathered.view(len(widths), *padded.shape)
        whole = torch.cat([gathered[r, :, :w] for r, w in enumerate(widths)], dim=-1)
        return whole.view(*x.shape[:-1], whole.shape[-1])

    def _local_partial(self, x):
        if not self.quantized:
            if self.gather:
                lo, hi = self.edges[self.rank], self.edges[self.rank + 1]
                x = ops.hadamard(self._gather_input(x), self.rotation)[..., lo:hi]
            return nn.functional.linear(x, self.weight)
        if self.gather:
            full = self._gather_input(x)
            if self.rotation is None:
                a_q, a_s = ops.quantize_act(full, self.group_size, self.act_clip)
            else:
                a_q, a_s = ops.hadamard_quantize_act(full, self.rotation, self.group_size,
                                                     self.act_clip)
            a_q = a_q[..., slice(*self.packed)].contiguous()
            a_s = a_s[..., slice(*self.groups)].contiguous()
        else:
            a_q, a_s = ops.quantize_act(x, self.group_size, self.act_clip)
        return ops.w4a4_gemm(a_q, a_s, self.w_q, self.w_s, None, x.dtype)

    def forward(self, x):
        y = self._local_partial(x)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        kind = "w4a4" if self.quantized else "float"
        return (f"{kind}, in_features={self.in_features} of {self.edges[-1]}, "
                f"out_features={self.out_features}, rank={self.rank}/{len(self.edges) - 1}, "
                f"gather_input={self.gather}")


@torch.no_grad()
def parallelize_(model: nn.Module, tp_size: int | None = None, group=None) -> nn.Module:
    """Shards `model` (a quantized, possibly rotated, or float Llama-style
    causal LM, e.g. from load_quantized) in place for this rank of `group`
    (default: the whole world). Every rank must call it on the same model.
    Returns the model."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("parallelize_: torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    group = group or dist.group.WORLD
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    if tp_size is not None and tp_size != tp:
        raise ValueError(f"parallelize_: tp_size={tp_size} but the process group has {tp} ranks")
    if getattr(model, "apex4_tensor_parallel", None) is not None:
        raise ValueError("parallelize_: the model is already parallelized")
    shards = tensor_parallel_shards(model, tp)
    for layer, shard in zip(model.model.layers, shards):
        attn, mlp = layer.self_attn, layer.mlp
        for name in COLUMN_ATTENTION:
            edges = shard.query if name == "q_proj" else shard.key_value
            setattr(attn, name, _column_shard(getattr(attn, name), edges[rank], edges[rank + 1]))
        attn.o_proj = RowParallelLinear(attn.o_proj, shard.query, rank, group)
        edges = shard.intermediate
        for name in COLUMN_MLP:
            setattr(mlp, name, _column_shard(getattr(mlp, name), edges[rank], edges[rank + 1]))
        mlp.down_proj = RowParallelLinear(mlp.down_proj, edges, rank, group)
    model.apex4_tensor_parallel = {"tp": tp, "rank": rank}
    fuse_projections_(model)
    return model
