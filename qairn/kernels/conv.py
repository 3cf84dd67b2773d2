"""Fused convolution for thin layers: bias, ReLU and a residual add in the same pass.

    out = conv2d(x, weight, bias, stride, padding)     (square k x k kernel, k <= 3, stride 1 or 2)
    x may come in two parts, x and x2, concatenated along channels without being materialised
    (RQAttention's input conv reads the skip and the decoder features this way)
    out = relu(out)            if relu
    out = out + residual       if residual is given      (a ResBlock: x + conv2(relu(conv1(x))))

Why: cuDNN runs the small model's 16- and 32-channel convs far below the memory floor (H200,
2026-11-27: a 16->16 3x3 conv at 36 TFLOP/s and about 0.5 TB/s, an eighth of the copy bandwidth),
and every ReLU and residual add is one more pass over memory. This kernel is an implicit GEMM: a
program owns BLOCK_M output pixels of one image and BLOCK_N output channels and accumulates the
taps' [BLOCK_M, Cin] x [Cin, BLOCK_N] products with tl.dot (tensor cores) in fp32. Each input pixel
comes from DRAM about once (the taps overlap in L1/L2) and the output is written once, with the ReLU
and the residual applied before the store: a ResBlock is two kernels instead of four.

Read top to bottom: reference, kernel, launcher, the torch.library op (Triton on CUDA, the reference
elsewhere; autograd by recomputing the reference; ONNX decomposition). qairn/kernels/fuse.py puts it
into the model. Inference is the point (the engine runs under inference_mode); the backward exists
so that a model with the kernel swapped in still trains.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from qairn.kernels.gate import check_interpreter, in_layout, on_device, triton_compiles_for

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # the reference path needs no Triton
    triton = None

HAS_TRITON = triton is not None
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_SIZES, STRIDES = (1, 2, 3), (1, 2)  # what the kernel is built and tested for


# ---------------------------------------------------------------------------------------------------
# Reference (plain torch). Traceable: it is also the op's decomposition for ONNX export.
# ---------------------------------------------------------------------------------------------------


def conv_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int = 1,
    padding: int = 1,
    relu: bool = False,
    residual: Tensor | None = None,
    x2: Tensor | None = None,
) -> Tensor:
    if x2 is not None:
        x = torch.cat([x, x2], dim=1)
    return epilogue_reference(F.conv2d(x, weight, bias, stride=stride, padding=padding), relu, residual)


def epilogue_reference(out: Tensor, relu: bool, residual: Tensor | None) -> Tensor:
    """What the kernels do before their store: ReLU, then the residual add."""
    if relu:
        out = F.relu(out)
    return out if residual is None else out + residual


def out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


def out_hw(x: Tensor, kh: int, kw: int, stride: int, padding: int) -> tuple[int, int]:
    """(H_out, W_out) of x's conv. Refuses what F.conv2d refuses, on every path alike: the op's fake
    divided by a stride of 0, and sized a negative padding's crop, for a run that then failed."""
    h, w = x.shape[-2:]
    if stride < 1 or padding < 0 or h + 2 * padding < kh or w + 2 * padding < kw:
        raise ValueError(
            f"x {tuple(x.shape)}, {kh}x{kw} kernel, stride {stride}, padding {padding}: the fused conv takes "
            "stride >= 1, padding >= 0 and an input at least as large as its kernel once padded"
        )
    return out_size(h, kh, stride, padding), out_size(w, kw, stride, padding)


# ---------------------------------------------------------------------------------------------------
# Triton kernel. Output pixels are the flattened (H_OUT, W_OUT) index of one image; every tensor is
# addressed with its own (n, c, h, w) strides, so channels_last (the fast case: a pixel's channels
# are one contiguous row of the GEMM's A tile) and NCHW both work.
# ---------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _program_tile(H, W, COUT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """(image, row and column of BLOCK_M pixels of an H x W grid, their mask, BLOCK_N output
        channels, their mask) of this program. Images and pixel blocks share grid axis 0: CUDA caps
        axes 1 and 2 at 65535 (a batch of 70000 patches); output-channel blocks, few, take axis 1.
        The image index is int64: batch offsets of a 4K tile batch pass 2**31 elements."""
        num_m = tl.cdiv(H * W, BLOCK_M)
        pid = tl.program_id(0)
        n = pid // num_m
        offs_m = (pid - n * num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        y = offs_m // W
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        return n.to(tl.int64), y, offs_m - y * W, offs_m < H * W, offs_n, offs_n < COUT

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        if UPCAST:  # the interpreter's tl.dot misreads bf16 (triton 3.9): fp32 products there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:  # fp32 inputs: exact products, as the reference (no TF32 rounding)
            return acc + tl.dot(a, b, input_precision="ieee")
        return acc + tl.dot(a, b)

    @triton.jit
    def _epilogue(
        acc, b_ptr, res_ptr, out_ptr, n, oy, ox, offs_n, mask_m, mask_n,
        s_rn, s_rc, s_rh, s_rw, s_on, s_oc, s_oh, s_ow,
        HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_RES: tl.constexpr,
    ):  # fmt: skip
        """bias, ReLU, residual, store: shared with conv_transpose.py."""
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if RELU:  # NaN stays NaN, as F.relu (tl.maximum's default returns 0 for it)
            acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
        mask = mask_m[:, None] & mask_n[None, :]
        if HAS_RES:
            r_ptrs = res_ptr + n * s_rn + (oy * s_rh + ox * s_rw)[:, None] + offs_n[None, :] * s_rc
            acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        o_ptrs = out_ptr + n * s_on + (oy * s_oh + ox * s_ow)[:, None] + offs_n[None, :] * s_oc
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _conv_kernel(
        x_ptr, x2_ptr, w_ptr, b_ptr, res_ptr, out_ptr,
        H, W, H_OUT, W_OUT, CIN, CIN2, COUT,
        s_xn, s_xc, s_xh, s_xw,
        s_x2n, s_x2c, s_x2h, s_x2w,
        s_wo, s_wi, s_wh, s_ww,
        s_rn, s_rc, s_rh, s_rw,
        s_on, s_oc, s_oh, s_ow,
        KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_RES: tl.constexpr, HAS_X2: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        n, oy, ox, mask_m, offs_n, mask_n = _program_tile(H_OUT, W_OUT, COUT, BLOCK_M, BLOCK_N)

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        x_img = x_ptr + n * s_xn
        x2_img = x2_ptr + n * s_x2n
        for tap in tl.static_range(KSIZE * KSIZE):
            ky = tap // KSIZE
            kx = tap % KSIZE
            iy = oy * STRIDE + (ky - PAD)
            ix = ox * STRIDE + (kx - PAD)
            valid = mask_m & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)  # zero padding
            w_tap = w_ptr + offs_n[None, :] * s_wo + ky * s_wh + kx * s_ww
            for k0 in range(0, CIN, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < CIN
                a_ptrs = x_img + (iy * s_xh + ix * s_xw)[:, None] + offs_k[None, :] * s_xc
                a = tl.load(a_ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0)
                b = tl.load(w_tap + offs_k[:, None] * s_wi, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc = _dot(a, b, acc, IEEE, UPCAST)
            if HAS_X2:  # the second part's channels follow the first's in the weight
                for k0 in range(0, CIN2, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    mask_k = offs_k < CIN2
                    a_ptrs = x2_img + (iy * s_x2h + ix * s_x2w)[:, None] + offs_k[None, :] * s_x2c
                    a = tl.load(a_ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0)
                    w_ptrs = w_tap + (CIN + offs_k[:, None]) * s_wi
                    b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                    acc = _dot(a, b, acc, IEEE, UPCAST)

        _epilogue(
            acc, b_ptr, res_ptr, out_ptr, n, oy, ox, offs_n, mask_m, mask_n,
            s_rn, s_rc, s_rh, s_rw, s_on, s_oc, s_oh, s_ow, HAS_BIAS, RELU, HAS_RES,
        )  # fmt: skip


# triton.jit picks the interpreter when the decorator runs, i.e. when this module is imported.
INTERPRETED = HAS_TRITON and isinstance(_conv_kernel, InterpretedFunction)


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


def candidate_configs(cin: int, cout: int) -> list[tuple[int, int, int, int]]:
    """tile_config first, then other pixel counts per program and warp counts (same N and K tiles)."""
    block_m, block_n, block_k, warps = tile_config(cin, cout)
    others = [
        (64, block_n, block_k, 4),
        (128, block_n, block_k, 4),
        (128, block_n, block_k, 8),
        (256, block_n, block_k, 8),
    ]
    return list(dict.fromkeys([(block_m, block_n, block_k, warps), *others]))


# On CUDA the first call of each layer shape times the candidate tilings and keeps the fastest
# (QAIRN_CONV_TUNE=0 keeps tile_config). Not under CUDA-graph capture, where nothing may sync:
# torch.compile's CUDA graphs run their warm-up calls eagerly first, and those tune.
_tuned: dict = {}


def tuning() -> bool:
    return os.environ.get("QAIRN_CONV_TUNE", "1") != "0"


def cuda_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def pick_fastest(configs, launch, repeats: int = 5, timer=cuda_ms):
    """The config whose launch(config) has the lowest median time (timer(fn) -> ms)."""
    best, best_ms = configs[0], float("inf")
    for config in configs:
        try:
            launch(config)  # compiles; a tiling the device cannot run raises here
            times = sorted(timer(lambda c=config: launch(c)) for _ in range(repeats))
        except Exception:  # noqa: BLE001 - out of shared memory or registers: not a candidate
            continue
        median = times[len(times) // 2]
        if median < best_ms:
            best, best_ms = config, median
    return best


def choose_config(key: tuple, x: Tensor, cin: int, cout: int, launch):
    if not (x.is_cuda and tuning()) or torch.cuda.is_current_stream_capturing():
        return _tuned.get(key, tile_config(cin, cout))
    if key not in _tuned:
        _tuned[key] = pick_fastest(candidate_configs(cin, cout), launch)
    return _tuned[key]


def check_runnable(x: Tensor, weight: Tensor, what: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"the Triton {what} needs the triton package (pip install qairn[triton])")
    if not x.is_cuda and not INTERPRETED:
        raise RuntimeError("Triton runs on CPU tensors only with TRITON_INTERPRET=1 set before import")
    check_interpreter()
    if x.dtype not in TRITON_DTYPES or weight.dtype != x.dtype:
        raise TypeError(
            f"the Triton {what} takes x and weight of one of {', '.join(map(str, TRITON_DTYPES))}, "
            f"got {x.dtype}, {weight.dtype}"
        )


def check_batched(x: Tensor, weight: Tensor, what: str) -> None:
    """The ops' fakes and launchers unpack (N, C, H, W), and x2 joins x along dim 1: an unbatched x
    is refused on every path alike (the fused modules add the batch dimension, as torch's do). So is an
    image of no pixels, which F.conv2d and F.conv_transpose2d refuse (the launchers and fakes sized it),
    and a weight of no input or output channels (its dims 0 and 1 in both ops): F.conv2d gave (N, 0, H, W)
    for no input channels where the fake says (N, Cout, H, W), and both refuse the rest."""
    if x.dim() != 4:
        raise ValueError(f"the fused {what} takes a 4-d (N, C, H, W) x, got {tuple(x.shape)}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"the fused {what} takes an image of at least one pixel, got x {tuple(x.shape)}")
    if 0 in weight.shape[:2]:
        raise ValueError(
            f"the fused {what} takes a weight of at least one input and one output channel, "
            f"got weight {tuple(weight.shape)}"
        )


def check_epilogue(out_shape, bias: Tensor | None, residual: Tensor | None, biggest: int) -> Tensor | None:
    """Returns the residual expanded to out_shape: one that broadcasts to it (a (1,C,1,1) shift), as
    the reference's out + residual takes, is read through stride 0."""
    if bias is not None and bias.shape != (out_shape[1],):
        raise ValueError(f"bias must be ({out_shape[1]},), got {tuple(bias.shape)}")
    if residual is not None:
        try:
            residual = residual.expand(out_shape)
        except RuntimeError:
            raise ValueError(
                f"residual must broadcast to {tuple(out_shape)}, got {tuple(residual.shape)}"
            ) from None
    # Offsets inside one image are int32 in the kernels (the batch offset is int64).
    if biggest >= 2**31:
        raise ValueError(f"one image of {biggest} elements is too large for the Triton kernels")
    return residual


def addressable(t: Tensor | None) -> Tensor | None:
    """t, or a dense copy of it where a view reaches 2**31 or more elements from its image's start
    (a crop of a larger frame): offsets inside one image are int32 in the kernels, and it is a view's
    strides, not check_epilogue's dense sizes, that they multiply."""
    if t is None:
        return None
    reach = sum(max(size - 1, 0) * stride for size, stride in zip(t.shape[1:], t.stride()[1:]))
    return t.contiguous() if reach >= 2**31 else t


def empty_like_layout(x: Tensor, shape) -> Tensor:
    """A new (N,C,H,W) tensor in x's memory format: channels_last in, channels_last out."""
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def conv_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int = 1,
    padding: int = 1,
    relu: bool = False,
    residual: Tensor | None = None,
    x2: Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> Tensor:
    """The fused conv of x, or of x and x2 concatenated along channels; out has x's memory format.
    config = (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) overrides the tuned tiling (benchmarks, tests)."""
    check_runnable(x, weight, "conv")
    check_batched(x, weight, "conv")
    if bias is not None and bias.dtype != x.dtype:  # as F.conv2d (the kernel would add it in fp32)
        raise TypeError(f"the Triton conv takes a bias of x's dtype {x.dtype}, got {bias.dtype}")
    n, cin, h, w = x.shape
    cin2 = 0
    if x2 is not None:
        if x2.dim() != 4 or x2.shape[0] != n or x2.shape[2:] != x.shape[2:] or x2.dtype != x.dtype:
            raise ValueError(
                f"x2 must be (N, C2, H, W) like x {tuple(x.shape)} in {x.dtype}, got {tuple(x2.shape)}"
            )
        cin2 = x2.shape[1]
    cout, k = weight.shape[0], weight.shape[-1]
    if weight.shape[1:] != (cin + cin2, k, k) or k not in KERNEL_SIZES or stride not in STRIDES:
        raise ValueError(
            f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, stride {stride}: the Triton conv takes "
            f"(Cout, {cin + cin2}, k, k) weights, k in {KERNEL_SIZES}, stride in {STRIDES}"
        )
    ho, wo = out_hw(x, k, k, stride, padding)  # else the kernel would crop, or write nothing
    residual = check_epilogue((n, cout, ho, wo), bias, residual, max(max(cin, cin2) * h * w, cout * ho * wo))
    out = empty_like_layout(x, (n, cout, ho, wo))
    x, x2, residual = addressable(x), addressable(x2), addressable(residual)  # after out: x's layout
    res = residual if residual is not None else out  # never read without HAS_RES
    bias_arg = bias.contiguous() if bias is not None else weight  # read as b_ptr + channel
    second = x2 if x2 is not None else x  # never read without HAS_X2
    upcast = INTERPRETED and x.dtype == torch.bfloat16

    def launch(cfg):
        block_m, block_n, block_k, num_warps = cfg
        grid = (triton.cdiv(ho * wo, block_m) * n, triton.cdiv(cout, block_n))
        _conv_kernel[grid](
            x, second, weight, bias_arg, res, out,
            h, w, ho, wo, cin, cin2, cout,
            *x.stride(), *second.stride(), *weight.stride(), *res.stride(), *out.stride(),
            KSIZE=k, STRIDE=stride, PAD=padding,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            HAS_BIAS=bias is not None, RELU=relu, HAS_RES=residual is not None, HAS_X2=x2 is not None,
            IEEE=x.dtype == torch.float32 or upcast, UPCAST=upcast,
            num_warps=num_warps,
        )  # fmt: skip

    # Tuned once per layer shape and layout (the epilogue flags barely change the time).
    key = ("conv", x.device, x.dtype, n, cin, cin2, cout, h, w, k, stride, padding, x.stride(), out.stride())
    with on_device(x):  # x's GPU, for the launches and the tuning's events and capture check alike
        launch(config or choose_config(key, x, max(cin, cin2), cout, launch))
    return out


# ---------------------------------------------------------------------------------------------------
# torch.library op: one node for torch.compile and torch.export. CUDA runs the Triton launcher;
# every other device (and fp64) runs the reference.
# ---------------------------------------------------------------------------------------------------


def _conv_impl(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: int,
    padding: int,
    relu: bool,
    residual: Tensor | None,
    x2: Tensor | None,
) -> Tensor:
    check_batched(x, weight, "conv")
    out_hw(x, *weight.shape[-2:], stride, padding)
    out = conv_reference(x, weight, bias, stride, padding, relu, residual, x2)
    return as_promised(out, _conv_fake(x, weight, bias, stride, padding, relu, residual, x2), residual)


def _conv_fake(x, weight, bias, stride, padding, relu, residual, x2):
    # The reference takes any kernel (a 3x1 one too): each side has its own kernel size.
    check_batched(x, weight, "conv")
    return empty_like_layout(
        x, (x.shape[0], weight.shape[0], *out_hw(x, *weight.shape[-2:], stride, padding))
    )


def as_promised(out: Tensor, promised: Tensor, residual: Tensor | None) -> Tensor:
    """The reference's out as the fake promised it: its layout and dtype (x's). out + residual also
    broadcasts out to a larger residual ((2, C, H, W) on one image's conv), which the fake and the
    Triton launchers do not: refused."""
    if out.shape != promised.shape:
        raise ValueError(f"residual must broadcast to {tuple(promised.shape)}, got {tuple(residual.shape)}")
    return in_layout(out, promised)


conv_op = torch.library.custom_op("qairn::conv2d", _conv_impl, mutates_args=())
conv_op.register_fake(_conv_fake)


def triton_takes(x: Tensor, weight: Tensor, *others: Tensor | None) -> bool:
    """others: the bias, residual and x2, whose loads compile for their own dtypes (bf16: Ampere)."""
    return (
        HAS_TRITON
        and x.dtype in TRITON_DTYPES
        and weight.dtype == x.dtype
        and all(triton_compiles_for(t.device, t.dtype) for t in (x, *others) if t is not None)
    )


def kernel_geometry(weight: Tensor, stride: int) -> bool:
    """Whether the Triton conv is built for this kernel and stride (the reference takes any)."""
    kh, kw = weight.shape[-2:]
    return kh == kw and kh in KERNEL_SIZES and stride in STRIDES


if HAS_TRITON:

    @conv_op.register_kernel("cuda")
    def _(x, weight, bias, stride, padding, relu, residual, x2):
        if (
            not triton_takes(x, weight, bias, residual, x2)
            or (x2 is not None and x2.dtype != x.dtype)
            or (bias is not None and bias.dtype != x.dtype)  # the reference refuses it, as on the CPU
            or not kernel_geometry(weight, stride)
        ):
            return _conv_impl(x, weight, bias, stride, padding, relu, residual, x2)
        return conv_triton(x, weight, bias, stride, padding, relu, residual, x2)


def recompute_backward(reference, tensors: dict, grad_out: Tensor, has_residual: bool, **kwargs) -> dict:
    """Gradients of the tensors (a name -> tensor or None dict of the reference's arguments) by
    differentiating the reference forward again: training with the kernels swapped in is correct, if
    not fused. The residual is added last, so its gradient is grad_out itself."""
    with torch.enable_grad():
        leaves = {k: t.detach().requires_grad_() for k, t in tensors.items() if t is not None}
        out = reference(**{k: leaves.get(k) for k in tensors}, **kwargs)
        grads = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), grad_out), strict=True))
    return {k: grads.get(k) for k in tensors} | {"residual": grad_out if has_residual else None}


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, relu, residual, x2 = inputs
    ctx.save_for_backward(x, weight, bias, x2)
    ctx.stride, ctx.padding, ctx.relu, ctx.has_residual = stride, padding, relu, residual is not None


def _backward(ctx, grad_out):
    x, weight, bias, x2 = ctx.saved_tensors
    g = recompute_backward(
        conv_reference, dict(x=x, weight=weight, bias=bias, x2=x2), grad_out, ctx.has_residual,
        stride=ctx.stride, padding=ctx.padding, relu=ctx.relu,
    )  # fmt: skip
    return g["x"], g["weight"], g["bias"], None, None, None, g["residual"], g["x2"]


conv_op.register_autograd(_backward, setup_context=_setup_context)


def autocast_inputs(*tensors: Tensor | None) -> tuple:
    """The tensors as torch.autocast casts a conv's inputs: floating-point ones but fp64 to its dtype."""
    dtype = torch.get_autocast_dtype(tensors[0].device.type)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def without_autocast(run, x: Tensor, residual: Tensor | None) -> Tensor:
    """run(residual) with autocast off, x being run's cast input: a residual wider than x is not passed
    to the op but added after it, so that out + residual promotes as the reference's does."""
    with torch.autocast(x.device.type, enabled=False):
        if residual is None or residual.dtype == x.dtype:
            return run(residual)
        return run(None) + residual


def _conv_autocast(x, weight, bias, stride, padding, relu, residual, x2):
    """The op under torch.autocast, as its reference runs there: the conv in the autocast dtype (the
    op alone kept fp32 in fp32: a fused model's gammas came out fp32, and CUDA ran the fp32 kernel),
    then out + residual promoting."""
    x, weight, bias, x2 = autocast_inputs(x, weight, bias, x2)
    return without_autocast(lambda res: conv_op(x, weight, bias, stride, padding, relu, res, x2), x, residual)


# torch.library.register_autocast casts to one dtype fixed at registration, not the caller's autocast
# dtype: the kernels go in by dispatch key instead. The library object must live as long as they do.
autocast_lib = torch.library.Library("qairn", "FRAGMENT")
AUTOCAST_KEYS = ("AutocastCPU", "AutocastCUDA")
for key in AUTOCAST_KEYS:
    autocast_lib.impl("conv2d", _conv_autocast, key)

# torch.onnx.export (dynamo) decomposes ops listed in torch._decomp's table: standard ONNX Conv/Relu/Add.
torch._decomp.register_decomposition(torch.ops.qairn.conv2d.default)(conv_reference)


def conv(
    x, weight, bias=None, stride: int = 1, padding: int = 1, relu: bool = False, residual=None, x2=None
) -> Tensor:
    """The fused op (Triton on CUDA, the reference elsewhere), differentiable."""
    return conv_op(x, weight, bias, stride, padding, relu, residual, x2)
