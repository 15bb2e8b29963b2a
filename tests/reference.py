"""Float64 reference of the apex4 quantization and GEMM math (docs/design.md),
written independently of the kernels with plain torch ops, as a test oracle."""
import math

import torch


def quantize_ref(x, group_size=None, clip_ratio=1.0):
    """Returns (int values [..., Kp] int8, scales [..., G] float32)."""
    x = x.float()
    k = x.shape[-1]
    align = group_size or 64
    kp = math.ceil(k / align) * align
    xp = torch.nn.functional.pad(x, (0, kp - k))
    g = group_size or kp
    groups = xp.reshape(*x.shape[:-1], kp // g, g)
    amax = groups.abs().amax(-1)
    finite = torch.isfinite(groups).all(-1)
    # The same float32 operations as the kernels: (amax * clip) / 7, x / scale.
    scale = amax * torch.tensor(clip_ratio, dtype=torch.float32) / 7.0
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    q = torch.round(groups / safe).clamp(-7, 7)
    q = torch.where((scale > 0).unsqueeze(-1), q, torch.zeros_like(q))
    return q.reshape(*x.shape[:-1], kp).to(torch.int8), scale


def gemm_ref(a_int, a_s, w_int, w_s, bias=None):
    """float64 result of sum_g P_g * sa * sw (+ bias), and the sum of the
    absolute terms (to bound fp32 rounding)."""
    groups = w_s.shape[-1]
    a = a_int.double().reshape(*a_int.shape[:-1], groups, -1)
    w = w_int.double().reshape(w_int.shape[0], groups, -1)
    partial = torch.einsum("...gk,ngk->...ng", a, w)
    terms = partial * a_s.double().unsqueeze(-2) * w_s.double()
    out = terms.sum(-1)
    magnitude = terms.abs().sum(-1)
    if bias is not None:
        out = out + bias.double()
        magnitude = magnitude + bias.double().abs()
    return out, magnitude
