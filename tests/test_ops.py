"""CPU kernels of every apex4 op: against the float64 reference, under opcheck,
and on bad input."""

import pytest
import torch

import torch_apex4  # noqa: F401  (registers the ops)
from torch_apex4.hadamard import rotation_factor, rotation_matrix
from reference import gemm_ref, quantize_ref

ops = torch.ops.apex4
GROUPS = [None, 64, 128, 256]


def unpack(packed):
    return ops.unpack_int4(packed)


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("shape", [(1, 64), (5, 576), (3, 7), (33, 1000), (2, 3, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_act_matches_reference(shape, group_size, dtype):
    x = torch.randn(shape, dtype=dtype) * 3
    packed, scales = ops.quantize_act(x, group_size)
    q_ref, s_ref = quantize_ref(x, group_size)
    assert packed.dtype == torch.uint8 and scales.dtype == torch.float32
    torch.testing.assert_close(scales, s_ref, rtol=0, atol=0)
    assert torch.equal(unpack(packed), q_ref)


@pytest.mark.parametrize("clip", [0.9, 0.5])
def test_quantize_clip_ratio(clip):
    x = torch.randn(17, 384)
    packed, scales = ops.quantize_weight(x, 128, clip)
    q_ref, s_ref = quantize_ref(x, 128, clip)
    torch.testing.assert_close(scales, s_ref, rtol=0, atol=0)
    assert torch.equal(unpack(packed), q_ref)
    assert unpack(packed).abs().max() == 7


def test_pack_unpack_round_trip_and_layout():
    values = torch.randint(-8, 8, (9, 130), dtype=torch.int8)
    packed = ops.pack_int4(values)
    assert packed.shape == (9, 65)
    assert torch.equal(unpack(packed), values)
    # Element 2j in the low nibble, 2j+1 in the high nibble, two's complement.
    byte = ops.pack_int4(torch.tensor([[-1, 3]], dtype=torch.int8))
    assert byte.item() == 0x3F


def random_operands(m, n, k, group_size, scale_a=1.0):
    x = torch.randn(m, k) * scale_a
    w = torch.randn(n, k)
    a_q, a_s = ops.quantize_act(x, group_size)
    w_q, w_s = ops.quantize_weight(w, group_size)
    return a_q, a_s, w_q, w_s


def assert_gemm_close(out, a_q, a_s, w_q, w_s, bias=None):
    ref, magnitude = gemm_ref(unpack(a_q), a_s, unpack(w_q), w_s, bias)
    err = (out.double() - ref).abs()
    eps = torch.finfo(out.dtype).eps
    groups = w_s.shape[-1]
    # fp32 accumulation over G groups, plus one rounding to the output dtype.
    bound = magnitude * (groups + 2) * 2 * torch.finfo(torch.float32).eps + ref.abs() * eps + 1e-30
    assert torch.all(err <= bound), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (7, 96, 576), (33, 192, 1000), (100, 130, 256),
                                   (257, 65, 1536), (3, 1, 128)])
def test_gemm_matches_reference(m, n, k, group_size):
    a_q, a_s, w_q, w_s = random_operands(m, n, k, group_size)
    out = ops.w4a4_gemm(a_q, a_s, w_q, w_s)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert_gemm_close(out, a_q, a_s, w_q, w_s)


def test_gemm_integer_partials_are_exact():
    # Unit scales make the output the exact integer dot products, -8 included.
    a = torch.randint(-8, 8, (37, 640), dtype=torch.int8)
    w = torch.randint(-8, 8, (50, 640), dtype=torch.int8)
    ones_a, ones_w = torch.ones(37, 5), torch.ones(50, 5)
    out = ops.w4a4_gemm(ops.pack_int4(a), ones_a, ops.pack_int4(w), ones_w)
    assert torch.equal(out, (a.double() @ w.double().T).float())


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.float16])
def test_gemm_out_dtype_and_bias(out_dtype, bias_dtype):
    a_q, a_s, w_q, w_s = random_operands(9, 70, 320, 64, scale_a=0.1)
    bias = None if bias_dtype is None else torch.randn(70, dtype=bias_dtype)
    out = ops.w4a4_gemm(a_q, a_s, w_q, w_s, bias, out_dtype)
    assert out.dtype == out_dtype
    assert_gemm_close(out, a_q, a_s, w_q, w_s, bias)


def test_gemm_leading_dims():
    x = torch.randn(2, 5, 256)
    w_q, w_s = ops.quantize_weight(torch.randn(48, 256), 128)
    a_q, a_s = ops.quantize_act(x, 128)
    out = ops.w4a4_gemm(a_q, a_s, w_q, w_s)
    flat = ops.w4a4_gemm(a_q.reshape(10, -1), a_s.reshape(10, -1), w_q, w_s)
    assert out.shape == (2, 5, 48)
    assert torch.equal(out.reshape(10, 48), flat)


@pytest.mark.parametrize("group_size", [None, 128])
def test_linear_is_quantize_then_gemm(group_size):
    x = torch.randn(3, 4, 300, dtype=torch.bfloat16)
    w_q, w_s = ops.quantize_weight(torch.randn(20, 300), group_size)
    bias = torch.randn(20, dtype=torch.bfloat16)
    out = ops.w4a4_linear(x, w_q, w_s, bias, 0.9)
    a_q, a_s = ops.quantize_act(x, group_size, 0.9)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ops.w4a4_gemm(a_q, a_s, w_q, w_s, bias, torch.bfloat16))


def test_k_not_multiple_of_group_is_zero_padded():
    # K = 576 = 4.5 groups of 128: the last group is half padding, and results
    # equal those of an explicitly zero-padded K = 640.
    x, w = torch.randn(4, 576), torch.randn(8, 576)
    xp, wp = (torch.nn.functional.pad(t, (0, 64)) for t in (x, w))
    a = ops.quantize_act(x, 128)
    b = ops.quantize_act(xp, 128)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    out = ops.w4a4_gemm(*a, *ops.quantize_weight(w, 128))
    assert torch.equal(out, ops.w4a4_gemm(*b, *ops.quantize_weight(wp, 128)))


def test_odd_k_is_padded():
    packed, scales = ops.quantize_act(torch.randn(2, 7))
    assert packed.shape == (2, 32) and scales.shape == (2, 1)
    assert torch.all(unpack(packed)[:, 7:] == 0)


def test_zero_tokens():
    a_q, a_s = ops.quantize_act(torch.randn(0, 256), 128)
    assert a_q.shape == (0, 128) and a_s.shape == (0, 2)
    w_q, w_s = ops.quantize_weight(torch.randn(16, 256), 128)
    out = ops.w4a4_gemm(a_q, a_s, w_q, w_s, None, torch.float16)
    assert out.shape == (0, 16) and out.dtype == torch.float16
    assert ops.w4a4_linear(torch.randn(0, 256), w_q, w_s).shape == (0, 16)


def test_zero_group_gives_zero_scale_and_output():
    x = torch.zeros(2, 256)
    x[1, :128] = 1.0
    packed, scales = ops.quantize_act(x, 128)
    assert scales[0].tolist() == [0.0, 0.0] and scales[1, 1] == 0.0
    w_q, w_s = ops.quantize_weight(torch.randn(4, 256), 128)
    out = ops.w4a4_gemm(packed, scales, w_q, w_s)
    assert torch.all(out[0] == 0) and torch.all(torch.isfinite(out))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("group_size", [None, 128])
def test_nonfinite_activation_poisons_only_its_token(bad, group_size):
    x = torch.randn(3, 256)
    x[1, 5] = bad
    a_q, a_s = ops.quantize_act(x, group_size)
    assert torch.isnan(a_s[1]).any() and torch.isfinite(a_s[[0, 2]]).all()
    w_q, w_s = ops.quantize_weight(torch.randn(6, 256), group_size)
    out = ops.w4a4_gemm(a_q, a_s, w_q, w_s)
    assert torch.isnan(out[1]).all()
    assert torch.isfinite(out[[0, 2]]).all()


def test_strided_activation_input_is_accepted():
    x = torch.randn(256, 6).t()  # [6, 256], not contiguous
    assert not x.is_contiguous()
    a = ops.quantize_act(x, 128)
    b = ops.quantize_act(x.contiguous(), 128)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def gemm_args():
    a_q, a_s, w_q, w_s = random_operands(4, 8, 256, 128)
    return dict(a_q=a_q, a_s=a_s, w_q=w_q, w_s=w_s)


@pytest.mark.parametrize("change,error,match", [
    (dict(a_q=torch.zeros(4, 64, dtype=torch.uint8)), ValueError, "K"),
    (dict(a_s=torch.ones(4, 1)), ValueError, "group"),
    (dict(a_s=torch.ones(5, 2)), ValueError, "a_s"),
    (dict(a_q=torch.zeros(4, 128, dtype=torch.int8)), TypeError, "uint8"),
    (dict(w_s=torch.ones(8, 2, dtype=torch.float16)), TypeError, "float32"),
    (dict(w_q=torch.zeros(8, 256, dtype=torch.uint8)[:, ::2]), ValueError, "contiguous"),
    (dict(w_q=torch.zeros(2, 4, 128, dtype=torch.uint8)), ValueError, "2-D"),
    (dict(bias=torch.ones(7)), ValueError, "bias"),
    (dict(bias=torch.ones(8, dtype=torch.int32)), TypeError, "bias"),
    (dict(out_dtype=torch.int32), TypeError, "out_dtype"),
    (dict(w_s=torch.ones(8, 3)), ValueError, "group"),
])
def test_gemm_bad_input(change, error, match):
    args = gemm_args()
    args.update(change)
    with pytest.raises(error, match=match):
        ops.w4a4_gemm(**args)


@pytest.mark.parametrize("call,error,match", [
    (lambda: ops.quantize_act(torch.randint(0, 5, (2, 64))), TypeError, "float16"),
    (lambda: ops.quantize_act(torch.randn(2, 64, dtype=torch.float64)), TypeError, "float16"),
    (lambda: ops.quantize_act(torch.randn(2, 128), 100), ValueError, "multiple of 64"),
    (lambda: ops.quantize_act(torch.randn(2, 128), 0), ValueError, "multiple of 64"),
    (lambda: ops.quantize_act(torch.randn(2, 128), -64), ValueError, "multiple of 64"),
    (lambda: ops.quantize_act(torch.randn(2, 128), None, 0.0), ValueError, "clip_ratio"),
    (lambda: ops.quantize_act(torch.randn(2, 0)), ValueError, "K > 0"),
    (lambda: ops.pack_int4(torch.zeros(2, 3, dtype=torch.int8)), ValueError, "even"),
    (lambda: ops.pack_int4(torch.full((2, 4), 8, dtype=torch.int8)), ValueError, r"\[-8, 7\]"),
    (lambda: ops.pack_int4(torch.zeros(2, 4)), TypeError, "int8"),
    (lambda: ops.unpack_int4(torch.zeros(2, 4, dtype=torch.int8)), TypeError, "uint8"),
    (lambda: ops.w4a4_linear(torch.randn(2, 100), *ops.quantize_weight(torch.randn(3, 300))),
     ValueError, "does not pad"),
    (lambda: ops.w4a4_gemm(*ops.quantize_act(torch.randn(2, 64)),
                           *ops.quantize_weight(torch.randn(3, 64, device="meta"))),
     ValueError, "one device"),
    (lambda: ops.w4a4_gemm(*ops.quantize_act(torch.randn(2, 64)),
                           *ops.quantize_weight(torch.randn(3, 64)), None, None,
                           torch.zeros(16, device="meta")),
     ValueError, "one device"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("n", [64, 192, 576, 1536, 172])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hadamard_matches_dense_rotation(n, dtype):
    x = torch.randn(5, n).to(dtype)
    out = ops.hadamard(x, rotation_factor(n))
    ref = x.double() @ rotation_matrix(n)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("group_size", [None, 64, 128])
def test_hadamard_quantize_act_is_rotate_then_quantize(group_size):
    x = torch.randn(7, 576)
    factor = rotation_factor(576)
    fused = ops.hadamard_quantize_act(x, factor, group_size, 0.9)
    separate = ops.quantize_act(ops.hadamard(x, factor), group_size, 0.9)
    assert all(torch.equal(u, v) for u, v in zip(fused, separate))


def test_rotated_linear_is_rotated_quantize_then_gemm():
    x = torch.randn(2, 3, 1536, dtype=torch.bfloat16)
    factor = rotation_factor(1536)
    w_q, w_s = ops.quantize_weight(torch.randn(40, 1536), 128)
    bias = torch.randn(40)
    out = ops.w4a4_rotated_linear(x, factor, w_q, w_s, bias, 0.8)
    a_q, a_s = ops.hadamard_quantize_act(x, factor, 128, 0.8)
    assert torch.equal(out, ops.w4a4_gemm(a_q, a_s, w_q, w_s, bias, torch.bfloat16))


@pytest.mark.parametrize("factor,error,match", [
    (torch.ones(3, 4), ValueError, "square"),
    (torch.eye(5), ValueError, "power of two"),
    (torch.eye(4, dtype=torch.float64), TypeError, "float32"),
])
def test_hadamard_bad_factor(factor, error, match):
    with pytest.raises(error, match=match):
        ops.hadamard(torch.randn(2, 64), factor)
    with pytest.raises(error, match=match):
        ops.hadamard_quantize_act(torch.randn(2, 64), factor)


def opcheck_cases():
    x = torch.randn(5, 576)
    w = torch.randn(24, 576)
    for group_size in (None, 128):
        a_q, a_s = ops.quantize_act(x, group_size)
        w_q, w_s = ops.quantize_weight(w, group_size)
        yield ops.quantize_act.default, (x, group_size, 0.9)
        yield ops.quantize_act.default, (torch.randn(2, 3, 200, dtype=torch.bfloat16), group_size)
        yield ops.quantize_weight.default, (w, group_size)
        yield ops.w4a4_gemm.default, (a_q, a_s, w_q, w_s)
        yield ops.w4a4_gemm.default, (a_q[:1], a_s[:1], w_q, w_s, torch.randn(24), torch.float16)
        yield ops.w4a4_linear.default, (x.reshape(1, 5, 576), w_q, w_s, torch.randn(24), 0.9)
        # prefetch (the next layer's weight, brought into L2 on CUDA) changes nothing.
        yield ops.w4a4_gemm.default, (a_q[:1], a_s[:1], w_q, w_s, None, None, w_q.clone())
        yield ops.w4a4_linear.default, (x[:1], w_q, w_s, None, 1.0, w_q.clone())
    factor = rotation_factor(576)
    w_q, w_s = ops.quantize_weight(w, 64)
    yield ops.hadamard.default, (torch.randn(2, 3, 576), factor)
    yield ops.hadamard_quantize_act.default, (x, factor, 64, 0.9)
    yield ops.w4a4_rotated_linear.default, (x.reshape(1, 5, 576), factor, w_q, w_s, None, 0.9)
    yield ops.pack_int4.default, (torch.randint(-8, 8, (3, 10), dtype=torch.int8),)
    yield ops.unpack_int4.default, (torch.randint(0, 256, (4, 2, 6), dtype=torch.uint8),)


@pytest.mark.parametrize("op,args", list(opcheck_cases()),
                         ids=lambda v: getattr(v, "__name__", None) if callable(v) else "")
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_prefetch_changes_no_result():
    x = torch.randn(3, 576)
    w_q, w_s = ops.quantize_weight(torch.randn(24, 576), 128)
    following = ops.quantize_weight(torch.randn(40, 576))[0]
    assert torch.equal(ops.w4a4_linear(x, w_q, w_s, None, 1.0, following),
                       ops.w4a4_linear(x, w_q, w_s))


def test_every_op_has_an_opcheck_case():
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("apex4::")}
    covered = {op.name().split("::")[1].split(".")[0] for op, _ in opcheck_cases()}
    assert registered and covered == registered


@pytest.mark.parametrize("group_size", [None, 128])
def test_portable_cpu_kernel_matches_simd_kernel(monkeypatch, group_size):
    # CPUs without AVX-512 VNNI take the portable micro-kernel; both must give
    # the same exact partials and the same fp32 folding, hence equal outputs.
    a_q, a_s, w_q, w_s = random_operands(70, 100, 640, group_size)
    simd = ops.w4a4_gemm(a_q, a_s, w_q, w_s)
    monkeypatch.setenv("APEX4_CPU_KERNEL", "portable")
    assert torch.equal(ops.w4a4_gemm(a_q, a_s, w_q, w_s), simd)
