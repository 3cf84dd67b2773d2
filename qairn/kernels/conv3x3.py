"""Fused 3x3 convolution for thin layers: bias, ReLU and a residual add in the same pass.

    out = conv3x3(x, weight, bias, stride 1, padding 1)
    out = relu(out)            if relu
    out = out + residual       if residual is given      (a ResBlock: x + conv2(relu(conv1(x))))

Why: cuDNN runs the small model's 16- and 32-channel 3x3 convs far below the memory floor (H200,
2026-11-27: 16->16 at 36 TFLOP/s and about 0.5 TB/s, while such a conv could stream at the copy
bandwidth), and every ReLU and residual add is one more pass over memory. This kernel is an implicit
GEMM: a program owns BLOCK_M output pixels of one image and BLOCK_N output channels and accumulates
the nine taps' [BLOCK_M, Cin] x [Cin, BLOCK_N] products with tl.dot (tensor cores) in fp32. Each
input pixel comes from DRAM about once (the taps overlap in L1/L2) and the output is written once,
with the ReLU and the residual applied before the store: a ResBlock is two kernels instead of four.

Read top to bottom: reference, kernel, launcher, the torch.library op (Triton on CUDA, the reference
elsewhere; autograd by recomputing the reference; ONNX decomposition), and the model surgery that
puts it into QAIRN's ResBlocks and other stride-1 3x3 convs. Inference is the point (the engine runs
under inference_mode); the backward exists so that a model with the kernel swapped in still trains.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from qairn.model import QAIRN, ResBlock

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # the reference path needs no Triton
    triton = None

HAS_TRITON = triton is not None
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------
# Reference (plain torch). Traceable: it is also the op's decomposition for ONNX export.
# ---------------------------------------------------------------------------------------------------


def conv3x3_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, relu: bool = False, residual: Tensor | None = None
) -> Tensor:
    out = F.conv2d(x, weight, bias, padding=1)
    if relu:
        out = F.relu(out)
    return out if residual is None else out + residual


# ---------------------------------------------------------------------------------------------------
# Triton kernel. Pixels are the flattened (H,W) index of one image; every tensor is addressed with
# its own (n, c, h, w) strides, so channels_last (the fast case: a pixel's channels are one
# contiguous row of the GEMM's A tile) and NCHW both work.
# ---------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _conv3x3_kernel(
        x_ptr, w_ptr, b_ptr, res_ptr, out_ptr,
        H, W, CIN, COUT,
        s_xn, s_xc, s_xh, s_xw,
        s_wo, s_wi, s_wh, s_ww,
        s_rn, s_rc, s_rh, s_rw,
        s_on, s_oc, s_oh, s_ow,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_RES: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        n = tl.program_id(1).to(tl.int64)  # batch offsets of a 4K tile batch pass 2**31 elements
        pid_n = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < H * W
        y = offs_m // W
        x = offs_m - y * W
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < COUT

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        x_img = x_ptr + n * s_xn
        for tap in tl.static_range(9):
            iy = y + (tap // 3 - 1)
            ix = x + (tap % 3 - 1)
            valid = mask_m & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)  # zero padding
            pix = iy * s_xh + ix * s_xw
            for k0 in range(0, CIN, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < CIN
                a = tl.load(
                    x_img + pix[:, None] + offs_k[None, :] * s_xc,
                    mask=valid[:, None] & mask_k[None, :],
                    other=0.0,
                )
                w_ptrs = (
                    w_ptr
                    + offs_n[None, :] * s_wo
                    + offs_k[:, None] * s_wi
                    + (tap // 3) * s_wh
                    + (tap % 3) * s_ww
                )
                b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                if UPCAST:  # the interpreter's tl.dot misreads bf16 (triton 3.9): fp32 products there
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                if IEEE:  # fp32 inputs: exact products, as the reference (no TF32 rounding)
                    acc += tl.dot(a, b, input_precision="ieee")
                else:
                    acc += tl.dot(a, b)

        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if RELU:
            acc = tl.maximum(acc, 0.0)
        mask = mask_m[:, None] & mask_n[None, :]
        if HAS_RES:
            r_ptrs = res_ptr + n * s_rn + (y * s_rh + x * s_rw)[:, None] + offs_n[None, :] * s_rc
            acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        o_ptrs = out_ptr + n * s_on + (y * s_oh + x * s_ow)[:, None] + offs_n[None, :] * s_oc
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# triton.jit picks the interpreter when the decorator runs, i.e. when this module is imported.
INTERPRETED = HAS_TRITON and isinstance(_conv3x3_kernel, InterpretedFunction)


# ---------------------------------------------------------------------------------------------------
# Launcher. Callable directly (tests run it on CPU tensors under TRITON_INTERPRET=1); the op below
# calls it for CUDA tensors.
# ---------------------------------------------------------------------------------------------------


def _pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(v)))


def tile_config(cin: int, cout: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps). tl.dot needs every dimension >= 16: thinner layers
    (RGB in, 3 or 1 channels out) are masked up to 16. Wide outputs split over programs (BLOCK_N
    <= 64), so the fp32 accumulator stays in registers; pixels per program shrink as it widens."""
    block_n = _pow2(cout, 16, 64)
    block_k = _pow2(cin, 16, 64)
    block_m = 128 if block_n <= 32 else 64
    return block_m, block_n, block_k, 4


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None) -> None:
    if not HAS_TRITON:
        raise RuntimeError("the Triton conv needs the triton package (pip install qairn[triton])")
    if not x.is_cuda and not INTERPRETED:
        raise RuntimeError("Triton runs on CPU tensors only with TRITON_INTERPRET=1 set before import")
    if x.dtype not in TRITON_DTYPES or weight.dtype != x.dtype:
        raise TypeError(
            f"the Triton conv takes x and weight of one of {TRITON_DTYPES}, got {x.dtype}, {weight.dtype}"
        )
    n, cin, h, w = x.shape
    if weight.shape[1:] != (cin, 3, 3):
        raise ValueError(
            f"weight must be (Cout, {cin}, 3, 3) for x {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    cout = weight.shape[0]
    if bias is not None and bias.shape != (cout,):
        raise ValueError(f"bias must be ({cout},), got {tuple(bias.shape)}")
    if residual is not None and residual.shape != (n, cout, h, w):
        raise ValueError(f"residual must be {(n, cout, h, w)}, got {tuple(residual.shape)}")
    # Offsets inside one image are int32 in the kernel (the batch offset is int64).
    if max(cin, cout) * h * w >= 2**31:
        raise ValueError(f"one image of {max(cin, cout)} x {h} x {w} is too large for the Triton conv")


def conv3x3_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    relu: bool = False,
    residual: Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> Tensor:
    """The fused conv; out has x's memory format (channels_last in, channels_last out).
    config = (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) overrides tile_config (benchmarks, tests)."""
    _check(x, weight, bias, residual)
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out = torch.empty(
        (n, cout, h, w), dtype=x.dtype, device=x.device,
        memory_format=torch.channels_last if cl else torch.contiguous_format,
    )  # fmt: skip
    block_m, block_n, block_k, num_warps = config or tile_config(cin, cout)
    res = residual if residual is not None else out  # never read without HAS_RES
    upcast = INTERPRETED and x.dtype == torch.bfloat16
    grid = (triton.cdiv(h * w, block_m), n, triton.cdiv(cout, block_n))
    _conv3x3_kernel[grid](
        x, weight, bias if bias is not None else weight, res, out,
        h, w, cin, cout,
        *x.stride(), *weight.stride(), *res.stride(), *out.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_BIAS=bias is not None, RELU=relu, HAS_RES=residual is not None,
        IEEE=x.dtype == torch.float32 or upcast, UPCAST=upcast,
        num_warps=num_warps,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------
# torch.library op: one node for torch.compile and torch.export. CUDA runs the Triton launcher;
# every other device (and fp64) runs the reference.
# ---------------------------------------------------------------------------------------------------


def _out_like(x: Tensor, cout: int) -> Tensor:
    n, _, h, w = x.shape
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty((n, cout, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)


def _conv3x3_impl(
    x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool, residual: Tensor | None
) -> Tensor:
    # In x's memory format, as the Triton path and the fake promise.
    return _out_like(x, weight.shape[0]).copy_(conv3x3_reference(x, weight, bias, relu, residual))


conv3x3_op = torch.library.custom_op("qairn::conv3x3", _conv3x3_impl, mutates_args=())


@conv3x3_op.register_fake
def _(x, weight, bias, relu, residual):
    return _out_like(x, weight.shape[0])


if HAS_TRITON:

    @conv3x3_op.register_kernel("cuda")
    def _(x, weight, bias, relu, residual):
        if x.dtype not in TRITON_DTYPES or weight.dtype != x.dtype:
            return _conv3x3_impl(x, weight, bias, relu, residual)
        return conv3x3_triton(x, weight, bias, relu, residual)


def _setup_context(ctx, inputs, output):
    x, weight, bias, relu, residual = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.relu = relu
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None


def _backward(ctx, grad_out):
    # Recompute the reference forward and let autograd differentiate it: training with the kernel
    # swapped in is correct, if not fused (the residual's gradient is grad_out itself).
    x, weight, bias = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (x, weight) + ((bias,) if ctx.has_bias else ())]
        out = conv3x3_reference(leaves[0], leaves[1], leaves[2] if ctx.has_bias else None, ctx.relu)
        grads = torch.autograd.grad(out, leaves, grad_out)
    grad_bias = grads[2] if ctx.has_bias else None
    return grads[0], grads[1], grad_bias, None, grad_out if ctx.has_residual else None


conv3x3_op.register_autograd(_backward, setup_context=_setup_context)

# torch.onnx.export (dynamo) decomposes ops listed in torch._decomp's table: standard ONNX Conv/Relu/Add.
torch._decomp.register_decomposition(torch.ops.qairn.conv3x3.default)(conv3x3_reference)


def decompositions() -> dict:
    """{op: decomposition}, for ExportedProgram.run_decompositions before other exporters."""
    return {torch.ops.qairn.conv3x3.default: conv3x3_reference}


def conv3x3(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, relu: bool = False, residual=None
) -> Tensor:
    """The fused op (Triton on CUDA, the reference elsewhere), differentiable."""
    return conv3x3_op(x, weight, bias, relu, residual)


# ---------------------------------------------------------------------------------------------------
# Model surgery. Modules keep their parameters and state_dict keys: only their class changes, to a
# subclass whose forward calls the op, so weights load and save as before and the swap is undone by
# restoring the base class.
# ---------------------------------------------------------------------------------------------------


class FusedConv3x3(nn.Conv2d):
    """A stride-1, padding-1 3x3 nn.Conv2d that runs through the fused op."""

    def forward(self, x: Tensor) -> Tensor:
        return conv3x3_op(x, self.weight, self.bias, False, None)


class FusedResBlock(ResBlock):
    """ResBlock in two fused calls: h = relu(conv1(x)); out = conv2(h) + x."""

    def forward(self, x: Tensor) -> Tensor:
        h = conv3x3_op(x, self.conv1.weight, self.conv1.bias, True, None)
        return conv3x3_op(h, self.conv2.weight, self.conv2.bias, False, x)


def _fusable(conv: nn.Module, max_channels: int) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and max(conv.in_channels, conv.out_channels) <= max_channels
    )


def fuse_convs(module: nn.Module, max_channels: int = 64) -> nn.Module:
    """Run module's ResBlocks and stride-1 3x3 convs at most max_channels wide through the fused op
    (a ResBlock as two calls: conv+bias+ReLU, then conv+bias+residual). In place; returns module."""
    inside = set()  # the convs of fused ResBlocks: their weights are read by the block's forward
    for m in module.modules():
        if type(m) is ResBlock and all(_fusable(c, max_channels) for c in (m.conv1, m.conv2)):
            m.__class__ = FusedResBlock
            inside |= {id(m.conv1), id(m.conv2)}
        elif id(m) not in inside and _fusable(m, max_channels):
            m.__class__ = FusedConv3x3
    return module


def unfuse_convs(module: nn.Module) -> nn.Module:
    """Undo fuse_convs: plain nn.Conv2d and ResBlock again."""
    for m in module.modules():
        if type(m) is FusedConv3x3:
            m.__class__ = nn.Conv2d
        elif type(m) is FusedResBlock:
            m.__class__ = ResBlock
    return module


def use_conv_backend(model: nn.Module, name: str, max_channels: int = 64) -> nn.Module:
    """Swap the convs of every QAIRN in model: "triton" (fuse_convs: Triton on CUDA, the reference
    on other devices) or "reference" (plain torch). Call it before torch.compile."""
    if name not in ("triton", "reference"):
        raise ValueError(f"unknown conv backend {name!r}; choose 'triton' or 'reference'")
    if name == "triton" and not HAS_TRITON:
        raise RuntimeError("conv backend 'triton' needs the triton package (pip install qairn[triton])")
    qairns = [module for module in model.modules() if isinstance(module, QAIRN)]
    if not qairns:
        raise ValueError("no QAIRN module found in model")
    for q in qairns:
        fuse_convs(q, max_channels) if name == "triton" else unfuse_convs(q)
    return model


def fused_conv_count(model: nn.Module) -> int:
    """How many convs run through the fused op (a ResBlock counts its two)."""
    return sum(
        2 if type(m) is FusedResBlock else 1 if type(m) is FusedConv3x3 else 0 for m in model.modules()
    )
