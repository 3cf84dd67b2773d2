"""Model surgery (qairn/kernels/fuse.py): QAIRN with its thin convs on the fused ops.

On CPU the ops run their plain-torch reference, so the swap must not change a single output beyond
float rounding; under TRITON_INTERPRET=1 one test runs the Triton launchers behind every fused conv.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import lively_model
from test_conv import DEVICE, TRITON_RUNS, needs_triton

from qairn.kernels import conv as cv
from qairn.kernels import conv_transpose as ct
from qairn.kernels import fuse
from qairn.model import QAIRN, ResBlock, RQAttention, preset

TOL = dict(rtol=1e-5, atol=1e-5) if DEVICE == "cpu" else dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(autouse=True)
def no_tf32():
    """cuDNN's fp32 convs default to TF32 on CUDA (10-bit mantissa products); the fused fp32 kernels
    take IEEE products. Compare like with like."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def run(m, x):
    with torch.no_grad():
        return m(x)


def assert_same(got, want, tol):
    (y, gammas), (y_ref, gammas_ref) = got, want
    torch.testing.assert_close(y, y_ref, **tol)
    for g, g_ref in zip(gammas, gammas_ref, strict=True):
        torch.testing.assert_close(g, g_ref, **tol)


def test_fuse_keeps_weights_and_output():
    m = lively_model("tiny").to(DEVICE)
    x = torch.rand(2, 3, 32, 48, device=DEVICE)
    keys, want = list(m.state_dict()), run(m, x)
    fuse.use_conv_backend(m, "triton" if cv.HAS_TRITON else "reference")
    # tiny: all 58 of its conv calls are <= 64 wide: 8 ResBlocks (16), 3 RQAttentions (18), head,
    # tail, 3 down convs and 3 up convs.
    assert fuse.fused_conv_count(m) == (2 * 8 + 6 * 3 + 2 + 3 + 3 if cv.HAS_TRITON else 0)
    assert list(m.state_dict()) == keys
    assert_same(run(m, x), want, TOL)
    fuse.use_conv_backend(m, "reference")
    assert fuse.fused_conv_count(m) == 0
    assert {type(mod) for mod in m.modules()} == {type(mod) for mod in lively_model("tiny").modules()}
    with pytest.raises(ValueError):
        fuse.use_conv_backend(m, "cudnn")
    with pytest.raises(ValueError, match="no QAIRN"):
        fuse.use_conv_backend(torch.nn.Conv2d(3, 3, 3), "reference")


def test_fuse_max_channels():
    m = fuse.fuse_convs(lively_model("small"), max_channels=16)
    fused = {name for name, mod in m.named_modules() if type(mod) in fuse.CALLS}
    # small (widths 16, 32, 64, 128) at <= 16 wide: the full-scale level and the autoencoders' 16-wide
    # layers; rqa1's input conv takes 32 channels (skip and decoder), so that block stays whole.
    assert {"head", "tail", "down1.0", "down1.1", "up1.1", "up1.2", "rqa1.down1", "rqa1.up2"} <= fused
    assert not any(
        name.startswith(("down2", "down3", "body", "up2.", "up3", "rqa1.inp")) for name in fused
    ), fused
    assert type(m.rqa1) is RQAttention and type(m.down2[0]) is ResBlock
    everything = fuse.fuse_convs(lively_model("small"), max_channels=128)
    assert fuse.fused_conv_count(everything) == 58  # every conv call of the small model


def test_backend_option_fused_conv():
    """Restorer(..., fused_conv=...) reaches the model: same pictures (the reference op off CUDA)."""
    from qairn.engine.backends import make_backend

    x = torch.rand(1, 3, 32, 40, device=DEVICE)
    plain = make_backend("eager", lively_model("tiny"), torch.device(DEVICE))
    fused = make_backend("eager", lively_model("tiny"), torch.device(DEVICE), fused_conv=16)
    assert fuse.fused_conv_count(plain.model) == 0
    assert (
        0 < fuse.fused_conv_count(fused.model) < fuse.fused_conv_count(fuse.fuse_convs(lively_model("tiny")))
    )
    (y_ref, g_ref), (y, g) = plain(x), fused(x)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(g[0], g_ref[0], **TOL)


@needs_triton
def test_model_on_the_triton_kernels(monkeypatch):
    """The whole model with the Triton launchers behind every fused conv (interpreted on CPU)."""
    m = lively_model("tiny").to(DEVICE)
    x = torch.rand(1, 3, 20, 23, device=DEVICE).contiguous(memory_format=torch.channels_last)
    want = run(m, x)
    fuse.fuse_convs(m)
    monkeypatch.setattr(fuse, "conv_op", cv.conv_triton)  # the ops run the reference on CPU
    monkeypatch.setattr(fuse, "conv_transpose_op", ct.conv_transpose_triton)
    assert_same(run(m, x), want, dict(rtol=1e-4, atol=1e-4))


def test_compile_export_and_onnx_see_the_ops(tmp_path):
    m = lively_model("tiny")
    x = torch.rand(1, 3, 32, 32)
    want = run(m, x)
    fuse.fuse_convs(m)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(m, backend=capture, fullgraph=True)(x)
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.qairn.conv2d.default) == 2 * 8 + 4 * 3 + 2 + 3
    assert targets.count(torch.ops.qairn.conv_transpose2x2.default) == 2 * 3 + 3

    ep = torch.export.export(m, (x,))
    decomposed = ep.run_decompositions(fuse.decompositions())
    targets = {node.target for node in decomposed.graph.nodes if node.op == "call_function"}
    assert not targets & {torch.ops.qairn.conv2d.default, torch.ops.qairn.conv_transpose2x2.default}
    assert_same(decomposed.module()(x), want, dict(rtol=1e-5, atol=1e-5))


class TinyBlocks(torch.nn.Module):
    """A ResBlock and an RQAttention, fused: small enough for the dynamo ONNX exporter on CI."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = ResBlock(4)
        self.rqa = RQAttention(4, 4)
        torch.nn.init.normal_(self.rqa.out.weight, std=0.1)

    def forward(self, x):
        y = self.block(x)
        return y, self.rqa.logit(x, y)


def test_onnx_export_uses_standard_ops_only(tmp_path):
    pytest.importorskip("onnxscript", reason="torch.onnx.export (dynamo) needs onnxscript")
    ort = pytest.importorskip("onnxruntime", reason="running the exported graph needs onnxruntime")
    import onnx

    m = TinyBlocks().eval()
    x = torch.randn(1, 4, 8, 12)
    want = run(m, x)
    fuse.fuse_convs(m)
    path = tmp_path / "blocks.onnx"
    torch.onnx.export(m, (x,), str(path), dynamo=True, verbose=False)
    ops = {(node.domain or "ai.onnx", node.op_type) for node in onnx.load(str(path)).graph.node}
    assert {d for d, _ in ops} == {"ai.onnx"}, ops
    assert {("ai.onnx", "Conv"), ("ai.onnx", "ConvTranspose")} <= ops, ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-5, atol=1e-5)


def test_a_fused_transposed_conv_keeps_output_size():
    """ConvTranspose2d(x, output_size) may ask for 2H+1 x 2W+1 (an implied output_padding); the fused
    op only makes 2H x 2W, and returned that (4x6 where 5x7 was asked)."""
    torch.manual_seed(0)
    m = torch.nn.ConvTranspose2d(4, 3, 2, stride=2).to(DEVICE)
    x = torch.randn(1, 4, 2, 3, device=DEVICE)
    want = run(m, x), m(x, output_size=(5, 7)).detach()
    fuse.fuse_convs(m)
    assert type(m) is fuse.FusedConvTranspose2d
    with torch.no_grad():
        got = m(x), m(x, output_size=(5, 7))
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("kind", ["conv", "conv_transpose"])
def test_fused_convs_take_unbatched_input(monkeypatch, kind):
    """nn.Conv2d and nn.ConvTranspose2d take a (C, H, W) input. The fused op's reference did too, but
    its fake kernel (torch.compile, export) and the Triton launchers unpack (N, C, H, W)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    m = torch.nn.Conv2d(4, 5, 3, padding=1) if kind == "conv" else torch.nn.ConvTranspose2d(4, 5, 2, stride=2)
    m = m.to(DEVICE)
    x = torch.randn(4, 6, 7, device=DEVICE)
    want = run(m, x)
    fuse.fuse_convs(m)
    assert type(m) in fuse.CALLS
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        assert run(m, mode.from_tensor(x)).shape == want.shape
    torch.testing.assert_close(run(m, x), want, **TOL)
    if TRITON_RUNS:  # the Triton launchers behind the op
        monkeypatch.setattr(fuse, "conv_op", cv.conv_triton)
        monkeypatch.setattr(fuse, "conv_transpose_op", ct.conv_transpose_triton)
        torch.testing.assert_close(run(m, x), want, rtol=1e-4, atol=1e-4)


def test_fusing_twice_or_at_another_width_is_fusing_once():
    fresh = {
        w: fuse.fused_conv_count(fuse.fuse_convs(QAIRN(preset("small")), max_channels=w)) for w in (16, 64)
    }
    m = QAIRN(preset("small"))
    fuse.fuse_convs(m)
    fuse.fuse_convs(m)
    assert fuse.fused_conv_count(m) == fresh[64]
    fuse.fuse_convs(m, max_channels=16)
    assert fuse.fused_conv_count(m) == fresh[16]


def test_a_fused_model_exports_to_onnx(tmp_path):
    pytest.importorskip("onnx", reason="onnx (qairn[export]) is not installed")
    from qairn.export import onnx_export as ox

    m = fuse.fuse_convs(QAIRN(preset("tiny")))
    ox.export_onnx(m, tmp_path / "m.onnx")
    import onnx

    assert not any(n.domain == "qairn" for n in onnx.load(str(tmp_path / "m.onnx")).graph.node)


def test_fused_blocks_compute_their_convs_or_refuse_them():
    """FusedResBlock passed stride 1 and padding 1 whatever its convs said (a ResBlock of 1x1 convs,
    which fuse_convs fuses, failed on a 7-wide where a 5-wide output was due), and FusedConv2d and
    FusedConvTranspose2d built directly passed the op one side's stride and padding and nothing of
    dilation, groups or the padding mode: each computed another conv without a word."""
    torch.manual_seed(0)
    block = ResBlock(4)
    block.conv1, block.conv2 = torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 1)
    block = block.to(DEVICE)
    x = torch.randn(1, 4, 5, 5, device=DEVICE)
    want = run(block, x)
    fuse.fuse_convs(block)
    assert type(block) is fuse.FusedResBlock
    torch.testing.assert_close(run(block, x), want, **TOL)

    block.conv2 = torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2).to(DEVICE)
    unfit = [
        block,
        fuse.FusedConv2d(4, 4, 3, stride=(1, 2), padding=1),
        fuse.FusedConv2d(4, 4, 3, padding=(1, 0)),
        fuse.FusedConv2d(4, 4, 3, padding=2, dilation=2),
        fuse.FusedConv2d(4, 4, 3, padding=1, groups=2),
        fuse.FusedConv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        fuse.FusedConv2d(4, 4, 3, padding="same"),
        fuse.FusedConvTranspose2d(4, 4, 2, stride=1),
        fuse.FusedConvTranspose2d(4, 4, 2, stride=2, padding=1),
        fuse.FusedConvTranspose2d(4, 4, 3, stride=2, output_padding=1),
        fuse.FusedConvTranspose2d(4, 4, 2, stride=2, groups=2),
    ]
    for m in unfit:
        with pytest.raises(ValueError, match="the fused .*cannot compute"):
            run(m.to(DEVICE), x)


def test_a_fused_resblock_takes_unbatched_input():
    """ResBlock's nn.Conv2d take a (C, H, W) input; the fused block's op refuses one (its fake and
    launchers want N), so the block adds and drops the batch dimension as FusedConv2d does."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    block = ResBlock(4).to(DEVICE)
    x = torch.randn(4, 5, 6, device=DEVICE)
    want = run(block, x)
    fuse.fuse_convs(block)
    assert type(block) is fuse.FusedResBlock
    torch.testing.assert_close(run(block, x), want, **TOL)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        assert run(block, mode.from_tensor(x)).shape == want.shape


def test_fused_convs_follow_autocast_as_the_torch_convs_do():
    """Under torch.autocast a torch conv runs in the autocast dtype and out + residual promotes. The
    fused ops ignored autocast: on the CPU their reference ran in bf16 and was copied back to fp32 (a
    fused model's gammas came out fp32, the plain model's bf16), and on CUDA the fp32 Triton kernel
    ran. They now cast as F.conv2d does, and add a wider residual after the conv, as the reference."""
    m = lively_model("tiny").eval()
    fused = fuse.fuse_convs(lively_model("tiny").eval())
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (y, gammas), (y_ref, gammas_ref) = fused(x), m(x)
    for got, want in zip([y, *gammas], [y_ref, *gammas_ref], strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    conv, up = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ConvTranspose2d(4, 4, 2, stride=2)
    x = torch.randn(1, 4, 5, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for out, want in [
            (cv.conv(x, conv.weight, conv.bias, 1, 1, True, x), F.relu(conv(x)) + x),
            (cv.conv(x, conv.weight, conv.bias, 1, 1), conv(x)),
            (
                ct.conv_transpose(x, up.weight, up.bias, True, x.repeat(1, 1, 2, 2)),
                F.relu(up(x)) + x.repeat(1, 1, 2, 2),
            ),
            (ct.conv_transpose(x, up.weight, up.bias), up(x)),
        ]:
            assert out.dtype == want.dtype
            torch.testing.assert_close(out, want, rtol=0, atol=0)
            (grad,) = torch.autograd.grad(out.float().sum(), x)
            torch.testing.assert_close(grad, torch.autograd.grad(want.float().sum(), x)[0])
