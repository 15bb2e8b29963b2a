"""CUDA kernels of the online rotation (hadamard, hadamard_quantize_act):
bit for bit against the CPU kernels (the same operations in the same order),
against a float64 reference, on every row size and factor kind, on rows that
need the global workspace, under opcheck, on bad input, and in a rotated
quantized Llama. Skipped without a GPU."""
import copy

import pytest
import torch

import torch_apex4 as apex4
from reference import quantize_ref
from test_cuda_ops import poison_allocator, same_bits
from test_rotation import llama, logits
from torch_apex4.hadamard import rotation_factor
from torch_apex4.rotation import rotate_

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ops = torch.ops.apex4
CUDA = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Row sizes and their factors: m = 1 (4096, 64, 8), Paley 36 / 12 / 28 / 44 /
# 20, DCT 43 / 25 / 7 / 3, p = 1 (7, 3), p < 8 (100: p = 4).
SIZES = [3, 7, 8, 64, 100, 192, 320, 576, 1536, 4096, 5632, 11008, 28672]


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def sylvester(p):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rotate_ref(x, factor):
    """float64 x @ kron(F, H_p / sqrt(p)) with the op's float32 F, applied in
    factored form (no dense n x n matrix), and the sum of absolute terms."""
    m = factor.shape[0]
    n = x.shape[-1]
    p = n // m
    h = sylvester(p).to(x.device) / p ** 0.5
    f = factor.double()
    blocks = x.double().reshape(*x.shape[:-1], m, p) @ h
    out = torch.einsum("...sb,sd->...db", blocks, f).reshape(x.shape)
    magnitude = torch.einsum("...sb,sd->...db", (x.double().abs().reshape(blocks.shape) @ h.abs()),
                             f.abs()).reshape(x.shape)
    return out, magnitude


def cuda_and_cpu(op, x, factor, *args):
    """op on CUDA (outputs over poisoned memory) and on the CPU."""
    poison_allocator(x.numel() * 4, x.numel() * 2, x.numel())
    return op(x.to(CUDA), factor.to(CUDA), *args), op(x.cpu(), factor.cpu(), *args)


def assert_same_floats(a, b):
    """Equal values, NaN where the other has NaN (NaN payloads may differ)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_hadamard_is_bit_identical_to_cpu_and_close_to_float64(n, dtype):
    rows = {3: 1000, 8: 300, 4096: 64, 28672: 3}.get(n, 17)
    x = (torch.randn(rows, n) * 3).to(dtype)
    factor = rotation_factor(n)
    out, cpu = cuda_and_cpu(ops.hadamard, x, factor)
    assert out.is_cuda and out.dtype == dtype and out.shape == x.shape
    assert same_bits(out.cpu(), cpu)
    ref, magnitude = rotate_ref(x.cuda(), factor.cuda())
    # fp32 rounding of log2(p) butterflies and m products and sums, then one
    # rounding to the output type.
    steps = n.bit_length() + factor.shape[0] + 2
    bound = magnitude * steps * torch.finfo(torch.float32).eps + ref.abs() * torch.finfo(dtype).eps
    assert torch.all((out.double() - ref).abs() <= bound + 1e-30)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("group_size", [None, 64, 128, 256])
def test_hadamard_quantize_act_is_bit_identical_to_cpu(n, group_size):
    dtype = DTYPES[(n + (group_size or 0)) % 3]
    rows = {3: 1000, 4096: 40, 28672: 2}.get(n, 9)
    x = (torch.randn(rows, n) * 2).to(dtype)
    factor = rotation_factor(n)
    (packed, scales), (packed_cpu, scales_cpu) = cuda_and_cpu(
        ops.hadamard_quantize_act, x, factor, group_size, 0.9)
    assert packed.is_cuda and packed.shape == packed_cpu.shape and scales.shape == scales_cpu.shape
    assert torch.equal(packed.cpu(), packed_cpu)
    assert same_bits(scales.cpu(), scales_cpu)
    # The quantization is quantize_act's, exactly, on the rotated values.
    rotated = ops.hadamard(x.float().to(CUDA), factor.to(CUDA))
    q_ref, s_ref = quantize_ref(rotated.cpu(), group_size, 0.9)
    assert torch.equal(ops.unpack_int4(packed).cpu(), q_ref)
    assert torch.equal(scales.cpu(), s_ref)
    assert all(torch.equal(u, v) for u, v in
               zip((packed, scales), ops.quantize_act(rotated, group_size, 0.9)))


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 31, 257, 1000, 4096])
@pytest.mark.parametrize("n", [4096, 11008])
def test_many_rows(rows, n):
    x = torch.randn(rows, n, dtype=torch.float16)
    factor = rotation_factor(n)
    (packed, scales), (packed_cpu, scales_cpu) = cuda_and_cpu(
        ops.hadamard_quantize_act, x, factor, 128)
    assert torch.equal(packed.cpu(), packed_cpu) and same_bits(scales.cpu(), scales_cpu)
    out, cpu = cuda_and_cpu(ops.hadamard, x, factor)
    assert same_bits(out.cpu(), cpu)


@pytest.mark.parametrize("n,factor_size", [(65536, 1), (98304, 12), (20480, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_in_the_global_workspace(n, factor_size, dtype):
    # 256 KB and 384 KB of fp32 row exceed any GPU's shared memory (a block
    # then works in a global workspace); 20480 fits, for contrast.
    factor = rotation_factor(n)
    assert factor.shape[0] == factor_size
    x = torch.randn(3, n).to(dtype)
    out, cpu = cuda_and_cpu(ops.hadamard, x, factor)
    assert same_bits(out.cpu(), cpu)
    for group_size in (None, 256):
        (packed, scales), (packed_cpu, scales_cpu) = cuda_and_cpu(
            ops.hadamard_quantize_act, x, factor, group_size)
        assert torch.equal(packed.cpu(), packed_cpu) and same_bits(scales.cpu(), scales_cpu)


@pytest.mark.parametrize("factor", [
    torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0].float(),  # any orthonormal F
    torch.randn(6, 6),                                                  # any F at all
    torch.full((1, 1), 3.0),                                            # m = 1: F is not used
    torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))[0].float(),  # p = 1: F alone
], ids=["orthonormal-5", "random-6", "m1", "dense-40"])
def test_any_factor_matches_cpu(factor):
    n = factor.shape[0] * (1 if factor.shape[0] == 40 else 64)
    x = torch.randn(6, n)
    out, cpu = cuda_and_cpu(ops.hadamard, x, factor)
    assert same_bits(out.cpu(), cpu)
    (packed, scales), (packed_cpu, scales_cpu) = cuda_and_cpu(
        ops.hadamard_quantize_act, x, factor, 64)
    assert torch.equal(packed.cpu(), packed_cpu) and same_bits(scales.cpu(), scales_cpu)


def test_nonfinite_values_poison_only_their_row():
    x = torch.randn(6, 1536)
    x[1, 7] = float("nan")
    x[4, 1000] = float("inf")
    factor = rotation_factor(1536)
    (packed, scales), (packed_cpu, scales_cpu) = cuda_and_cpu(
        ops.hadamard_quantize_act, x, factor, 128)
    assert torch.equal(packed.cpu(), packed_cpu)
    assert_same_floats(scales, scales_cpu)
    assert torch.isnan(scales[[1, 4]]).all() and torch.isfinite(scales[[0, 2, 3, 5]]).all()
    out, cpu = cuda_and_cpu(ops.hadamard, x, factor)
    assert_same_floats(out, cpu)
    # The rotation spreads a NaN over its row, an Inf as +-Inf (every entry of
    # this F is non-zero).
    assert torch.isnan(out[1]).all() and not torch.isfinite(out[4]).any()
    assert torch.isfinite(out[[0, 2, 3, 5]]).all()


def test_layouts_and_empty_input():
    factor = rotation_factor(576, CUDA)
    # Leading dims, a strided view, and a row start that is not 16-byte aligned.
    x = torch.randn(2, 3, 576, dtype=torch.bfloat16, device=CUDA)
    flat = ops.hadamard(x.reshape(6, 576), factor)
    assert same_bits(ops.hadamard(x, factor).reshape(6, 576), flat)
    strided = torch.randn(576, 5, device=CUDA).t()
    assert same_bits(ops.hadamard(strided, factor), ops.hadamard(strided.contiguous(), factor))
    misaligned = torch.randn(5 * 576 + 1, device=CUDA)[1:].view(5, 576)
    assert misaligned.data_ptr() % 16 != 0
    aligned = misaligned.clone()
    assert same_bits(ops.hadamard(misaligned, factor), ops.hadamard(aligned, factor))
    assert all(torch.equal(u, v) for u, v in zip(ops.hadamard_quantize_act(misaligned, factor, 64),
                                                 ops.hadamard_quantize_act(aligned, factor, 64)))
    empty = torch.randn(0, 576, device=CUDA)
    assert ops.hadamard(empty, factor).shape == (0, 576)
    packed, scales = ops.hadamard_quantize_act(empty, factor, 128)
    assert packed.shape == (0, 320) and scales.shape == (0, 5) and packed.is_cuda


@pytest.mark.parametrize("make,error,match", [
    (lambda: (torch.randint(0, 5, (2, 64)), torch.eye(1)), TypeError, "float16"),
    (lambda: (torch.randn(2, 64, dtype=torch.float64), torch.eye(1)), TypeError, "float16"),
    (lambda: (torch.randn(2, 64), torch.ones(3, 4)), ValueError, "square"),
    (lambda: (torch.randn(2, 64), torch.eye(5)), ValueError, "power of two"),
    (lambda: (torch.randn(2, 64), torch.eye(4, dtype=torch.float64)), TypeError, "float32"),
])
def test_bad_input_fails_as_on_cpu(make, error, match):
    x, factor = make()
    for device in ("cpu", CUDA):
        with pytest.raises(error, match=match):
            ops.hadamard(x.to(device), factor.to(device))
        with pytest.raises(error, match=match):
            ops.hadamard_quantize_act(x.to(device), factor.to(device))


def test_bad_quantize_arguments_and_devices():
    x = torch.randn(2, 128, device=CUDA)
    factor = rotation_factor(128, CUDA)
    with pytest.raises(ValueError, match="multiple of 64"):
        ops.hadamard_quantize_act(x, factor, 100)
    with pytest.raises(ValueError, match="clip_ratio"):
        ops.hadamard_quantize_act(x, factor, 64, 0.0)
    with pytest.raises(ValueError, match="K > 0"):
        ops.hadamard_quantize_act(torch.randn(2, 0, device=CUDA), factor)
    with pytest.raises(ValueError, match="last dimension"):
        ops.hadamard(torch.randn(2, 0, device=CUDA), factor)
    with pytest.raises(ValueError, match="factor is on cpu"):
        ops.hadamard(x, factor.cpu())
    with pytest.raises(ValueError, match="factor is on cpu"):
        ops.hadamard_quantize_act(x, factor.cpu(), 64)


def opcheck_cases():
    yield ops.hadamard.default, (torch.randn(2, 3, 576, device=CUDA), rotation_factor(576, CUDA))
    yield ops.hadamard.default, (torch.randn(4, 4096, dtype=torch.float16, device=CUDA),
                                 rotation_factor(4096, CUDA))
    yield ops.hadamard_quantize_act.default, (torch.randn(5, 1536, dtype=torch.bfloat16,
                                                          device=CUDA),
                                              rotation_factor(1536, CUDA), 128, 0.9)
    yield ops.hadamard_quantize_act.default, (torch.randn(3, 11008, device=CUDA),
                                              rotation_factor(11008, CUDA), None)


def test_opcheck_on_cuda():
    for op, args in opcheck_cases():
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("mode", ["residual", "online"])
def test_rotated_quantized_llama_runs_on_cuda_like_on_cpu(mode):
    model = llama()
    rotate_(model, mode)
    apex4.quantize_(model, apex4.W4A4Config(group_size=64))
    assert any(m.rotation is not None for m in model.modules() if isinstance(m, apex4.W4A4Linear))
    ids = torch.randint(0, 256, (2, 24))
    cpu = logits(model, ids)
    gpu_model = copy.deepcopy(model).to(CUDA)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        gpu = logits(gpu_model, ids.to(CUDA))
        torch.cuda.synchronize()
    kernels = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    assert any("rotate_kernel" in k for k in kernels), sorted(kernels)
    # The same W4A4 model; float attention and norms round differently on the
    # two devices, which can move a few activations across a 4-bit step.
    assert torch.isfinite(gpu).all()
    assert ((gpu.cpu() - cpu).norm() / cpu.norm()).item() < 2e-2
