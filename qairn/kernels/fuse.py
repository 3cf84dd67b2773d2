"""Model surgery: run QAIRN's thin convolutions on the fused Triton kernels.

Modules keep their parameters and state_dict keys: only their class changes, to a subclass whose
forward calls the fused ops (qairn/kernels/conv.py, conv_transpose.py), so weights load and save as
before and unfuse_convs restores the base classes. At most max_channels wide, fuse_convs turns
- a ResBlock into two calls: relu(conv1(x)), then conv2(.) + x;
- an RQAttention's logit into six: each conv with its ReLU, each transposed conv with its ReLU and
  its skip add (the autoencoder's d1 = relu(up2(e2)) + e1);
- every other Conv2d (square kernel up to 3, stride 1 or 2, zero padding) and 2x2 stride-2
  ConvTranspose2d into one call each.
Wider layers stay on cuDNN, which handles them well (the whole trunk's matmul shapes are its ground).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from qairn.kernels.conv import HAS_TRITON, KERNEL_SIZES, STRIDES, conv_op, conv_reference
from qairn.kernels.conv_transpose import conv_transpose_op, conv_transpose_reference
from qairn.kernels.gate import qairns_in
from qairn.model import ResBlock, RQAttention

DEFAULT_MAX_CHANNELS = 64


def op_computes_conv(m: nn.Conv2d) -> bool:
    """Whether qairn::conv2d computes m: it takes one stride and one padding for both sides, zero
    padding, no dilation or groups (any kernel: where the Triton kernel is not built, the reference)."""
    return (
        isinstance(m.padding, tuple)  # padding="same" is a str
        and m.stride[0] == m.stride[1]
        and m.padding[0] == m.padding[1]
        and m.dilation == (1, 1)
        and m.groups == 1
        and m.padding_mode == "zeros"
    )


def op_computes_conv_transpose(m: nn.ConvTranspose2d) -> bool:
    """Whether qairn::conv_transpose2x2 computes m: stride 2, nothing else (any kernel: the reference)."""
    return (
        m.stride == (2, 2)
        and m.padding == (0, 0)
        and m.output_padding == (0, 0)
        and m.dilation == (1, 1)
        and m.groups == 1
        and m.padding_mode == "zeros"
    )


def conv_args(m: nn.Conv2d) -> tuple[int, int]:
    """m's (stride, padding) for the op. A conv it cannot compute is refused: it would get another."""
    if not op_computes_conv(m):
        raise ValueError(
            f"the fused conv op cannot compute {m}: it takes one stride and padding for both sides, "
            "zero padding, no dilation or groups"
        )
    return m.stride[0], m.padding[0]


def check_conv_transpose(m: nn.ConvTranspose2d) -> None:
    if not op_computes_conv_transpose(m):
        raise ValueError(
            f"the fused transposed conv op cannot compute {m}: it takes stride 2 and nothing else"
        )


class FusedConv2d(nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes: the op's fake and kernel want N
            return self.forward(x[None])[0]
        return conv_op(x, self.weight, self.bias, *conv_args(self), False, None, None)


class FusedConvTranspose2d(nn.ConvTranspose2d):
    def forward(self, x: Tensor, output_size=None) -> Tensor:
        # output_size may ask for 2H+1 x 2W+1 (an implied output_padding); the op makes 2H x 2W only.
        if output_size is not None:
            return super().forward(x, output_size)
        if x.dim() == 3:  # unbatched (C, H, W), as nn.ConvTranspose2d takes
            return self.forward(x[None])[0]
        check_conv_transpose(self)
        return conv_transpose_op(x, self.weight, self.bias, False, None)


class FusedResBlock(ResBlock):
    """ResBlock in two fused calls: h = relu(conv1(x)); out = conv2(h) + x."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # unbatched (C, H, W), as ResBlock's nn.Conv2d take
            return self.forward(x[None])[0]
        h = conv_op(x, self.conv1.weight, self.conv1.bias, *conv_args(self.conv1), True, None, None)
        return conv_op(h, self.conv2.weight, self.conv2.bias, *conv_args(self.conv2), False, x, None)


class FusedRQAttention(RQAttention):
    """RQAttention whose logit runs in six fused calls: ReLUs and skip adds in the epilogues, and the
    input conv reading skip and dec as the two halves of its input (no concatenated copy)."""

    def logit(self, skip: Tensor, dec: Tensor) -> Tensor:
        def c(x, m, relu, x2=None):
            return conv_op(x, m.weight, m.bias, *conv_args(m), relu, None, x2)

        def up(x, m, skip):
            check_conv_transpose(m)
            return conv_transpose_op(x, m.weight, m.bias, True, skip)

        e0 = c(skip, self.inp, True, dec)
        e1 = c(e0, self.down1, True)
        e2 = c(e1, self.down2, True)
        d1 = up(e2, self.up2, e1)
        d0 = up(d1, self.up1, e0)
        return c(d0, self.out, False)


def _narrow(m: nn.Module, max_channels: int) -> bool:
    return max(m.in_channels, m.out_channels) <= max_channels


def fusable_conv(m: nn.Module, max_channels: int) -> bool:
    """The op computes m and on CUDA runs it on the Triton kernel."""
    if type(m) is not nn.Conv2d or not op_computes_conv(m):
        return False
    k, k2 = m.kernel_size
    return _narrow(m, max_channels) and k == k2 and k in KERNEL_SIZES and m.stride[0] in STRIDES


def fusable_conv_transpose(m: nn.Module, max_channels: int) -> bool:
    return (
        type(m) is nn.ConvTranspose2d
        and op_computes_conv_transpose(m)
        and _narrow(m, max_channels)
        and m.kernel_size == (2, 2)
    )


def fuse_convs(module: nn.Module, max_channels: int = DEFAULT_MAX_CHANNELS) -> nn.Module:
    """Put module's convs at most max_channels wide on the fused ops (see the module doc). In place.
    A second call starts from the plain modules: the same model fused twice, or at another width, is
    fused as once."""
    unfuse_convs(module)
    inside = set()  # convs of fused blocks: the block's forward reads their weights
    for m in module.modules():
        if id(m) in inside:
            continue
        if type(m) is ResBlock and all(fusable_conv(c, max_channels) for c in (m.conv1, m.conv2)):
            m.__class__ = FusedResBlock
            inside |= {id(c) for c in m.children()}
        elif type(m) is RQAttention and all(
            fusable_conv(c, max_channels) or fusable_conv_transpose(c, max_channels) for c in m.children()
        ):
            m.__class__ = FusedRQAttention
            inside |= {id(c) for c in m.children()}
        elif fusable_conv(m, max_channels):
            m.__class__ = FusedConv2d
        elif fusable_conv_transpose(m, max_channels):
            m.__class__ = FusedConvTranspose2d
    return module


UNFUSED = {
    FusedConv2d: nn.Conv2d,
    FusedConvTranspose2d: nn.ConvTranspose2d,
    FusedResBlock: ResBlock,
    FusedRQAttention: RQAttention,
}


def unfuse_convs(module: nn.Module) -> nn.Module:
    """Undo fuse_convs: the plain torch modules again."""
    for m in module.modules():
        if type(m) in UNFUSED:
            m.__class__ = UNFUSED[type(m)]
    return module


def use_conv_backend(model: nn.Module, name: str, max_channels: int = DEFAULT_MAX_CHANNELS) -> nn.Module:
    """Swap the convs of every QAIRN in model: "triton" (fuse_convs: Triton on CUDA, the reference
    on other devices) or "reference" (plain torch). Call it before torch.compile."""
    if name not in ("triton", "reference"):
        raise ValueError(f"unknown conv backend {name!r}; choose 'triton' or 'reference'")
    if name == "triton" and not HAS_TRITON:
        raise RuntimeError("conv backend 'triton' needs the triton package (pip install qairn[triton])")
    for q in qairns_in(model):
        fuse_convs(q, max_channels) if name == "triton" else unfuse_convs(q)
    return model


CALLS = {FusedConv2d: 1, FusedConvTranspose2d: 1, FusedResBlock: 2, FusedRQAttention: 6}


def fused_conv_count(model: nn.Module) -> int:
    """How many conv calls run on the fused ops (a ResBlock counts two, an RQAttention six)."""
    return sum(CALLS.get(type(m), 0) for m in model.modules())


def decompositions() -> dict:
    """{op: decomposition}, for ExportedProgram.run_decompositions before other exporters."""
    return {
        torch.ops.qairn.conv2d.default: conv_reference,
        torch.ops.qairn.conv_transpose2x2.default: conv_transpose_reference,
    }
