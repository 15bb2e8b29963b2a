"""CUDA kernels of every apex4 op: against the CPU kernels and the float64
reference, on every GEMM path (APEX4_GEMM_PATH), and under opcheck. Skipped
without a GPU."""
import pytest
import torch

import torch_apex4  # noqa: F401  (registers the ops)
from torch_apex4.hadamard import rotation_factor
from reference import quantize_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ops = torch.ops.apex4
GROUPS = [None, 64, 128, 256]
PATHS = ["sm80", "sm90", "sm90mma", "decode"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA = "cuda"


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def poison_allocator(*byte_counts):
    """Leaves 0xFF-filled blocks of these sizes in the caching allocator, so an
    op output that reuses one shows any element a kernel failed to write: NaN
    in every float type, -1 in int8."""
    blocks = [torch.full((n,), 0xFF, dtype=torch.uint8, device=CUDA) for n in byte_counts]
    del blocks


def set_path(monkeypatch, path):
    monkeypatch.setenv("APEX4_GEMM_PATH", path)


# ---- quantize ---------------------------------------------------------------

@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("shape", [(1, 64), (7, 576), (33, 1000), (2, 3, 200), (17, 4096),
                                   (3, 28672), (1, 11008)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_is_bit_identical_to_cpu(shape, group_size, dtype):
    x = torch.randn(shape, dtype=dtype) * 3
    flat = x.reshape(-1, shape[-1])
    if flat.shape[0] > 2:  # a NaN and an Inf: NaN scales for their groups only
        flat[1, shape[-1] // 2] = float("nan")
        flat[2, 0] = float("inf")
    poison_allocator(x.numel(), x.numel() * 4)
    packed, scales = ops.quantize_act(x.to(CUDA), group_size)
    packed_cpu, scales_cpu = ops.quantize_act(x, group_size)
    assert packed.device.type == CUDA and packed.shape == packed_cpu.shape
    assert torch.equal(packed.cpu(), packed_cpu)
    assert torch.equal(scales.cpu().view(torch.int32), scales_cpu.view(torch.int32))
    q_ref, s_ref = quantize_ref(x, group_size)
    assert torch.equal(ops.unpack_int4(packed).cpu(), q_ref)
    torch.testing.assert_close(scales.cpu(), s_ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("clip", [0.9, 0.5])
def test_quantize_weight_clip_ratio(clip):
    w = torch.randn(17, 384)
    packed, scales = ops.quantize_weight(w.to(CUDA), 128, clip)
    packed_cpu, scales_cpu = ops.quantize_weight(w, 128, clip)
    assert torch.equal(packed.cpu(), packed_cpu) and torch.equal(scales.cpu(), scales_cpu)


def test_quantize_strided_input_and_zero_rows():
    x = torch.randn(256, 6, device=CUDA).t()
    assert not x.is_contiguous()
    a, b = ops.quantize_act(x, 128), ops.quantize_act(x.contiguous(), 128)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    packed, scales = ops.quantize_act(torch.randn(0, 1000, device=CUDA), 128)
    assert packed.shape == (0, 512) and scales.shape == (0, 8) and packed.is_cuda


def test_quantize_padding_is_zero():
    packed, scales = ops.quantize_act(torch.randn(3, 7, device=CUDA) + 5)
    assert packed.shape == (3, 32) and scales.shape == (3, 1)
    assert torch.all(ops.unpack_int4(packed)[:, 7:] == 0)


# ---- pack / unpack ----------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 2), (9, 130), (3, 5, 1000), (4097, 64)])
def test_pack_unpack_match_cpu(shape):
    values = torch.randint(-8, 8, shape, dtype=torch.int8)
    packed = ops.pack_int4(values.to(CUDA))
    assert torch.equal(packed.cpu(), ops.pack_int4(values))
    assert torch.equal(ops.unpack_int4(packed).cpu(), values)
    assert ops.pack_int4(torch.tensor([[-1, 3]], dtype=torch.int8, device=CUDA)).item() == 0x3F
    assert ops.unpack_int4(torch.zeros(0, 4, dtype=torch.uint8, device=CUDA)).shape == (0, 8)


# ---- GEMM -------------------------------------------------------------------

def gemm_ref_device(a_q, a_s, w_q, w_s, bias=None):
    """float64 reference on the GPU, one group at a time (large shapes), and the
    sum of absolute terms that bounds fp32 rounding."""
    a = ops.unpack_int4(a_q.reshape(-1, a_q.shape[-1])).double()
    w = ops.unpack_int4(w_q).double()
    groups = w_s.shape[1]
    length = a.shape[1] // groups
    sa = a_s.reshape(-1, groups).double()
    out = torch.zeros(a.shape[0], w.shape[0], dtype=torch.float64, device=a.device)
    magnitude = torch.zeros_like(out)
    for g in range(groups):
        k = slice(g * length, (g + 1) * length)
        terms = (a[:, k] @ w[:, k].T) * sa[:, g:g + 1] * w_s[:, g].double()
        out += terms
        magnitude += terms.abs()
    if bias is not None:
        out += bias.double()
        magnitude += bias.double().abs()
    shape = (*a_q.shape[:-1], w_q.shape[0])
    return out.reshape(shape), magnitude.reshape(shape)


def rounding_bound(ref, magnitude, groups, dtype):
    # fp32 accumulation over G groups, plus one rounding to the output dtype.
    eps = torch.finfo(dtype).eps
    return magnitude * (groups + 2) * 2 * torch.finfo(torch.float32).eps + ref.abs() * eps + 1e-30


def assert_gemm_close(out, ref, magnitude, groups):
    bound = rounding_bound(ref, magnitude, groups, out.dtype)
    err = (out.double() - ref).abs()
    assert torch.isfinite(out).all(), "non-finite output"
    assert torch.all(err <= bound), f"max excess {(err - bound).max().item()}"


def random_operands(m, n, k, group_size, dtype=torch.float32, device=CUDA):
    x = torch.randn(m, k, dtype=dtype, device=device)
    w = torch.randn(n, k, device=device)
    return (*ops.quantize_act(x, group_size), *ops.quantize_weight(w, group_size))


def run_gemm(a_q, a_s, w_q, w_s, bias=None, out_dtype=None):
    m, n = a_q.numel() // a_q.shape[-1], w_q.shape[0]
    poison_allocator(m * n * 4, m * n * 2)
    return ops.w4a4_gemm(a_q, a_s, w_q, w_s, bias, out_dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("m,n,k", [(1, 192, 576), (2, 1000, 1000), (7, 256, 4096), (16, 264, 640),
                                   (17, 130, 2048), (33, 1000, 576), (128, 192, 1000),
                                   (300, 520, 1536), (4200, 1000, 576)])
def test_gemm_matches_cpu_and_reference(monkeypatch, path, m, n, k, group_size):
    set_path(monkeypatch, path)
    a_q, a_s, w_q, w_s = random_operands(m, n, k, group_size)
    # Rotate output dtype and bias type through the cases.
    case = m + n + (group_size or 0)
    out_dtype = DTYPES[case % 3]
    bias = [None, torch.randn(n, device=CUDA), torch.randn(n, device=CUDA, dtype=torch.float16),
            torch.randn(n, device=CUDA, dtype=torch.bfloat16)][case % 4]
    out = run_gemm(a_q, a_s, w_q, w_s, bias, out_dtype)
    assert out.shape == (m, n) and out.dtype == out_dtype and out.is_cuda
    ref, magnitude = gemm_ref_device(a_q, a_s, w_q, w_s, bias)
    assert_gemm_close(out, ref, magnitude, w_s.shape[1])
    # The CPU kernel is within the same bound of the reference, so the two are
    # within twice it of each other.
    cpu = ops.w4a4_gemm(a_q.cpu(), a_s.cpu(), w_q.cpu(), w_s.cpu(),
                        None if bias is None else bias.cpu(), out_dtype)
    bound = rounding_bound(ref, magnitude, w_s.shape[1], out_dtype).cpu()
    assert torch.all((out.cpu().double() - cpu.double()).abs() <= 2 * bound)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("groups", [1, 5])
@pytest.mark.parametrize("m,n", [(1, 8), (16, 40), (37, 50), (200, 264)])
def test_gemm_unit_scales_give_exact_integer_sums(monkeypatch, path, groups, m, n):
    # Every nibble value, -8 included; with unit scales the fp32 output is the
    # exact integer dot product (all sums stay below 2**24).
    set_path(monkeypatch, path)
    k = 640
    a = torch.randint(-8, 8, (m, k), dtype=torch.int8, device=CUDA)
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=CUDA)
    ones_a = torch.ones(m, groups, device=CUDA)
    ones_w = torch.ones(n, groups, device=CUDA)
    out = run_gemm(ops.pack_int4(a), ones_a, ops.pack_int4(w), ones_w)
    assert torch.equal(out, (a.double() @ w.double().T).float())


@pytest.mark.parametrize("path", ["sm90", "sm90mma", "decode"])
def test_gemm_group_too_long_for_int8_mma_falls_back_exactly(monkeypatch, path):
    # The INT8 paths hold 256x the partials; a 131072-long group could overflow
    # int32 there, so the binding runs the INT4 path instead (still exact).
    set_path(monkeypatch, path)
    k = 131072
    a = torch.full((2, k), -8, dtype=torch.int8, device=CUDA)
    w = torch.full((3, k), -8, dtype=torch.int8, device=CUDA)
    out = run_gemm(ops.pack_int4(a), torch.ones(2, 1, device=CUDA), ops.pack_int4(w),
                   torch.ones(3, 1, device=CUDA))
    assert torch.all(out == 64.0 * k)


LLAMA_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672),
                (28672, 8192)]


@pytest.mark.parametrize("k,n", LLAMA_SHAPES)
@pytest.mark.parametrize("m", [1, 16, 128])
@pytest.mark.parametrize("group_size", [None, 128])
def test_gemm_llama_shapes_auto_path(k, n, m, group_size):
    a_q, a_s, w_q, w_s = random_operands(m, n, k, group_size, dtype=torch.float16)
    out = run_gemm(a_q, a_s, w_q, w_s, None, torch.float16)
    ref, magnitude = gemm_ref_device(a_q, a_s, w_q, w_s)
    assert_gemm_close(out, ref, magnitude, w_s.shape[1])


@pytest.mark.parametrize("path", ["sm80", "sm90", "sm90mma"])
@pytest.mark.parametrize("k,n,group_size", [(4096, 4096, None), (4096, 11008, 128), (2048, 3072, 64),
                                            (2048, 1024, 256)])
def test_gemm_large_m(monkeypatch, path, k, n, group_size):
    set_path(monkeypatch, path)
    a_q, a_s, w_q, w_s = random_operands(8192, n, k, group_size, dtype=torch.bfloat16)
    bias = torch.randn(n, device=CUDA, dtype=torch.bfloat16)
    out = run_gemm(a_q, a_s, w_q, w_s, bias, torch.bfloat16)
    ref, magnitude = gemm_ref_device(a_q, a_s, w_q, w_s, bias)
    assert_gemm_close(out, ref, magnitude, w_s.shape[1])


@pytest.mark.parametrize("path", PATHS + ["auto"])
def test_gemm_paths_agree_per_channel(monkeypatch, path):
    # Per channel every path computes 0 + float(P) * (sa * sw) + bias from the
    # same exact P, with no fused multiply-add: the same bits on every path.
    a_q, a_s, w_q, w_s = random_operands(40, 300, 1000, None)
    bias = torch.randn(300, device=CUDA)
    set_path(monkeypatch, "sm80")
    expected = run_gemm(a_q, a_s, w_q, w_s, bias)
    set_path(monkeypatch, path)
    assert torch.equal(run_gemm(a_q, a_s, w_q, w_s, bias), expected)


def test_gemm_leading_dims_and_zero_tokens():
    x = torch.randn(2, 5, 256, device=CUDA)
    w_q, w_s = ops.quantize_weight(torch.randn(48, 256, device=CUDA), 128)
    a_q, a_s = ops.quantize_act(x, 128)
    out = ops.w4a4_gemm(a_q, a_s, w_q, w_s)
    flat = ops.w4a4_gemm(a_q.reshape(10, -1), a_s.reshape(10, -1), w_q, w_s)
    assert out.shape == (2, 5, 48) and torch.equal(out.reshape(10, 48), flat)
    a_q, a_s = ops.quantize_act(torch.randn(0, 256, device=CUDA), 128)
    out = ops.w4a4_gemm(a_q, a_s, w_q, w_s, None, torch.float16)
    assert out.shape == (0, 48) and out.dtype == torch.float16


def test_gemm_nonfinite_activation_poisons_only_its_token():
    x = torch.randn(20, 256, device=CUDA)
    x[1, 5] = float("nan")
    a_q, a_s = ops.quantize_act(x)
    w_q, w_s = ops.quantize_weight(torch.randn(6, 256, device=CUDA))
    out = ops.w4a4_gemm(a_q, a_s, w_q, w_s)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[torch.arange(20) != 1]).all()


def test_linear_on_cuda_is_quantize_then_gemm():
    x = torch.randn(3, 4, 300, dtype=torch.bfloat16, device=CUDA)
    w_q, w_s = ops.quantize_weight(torch.randn(20, 300, device=CUDA), 128)
    bias = torch.randn(20, dtype=torch.bfloat16, device=CUDA)
    out = ops.w4a4_linear(x, w_q, w_s, bias, 0.9)
    a_q, a_s = ops.quantize_act(x, 128, 0.9)
    assert torch.equal(out, ops.w4a4_gemm(a_q, a_s, w_q, w_s, bias, torch.bfloat16))


# ---- fused decode linear ------------------------------------------------------

def same_bits(a, b):
    """Bitwise equality (NaN included) of two float tensors of one dtype."""
    as_int = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.view(as_int[a.dtype]), b.view(as_int[b.dtype]))


def quantize_then_gemm(x, w_q, w_s, bias, clip):
    groups = w_s.shape[1]
    group_size = None if groups == 1 else w_q.shape[1] * 2 // groups
    a_q, a_s = ops.quantize_act(x, group_size, clip)
    return ops.w4a4_gemm(a_q, a_s, w_q, w_s, bias, x.dtype)


@pytest.mark.parametrize("m", range(1, 17))
@pytest.mark.parametrize("group_size", [None, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_linear_has_the_bits_of_quantize_then_gemm(m, group_size, dtype):
    # K pads to 640: every M up to 16 runs fused (M * Kp <= 11264). Rows of
    # K = 600 are 16-byte aligned (x staged in shared memory), K = 601 not.
    n, k = 1040, [600, 601][(m // 2) % 2]
    x = torch.randn(m, k, dtype=dtype, device=CUDA) * 2
    w_q, w_s = ops.quantize_weight(torch.randn(n, k, device=CUDA), group_size)
    bias = [None, torch.randn(n, device=CUDA, dtype=dtype)][m % 2]
    clip = [1.0, 0.9][m % 3 == 0]
    poison_allocator(m * n * 4)
    out = ops.w4a4_linear(x, w_q, w_s, bias, clip)
    assert out.shape == (m, n) and out.dtype == dtype
    assert same_bits(out, quantize_then_gemm(x, w_q, w_s, bias, clip))


@pytest.mark.parametrize("m", [1, 9, 16, 40])
@pytest.mark.parametrize("group_size", [None, 128])
def test_prefetch_changes_no_bits(monkeypatch, m, group_size):
    # Prefetch sizes: under a line, an odd view, and past the half of L2 that is taken.
    l2 = torch.cuda.get_device_properties(CUDA).L2_cache_size
    buffer = torch.randint(0, 256, (l2 + 4096,), dtype=torch.uint8, device=CUDA)
    x = torch.randn(m, 4096, dtype=torch.float16, device=CUDA)
    w_q, w_s = ops.quantize_weight(torch.randn(1040, 4096, device=CUDA), group_size)
    a_q, a_s = ops.quantize_act(x, group_size)
    for path in ("auto", "decode"):
        set_path(monkeypatch, path)
        expected = ops.w4a4_linear(x, w_q, w_s)
        for prefetch in (buffer[:100], buffer[3:70001], buffer):
            assert same_bits(ops.w4a4_linear(x, w_q, w_s, None, 1.0, prefetch), expected)
            assert same_bits(ops.w4a4_gemm(a_q, a_s, w_q, w_s, None, torch.float16, prefetch),
                             expected)


@pytest.mark.parametrize("group_size", [None, 128])
def test_decode_linear_runs_the_quantizer_then_the_decode_gemm(group_size):
    # The pair launch_linear_decode makes (the GEMM as a programmatic dependent).
    x = torch.randn(2, 512, dtype=torch.float16, device=CUDA)
    w_q, w_s = ops.quantize_weight(torch.randn(64, 512, device=CUDA), group_size)
    ops.w4a4_linear(x, w_q, w_s)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.w4a4_linear(x, w_q, w_s)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 2, kernels
    assert any("quantize_kernel" in k for k in kernels), kernels
    assert any("gemm_decode_kernel" in k for k in kernels), kernels


@pytest.mark.parametrize("m,k,n", [(5, 4096, 256), (16, 4096, 300), (2, 28672, 64), (40, 512, 96)])
def test_linear_too_big_to_fuse_is_quantize_then_gemm(m, k, n):
    x = torch.randn(m, k, dtype=torch.float16, device=CUDA)
    w_q, w_s = ops.quantize_weight(torch.randn(n, k, device=CUDA), 128)
    bias = torch.randn(n, device=CUDA, dtype=torch.float16)
    assert same_bits(ops.w4a4_linear(x, w_q, w_s, bias), quantize_then_gemm(x, w_q, w_s, bias, 1.0))


def test_fused_linear_strided_input_nonfinite_rows_and_leading_dims():
    x = torch.randn(600, 6, device=CUDA).t()  # [6, 600], not contiguous
    x[1, 7] = float("nan")
    x[4, 0] = float("inf")
    w_q, w_s = ops.quantize_weight(torch.randn(72, 600, device=CUDA), 64)
    out = ops.w4a4_linear(x, w_q, w_s)
    assert same_bits(out, quantize_then_gemm(x.contiguous(), w_q, w_s, None, 1.0))
    assert torch.isnan(out[1]).all() and torch.isnan(out[4]).all()
    assert torch.isfinite(out[[0, 2, 3, 5]]).all()
    x3 = torch.randn(2, 3, 600, dtype=torch.bfloat16, device=CUDA)
    out3 = ops.w4a4_linear(x3, w_q, w_s)
    assert out3.shape == (2, 3, 72)
    assert same_bits(out3.reshape(6, 72), ops.w4a4_linear(x3.reshape(6, 600), w_q, w_s))


def test_fused_linear_rejects_what_the_composite_rejects():
    x = torch.randn(2, 256, device=CUDA)
    w_q, w_s = ops.quantize_weight(torch.randn(8, 256, device=CUDA))
    with pytest.raises(ValueError, match="clip_ratio"):
        ops.w4a4_linear(x, w_q, w_s, None, 1.5)
    with pytest.raises(ValueError, match="bias"):
        ops.w4a4_linear(x, w_q, w_s, torch.randn(9, device=CUDA))
    with pytest.raises(TypeError, match="w_s"):
        ops.w4a4_linear(x, w_q, w_s.double())
    with pytest.raises(ValueError, match="pad"):
        ops.w4a4_linear(torch.randn(2, 320, device=CUDA), w_q, w_s)


def test_bad_gemm_path_is_rejected(monkeypatch):
    set_path(monkeypatch, "sm70")
    with pytest.raises(ValueError, match="APEX4_GEMM_PATH"):
        ops.w4a4_gemm(*random_operands(4, 8, 128, None))


def test_mixed_devices_are_rejected():
    a_q, a_s, w_q, w_s = random_operands(4, 8, 128, None)
    with pytest.raises(ValueError, match="w_q is on cpu"):
        ops.w4a4_gemm(a_q, a_s, w_q.cpu(), w_s)
    with pytest.raises(ValueError, match="prefetch is on cpu"):
        ops.w4a4_gemm(a_q, a_s, w_q, w_s, None, None, w_q.cpu())
    with pytest.raises(ValueError, match="prefetch is on cpu"):
        ops.w4a4_linear(torch.randn(1, 128, device=CUDA), w_q, w_s, None, 1.0, w_q.cpu())


# ---- opcheck ----------------------------------------------------------------

def opcheck_cases():
    x = torch.randn(5, 576, device=CUDA)
    w = torch.randn(24, 576, device=CUDA)
    for group_size in (None, 128):
        a_q, a_s = ops.quantize_act(x, group_size)
        w_q, w_s = ops.quantize_weight(w, group_size)
        yield ops.quantize_act.default, (x, group_size, 0.9)
        yield ops.quantize_act.default, (torch.randn(2, 3, 200, dtype=torch.bfloat16, device=CUDA),
                                         group_size)
        yield ops.quantize_weight.default, (w, group_size)
        yield ops.w4a4_gemm.default, (a_q, a_s, w_q, w_s)
        yield ops.w4a4_gemm.default, (a_q[:1], a_s[:1], w_q, w_s, torch.randn(24, device=CUDA),
                                      torch.float16)
        yield ops.w4a4_linear.default, (x.reshape(1, 5, 576), w_q, w_s,
                                        torch.randn(24, device=CUDA), 0.9)
        yield ops.w4a4_gemm.default, (a_q[:1], a_s[:1], w_q, w_s, None, None, w_q.clone())
        yield ops.w4a4_linear.default, (x[:1], w_q, w_s, None, 1.0, w_q.clone())
    factor = rotation_factor(576, CUDA)
    yield ops.hadamard.default, (torch.randn(2, 3, 576, device=CUDA), factor)
    yield ops.hadamard_quantize_act.default, (x, factor, 64, 0.9)
    yield ops.pack_int4.default, (torch.randint(-8, 8, (3, 10), dtype=torch.int8, device=CUDA),)
    yield ops.unpack_int4.default, (torch.randint(0, 256, (4, 2, 6), dtype=torch.uint8,
                                                  device=CUDA),)


def test_opcheck_every_op_on_cuda():
    covered = set()
    for op, args in opcheck_cases():
        torch.library.opcheck(op, args)
        covered.add(op.name().split("::")[1].split(".")[0])
    # Every op with a CUDA kernel of its own (composites that merely call
    # other ops, on whatever device those run, are covered through them).
    with_cuda_kernel = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                        if name.startswith("apex4::")
                        and "\nCUDA: registered" in torch._C._dispatch_dump(name)}
    assert covered == with_cuda_kernel


# ---- quantize: the exact division shortcut, long rows, every amax path -------

def half_integer_row(k, dtype, seed):
    """A row whose values divided by its scale land on and next to half
    integers: amax 7 gives scale 1 (clip 1), so (j + 0.5) is a tie and its
    float neighbours are a rounding away from one; random magnitudes beside."""
    g = torch.Generator().manual_seed(seed)
    ties = torch.arange(-7, 7, dtype=torch.float32) + 0.5
    near = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1)])
    x = torch.randn(k, generator=g) * 3
    x[: near.numel()] = near
    x[near.numel()] = 7.0
    x = x.to(dtype)
    return x[torch.randperm(k, generator=g)] if k <= 64 else x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [None, 64, 128])
def test_quantize_half_integer_quotients_match_cpu(dtype, group_size):
    # Every group of 64 gets the tie values and amax 7 (scale exactly 1), and
    # a scaled copy (scale not a power of two, quotients next to ties).
    rows = [half_integer_row(64, dtype, s).repeat(8) for s in range(4)]
    x = torch.stack(rows + [r.float().mul(0.3).to(dtype) for r in rows])
    for clip in (1.0, 0.9):
        packed, scales = ops.quantize_act(x.to(CUDA), group_size, clip)
        packed_cpu, scales_cpu = ops.quantize_act(x, group_size, clip)
        assert torch.equal(packed.cpu(), packed_cpu)
        assert torch.equal(scales.cpu().view(torch.int32), scales_cpu.view(torch.int32))


@pytest.mark.parametrize("k,group_size,dtype", [
    (70000, None, torch.float16),    # longer than a block's registers: two passes
    (70000, 128, torch.bfloat16),    # long rows of short groups: chunk by chunk
    (40000, None, torch.float32),
    (40001, 192, torch.float32),     # groups across warps, unaligned rows
    (4096, 192, torch.float16),
    (4096, 512, torch.float16),
    (11008, 1024, torch.bfloat16),
    (1000, 64, torch.float16),       # unaligned rows, read a value at a time
])
def test_quantize_long_rows_and_long_groups_match_cpu(k, group_size, dtype):
    x = torch.randn(3, k, dtype=dtype) * 2
    x[1, k // 3] = float("inf")
    packed, scales = ops.quantize_act(x.to(CUDA), group_size)
    packed_cpu, scales_cpu = ops.quantize_act(x, group_size)
    assert torch.equal(packed.cpu(), packed_cpu)
    assert torch.equal(scales.cpu().view(torch.int32), scales_cpu.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_tiny_scales_and_heavy_clipping_match_cpu(dtype):
    # Subnormal fp32 amaxes make 1 / scale overflow (the division path);
    # clip 0.05 sends most values past +-7 (clamped).
    x = torch.randn(6, 640) * 2
    if dtype == torch.float32:
        x[0] *= 1e-39
        x[1] *= 1e-44
    x[2] = 0.0
    x = x.to(dtype)
    for clip in (1.0, 0.05):
        for group_size in (None, 128):
            packed, scales = ops.quantize_act(x.to(CUDA), group_size, clip)
            packed_cpu, scales_cpu = ops.quantize_act(x, group_size, clip)
            assert torch.equal(packed.cpu(), packed_cpu)
            assert torch.equal(scales.cpu().view(torch.int32), scales_cpu.view(torch.int32))


# ---- decode GEMM: the weight ring across stages and row tiles ----------------

@pytest.mark.parametrize("m,n,k,group_size", [
    (1, 4096, 4096, None), (1, 300, 11008, 128), (3, 70, 28672, None), (16, 130, 8192, 64),
    (9, 2000, 2112, 192), (1, 33, 64, None),
    # two 16-row groups a tile (N >= 2 x 32 rows x 2 blocks x SMs, up to 148 SMs)
    (16, 19000, 4096, None), (11, 20000, 2112, 128),
])
def test_decode_gemm_matches_cpu_across_stages(monkeypatch, m, n, k, group_size):
    set_path(monkeypatch, "decode")
    a_q, a_s, w_q, w_s = random_operands(m, n, k, group_size)
    bias = torch.randn(n, device=CUDA)
    out = run_gemm(a_q, a_s, w_q, w_s, bias)
    ref, magnitude = gemm_ref_device(a_q, a_s, w_q, w_s, bias)
    assert_gemm_close(out, ref, magnitude, w_s.shape[1])
    if group_size is None:  # per channel: the CPU kernel's bits
        cpu = ops.w4a4_gemm(a_q.cpu(), a_s.cpu(), w_q.cpu(), w_s.cpu(), bias.cpu())
        assert same_bits(out.cpu(), cpu)


@pytest.mark.parametrize("k,n", [(4096, 4096), (11008, 4096), (8192, 600)])
@pytest.mark.parametrize("group_size", [None, 128])
def test_fused_linear_bits_at_llama_sizes(k, n, group_size):
    # One token: fused, row tiles walked by fewer blocks, rings of many stages.
    x = torch.randn(1, k, dtype=torch.float16, device=CUDA)
    w_q, w_s = ops.quantize_weight(torch.randn(n, k, device=CUDA), group_size)
    bias = torch.randn(n, dtype=torch.float16, device=CUDA)
    assert same_bits(ops.w4a4_linear(x, w_q, w_s, bias), quantize_then_gemm(x, w_q, w_s, bias, 1.0))


@pytest.mark.parametrize("m,n,k", [(40, 131, 8192), (128, 512, 8192), (33, 260, 16384)])
def test_gemm_sm90_split_k_has_the_bits_of_sm80(monkeypatch, m, n, k):
    # Per channel with few output tiles and K >= 8192 the sm90 path splits K
    # (here in 2, 2 and 4), adding exact int32 partial sums (odd N: the
    # workspace's scalar stores); twice, since the kernel resets the tile
    # counters it reuses.
    a_q, a_s, w_q, w_s = random_operands(m, n, k, None)
    bias = torch.randn(n, device=CUDA)
    set_path(monkeypatch, "sm80")
    expected = run_gemm(a_q, a_s, w_q, w_s, bias)
    set_path(monkeypatch, "sm90")
    assert torch.equal(run_gemm(a_q, a_s, w_q, w_s, bias), expected)
    assert torch.equal(run_gemm(a_q, a_s, w_q, w_s, bias), expected)


@pytest.mark.parametrize("group_size", [192, 384, 512])
def test_gemm_sm90_groups_across_stages(monkeypatch, group_size):
    # The wgmma kernel folds a group after its last 128-value stage; 192 is
    # not a whole number of stages and runs the mma.sync kernel.
    set_path(monkeypatch, "sm90")
    a_q, a_s, w_q, w_s = random_operands(150, 200, 2000, group_size)
    out = run_gemm(a_q, a_s, w_q, w_s, None, torch.float32)
    ref, magnitude = gemm_ref_device(a_q, a_s, w_q, w_s)
    assert_gemm_close(out, ref, magnitude, w_s.shape[1])


def test_decode_linear_replays_in_a_cuda_graph():
    # The programmatic dependency between the two kernels survives capture.
    x = torch.randn(3, 4096, dtype=torch.float16, device=CUDA)
    w_q, w_s = ops.quantize_weight(torch.randn(4096, 4096, device=CUDA), 128)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.w4a4_linear(x, w_q, w_s)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.w4a4_linear(x, w_q, w_s)
    x.copy_(torch.randn_like(x))
    expected = quantize_then_gemm(x, w_q, w_s, None, 1.0)
    graph.replay()
    torch.cuda.synchronize()
    assert same_bits(out, expected)
