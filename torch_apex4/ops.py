"""Python side of the apex4 ops: loads the compiled library (which declares the
schemas and registers the CPU/CUDA kernels) and registers the fake
implementations that torch.compile and opcheck trace with. Shapes follow
docs/design.md; the size rules come from the C++ layout header through
`_C.padded_k` / `_C.num_groups`, so they are stated once."""
import torch

from . import _C

ops = torch.ops.apex4
padded_k = _C.padded_k
num_groups = _C.num_groups


def _check_one_device(*tensors):
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"apex4: all inputs must be on one device, got {sorted(map(str, devices))}")


def _quantized_fake(x, group_size=None, clip_ratio=1.0):
    k = x.shape[-1]
    packed = x.new_empty((*x.shape[:-1], padded_k(k, group_size) // 2), dtype=torch.uint8)
    scales = x.new_empty((*x.shape[:-1], num_groups(k, group_size)), dtype=torch.float32)
    return packed, scales


torch.library.register_fake("apex4::quantize_act")(_quantized_fake)
torch.library.register_fake("apex4::quantize_weight")(_quantized_fake)


@torch.library.register_fake("apex4::hadamard_quantize_act")
def _(x, factor, group_size=None, clip_ratio=1.0):
    _check_one_device(x, factor)
    return _quantized_fake(x, group_size, clip_ratio)


@torch.library.register_fake("apex4::hadamard")
def _(x, factor):
    _check_one_device(x, factor)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("apex4::pack_int4")
def _(values):
    return values.new_empty((*values.shape[:-1], values.shape[-1] // 2), dtype=torch.uint8)


@torch.library.register_fake("apex4::unpack_int4")
def _(packed):
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=torch.int8)


@torch.library.register_fake("apex4::w4a4_gemm")
def _(a_q, a_s, w_q, w_s, bias=None, out_dtype=None, prefetch=None):
    _check_one_device(a_q, a_s, w_q, w_s, bias, prefetch)
    torch._check(a_q.shape[-1] == w_q.shape[-1], lambda: "apex4: a_q and w_q differ in K")
    return a_q.new_empty((*a_q.shape[:-1], w_q.shape[0]), dtype=out_dtype or torch.float32)


@torch.library.register_fake("apex4::w4a4_linear")
def _(x, w_q, w_s, bias=None, act_clip=1.0, prefetch=None):
    _check_one_device(x, w_q, w_s, bias, prefetch)
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


@torch.library.register_fake("apex4::w4a4_rotated_linear")
def _(x, rotation, w_q, w_s, bias=None, act_clip=1.0):
    _check_one_device(x, rotation, w_q, w_s, bias)
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))
