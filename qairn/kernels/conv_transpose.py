"""Fused 2x2, stride-2 transposed convolution: bias, ReLU and a residual add in the same pass.

    out = conv_transpose2d(x, weight, bias, stride 2)   (N,Cin,H,W) -> (N,Cout,2H,2W)
    out = relu(out)            if relu
    out = out + residual       if residual is given      (RQAttention: d1 = relu(up2(e2)) + e1)

Why: every upsampling of the model is one of these, and cuDNN ran them at 1-10 TFLOP/s on the H200
(2026-11-27), slower per byte than anything else in the network. With a 2x2 kernel and stride 2 the
four output phases do not overlap: output pixel (2y+dy, 2x+dx) is input pixel (y, x) times the
[Cin, Cout] slice weight[:, :, dy, dx]. So a program owns BLOCK_M input pixels and BLOCK_N output
channels and, per phase, runs one [BLOCK_M, Cin] x [Cin, BLOCK_N] tl.dot (the A tile comes from
L1 after the first phase) and stores that phase with the epilogue of qairn/kernels/conv.py.

Same structure as conv.py: reference, kernel, launcher, torch.library op with autograd (recomputed
reference) and ONNX decomposition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qairn.kernels.conv import (
    AUTOCAST_KEYS,
    HAS_TRITON,
    INTERPRETED,
    addressable,
    as_promised,
    autocast_inputs,
    autocast_lib,
    check_batched,
    check_epilogue,
    check_runnable,
    choose_config,
    empty_like_layout,
    epilogue_reference,
    on_device,
    recompute_backward,
    triton_takes,
    without_autocast,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from qairn.kernels.conv import _dot, _epilogue, _program_tile


def conv_transpose_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, relu: bool = False, residual: Tensor | None = None
) -> Tensor:
    return epilogue_reference(F.conv_transpose2d(x, weight, bias, stride=2), relu, residual)


if HAS_TRITON:

    @triton.jit
    def _conv_transpose_kernel(
        x_ptr, w_ptr, b_ptr, res_ptr, out_ptr,
        H, W, CIN, COUT,
        s_xn, s_xc, s_xh, s_xw,
        s_wi, s_wo, s_wh, s_ww,
        s_rn, s_rc, s_rh, s_rw,
        s_on, s_oc, s_oh, s_ow,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_RES: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        n, y, x, mask_m, offs_n, mask_n = _program_tile(H, W, COUT, BLOCK_M, BLOCK_N)
        pix = x_ptr + n * s_xn + y * s_xh + x * s_xw

        for phase in tl.static_range(4):
            dy = phase // 2
            dx = phase % 2
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, CIN, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < CIN
                a = tl.load(
                    pix[:, None] + offs_k[None, :] * s_xc, mask=mask_m[:, None] & mask_k[None, :], other=0.0
                )
                w_ptrs = w_ptr + offs_k[:, None] * s_wi + offs_n[None, :] * s_wo + dy * s_wh + dx * s_ww
                b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc = _dot(a, b, acc, IEEE, UPCAST)
            _epilogue(
                acc, b_ptr, res_ptr, out_ptr, n, 2 * y + dy, 2 * x + dx, offs_n, mask_m, mask_n,
                s_rn, s_rc, s_rh, s_rw, s_on, s_oc, s_oh, s_ow, HAS_BIAS, RELU, HAS_RES,
            )  # fmt: skip


def conv_transpose_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    relu: bool = False,
    residual: Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> Tensor:
    """The fused transposed conv; out has x's memory format. config as conv.conv_triton's."""
    check_runnable(x, weight, "transposed conv")
    check_batched(x, weight, "transposed conv")
    n, cin, h, w = x.shape
    cout = weight.shape[1]
    if weight.shape != (cin, cout, 2, 2):
        raise ValueError(
            f"weight must be ({cin}, Cout, 2, 2) for x {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    residual = check_epilogue((n, cout, 2 * h, 2 * w), bias, residual, max(cin * h * w, cout * 4 * h * w))
    out = empty_like_layout(x, (n, cout, 2 * h, 2 * w))
    x, residual = addressable(x), addressable(residual)  # after out: x's layout
    res = residual if residual is not None else out  # never read without HAS_RES
    bias_arg = bias.contiguous() if bias is not None else weight  # read as b_ptr + channel
    upcast = INTERPRETED and x.dtype == torch.bfloat16

    def launch(cfg):
        block_m, block_n, block_k, num_warps = cfg
        grid = (triton.cdiv(h * w, block_m) * n, triton.cdiv(cout, block_n))
        _conv_transpose_kernel[grid](
            x, weight, bias_arg, res, out,
            h, w, cin, cout,
            *x.stride(), *weight.stride(), *res.stride(), *out.stride(),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            HAS_BIAS=bias is not None, RELU=relu, HAS_RES=residual is not None,
            IEEE=x.dtype == torch.float32 or upcast, UPCAST=upcast,
            num_warps=num_warps,
        )  # fmt: skip

    key = ("conv_transpose", x.device, x.dtype, n, cin, cout, h, w, x.stride(), out.stride())
    with on_device(x):  # x's GPU, for the launches and the tuning's events and capture check alike
        launch(config or choose_config(key, x, cin, cout, launch))
    return out


def _conv_transpose_impl(
    x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool, residual: Tensor | None
) -> Tensor:
    check_batched(x, weight, "transposed conv")
    out = conv_transpose_reference(x, weight, bias, relu, residual)
    return as_promised(out, _conv_transpose_fake(x, weight, bias, relu, residual), residual)


def _conv_transpose_fake(x, weight, bias, relu, residual):
    # The reference takes any kernel at stride 2 (a 3x3 one makes 2H+1): (H-1)*2 + k per side.
    check_batched(x, weight, "transposed conv")
    n, _, h, w = x.shape
    kh, kw = weight.shape[-2:]
    return empty_like_layout(x, (n, weight.shape[1], 2 * (h - 1) + kh, 2 * (w - 1) + kw))


conv_transpose_op = torch.library.custom_op("qairn::conv_transpose2x2", _conv_transpose_impl, mutates_args=())
conv_transpose_op.register_fake(_conv_transpose_fake)


if HAS_TRITON:

    @conv_transpose_op.register_kernel("cuda")
    def _(x, weight, bias, relu, residual):
        if not triton_takes(x, weight, bias, residual) or weight.shape[-2:] != (2, 2):
            return _conv_transpose_impl(x, weight, bias, relu, residual)
        return conv_transpose_triton(x, weight, bias, relu, residual)


def _setup_context(ctx, inputs, output):
    x, weight, bias, relu, residual = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.relu, ctx.has_residual = relu, residual is not None


def _backward(ctx, grad_out):
    x, weight, bias = ctx.saved_tensors
    tensors = dict(x=x, weight=weight, bias=bias)
    g = recompute_backward(conv_transpose_reference, tensors, grad_out, ctx.has_residual, relu=ctx.relu)
    return g["x"], g["weight"], g["bias"], None, g["residual"]


conv_transpose_op.register_autograd(_backward, setup_context=_setup_context)


def _conv_transpose_autocast(x, weight, bias, relu, residual):
    """As conv._conv_autocast: the transposed conv in the autocast dtype, out + residual promoting."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    return without_autocast(lambda res: conv_transpose_op(x, weight, bias, relu, res), x, residual)


for key in AUTOCAST_KEYS:
    autocast_lib.impl("conv_transpose2x2", _conv_transpose_autocast, key)

torch._decomp.register_decomposition(torch.ops.qairn.conv_transpose2x2.default)(conv_transpose_reference)


def conv_transpose(x, weight, bias=None, relu: bool = False, residual=None) -> Tensor:
    """The fused op (Triton on CUDA, the reference elsewhere), differentiable."""
    return conv_transpose_op(x, weight, bias, relu, residual)
