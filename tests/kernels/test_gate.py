"""Fused gate (qairn/kernels/gate.py) against a float64 rendering of paper eq. 1 and Minkowski sums.

Environment: the Triton-path tests run on CUDA when present; on CPU they run only when
TRITON_INTERPRET=1 was set before qairn was imported (CI: `TRITON_INTERPRET=1 pytest`), and skip
otherwise. Everything else runs on the plain-torch reference. Shapes stay tiny: the interpreter
costs milliseconds per program.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import lively_model

from qairn.kernels import gate
from qairn.model import minkowski

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Where the kernels run interpreted on a triton and numpy that cannot (gate.interpreter_problem),
# every Triton-path test skips with that one line instead of failing in the interpreter.
INTERPRETER_PROBLEM = gate.installed_interpreter_problem()
TRITON_RUNS = gate.HAS_TRITON and (DEVICE == "cuda" or gate.INTERPRETED) and not INTERPRETER_PROBLEM
TRITON_SKIP_REASON = (
    "triton not installed"
    if not gate.HAS_TRITON
    else INTERPRETER_PROBLEM or "no CUDA, and TRITON_INTERPRET=1 was not set before import"
)
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason=TRITON_SKIP_REASON)
REPO = Path(__file__).resolve().parents[2]
# Saturated gates (logit +-100) overflow exp and reach log2(0) in the interpreter's numpy, by design.
pytestmark = pytest.mark.filterwarnings(
    "ignore:overflow encountered in exp:RuntimeWarning",
    "ignore:divide by zero encountered in log2:RuntimeWarning",
)

# (N, C, H, W): odd sizes, C not a power of two, C = 1, H = 1, and one with several pixel blocks.
SHAPES = [(2, 3, 7, 9), (1, 16, 16, 16), (3, 5, 1, 13), (2, 1, 11, 4), (1, 6, 33, 35)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Output rounding of each dtype (the kernel computes in fp32 and rounds once).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}
SCALE = 2.0**gate.POOL_SCALE_LOG2  # pool sums are of gamma**p * SCALE
POOL_TOL = dict(rtol=2e-5, atol=1e-5)  # fp32 sums of exp2(p*log2(gamma)) for any input dtype
LAYOUTS = ["nchw", "channels_last"]


def make_inputs(shape, dtype=torch.float32, layout="nchw", seed=0):
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    logit = 3 * torch.randn(n, 1, h, w, generator=gen)
    logit.view(-1)[:2] = torch.tensor([-100.0, 100.0])[: logit.numel()]  # saturated gates, gamma ~ 0 and 1
    skip, dec = torch.randn(2, n, c, h, w, generator=gen)
    tensors = [t.to(DEVICE, dtype) for t in (logit, skip, dec)]
    if layout == "channels_last":
        tensors = [t.to(memory_format=torch.channels_last) for t in tensors]
    return tensors


def make_cores(n, h, w):
    """Per-image boxes (y0, y1, x0, x1): inside, spilling over every edge, and empty."""
    boxes = [(1, h - 1, 2, w), (-3, h + 5, -1, w // 2 + 1), (h // 2, h // 2, 0, w), (0, h, 1, 2)]
    return torch.tensor([boxes[i % len(boxes)] for i in range(n)], dtype=torch.int32, device=DEVICE)


def ideal(logit, skip, dec, p=None, cores=None):
    """Paper eq. 1 in float64; the pool by slicing each box (independent of gate.core_mask)."""
    g = torch.sigmoid(logit.double())
    out = g * skip.double() + (1 - g) * dec.double()
    if p is None:
        return out, g, None, None
    n, _, h, w = g.shape
    boxes = cores.tolist() if cores is not None else [(0, h, 0, w)] * n
    cores_g = [
        g[i, 0, max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] for i, (y0, y1, x0, x1) in enumerate(boxes)
    ]
    sums = torch.stack([core.pow(p).sum() for core in cores_g]) * SCALE  # gamma**p exact in float64
    counts = torch.tensor([core.numel() for core in cores_g])
    return out, g, sums, counts


def assert_forward(result, expected, dtype):
    out, gamma, pool_sum, pool_count = result
    ref_out, ref_gamma, ref_sum, ref_count = expected
    assert out.dtype == dtype and gamma.dtype == dtype
    torch.testing.assert_close(out.double(), ref_out, **TOL[dtype])
    torch.testing.assert_close(gamma.double(), ref_gamma, **TOL[dtype])
    if ref_sum is not None:
        assert pool_sum.dtype == torch.float32 and pool_count.dtype == torch.int64
        torch.testing.assert_close(pool_sum.double(), ref_sum, **POOL_TOL)
        assert pool_count.tolist() == ref_count.tolist()


# --- Versions the interpreter cannot run on ---------------------------------------------------------


def test_interpreter_problem_names_triton_before_3_7_with_numpy_2_4_or_later():
    """triton 3.6's interpreter with numpy 2.4 failed every kernel test (231 of them) with
    InterpreterError("only 0-dimensional arrays can be converted to Python scalars")."""
    problem = gate.interpreter_problem("3.6.0", "2.4.6")
    assert problem == (
        "TRITON_INTERPRET=1 cannot run with triton 3.6.0 and numpy 2.4.6: triton's interpreter before 3.7 "
        "fails on numpy >= 2.4; use numpy < 2.4 or triton >= 3.7"
    )
    assert gate.interpreter_problem("3.2.0+git1a2b3c", "2.5.0rc1")
    for fine in [("3.6.0", "2.3.5"), ("3.7.0", "2.4.6"), ("3.9.0", "2.5.2"), ("4.0.0", "3.0.0")]:
        assert gate.interpreter_problem(*fine) is None, fine
    assert gate.interpreter_problem("unknown", "2.4.6") is None  # only a known bad pair is refused


@pytest.mark.skipif(not gate.HAS_TRITON, reason="triton not installed")
def test_a_launch_on_a_broken_interpreter_raises_the_problem_in_one_line(monkeypatch):
    """Each launcher (gate forward and backward, conv, transposed conv) refuses, before any kernel
    runs, where the installed triton and numpy cannot interpret them."""
    from qairn.kernels import conv as cv
    from qairn.kernels import conv_transpose as ct

    problem = gate.interpreter_problem("3.6.0", "2.4.6")
    monkeypatch.setattr(gate, "INTERPRETED", True)
    monkeypatch.setattr(cv, "INTERPRETED", True)
    monkeypatch.setattr(gate, "installed_interpreter_problem", lambda: problem)
    logit, skip, dec = make_inputs((1, 2, 3, 4))
    x = torch.randn(1, 2, 4, 4)
    calls = [
        lambda: gate.gated_blend_triton(logit, skip, dec, p=2.0),
        lambda: gate.gated_blend_backward_triton(skip, None, None, logit, skip, dec, None, None),
        lambda: cv.conv_triton(x, torch.randn(3, 2, 3, 3)),
        lambda: ct.conv_transpose_triton(x, torch.randn(2, 3, 2, 2)),
    ]
    for call in calls:
        with pytest.raises(RuntimeError) as raised:
            call()
        assert str(raised.value) == problem


# --- Triton forward ---------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_forward(shape, dtype, layout):
    logit, skip, dec = make_inputs(shape, dtype, layout)
    cores = make_cores(shape[0], *shape[2:])
    result = gate.gated_blend_triton(logit, skip, dec, p=2.0, cores=cores)
    assert_forward(result, ideal(logit, skip, dec, 2.0, cores), dtype)
    assert result[0].stride() == skip.stride()  # out keeps the input layout


@needs_triton
@pytest.mark.parametrize("p", [0.5, 1.0, 3.0, 7.3])
def test_triton_pool_exponents(p):
    logit, skip, dec = make_inputs((2, 3, 9, 10))
    result = gate.gated_blend_triton(logit, skip, dec, p=p)
    assert_forward(result, ideal(logit, skip, dec, p), torch.float32)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_low_gates_pool_at_large_p(path):
    """Gates all in 0.1-0.2 at p = 64: a bare fp32 gamma**64 is 0 there (Q would be 0); the scaled
    sums keep Q, and through the model's minkowski too."""
    if path == "triton" and not TRITON_RUNS:
        pytest.skip(TRITON_SKIP_REASON)
    gen = torch.Generator().manual_seed(3)
    g = 0.1 + 0.1 * torch.rand(2, 1, 6, 7, generator=gen)
    logit = torch.log(g / (1 - g)).to(DEVICE)
    skip, dec = torch.randn(2, 2, 2, 6, 7, generator=gen).to(DEVICE)
    assert torch.sigmoid(logit).pow(64).sum() == 0  # the underflow this guards against
    fn = gate.gated_blend_triton if path == "triton" else gate.gated_blend_reference
    _, gamma, pool_sum, pool_count = fn(logit, skip, dec, p=64.0)
    want = torch.sigmoid(logit.double()).flatten(1).pow(64).mean(1).pow(1 / 64)
    got = gate.minkowski_from_sums(pool_sum, pool_count, 64.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(minkowski(gamma, 64.0).double(), want, rtol=1e-5, atol=0)


def test_minkowski_from_sums_small_and_zero():
    """p < 1 neither overflows nor underflows the unscaling; all-zero gates pool to 0."""
    g = torch.full((1, 1, 4, 4), 0.3)
    _, _, s, c = gate.gated_blend_reference(torch.logit(g), g, g, p=0.25)
    assert gate.minkowski_from_sums(s, c, 0.25).item() == pytest.approx(0.3, rel=1e-5)
    _, _, s, c = gate.gated_blend_reference(torch.full((1, 1, 4, 4), -200.0), g, g, p=2.0)
    assert gate.minkowski_from_sums(s, c, 2.0).item() == 0


def test_scaled_pool_gradient_at_a_zero_gate():
    """A gate of exactly 0 (fp16 sigmoid saturates at logit -17) has gradient 0 through the scaled
    powers, as through gamma**p: not NaN from log(0)."""
    g = torch.tensor([[0.0, 0.5, 0.9]], requires_grad=True)
    minkowski(g, 64.0).sum().backward()
    want = torch.tensor([[0.0, 0.5, 0.9]], dtype=torch.float64, requires_grad=True)
    want.pow(64).mean(1).pow(1 / 64).sum().backward()
    torch.testing.assert_close(g.grad.double(), want.grad, rtol=1e-5, atol=0)
    logit = torch.tensor([-200.0, 0.3, 1.0]).view(1, 1, 1, 3).requires_grad_()
    skip = torch.zeros(1, 1, 1, 3)
    _, _, pool_sum, _ = gate.gated_blend_reference(logit, skip, skip, p=2.0)
    pool_sum.backward()
    assert torch.isfinite(logit.grad).all() and logit.grad[0, 0, 0, 0] == 0


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_a_nan_gate_pools_to_nan_on_every_path(path):
    """A NaN logit (an fp16 overflow upstream) gives a NaN gate. The Triton kernel pooled it to a NaN
    sum; the reference's scaled powers took NaN > 0 as false and pooled it as a gate of 0, so the CPU,
    the ONNX export and model.minkowski gave a plausible score from a broken map where CUDA gave NaN."""
    if path == "triton" and not TRITON_RUNS:
        pytest.skip(TRITON_SKIP_REASON)
    logit, skip, dec = make_inputs((2, 2, 3, 4))
    logit[0, 0, 1, 2] = float("nan")
    fn = gate.gated_blend_triton if path == "triton" else gate.gated_blend_reference
    _, gamma, pool_sum, _ = fn(logit, skip, dec, p=2.0)
    assert pool_sum[0].isnan() and pool_sum[1].isfinite()
    q = minkowski(gamma, 2.0)
    assert q[0].isnan() and q[1].isfinite()


def test_reference_takes_one_box_for_every_image():
    """cores=(y0, y1, x0, x1) is one box for all N images, on the reference and the op as on Triton."""
    logit, skip, dec = make_inputs((3, 2, 8, 12))
    box = (2, 7, 3, 12)
    want = ideal(logit, skip, dec, 2.0, torch.tensor([box] * 3))
    for fn in (gate.gated_blend_reference, gate.gated_blend):
        assert_forward(fn(logit, skip, dec, p=2.0, cores=box), want, torch.float32)


@needs_triton
def test_triton_cores_forms():
    """None, one box for all images, and a per-image (N,4) tensor mean the same thing as boxes."""
    logit, skip, dec = make_inputs((3, 2, 8, 12))
    whole = gate.gated_blend_triton(logit, skip, dec, p=2.0)
    assert_forward(whole, ideal(logit, skip, dec, 2.0), torch.float32)
    box = torch.tensor([2, 7, 3, 12], dtype=torch.int32, device=DEVICE)
    one = gate.gated_blend_triton(logit, skip, dec, p=2.0, cores=gate.as_cores(box, logit))
    assert_forward(one, ideal(logit, skip, dec, 2.0, box.expand(3, 4)), torch.float32)
    # Empty boxes: rows reversed, columns reversed, columns past the image (counts -48 and -64 when
    # only the rows' extent was clamped at 0).
    empty_boxes = torch.tensor(
        [[5, 2, 0, 12], [0, 8, 9, 3], [0, 8, 20, 30]], dtype=torch.int32, device=DEVICE
    )
    empty = gate.gated_blend_triton(logit, skip, dec, p=2.0, cores=empty_boxes)
    assert empty[2].tolist() == [0.0] * 3 and empty[3].tolist() == [0] * 3
    assert gate.pool_reference(torch.sigmoid(logit), 2.0, empty_boxes)[1].tolist() == [0] * 3


@needs_triton
def test_triton_optional_outputs():
    logit, skip, dec = make_inputs((2, 3, 5, 6))
    out, gamma, pool_sum, pool_count = gate.gated_blend_triton(logit, skip, dec, write_gamma=False)
    assert gamma.numel() == 0 and pool_sum.numel() == 0 and pool_count.numel() == 0
    torch.testing.assert_close(out.double(), ideal(logit, skip, dec)[0], **TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("shape", [(2, 0, 3, 4), (2, 3, 0, 4)], ids=str)
def test_triton_empty_tensors(shape):
    """No channels (the kernel once tiled C = 0 with a 0-wide block: range step 0) or no pixels:
    still the reference's empty blend and its pool over the gates."""
    logit, skip, dec = make_inputs(shape)
    cores = make_cores(shape[0], *shape[2:])
    assert_forward(
        gate.gated_blend_triton(logit, skip, dec, 2.0, cores),
        ideal(logit, skip, dec, 2.0, cores),
        torch.float32,
    )
    grad_out, grad_gamma, grad_pool_sum = upstream_grads(logit, skip)
    grads = gate.gated_blend_backward_triton(
        grad_out, grad_gamma, grad_pool_sum, logit, skip, dec, 2.0, cores
    )
    expected = ideal_grads(logit, skip, dec, grad_out, grad_gamma, grad_pool_sum, 2.0, cores)
    for grad, ref in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad.double(), ref, **TOL[torch.float32])


@needs_triton
def test_triton_mixed_and_strided_layouts():
    """skip channels_last, dec NCHW, logit a cropped view the kernel cannot walk (copied)."""
    logit, skip, dec = make_inputs((2, 5, 9, 11))
    skip = skip.to(memory_format=torch.channels_last)
    wide_logit = torch.randn(2, 1, 9, 20, device=DEVICE)
    logit = wide_logit[..., 3:14]
    cores = make_cores(2, 9, 11)
    result = gate.gated_blend_triton(logit, skip, dec, p=2.0, cores=cores)
    assert_forward(result, ideal(logit, skip, dec, 2.0, cores), torch.float32)


@needs_triton
def test_triton_launchers_refuse_an_input_in_a_dtype_the_kernels_do_not_take():
    """Only skip's dtype was checked: an fp64 logit given to the launcher got an fp32 pool sum where the
    op's fake promises fp64 (the op sends fp64 to the reference). Mixed dtypes the kernels take still
    run, with the outputs' dtypes the fake promises: out as skip, gamma as logit, the pool in fp32."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    logit, skip, dec = make_inputs((1, 2, 3, 4))
    says = r"^the Triton gate takes logit, skip, dec in float32, float16, bfloat16, got "
    for args, got in [
        ((logit.double(), skip, dec), "float64, float32, float32"),
        ((logit, skip, dec.double()), "float32, float32, float64"),
        ((logit, skip.int(), dec), "float32, int32, float32"),
    ]:
        with pytest.raises(ValueError, match=says + got + "$"):
            gate.gated_blend_triton(*args, p=2.0)
        with pytest.raises(ValueError, match=says + got + "$"):
            gate.gated_blend_backward_triton(torch.ones_like(skip), None, None, *args, 2.0, None)
    mixed = (logit.half(), skip, dec.bfloat16())
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = gate.gated_blend_op(*(mode.from_tensor(t) for t in mixed), 2.0, None, True)
    result = gate.gated_blend_triton(*mixed, p=2.0)
    assert (
        [t.dtype for t in result]
        == [t.dtype for t in fake]
        == [torch.float32, torch.float16, torch.float32, torch.int64]
    )
    torch.testing.assert_close(result[0].double(), ideal(*mixed)[0], **TOL[torch.bfloat16])


def test_odd_dense_layouts_get_nchw_outputs_as_the_fake_says():
    """H and W swapped is dense but has no single pixel stride: outputs come back NCHW, on every path,
    with the strides the op's fake promises (so compiled graphs agree with the kernels)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    logit = torch.randn(1, 1, 5, 4, device=DEVICE).transpose(2, 3)
    skip = torch.randn(1, 2, 5, 4, device=DEVICE).transpose(2, 3)
    dec = torch.randn(1, 2, 5, 4, device=DEVICE).transpose(2, 3)
    out, gamma, pool_sum, _ = torch.ops.qairn.gated_blend(logit, skip, dec, 2.0, None, True)
    ref_out, ref_gamma, ref_sum, _ = gate.gated_blend_reference(logit, skip, dec, 2.0)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(gamma, ref_gamma)
    torch.testing.assert_close(pool_sum, ref_sum)
    with FakeTensorMode() as mode:
        fake = torch.ops.qairn.gated_blend(
            *(mode.from_tensor(t) for t in (logit, skip, dec)), 2.0, None, True
        )
    assert (
        [t.stride() for t in fake[:2]] == [out.stride(), gamma.stride()] == [(40, 20, 5, 1), (20, 20, 5, 1)]
    )


@needs_triton
def test_triton_odd_dense_layouts():
    torch.manual_seed(0)
    logit, skip, dec = (torch.randn(1, c, 5, 4, device=DEVICE).transpose(2, 3) for c in (1, 2, 2))
    out, gamma, pool_sum, _ = gate.gated_blend_triton(logit, skip, dec, p=2.0)
    ref_out, ref_gamma, ref_sum, _ = gate.gated_blend_reference(logit, skip, dec, 2.0)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(pool_sum, ref_sum)
    grads = gate.gated_blend_backward_triton(torch.ones_like(skip), None, None, logit, skip, dec, None, None)
    want = gate.gated_blend_backward_reference(
        torch.ones_like(skip), None, None, logit, skip, dec, None, None
    )
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)


@needs_triton
def test_triton_pool_is_deterministic_over_many_blocks():
    logit, skip, dec = make_inputs((2, 3, 24, 24), torch.float16)
    cores = make_cores(2, 24, 24)
    first = gate.gated_blend_triton(logit, skip, dec, p=2.0, cores=cores, block_p=64)  # 9 blocks each
    again = gate.gated_blend_triton(logit, skip, dec, p=2.0, cores=cores, block_p=64)
    assert torch.equal(first[2], again[2]) and torch.equal(first[0], again[0])
    assert_forward(first, ideal(logit, skip, dec, 2.0, cores), torch.float16)


@needs_triton
@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA this would allocate 8.6 GB; the offsets are the same")
def test_triton_offsets_past_two_to_the_31_within_one_image():
    """A whole 8K frame at 64 channels passes 2**31 elements in one image: the in-image offsets must
    then be 64-bit. A stand-in: a view whose channel 2 lies 2**31 elements from its start, on a lazily
    allocated storage (only the pages touched are real); int32 offsets wrapped and read element 0."""
    storage = torch.empty(2**32 + 64, dtype=torch.float16)
    base = 2**31
    storage[0] = 99.0  # where a wrapped offset lands
    storage[base], storage[base + 2**30], storage[base + 2**31] = 1.0, 2.0, 3.0
    skip = storage.as_strided((1, 3, 1, 1), (1, 2**30, 1, 1), storage_offset=base)
    dec = torch.zeros(1, 3, 1, 1, dtype=torch.float16)
    logit = torch.full((1, 1, 1, 1), 100.0, dtype=torch.float16)  # gamma = 1: out = skip
    out = gate.gated_blend_triton(logit, skip, dec, p=2.0)[0]
    assert out.flatten().tolist() == [1.0, 2.0, 3.0]
    grad_out = torch.ones(1, 3, 1, 1, dtype=torch.float16)
    zero = torch.zeros(1, 1, 1, 1, dtype=torch.float16)  # gamma = 0.5: grad_logit = sum(skip - dec) / 4
    got = gate.gated_blend_backward_triton(grad_out, None, None, zero, skip, dec, None, None)[0]
    assert got.item() == 1.5


@needs_triton
def test_triton_pool_count_of_an_image_of_two_to_the_31_pixels():
    """The whole-image pixel count was H * W in int32: for one image (or tile) of 2**31 pixels or more
    it wrapped negative. Only the finishing kernel runs here, on one partial sum: no huge tensor."""
    side = 46341  # side**2 = 2**31 + 4633
    partial = torch.ones(1, 1, device=DEVICE)
    cores = torch.tensor([[0, side, 0, side]], dtype=torch.int32, device=DEVICE)
    gate.load_triton()  # a kernel launched directly, not through a launcher
    for has_cores in (False, True):
        pool_sum = torch.empty(1, device=DEVICE)
        count = torch.empty(1, dtype=torch.int64, device=DEVICE)
        with gate.on_device(partial):
            gate._pool_finish_kernel[(1,)](
                partial, cores, pool_sum, count, 1, side, side, BLOCK=512, HAS_CORES=has_cores
            )
        assert count.item() == side * side and pool_sum.item() == 1.0


if gate.HAS_TRITON:
    import triton
    import triton.language as tl

    gate.load_triton()  # _pixel_offsets, which the kernel below calls, must be a Triton kernel by now
    from qairn.kernels.gate import _pixel_offsets

    @triton.jit
    def _pixel_offsets_kernel(out_ptr, pid_p, BLOCK_P: tl.constexpr, OFFSET: tl.constexpr):
        tl.store(out_ptr + tl.arange(0, BLOCK_P), _pixel_offsets(pid_p, BLOCK_P, OFFSET))


@needs_triton
def test_triton_pixel_offsets_past_two_to_the_31_within_one_image():
    """The kernels' pixel indices were (pid_p * BLOCK_P + arange) in int32, cast to int64 only after
    the product had wrapped: an image of 2**31 - BLOCK_P pixels or more read and pooled its last
    blocks at negative indices (which pass the `< HW` mask). The helper, run for one such block."""
    block, pid_p = 16, 2**27  # pid_p * block = 2**31
    out = torch.empty(block, dtype=torch.int64, device=DEVICE)
    with gate.on_device(out):
        _pixel_offsets_kernel[(1,)](out, pid_p, BLOCK_P=block, OFFSET=tl.int64)
    assert out.tolist() == [2**31 + k for k in range(block)]


@needs_triton
def test_triton_tiles_pool_to_the_whole_image():
    """The tiled engine's case: overlapping tiles of one image in one batch, each pooling its own
    core box; the tiles' sums and counts add up to the whole image's."""
    logit, skip, dec = make_inputs((1, 2, 20, 28))
    tiles = [(0, 0), (0, 12), (8, 0), (8, 12)]  # 12 x 16 tiles at these origins
    cores = [(0, 10, 0, 14), (0, 10, 2, 16), (2, 12, 0, 14), (2, 12, 2, 16)]  # tile-local cores
    crop = [(t[:, :, y : y + 12, x : x + 16]) for t in (logit, skip, dec) for y, x in tiles]
    batch = [torch.cat(crop[i * 4 : i * 4 + 4]) for i in range(3)]
    tiled = gate.gated_blend_triton(*batch, p=2.0, cores=torch.tensor(cores, device=DEVICE))
    whole = gate.gated_blend_triton(logit, skip, dec, p=2.0)
    assert tiled[3].sum().item() == whole[3].item() == 20 * 28
    torch.testing.assert_close(tiled[2].sum(), whole[2][0], **POOL_TOL)


# --- Triton backward --------------------------------------------------------------------------------


def ideal_grads(logit, skip, dec, grad_out, grad_gamma, grad_pool_sum, p, cores):
    leaves = [t.detach().double().requires_grad_() for t in (logit, skip, dec)]
    out, g, pool_sum, _ = ideal(*leaves, p, cores)
    loss = (out * grad_out.double()).sum()
    if grad_gamma is not None:
        loss = loss + (g * grad_gamma.double()).sum()
    if grad_pool_sum is not None:
        loss = loss + (pool_sum * grad_pool_sum.double()).sum()
    return torch.autograd.grad(loss, leaves)


def upstream_grads(logit, skip, seed=1):
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(skip.shape, generator=gen).to(DEVICE, skip.dtype)
    grad_gamma = torch.randn(logit.shape, generator=gen).to(DEVICE, logit.dtype)
    # As a loss on Q sends it: the sums are scaled by 2**96, their gradient by 2**-96.
    grad_pool_sum = (torch.randn(logit.shape[0], generator=gen) / SCALE).to(DEVICE)
    return (
        grad_out.to(memory_format=torch.channels_last) if skip.stride(1) == 1 else grad_out,
        grad_gamma,
        grad_pool_sum,
    )


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[4:], ids=str)
def test_triton_backward(shape, dtype, layout):
    logit, skip, dec = make_inputs(shape, dtype, layout)
    cores = make_cores(shape[0], *shape[2:])
    grad_out, grad_gamma, grad_pool_sum = upstream_grads(logit, skip)
    grads = gate.gated_blend_backward_triton(
        grad_out, grad_gamma, grad_pool_sum, logit, skip, dec, 2.0, cores
    )
    expected = ideal_grads(logit, skip, dec, grad_out, grad_gamma, grad_pool_sum, 2.0, cores)
    for grad, ref, x in zip(grads, expected, (logit, skip, dec), strict=True):
        assert grad.dtype == x.dtype and grad.stride() == x.stride()
        torch.testing.assert_close(grad.double(), ref, **TOL[dtype])


@needs_triton
def test_triton_backward_without_gamma_and_pool_grads():
    logit, skip, dec = make_inputs((2, 3, 6, 7))
    grad_out = torch.full((), 0.7, device=DEVICE).expand(skip.shape)  # as out.sum() * 0.7 gives: stride 0
    grads = gate.gated_blend_backward_triton(grad_out, None, None, logit, skip, dec, None, None)
    expected = ideal_grads(logit, skip, dec, grad_out, None, None, None, None)
    for grad, ref in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad.double(), ref, **TOL[torch.float32])


# --- Devices: every launch runs on its tensors' GPU, not the current one ------------------------------


def test_triton_is_not_taken_where_any_input_needs_a_newer_gpu(monkeypatch):
    """On a Turing GPU (7.5) bf16 does not compile: the ops must take the reference when any input is
    bf16, not only when the first one is (a bf16 skip under an fp16 logit, a bf16 bias or residual)."""
    from qairn.kernels import conv

    monkeypatch.setattr(gate, "device_capability", lambda index: (7, 5))
    cuda = torch.device("cuda", 0)
    fp16, bf16 = (SimpleNamespace(dtype=dtype, device=cuda) for dtype in (torch.float16, torch.bfloat16))
    assert gate._triton_takes(fp16, fp16, fp16) is gate.HAS_TRITON
    assert not gate._triton_takes(fp16, bf16, fp16)
    assert not gate._triton_takes(fp16, fp16, bf16)
    assert conv.triton_takes(fp16, fp16, fp16, fp16, None) is conv.HAS_TRITON
    assert not conv.triton_takes(fp16, fp16, bf16, None, None)  # bias
    assert not conv.triton_takes(fp16, fp16, None, bf16, None)  # residual


def launch_spy(monkeypatch, module, *kernels):
    """Swap module.on_device for a counting context and each named kernel for a wrapper that notes
    whether it was launched inside it (then runs the real kernel). Returns the list of
    (kernel name, inside, the tensor given to on_device) per launch."""
    launches, entered = [], []

    @contextlib.contextmanager
    def on_device(t):
        entered.append(t)
        try:
            yield
        finally:
            entered.pop()

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.name, bool(entered), entered[-1] if entered else None))
                return self.kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, "on_device", on_device)
    for name in kernels:
        monkeypatch.setattr(module, name, Spy(name, getattr(module, name)))
    return launches


def test_on_device_is_a_no_op_for_cpu_tensors(monkeypatch):
    def no_cuda(*args):
        raise AssertionError("torch.cuda.device was called for a CPU tensor")

    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    context = gate.on_device(torch.zeros(2))
    assert isinstance(context, contextlib.nullcontext)
    with context:
        pass


def test_on_device_makes_the_tensors_gpu_current(monkeypatch):
    """A CUDA tensor's device, with its index, goes to torch.cuda.device (faked: no GPU needed)."""
    seen = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: seen.append(d) or contextlib.nullcontext())
    fake = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    with gate.on_device(fake):
        pass
    assert seen == [torch.device("cuda", 1)]


@needs_triton
def test_triton_launches_run_under_on_device(monkeypatch):
    launches = launch_spy(monkeypatch, gate, "_gate_fwd_kernel", "_pool_finish_kernel", "_gate_bwd_kernel")
    logit, skip, dec = make_inputs((2, 3, 5, 6))
    gate.gated_blend_triton(logit, skip, dec, p=2.0)
    gate.gated_blend_backward_triton(*upstream_grads(logit, skip), logit, skip, dec, 2.0, None)
    assert [(name, inside) for name, inside, _ in launches] == [
        ("_gate_fwd_kernel", True),
        ("_pool_finish_kernel", True),
        ("_gate_bwd_kernel", True),
    ]
    assert all(t is skip for _, _, t in launches)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_op_on_the_second_gpu(layout):
    """Tensors on cuda:1 while cuda:0 is current: the Triton launches must go to cuda:1."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    if not gate.HAS_TRITON:
        pytest.skip("triton not installed")
    shape, cores = (2, 5, 9, 11), make_cores(2, 9, 11)
    leaves = [t.to("cuda:1").requires_grad_() for t in make_inputs(shape, torch.float16, layout)]
    with torch.cuda.device(0):
        out, gamma, pool_sum, pool_count = gate.gated_blend(*leaves, p=2.0, cores=cores.to("cuda:1"))
        grad_out, grad_gamma, grad_pool_sum = (g.to("cuda:1") for g in upstream_grads(leaves[0], leaves[1]))
        torch.autograd.backward([out, gamma, pool_sum], [grad_out, grad_gamma, grad_pool_sum])
        torch.cuda.synchronize(1)
    assert out.device == torch.device("cuda", 1) and torch.cuda.current_device() == 0
    logit, skip, dec = (t.detach().cpu() for t in leaves)
    cores = cores.cpu()
    assert_forward(
        (out.cpu(), gamma.cpu(), pool_sum.cpu(), pool_count.cpu()),
        ideal(logit, skip, dec, 2.0, cores),
        torch.float16,
    )
    grads = (grad_out.cpu(), grad_gamma.cpu(), grad_pool_sum.cpu())
    expected = ideal_grads(logit, skip, dec, *grads, 2.0, cores)
    for leaf, ref in zip(leaves, expected, strict=True):
        torch.testing.assert_close(leaf.grad.cpu().double(), ref, **TOL[torch.float16])


# --- The op: torch.library registration, autograd, compile, export, ONNX ----------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_forward_and_backward(dtype):
    """The op on this machine's device: Triton on CUDA, the reference on CPU."""
    if DEVICE == "cpu" and dtype != torch.float32:
        pytest.skip("the CPU reference computes in the input dtype; half dtypes are checked on Triton")
    logit, skip, dec = make_inputs((2, 4, 6, 5), dtype)
    cores = make_cores(2, 6, 5)
    leaves = [t.clone().requires_grad_() for t in (logit, skip, dec)]
    out, gamma, pool_sum, pool_count = gate.gated_blend(*leaves, p=2.0, cores=cores)
    assert_forward((out, gamma, pool_sum, pool_count), ideal(logit, skip, dec, 2.0, cores), dtype)
    grad_out, grad_gamma, grad_pool_sum = upstream_grads(logit, skip)
    torch.autograd.backward([out, gamma, pool_sum], [grad_out, grad_gamma, grad_pool_sum])
    expected = ideal_grads(logit, skip, dec, grad_out, grad_gamma, grad_pool_sum, 2.0, cores)
    for leaf, ref in zip(leaves, expected, strict=True):
        torch.testing.assert_close(leaf.grad.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reference_pools_half_gates_from_the_fp32_sigmoid(dtype):
    """The reference (the CPU op, and the decomposition ONNX exports) gives out and gamma in a half dtype
    but pools gamma**p from the fp32 sigmoid of the logit, as the kernel does: pooling the rounded gate
    would be off by p times its rounding (2e-3 in fp16, 1e-2 in bf16 at p = 2)."""
    logit, skip, dec = (t.cpu() for t in make_inputs((2, 3, 6, 7), dtype))
    cores = make_cores(2, 6, 7).cpu()
    *_, want_sum, want_count = ideal(logit, skip, dec, 2.0, cores)
    for fn in (gate.gated_blend_reference, gate.gated_blend):
        _, gamma, pool_sum, pool_count = fn(logit, skip, dec, p=2.0, cores=cores)
        assert gamma.dtype == dtype and pool_sum.dtype == torch.float32
        torch.testing.assert_close(pool_sum.double(), want_sum, **POOL_TOL)
        assert pool_count.tolist() == want_count.tolist()
    # pool_reference itself takes a half gate in fp32 (its scaled powers pass fp16's 65504).
    pool_sum, _ = gate.pool_reference(gamma, 2.0, cores)
    want_sum = ideal(torch.logit(gamma.double()), skip, dec, 2.0, cores)[2]
    assert pool_sum.dtype == torch.float32
    torch.testing.assert_close(pool_sum.double(), want_sum, **POOL_TOL)


def test_op_gradcheck_float64_reference():
    logit, skip, dec = (t.cpu().double().requires_grad_() for t in make_inputs((2, 3, 4, 5)))
    logit.data.clamp_(-4, 4)  # keep the gate off saturation, where finite differences vanish
    cores = make_cores(2, 4, 5).cpu()

    def fn(logit, skip, dec):
        return gate.gated_blend(logit, skip, dec, p=2.5, cores=cores)[:3]

    assert torch.autograd.gradcheck(fn, (logit, skip, dec))
    assert torch.autograd.gradcheck(lambda *x: gate.gated_blend(*x)[0], (logit, skip, dec))


def test_opcheck():
    """torch.library's own checks: schema, fake (meta) kernel, autograd registration, AOT dispatch."""
    logit, skip, dec = make_inputs((2, 3, 4, 5))
    cores = make_cores(2, 4, 5)
    for p, c, write_gamma in [(2.0, cores, True), (None, None, False), (1.5, None, True)]:
        args = [t.clone().requires_grad_() for t in (logit, skip, dec)] + [p, c, write_gamma]
        torch.library.opcheck(torch.ops.qairn.gated_blend.default, args)
    grad_out, grad_gamma, grad_pool_sum = upstream_grads(logit, skip)
    args = (grad_out, grad_gamma, grad_pool_sum, logit, skip, dec, 2.0, cores)
    torch.library.opcheck(torch.ops.qairn.gated_blend_backward.default, args)


def test_compile_sees_one_op_forward_and_backward():
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    @torch.compile(backend=capture, fullgraph=True)
    def f(logit, skip, dec, cores):
        return gate.gated_blend(logit, skip, dec, p=2.0, cores=cores)

    logit, skip, dec = make_inputs((2, 3, 4, 5))
    out = f(logit, skip, dec, make_cores(2, 4, 5))
    torch.testing.assert_close(out[0].double(), ideal(logit, skip, dec)[0], **TOL[torch.float32])
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.qairn.gated_blend.default) == 1
    assert torch.sigmoid not in targets and torch.ops.aten.sigmoid.default not in targets

    # AOT autograd traces the registered backward as one op too.
    from torch._functorch.aot_autograd import aot_function, make_boxed_func

    backward_graphs = []

    def keep_backward(gm, _):
        backward_graphs.append(gm)
        return make_boxed_func(gm.forward)

    fn = aot_function(
        lambda *x: gate.gated_blend(*x)[0].sum(),
        fw_compiler=lambda gm, _: make_boxed_func(gm.forward),
        bw_compiler=keep_backward,
    )
    fn(*(t.clone().requires_grad_() for t in (logit, skip, dec))).backward()
    bw_targets = [node.target for node in backward_graphs[0].graph.nodes]
    assert torch.ops.qairn.gated_blend_backward.default in bw_targets


class TinyGate(torch.nn.Module):
    def forward(self, logit, skip, dec, cores):
        out, gamma, pool_sum, pool_count = gate.gated_blend(logit, skip, dec, p=2.0, cores=cores)
        return out, gamma, gate.minkowski_from_sums(pool_sum, pool_count, 2.0)


def test_export_sees_one_op():
    args = (*make_inputs((2, 3, 4, 5)), make_cores(2, 4, 5))
    ep = torch.export.export(TinyGate(), args)
    for program in (ep, ep.run_decompositions()):  # core-ATen decompositions keep the op whole
        targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
        assert targets.count(torch.ops.qairn.gated_blend.default) == 1
    decomposed = ep.run_decompositions(gate.decompositions())
    targets = [node.target for node in decomposed.graph.nodes if node.op == "call_function"]
    assert torch.ops.qairn.gated_blend.default not in targets
    for got, want in zip(decomposed.module()(*args), TinyGate()(*args), strict=True):
        torch.testing.assert_close(got, want)


def test_onnx_export_uses_standard_ops_only(tmp_path):
    pytest.importorskip("onnxscript", reason="torch.onnx.export (dynamo) needs onnxscript")
    ort = pytest.importorskip("onnxruntime", reason="running the exported graph needs onnxruntime")
    args = tuple(t.cpu() for t in make_inputs((2, 3, 6, 7))) + (make_cores(2, 6, 7).cpu(),)
    path = tmp_path / "gate.onnx"
    torch.onnx.export(TinyGate().eval(), args, str(path), dynamo=True, verbose=False)
    import onnx

    model = onnx.load(str(path))
    domains = {(node.domain or "ai.onnx", node.op_type) for node in model.graph.node}
    assert {d for d, _ in domains} == {"ai.onnx"}, domains
    assert ("ai.onnx", "Sigmoid") in domains
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
    for got, want in zip(session.run(None, feeds), TinyGate()(*args), strict=True):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-6)


def test_import_and_reference_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, qairn.kernels.gate as g, qairn.model as m\n"
        "assert not g.HAS_TRITON\n"
        "skip, dec = torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)\n"
        "out, gamma = g.gated_blend(torch.zeros(1, 1, 2, 2), skip, dec)\n"
        "assert torch.equal(out, torch.full((1, 2, 2, 2), 0.5))\n"
        "try:\n"
        "    g.use_gate_backend(m.QAIRN(m.preset('tiny')), 'triton')\n"
        "except RuntimeError:\n"
        "    print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_import_and_cpu_restore_leave_triton_unimported():
    """import triton takes 0.3-0.5 s, which every CPU run paid at `import qairn` for kernels it never
    launches: the gate loads it on its first launch instead."""
    code = (
        "import sys, numpy as np, qairn\n"
        "qairn.Restorer(device='cpu').restore(np.zeros((16, 16, 3), np.uint8))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


# --- The model ---------------------------------------------------------------------------------------


def test_model_pooled_forward_matches_minkowski():
    m = lively_model("tiny")
    x = torch.rand(2, 3, 37, 45)  # not a multiple of 16: padded, and the padding must not be pooled
    y, gammas = m(x)
    y_pooled, gammas_pooled, pools = m(x, pool_p=2.0)
    assert torch.equal(y, y_pooled)
    for g, (pool_sum, pool_count) in zip(gammas, pools, strict=True):
        assert pool_count.tolist() == [g[0].numel()] * 2
        torch.testing.assert_close(gate.minkowski_from_sums(pool_sum, pool_count, 2.0), minkowski(g, 2.0))


def test_model_pooled_core_boxes_partition_the_image():
    m = lively_model("tiny")
    x = torch.rand(1, 3, 37, 45)
    _, _, whole = m(x, pool_p=3.0)
    _, _, top = m(x, pool_p=3.0, cores=torch.tensor([[0, 18, 0, 45]]))
    _, _, bottom = m(x, pool_p=3.0, cores=torch.tensor([[18, 37, 0, 45]]))
    for (s, c), (s_top, c_top), (s_bot, c_bot) in zip(whole, top, bottom, strict=True):
        assert (c_top + c_bot).item() == c.item()
        torch.testing.assert_close(s_top + s_bot, s)


@pytest.mark.skipif(not gate.HAS_TRITON, reason="triton not installed")
def test_use_gate_backend():
    m = lively_model("tiny").to(DEVICE)
    x = torch.rand(2, 3, 32, 48, device=DEVICE)
    y_ref, gammas_ref, pools_ref = m(x, pool_p=2.0)
    assert gate.use_gate_backend(m, "triton").gate is gate.gated_blend
    y, gammas, pools = m(x, pool_p=2.0)
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(gammas + [s for s, _ in pools], gammas_ref + [s for s, _ in pools_ref], strict=True):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError):
        gate.use_gate_backend(m, "tensorrt")


@needs_triton
def test_model_on_the_triton_kernels():
    """The whole model with the Triton launchers as its gate (interpreted on CPU)."""

    def triton_gate(logit, skip, dec, p=None, cores=None):
        out, gamma, pool_sum, pool_count = gate.gated_blend_triton(logit, skip, dec, p, cores)
        return (out, gamma) if p is None else (out, gamma, pool_sum, pool_count)

    m = lively_model("tiny").to(DEVICE)
    x = torch.rand(1, 3, 30, 33, device=DEVICE)
    y_ref, gammas_ref, pools_ref = m(x, pool_p=2.0)
    m.gate = triton_gate
    y, gammas, pools = m(x, pool_p=2.0)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for g, g_ref, (s, c), (s_ref, c_ref) in zip(gammas, gammas_ref, pools, pools_ref, strict=True):
        torch.testing.assert_close(g, g_ref)
        torch.testing.assert_close(s, s_ref, **POOL_TOL)
        assert torch.equal(c, c_ref)


# --- Compiled code (no GPU needed): the kernels compile for Hopper and vectorise -------------------

# The start of every compile script (here, test_conv, test_conv_transpose): sm90_ptx(kernel, ...) is
# the kernel's PTX for sm_90, which needs no GPU.
SM90_HELPER = r"""
import json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def sm90_ptx(kernel, dtype, constexprs, types={}):
    # Pointers of dtype, sizes and strides i32, unless types names another type; all but fp32 scalars
    # 16-divisible: a 16-aligned tile batch, as the launcher's specialisation sees it.
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        sig[name] = types.get(name, dtype if name.endswith("_ptr") else "i32")
        if sig[name] != "fp32":
            attrs[(i,)] = [["tt.divisibility", 16]]
    consts = {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
"""


def compiled_for_hopper(script: str) -> dict:
    """Runs SM90_HELPER + script in a fresh interpreter without TRITON_INTERPRET (the kernels must be
    compiled, not interpreted) and returns the JSON of its last line."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences triton 3.9's notice; fusion is its default
    result = subprocess.run(
        [sys.executable, "-c", SM90_HELPER + script],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


PTX_SCRIPT = r"""
from qairn.kernels import gate
gate.load_triton()

FIXED_TYPES = {"cores_ptr": "*i32", "partial_ptr": "*fp32", "grad_pool_ptr": "*fp32", "p": "fp32"}

def ptx(kernel, dtype, constexprs):
    return re.findall(r"(?:ld|st)\.global[.\w]*", sm90_ptx(kernel, dtype, constexprs, FIXED_TYPES))

flags = dict(POOL=True, HAS_CORES=True, OFFSET=triton.language.int32)
nchw = dict(BLOCK_C=4, BLOCK_P=1024, s_skip_p=1, s_dec_p=1, s_out_p=1, s_logit_p=1)
cl = dict(BLOCK_C=64, BLOCK_P=64, s_skip_c=1, s_dec_c=1, s_out_c=1, s_logit_p=1)
print(json.dumps({
    "fwd_nchw_fp16": ptx(gate._gate_fwd_kernel, "*fp16", dict(nchw, s_gamma_p=1, WRITE_GAMMA=True, **flags)),
    "fwd_cl_bf16": ptx(gate._gate_fwd_kernel, "*bf16", dict(cl, s_gamma_p=1, WRITE_GAMMA=True, **flags)),
    "finish": ptx(gate._pool_finish_kernel, "*fp32", dict(BLOCK=512, HAS_CORES=True)),
    "finish_whole": ptx(gate._pool_finish_kernel, "*fp32", dict(BLOCK=512, HAS_CORES=False)),
    # 64-bit in-image offsets (one image past 2**31 elements): must compile too.
    "fwd_wide": ptx(gate._gate_fwd_kernel, "*fp16", dict(nchw, s_gamma_p=1, WRITE_GAMMA=True,
                                                         **(flags | dict(OFFSET=triton.language.int64)))),
    "bwd_wide": ptx(gate._gate_bwd_kernel, "*fp16", dict(
        BLOCK_C=4, BLOCK_P=1024, s_go_p=1, s_skip_p=1, s_dec_p=1, s_gs_p=1, s_gd_p=1, s_logit_p=1,
        s_gl_p=1, s_gg_p=1, HAS_GRAD_GAMMA=True, **(flags | dict(OFFSET=triton.language.int64)))),
    "bwd_nchw_fp32": ptx(gate._gate_bwd_kernel, "*fp32", dict(
        BLOCK_C=4, BLOCK_P=1024, s_go_p=1, s_skip_p=1, s_dec_p=1, s_gs_p=1, s_gd_p=1, s_logit_p=1,
        s_gl_p=1, s_gg_p=1, HAS_GRAD_GAMMA=True, **flags)),
}))
"""


@pytest.mark.skipif(not gate.HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(
    DEVICE == "cuda", reason="on CUDA the other tests compile the kernels for the real device"
)
def test_kernels_compile_for_hopper_with_vector_access():
    """Compiles (not interprets) the kernels for sm_90, which needs no GPU, and checks that the big
    tensors move in 128-bit accesses: the interpreter cannot catch compile errors or slow code."""
    access = compiled_for_hopper(PTX_SCRIPT)
    for name in ("fwd_nchw_fp16", "fwd_cl_bf16", "bwd_nchw_fp32"):
        wide = [a for a in access[name] if ".v4." in a]
        # skip, dec and out (bwd: grad_out, skip, dec, grad_skip, grad_dec) all vectorised.
        assert sum(a.startswith("ld") for a in wide) >= 2 and any(a.startswith("st") for a in wide), access[
            name
        ]
    assert access["finish"] and access["finish_whole"] and access["fwd_wide"] and access["bwd_wide"]


def test_op_refuses_shapes_the_triton_gate_refuses():
    """The Triton launcher takes logit (N,1,H,W) and skip, dec (N,C,H,W) alike; the CPU reference
    broadcast whatever it was given: a (1,1,1,4) logit on a 3x4 image pooled 4 pixels, not 12, and a
    dec of 2 images on a skip of 1 resized out behind the fake's back. One ValueError on every path."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    logit, skip = torch.randn(1, 1, 3, 4), torch.randn(1, 2, 3, 4)
    unfit = [
        (logit[..., :1, :], skip, skip),
        (logit, skip, torch.randn(2, 2, 3, 4)),
        (logit, skip, skip[:, :1]),
        (torch.randn(1, 2, 3, 4), skip, skip),
    ]
    for args in unfit:
        with pytest.raises(ValueError, match=r"logit \(N, 1, H, W\) and skip, dec \(N, C, H, W\)"):
            gate.gated_blend(*args, p=2.0)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, pytest.raises(ValueError, match="logit"):
            gate.gated_blend(*(mode.from_tensor(t) for t in args), p=2.0)
        if TRITON_RUNS:
            with pytest.raises(ValueError, match=r"logit \(N, 1, H, W\)"):
                gate.gated_blend_triton(*(t.to(DEVICE) for t in args), p=2.0)


def test_cores_of_the_wrong_shape_are_refused_in_one_message():
    """Cores for another batch size, or a box of 3 or 5 numbers, failed on the CPU inside a view or
    an expand ("shape '[1, 4, 1, 1, 1]' is invalid for input of size 8") and passed the fake kernel;
    the Triton launcher said what it takes. Every path now says it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    logit, skip = torch.randn(1, 1, 3, 4), torch.randn(1, 2, 3, 4)
    for cores in [torch.zeros(2, 4, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), torch.zeros(1, 5)]:
        for blend in (gate.gated_blend, gate.gated_blend_reference):
            with pytest.raises(ValueError, match=r"cores must be .*\(N, 4\).*\(N = 1\), got \("):
                blend(logit, skip, skip, p=2.0, cores=cores)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, pytest.raises(ValueError, match="cores"):
            gate.gated_blend_op(*(mode.from_tensor(t) for t in (logit, skip, skip)), 2.0, cores, True)
        if cores.dim() == 2:  # the op called with (N, 4) cores of another N
            with pytest.raises(ValueError, match="cores must be"):
                gate.gated_blend_op(logit, skip, skip, 2.0, cores, True)
