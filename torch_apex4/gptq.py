"""GPTQ weight quantization (Frantar et al., 2022) on the apex4 INT4 grid, clipping-ratio
search for weights and activations, and a sequential calibration pass over a whole model.

The grid is the kernels' exactly (docs/design.md): symmetric −7…7, one fp32 scale per group
of `group_size` columns (or per row), `scale = amax · clip / 7`, `q = clamp(rint(w / scale))`,
K zero-padded to `padded_k(K, group_size)`. So `pack_int4(values)` and `scales` from
`gptq_quantize` are a W4A4Linear's `w_q` and `w_s` as they stand.

    stats = calibrate_gptq_(model, calibration_ids, W4A4Config(group_size=128),
                            weight_clip_candidates=CLIP_CANDIDATES,
                            act_clip_candidates=CLIP_CANDIDATES)

Errors are measured on a layer's output: with H = 2/n Σ xᵀx over calibration inputs x, the
error of a quantized weight Ŵ is tr((W − Ŵ) H (W − Ŵ)ᵀ) = (2/n) ‖X Wᵀ − X Ŵᵀ‖², the
quantity GPTQ minimises column by column.
"""
import inspect
import math
from typing import Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .ops import num_groups, ops, padded_k
from .plan import Granularity, GranularityPlan, check_granularity, granularity_label
from .quantize import W4A4Config, W4A4Linear, fuse_projections_, layer_config, quantize_targets
from .rotation import RotatedInputLinear

QMAX = 7  # the symmetric INT4 grid −7…7
CLIP_CANDIDATES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


# ---------------------------------------------------------------------------------------------
# The INT4 grid, in torch, with the kernels' fp32 operations


def _group_scale(amax: Tensor, clip: Tensor) -> Tensor:
    """fp32 `amax · clip / 7`, rounded after each operation as in int4.h's group_scale."""
    return amax * clip / float(QMAX)


def _quantize_column(w: Tensor, scale: Tensor) -> Tensor:
    """int4.h's quantize_value on fp32 tensors: a zero scale gives 0."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe).clamp_(-QMAX, QMAX)
    return torch.where(scale > 0, q, torch.zeros_like(q))


def dequantize(values: Tensor, scales: Tensor) -> Tensor:
    """float32 [..., Kp] of INT4 values [..., Kp] (int8) times their group scales [..., G]."""
    groups = scales.shape[-1]
    grouped = values.float().reshape(*values.shape[:-1], groups, -1)
    return (grouped * scales.unsqueeze(-1)).reshape(values.shape)


# ---------------------------------------------------------------------------------------------
# Hessians and output errors


def hessian_from_inputs(inputs: Tensor) -> Tensor:
    """H = 2/n Σ xᵀx (float64 [K, K]) over the n rows of `inputs` [..., K]."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    if x.shape[0] == 0:
        raise ValueError("hessian_from_inputs needs at least one input row")
    return (x.T @ x).double() * (2.0 / x.shape[0])


def row_output_errors(weight: Tensor, quantized: Tensor, hessian: Tensor) -> Tensor:
    """Per row n: (w_n − ŵ_n) H (w_n − ŵ_n)ᵀ as float64 [N] (products in fp32, plenty to rank
    candidates). `quantized` may be K-padded."""
    delta = weight.float() - quantized[:, :weight.shape[1]].float()
    return ((delta @ hessian.float()) * delta).double().sum(-1)


def output_error(weight: Tensor, quantized: Tensor, hessian: Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ): the layer's squared output error (times 2/n) on the inputs of H."""
    return row_output_errors(weight, quantized, hessian).sum().item()


# ---------------------------------------------------------------------------------------------
# GPTQ


def _check_weight_and_hessian(weight: Tensor, hessian: Tensor):
    if not isinstance(weight, Tensor) or not isinstance(hessian, Tensor):
        raise TypeError("weight and hessian must be tensors")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point() or not hessian.is_floating_point():
        raise TypeError(f"weight and hessian must be floating point, got {weight.dtype} and "
                        f"{hessian.dtype}")
    k = weight.shape[1]
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [K, K] = [{k}, {k}] for a weight of shape "
                         f"{tuple(weight.shape)}, got {tuple(hessian.shape)}")
    if not torch.isfinite(weight).all() or not torch.isfinite(hessian).all():
        raise ValueError("weight and hessian must be finite (no NaN or Inf)")


def _row_clip(clip_ratio: Union[float, Tensor], rows: int, device) -> Tensor:
    """The clip ratio as an fp32 column [N, 1] (one value, or one per row)."""
    clip = torch.as_tensor(clip_ratio, dtype=torch.float32, device=device)
    if clip.dim() == 0:
        clip = clip.expand(rows)
    if clip.shape != (rows,):
        raise ValueError(f"clip_ratio must be a float or a tensor of {rows} per-row ratios, "
                         f"got shape {tuple(clip.shape)}")
    if not torch.all((clip > 0) & (clip <= 1)):
        raise ValueError("clip_ratio must lie in (0, 1]")
    return clip.reshape(rows, 1)


def _prepare(weight: Tensor, hessian: Tensor, kp: int, damp: float):
    """fp32 weight and damped float64 Hessian H + λI, λ = damp · mean(diag H), padded from K
    to Kp. As in the reference GPTQ, dead inputs (zero Hessian diagonal: never active in
    calibration) get H_ii = 1 and zero weights; so do the padding columns, which then quantize
    to 0 and, being uncoupled from the rest, change nothing."""
    k = weight.shape[1]
    w = F.pad(weight.detach().float(), (0, kp - k))
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, :k][:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype, device=h.device)
    h = F.pad(h, (0, kp - k, 0, kp - k))
    padding = torch.arange(k, kp, device=h.device)
    h[padding, padding] = 1.0
    return w, h


def _inverse_hessian_cholesky(hessian: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor U of H⁻¹ (H damped), computed in float64.

    GPTQ's updates are rows of U: quantizing column i moves the remaining columns by
    err_i · U[i, i+1:] / U[i, i], the optimal compensation given the columns already fixed.
    """
    lower, info = torch.linalg.cholesky_ex(hessian)
    if info.item() != 0:
        raise ValueError(f"the damped Hessian is not positive definite (damp={damp}); raise damp")
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def gptq_quantize(weight: Tensor, hessian: Tensor, group_size: Optional[int],
                  clip_ratio: Union[float, Tensor] = 1.0, block_size: int = 32,
                  damp: float = 0.01, act_order: bool = False):
    """GPTQ-quantize `weight` [N, K] for the inputs whose Hessian is `hessian` [K, K].

    Returns (values int8 [N, Kp] in −7…7, scales float32 [N, G]) in the apex4 layout:
    `pack_int4(values)` and `scales` are a W4A4Linear's w_q and w_s.

    Columns are quantized left to right (or by decreasing H_ii with act_order), each one's
    rounding error spread over the columns not yet quantized; updates are applied lazily, one
    block of `block_size` columns at a time (the result does not depend on it beyond fp32
    rounding; 32 runs about twice as fast as 128 on CPU). Scales: per channel (group_size None) from each whole row upfront; per group
    from the error-updated weights when the group's first column is reached (the block size is
    reduced to gcd(block_size, group_size) so that a group starts at a block boundary, where all
    its columns are up to date). With act_order the group scales are taken upfront from the
    original weights ("static groups"), which keeps groups contiguous in natural K order as the
    kernels require; act_order usually lowers the error.

    clip_ratio: a float, or a tensor [N] of per-row ratios; damp: fraction of mean(diag H)
    added to the diagonal.
    """
    _check_weight_and_hessian(weight, hessian)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if damp < 0:
        raise ValueError(f"damp must be non-negative, got {damp}")
    rows, k = weight.shape
    kp = padded_k(k, group_size)  # also validates group_size
    group = group_size or kp
    clip = _row_clip(clip_ratio, rows, weight.device)
    w, h = _prepare(weight, hessian, kp, damp)

    static_scales = act_order or group_size is None
    if static_scales:
        scales = _group_scale(w.reshape(rows, -1, group).abs().amax(-1), clip)
    else:  # filled in as each group is reached
        scales = torch.zeros(rows, num_groups(k, group_size), dtype=torch.float32, device=w.device)
    order = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if order is not None:
        w, h = w[:, order], h[order][:, order]
    column_group = (order if order is not None else torch.arange(kp, device=w.device)) // group

    inverse = _inverse_hessian_cholesky(h, damp).float()
    if not static_scales:
        # Every group must start at a block boundary: its current weights are then all in w.
        block_size = math.gcd(block_size, group)
    values = torch.empty(rows, kp, dtype=torch.int8, device=w.device)
    for start in range(0, kp, block_size):
        end = min(start + block_size, kp)
        if not static_scales and start % group == 0:
            amax = w[:, start:start + group].abs().amax(-1)
            scales[:, start // group] = _group_scale(amax, clip[:, 0])
        block_values, errors = _quantize_block(w[:, start:end], inverse[start:end, start:end],
                                               scales[:, column_group[start:end]].T)
        values[:, start:end] = block_values.T
        # The lazy batch update: the block's errors, propagated to all later columns at once.
        w[:, end:].addmm_(errors.T, inverse[start:end, end:], alpha=-1)
    if order is not None:
        values = values[:, torch.argsort(order)]
    return values, scales


def _quantize_block(w: Tensor, inverse: Tensor, column_scales: Tensor):
    """Quantize the columns of one block w [N, B] in order, moving the block's remaining columns
    after each by its error. Works on the transpose, so a column is a contiguous row.

    column_scales [B, N]: the scale of each column's group. Returns (values int8 [B, N], scaled
    errors [B, N] for the lazy update of the later blocks)."""
    w = w.T.clone()
    values = torch.empty_like(w, dtype=torch.int8)
    errors = torch.empty_like(w)
    for i in range(w.shape[0]):
        q = _quantize_column(w[i], column_scales[i])
        values[i] = q
        errors[i] = (w[i] - q * column_scales[i]) / inverse[i, i]
        w[i:].addr_(inverse[i, i:], errors[i], alpha=-1)
    return values, errors


# ---------------------------------------------------------------------------------------------
# Clipping-ratio search


def _check_candidates(candidates: Sequence[float]):
    if len(candidates) == 0 or not all(0 < c <= 1 for c in candidates):
        raise ValueError(f"clip candidates must be a non-empty sequence in (0, 1], "
                         f"got {candidates}")


def search_weight_clip(weight: Tensor, hessian: Tensor, group_size: Optional[int],
                       candidates: Sequence[float] = CLIP_CANDIDATES, per_row: bool = False,
                       **gptq_options) -> Union[float, Tensor]:
    """The weight clip ratio minimising the GPTQ-quantized layer's output error
    tr((W − Ŵ) H (W − Ŵ)ᵀ), Ŵ = gptq_quantize(weight, hessian, group_size, clip, ...).

    GPTQ, not RTN, is searched because it is what gets deployed and it prefers milder clipping
    (its error feedback already absorbs part of the rounding error). GPTQ treats rows
    independently, so all candidates run as one batched call with per-row ratios, and with
    per_row=True each row keeps its own best ratio (a tensor [N]; free at inference time, as it
    is folded into the scales). Ties keep the earlier candidate, so with 1.0 listed first the
    chosen ratio never does worse than no clipping on the calibration inputs.
    """
    _check_candidates(candidates)
    _check_weight_and_hessian(weight, hessian)
    rows = weight.shape[0]
    stacked = weight.detach().float().repeat(len(candidates), 1)
    ratios = torch.tensor(candidates, dtype=torch.float32, device=weight.device)
    values, scales = gptq_quantize(stacked, hessian, group_size, ratios.repeat_interleave(rows),
                                   **gptq_options)
    errors = row_output_errors(stacked, dequantize(values, scales), hessian)
    errors = errors.reshape(len(candidates), rows)
    if per_row:
        return ratios[errors.argmin(0)]
    return candidates[int(errors.sum(1).argmin())]


def _dequantized_act(x: Tensor, group_size: Optional[int], clip: float) -> Tensor:
    """deq(q(x)) [T, Kp] through the real activation quantizer."""
    packed, scales = ops.quantize_act(x, group_size, clip)
    return dequantize(ops.unpack_int4(packed), scales)


def search_act_clip(inputs: Tensor, weight: Tensor, group_size: Optional[int],
                    candidates: Sequence[float] = CLIP_CANDIDATES,
                    quantized_weight: Optional[Tensor] = None) -> float:
    """The activation clip ratio minimising ‖X Wᵀ − deq(q(X)) Ŵᵀ‖ on calibration inputs
    `inputs` [..., K] (as the weight sees them), with q = apex4.quantize_act at `group_size`.

    weight: the float weight [N, K] (the reference output); quantized_weight: the dequantized
    weight Ŵ [N, K] the layer will run with (default: `weight`, which measures the activation
    error alone). Ties keep the earlier candidate.
    """
    _check_candidates(candidates)
    if weight.dim() != 2 or inputs.shape[-1] != weight.shape[1]:
        raise ValueError(f"inputs [..., K] and weight [N, K] must share K, got "
                         f"{tuple(inputs.shape)} and {tuple(weight.shape)}")
    w_hat = weight if quantized_weight is None else quantized_weight
    if w_hat.shape != weight.shape:
        raise ValueError(f"quantized_weight must have the weight's shape {tuple(weight.shape)}, "
                         f"got {tuple(w_hat.shape)}")
    k = weight.shape[1]
    x = inputs.detach().reshape(-1, k).float()
    reference = x @ weight.detach().float().T
    w_hat_padded = F.pad(w_hat.detach().float(), (0, padded_k(k, group_size) - k))
    errors = [(reference - _dequantized_act(x, group_size, c) @ w_hat_padded.T).square().sum()
              for c in candidates]
    return candidates[int(torch.stack(errors).argmin())]  # the first of equal minima


# ---------------------------------------------------------------------------------------------
# Sequential calibration over a model


class _StopForward(Exception):
    """Raised by the capture hook once the first decoder block's inputs are recorded."""


def _input_rotation(module: nn.Module) -> Optional[Callable[[Tensor], Tensor]]:
    """The online rotation a layer applies to x inside its forward before F.linear, if any
    (RotatedInputLinear.input_rotation)."""
    return getattr(module, "input_rotation", None)


def _rotation_factor(linear: nn.Linear) -> Optional[Tensor]:
    """The rotation factor the W4A4Linear needs to rotate its input online as `linear` does."""
    if isinstance(linear, RotatedInputLinear):
        return linear.rotation
    if _input_rotation(linear) is not None:
        raise TypeError(f"{type(linear).__name__} rotates its input online, but only a "
                        "RotatedInputLinear's rotation can be carried over to a W4A4Linear")
    return None


class _LinearInputs:
    """Calibration statistics of one linear's inputs (as the weight sees them): Σ xᵀx in float64
    over all tokens, and every `sample_stride`-th token for the activation-clip search."""

    def __init__(self, in_features: int, sample_stride: int, device):
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.tokens = 0
        self.sample_stride = sample_stride
        self.samples = []

    def add(self, x: Tensor, gram: Tensor):
        self.gram += gram
        self.tokens += x.shape[0]
        # A copy: a strided view would keep the whole activation alive.
        self.samples.append(x[::self.sample_stride].clone())

    def hessian(self) -> Tensor:
        return self.gram * (2.0 / self.tokens)

    def sample(self) -> Tensor:
        return torch.cat(self.samples)


def _gram(rows: Tensor) -> Tensor:
    return (rows.T @ rows).double()


class _GramCache:
    """The input rows (as the weight sees them) and their Σ xᵀx for each input tensor met
    during one block forward, so that layers fed the same tensor through the same rotation
    (q/k/v, gate/up; RotatedInputLinears of one size share their factor) compute them once.
    Holds the tensors so ids stay unique."""

    def __init__(self):
        self.entries = {}

    def rows_and_gram(self, x: Tensor, module: nn.Module):
        rotation = _input_rotation(module)
        if rotation is None:
            key = (id(x), None)
        elif isinstance(module, RotatedInputLinear):
            key = (id(x), tuple(module.rotation.flatten().tolist()))
        else:  # an unknown rotation: shared by nothing
            key = (id(x), id(module))
        entry = self.entries.get(key)
        if entry is None:
            seen = x.detach() if rotation is None else rotation(x.detach())
            rows = seen.reshape(-1, seen.shape[-1]).float()
            entry = self.entries[key] = (x, rows, _gram(rows))
        return entry[1], entry[2]

    def clear(self):
        self.entries.clear()


def _record_inputs_hook(stats: _LinearInputs, cache: _GramCache):
    def hook(module, args):
        stats.add(*cache.rows_and_gram(args[0], module))
    return hook


def _find_blocks(model: nn.Module, targets: Dict[str, nn.Linear]):
    """(prefix, nn.ModuleList) of the decoder blocks: the ModuleList holding the most target
    linears, which must hold them all (the sequential pass only reaches layers inside blocks)."""
    best_prefix, best_count = None, 0
    for prefix, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            count = sum(name.startswith(prefix + ".") for name in targets)
            if count > best_count:
                best_prefix, best_count = prefix, count
    if best_prefix is None:
        raise ValueError("calibrate_gptq_ found no nn.ModuleList of decoder blocks holding the "
                         "linear layers to quantize")
    outside = [name for name in targets if not name.startswith(best_prefix + ".")]
    if outside:
        raise ValueError(f"calibrate_gptq_ quantizes linears inside the decoder blocks "
                         f"({best_prefix}) only; exclude these with filter_fn: {outside}")
    return best_prefix, model.get_submodule(best_prefix)


def _accepts_keyword(function: Callable, name: str) -> bool:
    parameters = inspect.signature(function).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _capture_block_inputs(model: nn.Module, first_block: nn.Module, batches):
    """Run the model on each batch until the first block; return its inputs per batch as
    (hidden_states, other positional args, keyword args)."""
    captured = []

    def hook(module, args, kwargs):
        if args:
            captured.append((args[0], args[1:], kwargs))
        else:
            kwargs = dict(kwargs)
            captured.append((kwargs.pop("hidden_states"), (), kwargs))
        raise _StopForward

    # A KV cache would grow across the calibration batches (Hugging Face models default to one).
    options = {"use_cache": False} if _accepts_keyword(model.forward, "use_cache") else {}
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(batch, **options)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, inputs, after_each: Callable[[], None] = lambda: None):
    """The block's output hidden states for each captured batch input."""
    outputs = []
    for hidden, args, kwargs in inputs:
        out = block(hidden, *args, **kwargs)
        outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
        after_each()
    return outputs


def _relative_weight_error(weight: Tensor, quantized_weight: Tensor, hessian: Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ): the weight quantization's share of the output, alone."""
    signal = output_error(weight, torch.zeros_like(weight), hessian)
    return output_error(weight, quantized_weight, hessian) / signal if signal > 0 else 0.0


def _quantize_weight_and_clips(weight: Tensor, hessian: Tensor, sample: Tensor,
                               group_size: Optional[int], config: W4A4Config,
                               weight_clip_candidates, act_clip_candidates, gptq_options):
    """GPTQ (with optional clip searches) of one weight at one granularity: (w_q, w_s,
    statistics). "output_error" is the relative MSE ‖Y − Ŷ‖² / ‖Y‖² of the W4A4 layer's output
    (weights and activations quantized) on the sampled calibration inputs."""
    weight_clip = config.weight_clip
    if weight_clip_candidates is not None:
        weight_clip = search_weight_clip(weight, hessian, group_size, weight_clip_candidates,
                                         **gptq_options)
    values, scales = gptq_quantize(weight, hessian, group_size, weight_clip, **gptq_options)
    w_q = ops.pack_int4(values)
    quantized_weight = dequantize(values, scales)[:, :weight.shape[1]]

    act_clip = config.act_clip
    if act_clip_candidates is not None:
        act_clip = search_act_clip(sample, weight, group_size, act_clip_candidates,
                                   quantized_weight)

    reference = sample @ weight.float().T
    quantized_output = ops.w4a4_linear(sample, w_q, scales, None, act_clip)
    layer_stats = {
        "granularity": granularity_label(group_size),
        "weight_clip": weight_clip,
        "act_clip": act_clip,
        "output_error": ((quantized_output - reference).square().sum()
                         / reference.square().sum()).item(),
        "weight_error": _relative_weight_error(weight, quantized_weight, hessian),
    }
    return w_q, scales, layer_stats


def _quantize_linear(linear: nn.Linear, stats: _LinearInputs, config: W4A4Config,
                     sensitivity_granularities, weight_clip_candidates, act_clip_candidates,
                     gptq_options):
    """GPTQ of one layer at config.group_size; returns (W4A4Linear, its statistics), with
    "sensitivity": {label: output error} over `sensitivity_granularities` (each quantized the
    same way, on the same inputs) when any are asked for."""
    weight, hessian, sample = linear.weight.detach(), stats.hessian(), stats.sample()
    quantize = lambda g: _quantize_weight_and_clips(  # noqa: E731
        weight, hessian, sample, g, config, weight_clip_candidates, act_clip_candidates,
        gptq_options)
    w_q, scales, layer_stats = quantize(config.group_size)
    if sensitivity_granularities:
        layer_stats["sensitivity"] = {
            granularity_label(g): layer_stats["output_error"] if g == config.group_size
            else quantize(g)[2]["output_error"] for g in sensitivity_granularities}
    bias = None if linear.bias is None else linear.bias.detach().clone()
    layer = W4A4Linear(w_q, scales, bias, linear.in_features, layer_stats["act_clip"],
                       _rotation_factor(linear))
    return layer, layer_stats


def _check_calibration_ids(calibration_ids):
    if not isinstance(calibration_ids, Tensor):
        raise TypeError(f"calibration_ids must be a tensor, got {type(calibration_ids).__name__}")
    if calibration_ids.dim() != 2 or calibration_ids.numel() == 0:
        raise ValueError(f"calibration_ids must be a non-empty [B, T] tensor of token ids, "
                         f"got shape {tuple(calibration_ids.shape)}")
    if calibration_ids.is_floating_point() or calibration_ids.is_complex():
        raise TypeError(f"calibration_ids must be integer token ids, got {calibration_ids.dtype}")


def calibrate_gptq_(model: nn.Module, calibration_ids: Tensor, config: W4A4Config,
                    progress: bool = True,
                    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, *,
                    plan: Optional[GranularityPlan] = None,
                    sensitivity_granularities: Sequence[Granularity] = (),
                    weight_clip_candidates: Optional[Sequence[float]] = None,
                    act_clip_candidates: Optional[Sequence[float]] = None,
                    batch_size: int = 8, act_clip_tokens: int = 2048,
                    **gptq_options) -> Dict[str, dict]:
    """Quantize, in place, the model's nn.Linear layers that filter_fn accepts (default: all but
    the LM head, as quantize_) with GPTQ on `calibration_ids` [B, T], replacing each with a
    W4A4Linear at the granularity `plan` gives it (plan.py), else config.group_size.

    The standard sequential pass: the calibration batches run up to the first decoder block
    (the nn.ModuleList of blocks is found generically); then for each block, one float forward
    collects each linear's input Hessian with hooks (through the layer's `input_rotation` if it
    has one: H is over the inputs as the weight sees them), its linears are quantized, and the
    *quantized* block's outputs become the next block's inputs, so later layers compensate for
    the error of earlier ones. Only one block's activations are held at a time.

    weight_clip_candidates / act_clip_candidates: clip ratios to search per layer
    (search_weight_clip, search_act_clip); None uses config.weight_clip / config.act_clip.
    batch_size: calibration sequences per forward; act_clip_tokens: about how many input tokens
    per layer the activation-clip search and the reported errors use. gptq_options go to
    gptq_quantize (block_size, damp, act_order). sensitivity_granularities: granularities at
    which each layer is also quantized (the same way, on the same inputs) to measure its
    output error: the per-layer sensitivity a mixed plan is chosen from.

    Returns {layer name: {"granularity" (label), "weight_clip", "act_clip", "output_error"
    (relative MSE of the W4A4 layer's output on calibration inputs), "weight_error" (relative
    tr(ΔW H ΔWᵀ)), and with sensitivity_granularities "sensitivity" ({label: output_error})}}.
    """
    if not isinstance(config, W4A4Config):
        raise TypeError(f"calibrate_gptq_ expects a W4A4Config, got {type(config).__name__}")
    _check_calibration_ids(calibration_ids)
    if batch_size < 1 or act_clip_tokens < 1:
        raise ValueError(f"batch_size and act_clip_tokens must be positive, got {batch_size}, "
                         f"{act_clip_tokens}")
    for candidates in (weight_clip_candidates, act_clip_candidates):
        if candidates is not None:
            _check_candidates(candidates)
    sensitivity_granularities = [check_granularity(g) for g in sensitivity_granularities]
    targets = quantize_targets(model, filter_fn, plan)
    if not targets:
        return {}
    prefix, blocks = _find_blocks(model, targets)
    device = next(iter(targets.values())).weight.device
    sample_stride = max(calibration_ids.numel() // act_clip_tokens, 1)

    all_stats = {}
    with torch.no_grad():
        batches = calibration_ids.to(device).split(batch_size)
        inputs = _capture_block_inputs(model, blocks[0], batches)
        for index, block in enumerate(tqdm(blocks, desc="GPTQ", unit="block",
                                           disable=not progress)):
            block_prefix = f"{prefix}.{index}."
            linears = {name[len(block_prefix):]: m for name, m in targets.items()
                       if name.startswith(block_prefix)}
            stats = {name: _LinearInputs(m.in_features, sample_stride, device)
                     for name, m in linears.items()}
            cache = _GramCache()
            handles = [m.register_forward_pre_hook(_record_inputs_hook(stats[name], cache))
                       for name, m in linears.items()]
            try:
                _run_block(block, inputs, after_each=cache.clear)
            finally:
                for handle in handles:
                    handle.remove()
            for name, linear in linears.items():
                if stats[name].tokens == 0:
                    raise ValueError(f"{block_prefix}{name} received no calibration inputs")
                layer, layer_stats = _quantize_linear(
                    linear, stats.pop(name), layer_config(config, plan, block_prefix + name),
                    sensitivity_granularities, weight_clip_candidates, act_clip_candidates,
                    gptq_options)
                parent_name, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent_name) if parent_name else block, child, layer)
                all_stats[block_prefix + name] = layer_stats
            inputs = [(out, args, kwargs) for out, (_, args, kwargs)
                      in zip(_run_block(block, inputs), inputs)]
    fuse_projections_(model)
    return all_stats
