"""Fused 2x2 stride-2 transposed conv (qairn/kernels/conv_transpose.py) against F.conv_transpose2d
in float64. Environment and tolerances as tests/kernels/test_conv.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_conv import DEVICE, DTYPES, LAYOUTS, TOL, TRITON_RUNS, assert_layout, compiled_mma, needs_triton

from qairn.kernels import conv as cv
from qairn.kernels import conv_transpose as ct

# (N, Cin, Cout, H, W) of the input: the model's up-samplings (16..128 channels), odd sizes, H = 1,
# channel counts that are not powers of two, and several K and N steps.
SHAPES = [
    (2, 16, 16, 5, 7),
    (1, 32, 16, 4, 4),
    (1, 5, 3, 3, 6),
    (2, 16, 8, 1, 9),
    (1, 80, 96, 3, 3),
    (1, 16, 16, 13, 11),
]


def make_inputs(shape, dtype=torch.float32, layout="nchw", seed=0, bias=True, residual=True):
    n, cin, cout, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen)
    weight = torch.randn(cin, cout, 2, 2, generator=gen) / cin**0.5
    b = torch.randn(cout, generator=gen) if bias else None
    r = torch.randn(n, cout, 2 * h, 2 * w, generator=gen) if residual else None
    to = dict(device=DEVICE, dtype=dtype)
    x, weight = x.to(**to), weight.to(**to)
    b = b.to(**to) if b is not None else None
    r = r.to(**to) if r is not None else None
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        r = r.contiguous(memory_format=torch.channels_last) if r is not None else None
    return x, weight, b, r


def ideal(x, weight, bias=None, relu=False, residual=None):
    out = F.conv_transpose2d(x.double(), weight.double(), None if bias is None else bias.double(), stride=2)
    if relu:
        out = out.relu()
    return out if residual is None else out + residual.double()


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_forward(shape, dtype, layout):
    x, weight, bias, residual = make_inputs(shape, dtype, layout)
    relu = shape[0] == 1
    out = ct.conv_transpose_triton(x, weight, bias, relu, residual)
    n, _, cout, h, w = shape
    assert out.dtype == dtype and out.shape == (n, cout, 2 * h, 2 * w)
    assert_layout(out, layout)
    torch.testing.assert_close(out.double(), ideal(x, weight, bias, relu, residual), **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_triton_epilogues(bias, relu, residual):
    x, weight, b, r = make_inputs((1, 16, 16, 4, 5), bias=bias, residual=residual)
    out = ct.conv_transpose_triton(x, weight, b, relu, r)
    torch.testing.assert_close(out.double(), ideal(x, weight, b, relu, r), **TOL[torch.float32])


@needs_triton
def test_triton_keeps_nan_and_inf():
    """NaN and inf reach the output as in F.conv_transpose2d and F.relu (the fused ReLU kept 0)."""
    x, weight, bias, _ = make_inputs((1, 16, 16, 3, 4), residual=False)
    x[0, 0, 1, 1], x[0, 1, 2, 3] = float("nan"), float("inf")
    out = ct.conv_transpose_triton(x, weight, bias, relu=True)
    torch.testing.assert_close(
        out.double(), ideal(x, weight, bias, relu=True), equal_nan=True, **TOL[torch.float32]
    )


@needs_triton
def test_triton_rejects_bad_arguments():
    x, weight, bias, residual = make_inputs((1, 16, 8, 4, 4))
    with pytest.raises(ValueError, match="weight"):
        ct.conv_transpose_triton(x, weight[:8], bias)
    with pytest.raises(ValueError, match="weight"):
        ct.conv_transpose_triton(x, torch.randn(16, 8, 3, 3, device=DEVICE), bias)
    with pytest.raises(ValueError, match="residual"):
        ct.conv_transpose_triton(x, weight, bias, residual=residual[..., :3])


@needs_triton
def test_triton_launch_runs_under_on_device(monkeypatch):
    from test_gate import launch_spy

    launches = launch_spy(monkeypatch, ct, "_conv_transpose_kernel")
    x, weight, bias, residual = make_inputs((1, 16, 8, 3, 4))
    out = ct.conv_transpose_triton(x, weight, bias, True, residual)
    torch.testing.assert_close(out.double(), ideal(x, weight, bias, True, residual), **TOL[torch.float32])
    assert launches and all(inside and t is x for _, inside, t in launches)


def test_op_on_the_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the launches must go to cuda:1."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    if not cv.HAS_TRITON:
        pytest.skip("triton not installed")
    x, weight, bias, residual = (
        t.to("cuda:1") for t in make_inputs((2, 16, 8, 5, 7), torch.float16, "channels_last")
    )
    with torch.cuda.device(0):
        out = ct.conv_transpose(x, weight, bias, True, residual)
        torch.cuda.synchronize(1)
    assert out.device == torch.device("cuda", 1) and torch.cuda.current_device() == 0
    want = ideal(*(t.cpu() for t in (x, weight, bias)), True, residual.cpu())
    torch.testing.assert_close(out.cpu().double(), want, **TOL[torch.float16])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_op_forward(layout):
    x, weight, bias, residual = make_inputs((2, 16, 8, 4, 3), layout=layout)
    out = ct.conv_transpose(x, weight, bias, True, residual)
    assert_layout(out, layout)
    torch.testing.assert_close(out.double(), ideal(x, weight, bias, True, residual), **TOL[torch.float32])


def test_op_gradcheck_float64():
    x, weight, bias, residual = (t.cpu().double().requires_grad_() for t in make_inputs((1, 3, 4, 3, 2)))
    assert torch.autograd.gradcheck(
        lambda *a: ct.conv_transpose(a[0], a[1], a[2], True, a[3]), (x, weight, bias, residual)
    )


def test_opcheck():
    x, weight, bias, residual = make_inputs((2, 4, 6, 3, 4))
    for b, relu, r in [(bias, True, residual), (None, False, None)]:
        args = [x.clone().requires_grad_(), weight.clone().requires_grad_(), b, relu, r]
        torch.library.opcheck(torch.ops.qairn.conv_transpose2x2.default, args)


@pytest.mark.parametrize("kernel", [(3, 3), (1, 2)], ids=str)
def test_other_kernels(kernel):
    """The reference takes any kernel at stride 2 (a 3x3 one makes 2H+1 x 2W+1): the fake kernel must
    give that shape, and the op's CUDA kernel (run here on this machine's device, interpreted on CPU)
    must compute it on the reference rather than refuse it."""
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(1, 4, 3, 5, generator=gen), torch.randn(4, 5, *kernel, generator=gen)
    torch.library.opcheck(torch.ops.qairn.conv_transpose2x2.default, [x, weight, None, True, None])
    if TRITON_RUNS:
        x, weight = x.to(DEVICE), weight.to(DEVICE)
        out = ct.conv_transpose_op._backend_fns["cuda"](x, weight, None, True, None)
        torch.testing.assert_close(out, ct.conv_transpose_reference(x, weight, None, True))


PTX_SCRIPT = r"""
def ptx(dtype, cin, cout):
    block_m, block_n, block_k, _ = cv.tile_config(cin, cout)
    blocks = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return mma(ct._conv_transpose_kernel, dtype, dict(**blocks, **epilogue(dtype)))

print(json.dumps({
    "fp16_32x16": ptx("*fp16", 32, 16), "bf16_16x16": ptx("*bf16", 16, 16), "fp32": ptx("*fp32", 16, 16),
}))
"""


@pytest.mark.skipif(not cv.HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA the other tests compile the kernel for the real device")
def test_kernel_compiles_for_hopper_on_tensor_cores():
    mma = compiled_mma(PTX_SCRIPT)
    assert mma["fp16_32x16"] and mma["bf16_16x16"] and not mma["fp32"], mma


def test_op_refuses_unbatched_input_on_every_path():
    """As test_conv's: the fake kernel and the Triton launcher failed to unpack a (C, H, W) x."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, weight = torch.randn(3, 2, 3), torch.randn(3, 4, 2, 2)
    calls = [lambda x: ct.conv_transpose(x, weight)]
    if TRITON_RUNS:
        calls.append(lambda x: ct.conv_transpose_triton(x.to(DEVICE), weight.to(DEVICE)))
    for call in calls:
        with pytest.raises(ValueError, match=r"takes a 4-d \(N, C, H, W\) x, got \("):
            call(x)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, pytest.raises(ValueError, match="4-d"):
        ct.conv_transpose(mode.from_tensor(x), weight)


@pytest.mark.parametrize("op", ["conv", "conv_transpose"])
def test_an_empty_image_is_refused_on_every_path(op):
    """F.conv2d and F.conv_transpose2d refuse an image of 0 rows ('Only zero batch or zero channel
    inputs are supported'): so did the ops on the CPU, but the Triton launchers and the fakes gave an
    output (a (1, 3, 2, 6) one of padding and bias for a 1x1 conv of padding 1, a (1, 3, 0, 8) one for
    the transposed conv). Every path now refuses it in one ValueError; a batch of 0 images still runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(1, 4, 0, 4)
    if op == "conv":
        weight = torch.randn(3, 4, 1, 1)
        calls = [lambda x, w: cv.conv(x, w, None, 1, 1), lambda x, w: cv.conv_triton(x, w, None, 1, 1)]
    else:
        weight = torch.randn(4, 3, 2, 2)
        calls = [lambda x, w: ct.conv_transpose(x, w), lambda x, w: ct.conv_transpose_triton(x, w)]
    if not TRITON_RUNS:
        calls = calls[:1]
    for call in calls:
        with pytest.raises(ValueError, match=r"an image of at least one pixel, got x \(1, 4, 0, 4\)"):
            call(x.to(DEVICE), weight.to(DEVICE))
        assert call(x.new_empty(0, 4, 3, 4).to(DEVICE), weight.to(DEVICE)).shape[0] == 0
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, pytest.raises(ValueError, match="one pixel"):
        calls[0](mode.from_tensor(x), mode.from_tensor(weight))


@pytest.mark.parametrize("op", ["conv", "conv_transpose"])
def test_a_weight_of_no_channels_is_refused_on_every_path(op):
    """A weight of 0 input or 0 output channels: F.conv2d returned (1, 0, 5, 5) for a (2, 0, 3, 3)
    weight where the fake promised (1, 2, 5, 5), so the CPU op failed with AttributeError inside its own
    error message; F.conv2d (0 out) and F.conv_transpose2d refuse the others, where the Triton launchers
    gave the bias or an empty output. One ValueError on every path now."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if op == "conv":
        cases = [
            (torch.randn(1, 0, 5, 5), torch.randn(2, 0, 3, 3)),
            (torch.randn(1, 3, 5, 5), torch.randn(0, 3, 3, 3)),
        ]
        calls = [lambda x, w: cv.conv(x, w, None, 1, 1), lambda x, w: cv.conv_triton(x, w, None, 1, 1)]
    else:
        cases = [
            (torch.randn(1, 0, 2, 2), torch.randn(0, 3, 2, 2)),
            (torch.randn(1, 3, 2, 2), torch.randn(3, 0, 2, 2)),
        ]
        calls = [lambda x, w: ct.conv_transpose(x, w), lambda x, w: ct.conv_transpose_triton(x, w)]
    if not TRITON_RUNS:
        calls = calls[:1]
    for x, weight in cases:
        for call in calls:
            with pytest.raises(ValueError, match=r"at least one input and one output channel, got weight \("):
                call(x.to(DEVICE), weight.to(DEVICE))
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, pytest.raises(ValueError, match="channel"):
            calls[0](mode.from_tensor(x), mode.from_tensor(weight))
