"""Fused conv (qairn/kernels/conv.py) against F.conv2d in float64.

Environment as tests/kernels/test_gate.py: the Triton-path tests run on CUDA when present; on CPU
only when TRITON_INTERPRET=1 was set before qairn was imported, and skip otherwise. Everything else
runs on the plain-torch reference. Shapes stay tiny: the interpreter costs milliseconds per program.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_gate import DEVICE, TRITON_RUNS, compiled_for_hopper, needs_triton  # one environment

from qairn.kernels import conv as cv
from qairn.kernels import gate

# (N, Cin, Cout, H, W): the model's thin layers (RGB in, 3 and 1 out), channel counts that are not
# powers of two, several K steps (Cin 80 > BLOCK_K 64), several N programs (Cout 96 > 64), H = 1,
# and enough pixels for several M programs.
SHAPES = [
    (2, 16, 16, 9, 13),
    (1, 3, 16, 8, 7),
    (1, 16, 3, 7, 5),
    (1, 16, 1, 6, 6),
    (1, 33, 17, 5, 7),
    (1, 80, 96, 4, 5),
    (2, 8, 8, 1, 11),
    (1, 16, 16, 19, 17),
]
# (kernel, stride, padding): the model's 3x3 (stride 1 and 2, padding 1) and 2x2 stride-2 convs, and
# the other combinations the kernel accepts.
GEOMETRIES = [(3, 1, 1), (3, 2, 1), (2, 2, 0), (1, 1, 0), (3, 1, 0), (1, 2, 0)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Sums of Cin*k*k products: half inputs are rounded once on the way in and once on the way out.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}
LAYOUTS = ["nchw", "channels_last"]


def make_inputs(
    shape, dtype=torch.float32, layout="nchw", geometry=(3, 1, 1), seed=0, bias=True, residual=True
):
    n, cin, cout, h, w = shape
    k, s, p = geometry
    ho, wo = cv.out_size(h, k, s, p), cv.out_size(w, k, s, p)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen)
    weight = torch.randn(cout, cin, k, k, generator=gen) / (k * cin**0.5)  # outputs of order 1
    b = torch.randn(cout, generator=gen) if bias else None
    r = torch.randn(n, cout, ho, wo, generator=gen) if residual else None
    to = dict(device=DEVICE, dtype=dtype)
    x, weight = x.to(**to), weight.to(**to)
    b = b.to(**to) if b is not None else None
    r = r.to(**to) if r is not None else None
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        r = r.contiguous(memory_format=torch.channels_last) if r is not None else None
    return x, weight, b, r


def ideal(x, weight, bias=None, stride=1, padding=1, relu=False, residual=None):
    b = None if bias is None else bias.double()
    out = F.conv2d(x.double(), weight.double(), b, stride=stride, padding=padding)
    if relu:
        out = out.relu()
    return out if residual is None else out + residual.double()


def assert_layout(out, layout):
    if layout == "channels_last" and out.shape[1] > 1 and out.shape[2] * out.shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


# --- The Triton launcher -------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_forward(shape, dtype, layout):
    x, weight, bias, residual = make_inputs(shape, dtype, layout)
    relu = shape[1] % 2 == 0  # both epilogues over the shapes; all four below
    out = cv.conv_triton(x, weight, bias, relu=relu, residual=residual)
    assert out.dtype == dtype and out.shape == (shape[0], shape[2], shape[3], shape[4])
    assert_layout(out, layout)
    torch.testing.assert_close(
        out.double(), ideal(x, weight, bias, relu=relu, residual=residual), **TOL[dtype]
    )


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("shape", [(2, 16, 16, 9, 13), (1, 3, 17, 8, 7), (1, 16, 32, 3, 6)], ids=str)
def test_triton_kernel_stride_padding(shape, geometry, layout):
    x, weight, bias, residual = make_inputs(shape, torch.float16, layout, geometry)
    k, s, p = geometry
    out = cv.conv_triton(x, weight, bias, s, p, relu=True, residual=residual)
    assert_layout(out, layout)
    want = ideal(x, weight, bias, s, p, relu=True, residual=residual)
    assert out.shape == want.shape
    torch.testing.assert_close(out.double(), want, **TOL[torch.float16])


@needs_triton
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_triton_epilogues(bias, relu, residual):
    x, weight, b, r = make_inputs((1, 16, 16, 6, 7), bias=bias, residual=residual)
    out = cv.conv_triton(x, weight, b, relu=relu, residual=r)
    torch.testing.assert_close(out.double(), ideal(x, weight, b, relu=relu, residual=r), **TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("relu", [False, True])
def test_triton_keeps_nan_and_inf(relu):
    """A NaN or inf in the input (a corrupt tile) reaches the output as in F.conv2d and F.relu: the
    fused ReLU must not turn NaN into 0."""
    x, weight, bias, _ = make_inputs((1, 16, 16, 5, 6), residual=False)
    x[0, 0, 1, 1], x[0, 1, 3, 4] = float("nan"), float("inf")
    out = cv.conv_triton(x, weight, bias, relu=relu)
    torch.testing.assert_close(
        out.double(), ideal(x, weight, bias, relu=relu), equal_nan=True, **TOL[torch.float32]
    )


@needs_triton
@pytest.mark.parametrize("config", [(16, 16, 16, 1), (32, 16, 16, 2), (64, 32, 32, 4)], ids=str)
def test_triton_tile_configs_agree(config):
    """Other tilings (as a benchmark may pick) give the same result: masks and loops are right."""
    x, weight, bias, residual = make_inputs((1, 40, 24, 7, 9), layout="channels_last")
    out = cv.conv_triton(x, weight, bias, relu=True, residual=residual, config=config)
    want = ideal(x, weight, bias, relu=True, residual=residual)
    torch.testing.assert_close(out.double(), want, **TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("split", [(16, 16), (3, 17), (40, 24)], ids=str)
def test_triton_two_inputs(split, layout):
    """x and x2 concatenated along channels without the copy: RQAttention's (skip, decoder) input."""
    c1, c2 = split
    x, weight, bias, residual = make_inputs((2, c1 + c2, 16, 7, 9), torch.float16, layout)
    x1, x2 = x[:, :c1], x[:, c1:]  # views of one tensor; the kernel walks their strides
    if layout == "nchw":
        x1, x2 = x1.contiguous(), x2.contiguous()
    out = cv.conv_triton(x1, weight, bias, relu=True, residual=residual, x2=x2)
    torch.testing.assert_close(
        out.double(), ideal(x, weight, bias, relu=True, residual=residual), **TOL[torch.float16]
    )
    for s, p in [(2, 1)]:
        out = cv.conv_triton(x1, weight, bias, s, p, x2=x2)
        torch.testing.assert_close(out.double(), ideal(x, weight, bias, s, p), **TOL[torch.float16])
    with pytest.raises(ValueError, match="x2"):
        cv.conv_triton(x1, weight, bias, x2=x2[..., :3])
    with pytest.raises(ValueError, match="Cout"):
        cv.conv_triton(x1, weight[:, :c1], bias, x2=x2)


@needs_triton
def test_triton_mixed_layouts_and_views():
    """x channels_last with an NCHW residual, and a non-contiguous slice of a bigger tensor."""
    x, weight, bias, residual = make_inputs((2, 16, 16, 8, 8), layout="channels_last")
    out = cv.conv_triton(x, weight, bias, residual=residual.contiguous())
    torch.testing.assert_close(out.double(), ideal(x, weight, bias, residual=residual), **TOL[torch.float32])
    wide = torch.randn(2, 32, 8, 8, device=DEVICE)
    view = wide[:, 8:24]  # strided in n: not contiguous
    out = cv.conv_triton(view, weight, bias)
    torch.testing.assert_close(out.double(), ideal(view, weight, bias), **TOL[torch.float32])


@needs_triton
def test_triton_rejects_bad_arguments():
    x, weight, bias, residual = make_inputs((1, 16, 16, 4, 4))
    with pytest.raises(ValueError, match="weight"):
        cv.conv_triton(x, weight[:, :8], bias)
    with pytest.raises(ValueError, match="weight"):
        cv.conv_triton(x, torch.randn(16, 16, 5, 5, device=DEVICE), bias)
    with pytest.raises(ValueError, match="stride"):
        cv.conv_triton(x, weight, bias, stride=3)
    with pytest.raises(ValueError, match="bias"):
        cv.conv_triton(x, weight, bias[:3])
    with pytest.raises(ValueError, match="residual"):
        cv.conv_triton(x, weight, bias, residual=residual[:, :3])
    with pytest.raises(TypeError):
        cv.conv_triton(x.double(), weight.double(), bias.double())
    # What F.conv2d refuses: an input smaller than the kernel (a 1x1 image under a 2x2 stride-2 conv
    # came back empty, under a 3x3 unpadded one as "negative dimension"), negative padding (cropped).
    one = torch.randn(1, 16, 1, 1, device=DEVICE)
    for w, s, p in [(weight[..., :2, :2], 2, 0), (weight, 1, 0), (weight[..., :1, :1], 1, -1)]:
        with pytest.raises(ValueError, match="padding"):
            cv.conv_triton(one if p >= 0 else x, w, bias, s, p)


@pytest.mark.skipif(not cv.HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("op", ["conv", "conv_transpose"])
def test_views_reaching_past_int32_reach_the_kernels_dense(monkeypatch, op):
    """A crop of a huge frame: 16x4x4 elements, so check_epilogue's dense sizes pass, but 2**30
    elements between channels. The kernels' in-image offsets are int32 and multiply the strides they
    are given: they must get a dense copy. Meta tensors: nothing is allocated; the launch is recorded."""
    from qairn.kernels import conv_transpose as ct

    launched = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(args)

    monkeypatch.setattr(*((cv, "_conv_kernel") if op == "conv" else (ct, "_conv_transpose_kernel")), Spy())
    monkeypatch.setattr(cv, "INTERPRETED", True)  # meta tensors through the CPU tensors' checks
    monkeypatch.setattr(gate, "installed_interpreter_problem", lambda: None)  # the spy interprets nothing
    far = torch.empty_strided((1, 16, 4, 4), (2**34, 2**30, 2**26, 1), device="meta")
    if op == "conv":
        residual = torch.empty_strided((1, 8, 4, 4), (2**34, 2**30, 2**26, 1), device="meta")
        cv.conv_triton(far, torch.empty(8, 32, 3, 3, device="meta"), None, residual=residual, x2=far)
    else:
        residual = torch.empty_strided((1, 8, 8, 8), (2**34, 2**30, 2**26, 1), device="meta")
        ct.conv_transpose_triton(far, torch.empty(16, 8, 2, 2, device="meta"), None, residual=residual)
    (args,) = launched
    for t in args:
        if isinstance(t, torch.Tensor):
            assert sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:])) < 2**31


@needs_triton
def test_a_bias_of_another_dtype_is_refused_as_f_conv2d_refuses_it():
    """An fp16 bias under an fp32 conv: F.conv2d (the CPU op) refuses it; the Triton launcher read it
    and added it in fp32, so the same call ran on CUDA and failed on the CPU. Now the launcher refuses
    it, and the op's CUDA kernel leaves it to the reference, which refuses it as on the CPU."""
    x, weight, bias, _ = make_inputs((1, 8, 8, 4, 4))
    with pytest.raises(TypeError, match="bias of x's dtype torch.float32, got torch.float16"):
        cv.conv_triton(x, weight, bias.half())
    for kernel in (cv.conv_op, cv.conv_op._backend_fns["cuda"]):
        with pytest.raises(RuntimeError, match="bias type"):
            kernel(x, weight, bias.half(), 1, 1, False, None, None)


@needs_triton
def test_triton_strided_bias():
    """The kernels read the bias as bias_ptr + channel: a strided one (every other element of a
    longer vector) gave other channels' biases, 2.9 off, in conv and transposed conv alike."""
    from qairn.kernels import conv_transpose as ct

    x, weight, _, _ = make_inputs((1, 3, 4, 5, 6))
    bias = torch.randn(8, device=DEVICE)[::2]
    torch.testing.assert_close(
        cv.conv_triton(x, weight, bias).double(), ideal(x, weight, bias), **TOL[torch.float32]
    )
    up = torch.randn(3, 4, 2, 2, device=DEVICE)
    want = F.conv_transpose2d(x.double(), up.double(), bias.double(), stride=2)
    torch.testing.assert_close(ct.conv_transpose_triton(x, up, bias).double(), want, **TOL[torch.float32])


@needs_triton
def test_triton_broadcast_residual():
    """A residual that broadcasts to the output (a (1,Cout,1,1) shift), which the op's reference adds
    on the CPU, was refused on the Triton path ('residual must be (2, 16, 5, 6)'); both launchers
    now read it through stride 0."""
    from qairn.kernels import conv_transpose as ct

    x, weight, bias, _ = make_inputs((2, 16, 16, 5, 6))
    shift = torch.randn(1, 16, 1, 1, device=DEVICE)
    want = ideal(x, weight, bias, relu=True, residual=shift)
    torch.testing.assert_close(
        cv.conv_triton(x, weight, bias, relu=True, residual=shift).double(), want, **TOL[torch.float32]
    )
    up = torch.randn(16, 16, 2, 2, device=DEVICE)
    want = F.conv_transpose2d(x.double(), up.double(), stride=2) + shift.double()
    torch.testing.assert_close(
        ct.conv_transpose_triton(x, up, residual=shift).double(), want, **TOL[torch.float32]
    )


def test_pick_fastest_takes_the_lowest_median_and_skips_failures():
    times = {"a": iter([5.0, 1.0, 5.0]), "b": iter([2.0, 2.0, 9.0])}  # medians 5 and 2; "c" cannot run
    launched = []

    def launch(config):
        if config == "c":
            raise RuntimeError("out of resources")
        launched.append(config)

    def timer(fn):
        fn()
        return next(times[launched[-1]])

    assert cv.pick_fastest(["a", "c", "b"], launch, repeats=3, timer=timer) == "b"
    assert cv.pick_fastest(["c"], launch, timer=timer) == "c"  # nothing ran: the first, to fail loudly


@pytest.mark.skipif(DEVICE != "cuda", reason="tuning times CUDA kernels; no CUDA device")
def test_tuned_tiling_gives_the_same_result(monkeypatch):
    """The first call of a shape times the candidate tilings (the CUDA tests otherwise run with
    QAIRN_CONV_TUNE=0 to save compiles) and keeps one; any of them computes the same conv."""
    monkeypatch.setenv("QAIRN_CONV_TUNE", "1")
    x, weight, bias, residual = make_inputs((2, 16, 16, 40, 52), torch.float16, "channels_last")
    cv._tuned.clear()
    out = cv.conv_triton(x, weight, bias, relu=True, residual=residual)
    assert len(cv._tuned) == 1 and next(iter(cv._tuned.values())) in cv.candidate_configs(16, 16)
    torch.testing.assert_close(
        out.double(), ideal(x, weight, bias, relu=True, residual=residual), **TOL[torch.float16]
    )


@needs_triton
def test_triton_launch_runs_under_on_device(monkeypatch):
    """The launch (and, on CUDA, the tuning that times it) runs with x's GPU made current."""
    from test_gate import launch_spy

    launches = launch_spy(monkeypatch, cv, "_conv_kernel")
    x, weight, bias, residual = make_inputs((1, 16, 16, 5, 6))
    out = cv.conv_triton(x, weight, bias, relu=True, residual=residual)
    torch.testing.assert_close(
        out.double(), ideal(x, weight, bias, relu=True, residual=residual), **TOL[torch.float32]
    )
    assert launches and all(name == "_conv_kernel" and inside and t is x for name, inside, t in launches)


@pytest.mark.parametrize("tune", ["0", "1"])
def test_op_on_the_second_gpu(monkeypatch, tune):
    """Tensors on cuda:1 while cuda:0 is current: the launches, and the tuning's timed launches,
    must go to cuda:1."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    if not cv.HAS_TRITON:
        pytest.skip("triton not installed")
    monkeypatch.setenv("QAIRN_CONV_TUNE", tune)
    cv._tuned.clear()
    x, weight, bias, residual = (
        t.to("cuda:1") for t in make_inputs((2, 16, 16, 21, 19), torch.float16, "channels_last")
    )
    with torch.cuda.device(0):
        out = cv.conv(x, weight, bias, relu=True, residual=residual)
        torch.cuda.synchronize(1)
    assert out.device == torch.device("cuda", 1) and torch.cuda.current_device() == 0
    want = ideal(*(t.cpu() for t in (x, weight, bias)), relu=True, residual=residual.cpu())
    torch.testing.assert_close(out.cpu().double(), want, **TOL[torch.float16])


# --- The op --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("geometry", [(3, 1, 1), (3, 2, 1), (2, 2, 0)], ids=str)
def test_op_forward(layout, geometry):
    """The op on this machine's device (Triton on CUDA, the reference elsewhere), in x's layout."""
    x, weight, bias, residual = make_inputs((2, 16, 8, 8, 6), layout=layout, geometry=geometry)
    _, s, p = geometry
    out = cv.conv(x, weight, bias, s, p, True, residual)
    assert_layout(out, layout)
    torch.testing.assert_close(
        out.double(), ideal(x, weight, bias, s, p, True, residual), **TOL[torch.float32]
    )


def test_op_gradcheck_float64():
    inputs = make_inputs((1, 4, 3, 5, 4), geometry=(3, 2, 1))
    x, weight, bias, residual = (t.cpu().double().requires_grad_() for t in inputs)

    def fn(x, weight, bias, residual):
        return cv.conv(x, weight, bias, 2, 1, True, residual)

    assert torch.autograd.gradcheck(fn, (x, weight, bias, residual))
    assert torch.autograd.gradcheck(lambda x, w: cv.conv(x, w[..., :2, :2], None, 2, 0), (x, weight))
    x1, x2 = x[:, :1].detach().clone().requires_grad_(), x[:, 1:].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, w: cv.conv(a, w, None, 1, 1, True, None, b), (x1, x2, weight)
    )


def test_opcheck():
    """torch.library's own checks: schema, fake (meta) kernel, autograd registration, AOT dispatch."""
    for geometry in [(3, 1, 1), (2, 2, 0)]:
        x, weight, bias, residual = make_inputs((2, 4, 6, 6, 4), geometry=geometry)
        _, s, p = geometry
        for b, relu, r in [(bias, True, residual), (None, False, None)]:
            args = [x.clone().requires_grad_(), weight.clone().requires_grad_(), b, s, p, relu, r, None]
            torch.library.opcheck(torch.ops.qairn.conv2d.default, args)
    # two inputs: x's channels, then x2's
    x, weight, bias, residual = make_inputs((2, 6, 5, 5, 4))
    x1, x2 = x[:, :4].contiguous().requires_grad_(), x[:, 4:].contiguous().requires_grad_()
    args = [x1, weight.clone().requires_grad_(), bias, 1, 1, True, residual, x2]
    torch.library.opcheck(torch.ops.qairn.conv2d.default, args)


@pytest.mark.parametrize("stride,padding,size", [(0, 1, 5), (-1, 1, 5), (1, -1, 5), (1, 0, 2)])
def test_op_and_its_fake_refuse_bad_stride_and_padding_alike(stride, padding, size):
    """F.conv2d refuses stride < 1, padding < 0 and an input smaller than the kernel once padded; the
    op's fake divided by a stride of 0 (ZeroDivisionError), made a (1, 4, 1, 1) output of padding -1
    and a negative size of the small input, so torch.compile traced what then failed at run time.
    Both now refuse in one ValueError."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, weight = torch.randn(1, 4, size, size), torch.randn(4, 4, 3, 3)
    says = "stride >= 1, padding >= 0 and an input at least as large as its kernel once padded"
    with pytest.raises(ValueError, match=says):
        cv.conv(x, weight, None, stride, padding)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, pytest.raises(ValueError, match=says):
        cv.conv(mode.from_tensor(x), mode.from_tensor(weight), None, stride, padding)


# (kernel height, width, stride, padding): kernels and strides the reference takes and the Triton conv
# is not built for.
OTHER_GEOMETRIES = [(3, 1, 1, 0), (5, 5, 1, 2), (3, 3, 3, 1)]


@pytest.mark.parametrize("geometry", OTHER_GEOMETRIES, ids=str)
def test_opcheck_other_kernels(geometry):
    """The fake kernel gives each side its own kernel size: a 3x1 kernel shrinks H only."""
    kh, kw, s, p = geometry
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(1, 4, 7, 8, generator=gen), torch.randn(5, 4, kh, kw, generator=gen)
    torch.library.opcheck(torch.ops.qairn.conv2d.default, [x, weight, None, s, p, True, None, None])


@needs_triton
@pytest.mark.parametrize("geometry", OTHER_GEOMETRIES, ids=str)
def test_cuda_kernel_falls_back_for_other_kernels(geometry):
    """The op's CUDA kernel (run here on this machine's device) computes such convs on the reference
    instead of refusing them, as the op does on every other device."""
    kh, kw, s, p = geometry
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(1, 4, 7, 8, generator=gen), torch.randn(5, 4, kh, kw, generator=gen)
    x, weight = x.to(DEVICE), weight.to(DEVICE)
    out = cv.conv_op._backend_fns["cuda"](x, weight, None, s, p, True, None, None)
    torch.testing.assert_close(out, cv.conv_reference(x, weight, None, s, p, True))


# --- Compiled code (no GPU needed): the kernel compiles for Hopper and uses tensor cores ---------------

# Follows test_gate.SM90_HELPER (sm90_ptx compiles a kernel for sm_90, no GPU needed): mma lists a
# kernel's tensor-core instructions.
PTX_HELPER = r"""
from qairn.kernels import conv as cv, conv_transpose as ct

def mma(kernel, dtype, constexprs):
    return sorted(set(re.findall(r"\b(?:w?gmma|mma)\.[\w.]+", sm90_ptx(kernel, dtype, constexprs))))

def epilogue(dtype):  # every epilogue on, channels contiguous (channels_last)
    flags = dict(HAS_BIAS=True, RELU=True, HAS_RES=True, IEEE=dtype == "*fp32", UPCAST=False)
    return dict(**flags, s_xc=1, s_rc=1, s_oc=1)
"""

PTX_SCRIPT = r"""
def ptx(dtype, k, stride, pad, block_m, block_n, block_k, x2=False):
    blocks = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    geometry = dict(KSIZE=k, STRIDE=stride, PAD=pad, HAS_X2=x2, s_x2c=1)
    return mma(cv._conv_kernel, dtype, dict(**blocks, **geometry, **epilogue(dtype)))

print(json.dumps({
    "fp16_16x16": ptx("*fp16", 3, 1, 1, *cv.tile_config(16, 16)[:3]),
    "bf16_32x32_s2": ptx("*bf16", 3, 2, 1, *cv.tile_config(32, 32)[:3]),
    "fp16_3x16": ptx("*fp16", 3, 1, 1, *cv.tile_config(3, 16)[:3]),
    "fp16_2x2_s2": ptx("*fp16", 2, 2, 0, *cv.tile_config(16, 32)[:3]),
    "fp16_two_inputs": ptx("*fp16", 3, 1, 1, *cv.tile_config(16, 16)[:3], x2=True),
    "fp32_16x16": ptx("*fp32", 3, 1, 1, *cv.tile_config(16, 16)[:3]),
}))
"""


def compiled_mma(script: str) -> dict:
    return compiled_for_hopper(PTX_HELPER + script)


@pytest.mark.skipif(not cv.HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA the other tests compile the kernel for the real device")
def test_kernel_compiles_for_hopper_on_tensor_cores():
    """Compiles (not interprets) the kernel for sm_90, which needs no GPU: half inputs must reach the
    tensor cores (mma/wgmma), and fp32 must not (IEEE products, as the reference)."""
    mma = compiled_mma(PTX_SCRIPT)
    for name in ("fp16_16x16", "bf16_32x32_s2", "fp16_3x16", "fp16_2x2_s2", "fp16_two_inputs"):
        assert mma[name], (name, mma)
    assert not mma["fp32_16x16"], mma


def test_op_refuses_unbatched_input_on_every_path():
    """A (C, H, W) x ran on the CPU reference, but the fake kernel (torch.compile, export) and the
    Triton launcher failed with 'not enough values to unpack (expected 4, got 3)', and with x2 the
    reference concatenated along H. One ValueError now, on every path (fused modules add the batch)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, weight = torch.randn(3, 6, 6), torch.randn(4, 3, 3, 3)
    calls = [lambda x: cv.conv(x, weight), lambda x: cv.conv(x[:1], weight, x2=x[1:])]
    if TRITON_RUNS:
        calls.append(lambda x: cv.conv_triton(x.to(DEVICE), weight.to(DEVICE)))
    for call in calls:
        with pytest.raises(ValueError, match=r"takes a 4-d \(N, C, H, W\) x, got \("):
            call(x)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, pytest.raises(ValueError, match="4-d"):
        cv.conv(mode.from_tensor(x), weight)


@pytest.mark.parametrize("op", ["conv", "conv_transpose"])
def test_op_output_takes_x_dtype_under_a_wider_residual(op):
    """The fake kernel and the Triton launchers give out in x's dtype; the CPU reference's out + a
    float64 residual is float64, which the op must not return as is."""
    from qairn.kernels import conv_transpose as ct

    x = torch.randn(1, 4, 5, 5)
    if op == "conv":
        out = cv.conv(x, torch.randn(4, 4, 3, 3), None, 1, 1, False, torch.randn(1, 4, 5, 5).double())
    else:
        out = ct.conv_transpose(x, torch.randn(4, 4, 2, 2), None, False, torch.randn(1, 4, 10, 10).double())
    assert out.dtype == x.dtype


@pytest.mark.parametrize("op", ["conv", "conv_transpose"])
def test_op_refuses_a_residual_that_grows_the_output(op):
    """out + residual broadcasts both ways: a (2, C, H, W) residual on one image's conv made the CPU
    reference return two images where the fake kernel (and the Triton launchers) say one."""
    from qairn.kernels import conv_transpose as ct

    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match=r"residual must broadcast to \(1, 4, (5, 5|10, 10)\), got \(2, "):
        if op == "conv":
            cv.conv(x, torch.randn(4, 4, 3, 3), None, 1, 1, False, torch.randn(2, 4, 5, 5))
        else:
            ct.conv_transpose(x, torch.randn(4, 4, 2, 2), None, False, torch.randn(2, 4, 10, 10))
