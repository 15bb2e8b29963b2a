"""torch_apex4: pure W4A4 (INT4 weights and INT4 activations) inference for PyTorch.

    import torch_apex4 as apex4
    apex4.quantize_(model, apex4.W4A4Config(group_size=128))
    cmodel = torch.compile(model, backend="apex4")
"""
from .ops import num_groups, ops, padded_k
from .checkpoint import load_quantized, save_quantized
from .quantize import W4A4Config, W4A4Linear, fuse_projections_, linear_weight_bytes, quantize_
from .parallel import parallelize_
from .plan import GranularityPlan
from .rotation import rotate_, smooth_

__all__ = ["W4A4Config", "W4A4Linear", "quantize_", "fuse_projections_", "rotate_", "smooth_", "parallelize_", "GranularityPlan", "linear_weight_bytes",
           "save_quantized", "load_quantized", "ops", "padded_k", "num_groups"]
