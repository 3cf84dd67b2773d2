"""Fused 3x3 conv (qairn/kernels/conv3x3.py) against F.conv2d in float64.

Environment as tests/kernels/test_gate.py: the Triton-path tests run on CUDA when present; on CPU
only when TRITON_INTERPRET=1 was set before qairn was imported, and skip otherwise. Everything else
runs on the plain-torch reference. Shapes stay tiny: the interpreter costs milliseconds per program.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import lively_model

from qairn.kernels import conv3x3 as cv
from qairn.model import ResBlock

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_RUNS = cv.HAS_TRITON and (DEVICE == "cuda" or cv.INTERPRETED)
needs_triton = pytest.mark.skipif(
    not TRITON_RUNS,
    reason="triton not installed"
    if not cv.HAS_TRITON
    else "no CUDA, and TRITON_INTERPRET=1 was not set before import",
)
REPO = Path(__file__).resolve().parents[2]

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
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Products of Cin*9 terms: half inputs are rounded once on the way in and once on the way out.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}
LAYOUTS = ["nchw", "channels_last"]


def make_inputs(shape, dtype=torch.float32, layout="nchw", seed=0, bias=True, residual=True):
    n, cin, cout, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen)
    weight = torch.randn(cout, cin, 3, 3, generator=gen) / (3 * cin**0.5)  # outputs of order 1
    b = torch.randn(cout, generator=gen) if bias else None
    r = torch.randn(n, cout, h, w, generator=gen) if residual else None
    to = dict(device=DEVICE, dtype=dtype)
    x, weight = x.to(**to), weight.to(**to)
    b = b.to(**to) if b is not None else None
    r = r.to(**to) if r is not None else None
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        r = r.contiguous(memory_format=torch.channels_last) if r is not None else None
    return x, weight, b, r


def ideal(x, weight, bias=None, relu=False, residual=None):
    out = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    if relu:
        out = out.relu()
    return out if residual is None else out + residual.double()


def expected_layout(out, layout):
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
    out = cv.conv3x3_triton(x, weight, bias, relu, residual)
    assert out.dtype == dtype and out.shape == (shape[0], shape[2], shape[3], shape[4])
    expected_layout(out, layout)
    torch.testing.assert_close(out.double(), ideal(x, weight, bias, relu, residual), **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_triton_epilogues(bias, relu, residual):
    x, weight, b, r = make_inputs((1, 16, 16, 6, 7), bias=bias, residual=residual)
    out = cv.conv3x3_triton(x, weight, b, relu, r)
    torch.testing.assert_close(out.double(), ideal(x, weight, b, relu, r), **TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("config", [(16, 16, 16, 1), (32, 16, 16, 2), (64, 32, 32, 4)], ids=str)
def test_triton_tile_configs_agree(config):
    """Other tilings (as a benchmark may pick) give the same result: masks and loops are right."""
    x, weight, bias, residual = make_inputs((1, 40, 24, 7, 9), layout="channels_last")
    out = cv.conv3x3_triton(x, weight, bias, True, residual, config=config)
    torch.testing.assert_close(out.double(), ideal(x, weight, bias, True, residual), **TOL[torch.float32])


@needs_triton
def test_triton_mixed_layouts_and_views():
    """x channels_last with an NCHW residual, and a non-contiguous slice of a bigger tensor."""
    x, weight, bias, residual = make_inputs((2, 16, 16, 8, 8), layout="channels_last")
    out = cv.conv3x3_triton(x, weight, bias, False, residual.contiguous())
    torch.testing.assert_close(out.double(), ideal(x, weight, bias, False, residual), **TOL[torch.float32])
    wide = torch.randn(2, 32, 8, 8, device=DEVICE)
    view = wide[:, 8:24]  # strided in (n), not contiguous
    out = cv.conv3x3_triton(view, weight, bias)
    torch.testing.assert_close(out.double(), ideal(view, weight, bias), **TOL[torch.float32])


@needs_triton
def test_triton_rejects_bad_arguments():
    x, weight, bias, residual = make_inputs((1, 16, 16, 4, 4))
    with pytest.raises(ValueError, match="weight"):
        cv.conv3x3_triton(x, weight[:, :8], bias)
    with pytest.raises(ValueError, match="bias"):
        cv.conv3x3_triton(x, weight, bias[:3])
    with pytest.raises(ValueError, match="residual"):
        cv.conv3x3_triton(x, weight, bias, residual=residual[:, :3])
    with pytest.raises(TypeError):
        cv.conv3x3_triton(x.double(), weight.double(), bias.double())


# --- The op --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_op_forward(layout):
    """The op on this machine's device (Triton on CUDA, the reference elsewhere), in x's layout."""
    x, weight, bias, residual = make_inputs((2, 16, 8, 5, 6), layout=layout)
    out = cv.conv3x3(x, weight, bias, True, residual)
    expected_layout(out, layout)
    torch.testing.assert_close(out.double(), ideal(x, weight, bias, True, residual), **TOL[torch.float32])


def test_op_gradcheck_float64():
    x, weight, bias, residual = (t.cpu().double().requires_grad_() for t in make_inputs((1, 4, 3, 5, 4)))

    def fn(x, weight, bias, residual):
        return cv.conv3x3(x, weight, bias, True, residual)

    assert torch.autograd.gradcheck(fn, (x, weight, bias, residual))
    assert torch.autograd.gradcheck(lambda x, w: cv.conv3x3(x, w), (x, weight))


def test_opcheck():
    """torch.library's own checks: schema, fake (meta) kernel, autograd registration, AOT dispatch."""
    x, weight, bias, residual = make_inputs((2, 4, 6, 5, 4))
    for b, relu, r in [(bias, True, residual), (None, False, None), (bias, False, None)]:
        args = [x.clone().requires_grad_(), weight.clone().requires_grad_(), b, relu, r]
        torch.library.opcheck(torch.ops.qairn.conv3x3.default, args)


class TinyResBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = ResBlock(4)

    def forward(self, x):
        return self.block(x)


def test_export_sees_the_op_and_onnx_gets_standard_ops(tmp_path):
    m = TinyResBlock().eval()
    x = torch.randn(1, 4, 6, 7)
    want = m(x)
    cv.fuse_convs(m)
    ep = torch.export.export(m, (x,))
    targets = [node.target for node in ep.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.qairn.conv3x3.default) == 2
    decomposed = ep.run_decompositions(cv.decompositions())
    targets = [node.target for node in decomposed.graph.nodes if node.op == "call_function"]
    assert torch.ops.qairn.conv3x3.default not in targets
    torch.testing.assert_close(decomposed.module()(x), want)

    pytest.importorskip("onnxscript", reason="torch.onnx.export (dynamo) needs onnxscript")
    ort = pytest.importorskip("onnxruntime", reason="running the exported graph needs onnxruntime")
    import onnx

    path = tmp_path / "block.onnx"
    torch.onnx.export(m, (x,), str(path), dynamo=True, verbose=False)
    ops = {(node.domain or "ai.onnx", node.op_type) for node in onnx.load(str(path)).graph.node}
    assert {d for d, _ in ops} == {"ai.onnx"} and ("ai.onnx", "Conv") in ops, ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)


# --- The model -----------------------------------------------------------------------------------------


def test_use_conv_backend_keeps_weights_and_output():
    m = lively_model("tiny").to(DEVICE)
    x = torch.rand(2, 3, 32, 48, device=DEVICE)
    keys = list(m.state_dict())
    with torch.no_grad():
        y_ref, gammas_ref = m(x)
        cv.use_conv_backend(m, "triton" if cv.HAS_TRITON else "reference")
        # tiny: head, tail, rqa inp/out x3 and 8 ResBlocks of two convs, all <= 64 wide.
        assert cv.fused_conv_count(m) == (2 + 2 * 3 + 2 * 8 if cv.HAS_TRITON else 0)
        assert list(m.state_dict()) == keys
        y, gammas = m(x)
    tol = TOL[torch.float32] if DEVICE == "cpu" else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, y_ref, **tol)
    for g, g_ref in zip(gammas, gammas_ref, strict=True):
        torch.testing.assert_close(g, g_ref, **tol)
    cv.use_conv_backend(m, "reference")
    assert cv.fused_conv_count(m) == 0
    with pytest.raises(ValueError):
        cv.use_conv_backend(m, "cudnn")


def test_use_conv_backend_max_channels():
    if not cv.HAS_TRITON:
        pytest.skip("triton not installed")
    m = lively_model("small")
    cv.use_conv_backend(m, "triton", max_channels=16)
    # small at <= 16 wide: head, tail, rqa1.out... the full-scale level only (widths 16, 32, 64, 128).
    fused = {name for name, mod in m.named_modules() if type(mod) in (cv.FusedConv3x3, cv.FusedResBlock)}
    assert "head" in fused and "tail" in fused and "down1.0" in fused and "up1.1" in fused
    assert not any(name.startswith(("down2", "down3", "body", "up2.", "up3")) for name in fused), fused


@pytest.mark.skipif(not cv.HAS_TRITON, reason="triton not installed")
def test_backend_option_fused_conv():
    """Restorer(..., fused_conv=True) reaches the model: same pictures (the reference op off CUDA)."""
    from qairn.engine.backends import make_backend

    x = torch.rand(1, 3, 32, 40, device=DEVICE)
    plain = make_backend("eager", lively_model("tiny"), torch.device(DEVICE))
    fused = make_backend("eager", lively_model("tiny"), torch.device(DEVICE), fused_conv=16)
    assert cv.fused_conv_count(plain.model) == 0 and cv.fused_conv_count(fused.model) > 0
    assert cv.fused_conv_count(fused.model) < cv.fused_conv_count(cv.fuse_convs(lively_model("tiny")))
    (y_ref, g_ref), (y, g) = plain(x), fused(x)
    tol = TOL[torch.float32] if DEVICE == "cpu" else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(g[0], g_ref[0], **tol)


@needs_triton
def test_model_on_the_triton_conv(monkeypatch):
    """The whole model with the Triton launcher behind every fused conv (interpreted on CPU)."""
    m = lively_model("tiny").to(DEVICE)
    x = torch.rand(1, 3, 20, 23, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y_ref, gammas_ref = m(x)
        cv.use_conv_backend(m, "triton")
        monkeypatch.setattr(cv, "conv3x3_op", cv.conv3x3_triton)  # the op runs the reference on CPU
        y, gammas = m(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for g, g_ref in zip(gammas, gammas_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


# --- Compiled code (no GPU needed): the kernel compiles for Hopper and uses tensor cores ---------------

PTX_SCRIPT = r"""
import json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qairn.kernels import conv3x3 as cv

def ptx(dtype, block_m, block_n, block_k):
    kernel = cv._conv3x3_kernel
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=True, RELU=True,
                      HAS_RES=True, IEEE=dtype == "*fp32", UPCAST=False, s_xc=1, s_rc=1, s_oc=1)
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = dtype if name.endswith("_ptr") else "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    consts = {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    asm = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    return sorted(set(re.findall(r"\b(?:w?gmma|mma)\.[\w.]+", asm)))

print(json.dumps({
    "fp16_16x16": ptx("*fp16", *cv.tile_config(16, 16)[:3]),
    "bf16_32x32": ptx("*bf16", *cv.tile_config(32, 32)[:3]),
    "fp16_3x16": ptx("*fp16", *cv.tile_config(3, 16)[:3]),
    "fp32_16x16": ptx("*fp32", *cv.tile_config(16, 16)[:3]),
}))
"""


@pytest.mark.skipif(not cv.HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA the other tests compile the kernel for the real device")
def test_kernel_compiles_for_hopper_on_tensor_cores():
    """Compiles (not interprets) the kernel for sm_90, which needs no GPU: half inputs must reach the
    tensor cores (mma), and fp32 must not (IEEE products, as the reference)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", PTX_SCRIPT], capture_output=True, text=True, env=env, timeout=300, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mma = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("fp16_16x16", "bf16_32x32", "fp16_3x16"):
        assert mma[name], (name, mma)
    assert not mma["fp32_16x16"], mma
