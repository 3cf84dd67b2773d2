"""Fused RQAttention merge: sigmoid gate, gated blend over all channels, Minkowski pooling sums.

For logit (N,1,H,W) and skip, dec (N,C,H,W), one pass over memory computes

    gamma = sigmoid(logit)
    out   = gamma * skip + (1 - gamma) * dec                  (paper eq. 1)
    pool_sum[n]   = sum of gamma**p * 2**POOL_SCALE_LOG2 over image n's core box   (fp32)
    pool_count[n] = number of pixels in that box                                 (int64)

so the quality score Q = (pool_sum / pool_count) ** (1/p) / 2**(POOL_SCALE_LOG2 / p)
(`minkowski_from_sums`) costs no extra read of gamma. Why the scale: fp32 ends at 2**-149, so at the
shipped p = 64 a bare gamma**p is 0 for every gate below 0.2 (and loses digits below 0.25), and an
image whose gates all sit there would score Q = 0. Scaled by 2**96, gates down to 0.09 stay in
fp32's normal range at p = 64 (0.0002 at p = 16), and a sum stays finite below 2**32 pixels. The
price: exp2 of an argument near 96 rounds each term to about 5e-6, so Q carries about 1e-6 relative
error at p = 2 (it was 1e-7) and 2e-5 at p = 0.1; negligible next to the gate's own. A core box
is (y0, y1, x0, x1), half-open, one per image: the tiled engine pools each tile's core only, and the
sums and counts of all tiles of an image add up to the whole image's.

Read top to bottom: plain-torch reference, Triton kernels and their launchers, the torch.library
ops (Triton on CUDA, the reference elsewhere; autograd; ONNX decomposition), the public helpers.
Triton is optional: without it everything here runs on the reference.

Triton runs on CPU tensors only under the interpreter: TRITON_INTERPRET=1 must be set before this
module is imported. Triton itself is imported on the first launch (load_triton), not here. Powers
are taken as exp2(p * log2(x)), which compiles and interprets alike.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import re
import threading

import torch
from torch import Tensor

HAS_TRITON = importlib.util.find_spec("triton") is not None  # the reference path needs no Triton
INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
POOL_SCALE_LOG2 = 96.0  # pool sums are of gamma**p * 2**96 (module doc)
# Terms underflow for gates below 2**(-222/p) even scaled: 0.09 at p = 64, 0.30 at 128, 0.74 at 500.
# Past 128 a map of middling gates would pool to Q = 0: the engine refuses such p.
MAX_POOL_P = 128.0
_POOL_SCALE_LN = POOL_SCALE_LOG2 * math.log(2.0)


# ---------------------------------------------------------------------------------------------------
# Reference (plain torch). Traceable: it is also the op's decomposition for ONNX export.
# ---------------------------------------------------------------------------------------------------


def core_mask(cores: Tensor | None, n: int, h: int, w: int, device) -> Tensor | None:
    """(N,1,H,W) bool mask of each image's core box (y0, y1, x0, x1); None means the whole image."""
    if cores is None:
        return None
    ys = torch.arange(h, device=device).view(1, 1, h, 1)
    xs = torch.arange(w, device=device).view(1, 1, 1, w)
    y0, y1, x0, x1 = cores.to(device).view(n, 4, 1, 1, 1).unbind(1)
    return (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)


def scaled_pow(gamma: Tensor, p: float) -> Tensor:
    """gamma**p * 2**POOL_SCALE_LOG2 as one exponential, so nothing underflows before the scale
    applies. Natural exp and log, not the kernels' exp2 and log2: ONNX has no Exp2 (the TorchScript
    exporter refuses aten::exp2). A gate of exactly 0 (sigmoid saturates at logit -17 in fp16) gives 0
    with gradient 0: log(0) is kept out of the graph, whose backward would be 0 * inf = NaN. A NaN gate
    stays NaN, as in the kernels (a `gamma > 0` test pooled it as 0: a score from a broken map)."""
    zero = gamma == 0
    safe = torch.where(zero, torch.ones_like(gamma), gamma)
    return torch.where(zero, torch.zeros_like(gamma), torch.exp(p * torch.log(safe) + _POOL_SCALE_LN))


def pool_reference(gamma: Tensor, p: float, cores: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-image (scaled sum of gamma**p, pixel count) over the core boxes; sums in fp32 (fp64 for
    fp64)."""
    n, _, h, w = gamma.shape
    gp = scaled_pow(gamma.to(torch.promote_types(gamma.dtype, torch.float32)), p)
    mask = core_mask(cores, n, h, w, gamma.device)
    if mask is None:
        return gp.sum(dim=(1, 2, 3)), torch.full((n,), h * w, dtype=torch.int64, device=gamma.device)
    pool_sum = torch.where(mask, gp, torch.zeros_like(gp)).sum(dim=(1, 2, 3))
    return pool_sum, mask.sum(dim=(1, 2, 3))


def _pool_gamma(logit: Tensor, gamma: Tensor) -> Tensor:
    """The gate to pool, in fp32 (fp64 for fp64): pooled like the kernel, from the unrounded gate."""
    compute = torch.promote_types(logit.dtype, torch.float32)
    return gamma if gamma.dtype == compute else torch.sigmoid(logit.to(compute))


def gated_blend_reference(logit: Tensor, skip: Tensor, dec: Tensor, p: float | None = None, cores=None):
    """gamma = sigmoid(logit); out = gamma*skip + (1-gamma)*dec, in the inputs' dtype.

    Returns (out, gamma); with p, returns (out, gamma, pool_sum, pool_count) (see the module doc).
    """
    gamma = torch.sigmoid(logit)
    out = dec + gamma * (skip - dec)
    if p is None:
        return out, gamma
    return out, gamma, *pool_reference(_pool_gamma(logit, gamma), p, as_cores(cores, logit))


def gated_blend_backward_reference(grad_out, grad_gamma, grad_pool_sum, logit, skip, dec, p, cores):
    """Gradients (logit, skip, dec) of gated_blend; None grads count as zero.

    With g = sigmoid(logit): d out/d skip = g, d out/d dec = 1-g, d g/d logit = g(1-g), and
    d (g**p)/d logit = p g**p (1-g), which needs neither g**(p-1) nor a division at g = 0 (g**p
    scaled as the sums are: grad_pool_sum is the gradient of the scaled sum).
    """
    compute = torch.promote_types(logit.dtype, torch.float32)
    g = torch.sigmoid(logit.to(compute))
    if grad_out is None:
        grad_out = torch.zeros_like(skip)
    go = grad_out.to(compute)
    grad_skip = (go * g).to(skip.dtype)
    grad_dec = (go * (1 - g)).to(dec.dtype)
    grad_gamma_total = (go * (skip.to(compute) - dec.to(compute))).sum(dim=1, keepdim=True)
    if grad_gamma is not None:
        grad_gamma_total = grad_gamma_total + grad_gamma.to(compute)
    grad_logit = grad_gamma_total * g * (1 - g)
    if grad_pool_sum is not None:
        n, _, h, w = logit.shape
        d_pool = grad_pool_sum.to(compute).view(n, 1, 1, 1) * p * scaled_pow(g, p) * (1 - g)
        mask = core_mask(cores, n, h, w, logit.device)
        grad_logit = grad_logit + (d_pool if mask is None else torch.where(mask, d_pool, 0.0))
    return grad_logit.to(logit.dtype), grad_skip, grad_dec


# ---------------------------------------------------------------------------------------------------
# Triton kernels. A program owns BLOCK_P pixels of one image and loops over the channels, so gamma
# is computed once per pixel and logit, skip, dec are each read once and out written once.
# Pixels are the flattened (H,W) index; a tensor's address is n*s_n + c*s_c + pixel*s_p, which
# covers contiguous NCHW (s_p = 1) and channels_last (s_c = 1) alike. HW is passed on its own so
# that Triton's divisible-by-16 specialisation of it lets the masked loads vectorise.
# ---------------------------------------------------------------------------------------------------

# Until load_triton(), the first launch, runs, the kernels are plain functions marked @jit: import
# triton takes 0.3-0.5 s, which `import qairn` would cost every CPU run, and CPU runs launch nothing.
# load_triton then does what a module-level @triton.jit would have done at import.
triton = tl = None  # bound by load_triton
_POOL_SCALE_LOG2 = None  # tl.constexpr(POOL_SCALE_LOG2), made by load_triton
_JIT_FUNCTIONS = {}  # name: the plain function, for load_triton
_load_lock = threading.Lock()


def jit(fn):
    """triton.jit, put off until load_triton."""
    _JIT_FUNCTIONS[fn.__name__] = fn
    return fn


def load_triton() -> None:
    """Imports triton and puts the @jit functions' kernels in their place (interpreted where
    TRITON_INTERPRET=1 was set at import, as the kernels' callers expect). Once; thread-safe: a kernel
    replaced after another compiled against it would fail that one's next launch."""
    global triton, tl, _POOL_SCALE_LOG2
    with _load_lock:
        if tl is not None:
            return
        try:
            import triton
            from triton.runtime.interpreter import InterpretedFunction
        except Exception as e:  # installed but broken (a missing shared library, another torch's build)
            why = str(e).splitlines()[0] if str(e) else ""
            raise ImportError(f"triton is installed but cannot be imported: {type(e).__name__}: {why}") from e

        make_kernel = InterpretedFunction if INTERPRETED else triton.jit
        for name, fn in _JIT_FUNCTIONS.items():
            globals()[name] = make_kernel(fn)
        _POOL_SCALE_LOG2 = triton.language.constexpr(POOL_SCALE_LOG2)
        tl = triton.language


@jit
def _core_box(cores_ptr, n):
    y0 = tl.load(cores_ptr + n * 4 + 0)
    y1 = tl.load(cores_ptr + n * 4 + 1)
    x0 = tl.load(cores_ptr + n * 4 + 2)
    x1 = tl.load(cores_ptr + n * 4 + 3)
    return y0, y1, x0, x1


@jit
def _pixel_offsets(pid_p, BLOCK_P: tl.constexpr, OFFSET: tl.constexpr):
    """Block pid_p's pixel indices, in OFFSET. Cast before the product: pid_p * BLOCK_P in int32
    wraps to negative indices (which pass the `< HW` mask) in an image of 2**31 - BLOCK_P pixels."""
    return pid_p.to(OFFSET) * BLOCK_P + tl.arange(0, BLOCK_P).to(OFFSET)


@jit
def _program_pixels(num_blocks, HW, BLOCK_P: tl.constexpr, OFFSET: tl.constexpr):
    """(image, image in int64, pixel block, its pixel indices, their mask) of this program. One flat
    grid axis (images x pixel blocks): CUDA caps grid axes 1 and 2 at 65535. Batch offsets are int64
    (a 4K tile batch passes 2**31 elements); OFFSET is int32, or int64 where one image does (a whole
    8K frame at 64 channels)."""
    pid = tl.program_id(0)
    n = pid // num_blocks
    pid_p = pid - n * num_blocks
    offs_p = _pixel_offsets(pid_p, BLOCK_P, OFFSET)
    return n, n.to(tl.int64), pid_p, offs_p, offs_p < HW


@jit
def _load_gate(logit_ptr, n64, offs_p, mask_p, s_logit_n, s_logit_p):
    """gamma = sigmoid(logit) of the block's pixels, in fp32."""
    logit = tl.load(logit_ptr + n64 * s_logit_n + offs_p * s_logit_p, mask=mask_p, other=0.0)
    return tl.sigmoid(logit.to(tl.float32))


@jit
def _in_core(offs_p, mask_p, cores_ptr, n, W, HAS_CORES: tl.constexpr):
    if HAS_CORES:
        y0, y1, x0, x1 = _core_box(cores_ptr, n)
        y = offs_p // W
        x = offs_p - y * W
        return mask_p & (y >= y0) & (y < y1) & (x >= x0) & (x < x1)
    else:
        return mask_p


@jit
def _gate_fwd_kernel(
    logit_ptr, skip_ptr, dec_ptr, out_ptr, gamma_ptr, partial_ptr, cores_ptr,
    C, HW, W, p, num_blocks,
    s_logit_n, s_logit_p,
    s_skip_n, s_skip_c, s_skip_p,
    s_dec_n, s_dec_c, s_dec_p,
    s_out_n, s_out_c, s_out_p,
    s_gamma_n, s_gamma_p,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    WRITE_GAMMA: tl.constexpr, POOL: tl.constexpr, HAS_CORES: tl.constexpr, OFFSET: tl.constexpr,
):  # fmt: skip
    n, n64, pid_p, offs_p, mask_p = _program_pixels(num_blocks, HW, BLOCK_P, OFFSET)
    gamma = _load_gate(logit_ptr, n64, offs_p, mask_p, s_logit_n, s_logit_p)
    if WRITE_GAMMA:
        gamma_ptrs = gamma_ptr + n64 * s_gamma_n + offs_p * s_gamma_p
        tl.store(gamma_ptrs, gamma.to(gamma_ptr.dtype.element_ty), mask=mask_p)
    if POOL:
        # One partial per program, summed in a fixed order by _pool_finish_kernel: deterministic.
        gamma_p = tl.exp2(p * tl.log2(gamma) + _POOL_SCALE_LOG2)
        in_core = _in_core(offs_p, mask_p, cores_ptr, n, W, HAS_CORES)
        tl.store(partial_ptr + n * num_blocks + pid_p, tl.sum(tl.where(in_core, gamma_p, 0.0), axis=0))

    g = gamma[None, :]
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + tl.arange(0, BLOCK_C)).to(OFFSET)
        mask = (offs_c[:, None] < C) & mask_p[None, :]
        skip_ptrs = skip_ptr + n64 * s_skip_n + offs_c[:, None] * s_skip_c + offs_p[None, :] * s_skip_p
        dec_ptrs = dec_ptr + n64 * s_dec_n + offs_c[:, None] * s_dec_c + offs_p[None, :] * s_dec_p
        skip = tl.load(skip_ptrs, mask=mask, other=0.0).to(tl.float32)
        dec = tl.load(dec_ptrs, mask=mask, other=0.0).to(tl.float32)
        out = dec + g * (skip - dec)
        out_ptrs = out_ptr + n64 * s_out_n + offs_c[:, None] * s_out_c + offs_p[None, :] * s_out_p
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _pool_finish_kernel(
    partial_ptr, cores_ptr, sum_ptr, count_ptr, num_blocks, H, W,
    BLOCK: tl.constexpr, HAS_CORES: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for b0 in range(0, num_blocks, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + n * num_blocks + offs, mask=offs < num_blocks, other=0.0)
    tl.store(sum_ptr + n, tl.sum(acc, axis=0))
    # The count follows from the box clipped to the image; it equals the number of masked pixels.
    if HAS_CORES:
        y0, y1, x0, x1 = _core_box(cores_ptr, n)
        rows = tl.maximum(tl.minimum(y1, H) - tl.maximum(y0, 0), 0).to(tl.int64)
        cols = tl.maximum(tl.minimum(x1, W) - tl.maximum(x0, 0), 0).to(tl.int64)
        tl.store(count_ptr + n, rows * cols)
    else:
        # In int64 before the product: H * W in int32 wraps for an image of 2**31 pixels or more.
        tl.store(count_ptr + n, (tl.full([], 0, tl.int64) + H) * W)


@jit
def _gate_bwd_kernel(
    grad_out_ptr, grad_gamma_ptr, grad_pool_ptr, logit_ptr, skip_ptr, dec_ptr,
    grad_logit_ptr, grad_skip_ptr, grad_dec_ptr, cores_ptr,
    C, HW, W, p, num_blocks,
    s_go_n, s_go_c, s_go_p,
    s_gg_n, s_gg_p,
    s_logit_n, s_logit_p,
    s_skip_n, s_skip_c, s_skip_p,
    s_dec_n, s_dec_c, s_dec_p,
    s_gs_n, s_gs_c, s_gs_p,
    s_gd_n, s_gd_c, s_gd_p,
    s_gl_n, s_gl_p,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_GRAD_GAMMA: tl.constexpr, POOL: tl.constexpr, HAS_CORES: tl.constexpr, OFFSET: tl.constexpr,
):  # fmt: skip
    n, n64, _, offs_p, mask_p = _program_pixels(num_blocks, HW, BLOCK_P, OFFSET)
    gamma = _load_gate(logit_ptr, n64, offs_p, mask_p, s_logit_n, s_logit_p)
    g = gamma[None, :]
    grad_gamma = tl.zeros([BLOCK_P], dtype=tl.float32)  # sum over channels of grad_out*(skip-dec)
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + tl.arange(0, BLOCK_C)).to(OFFSET)
        mask = (offs_c[:, None] < C) & mask_p[None, :]
        oc = offs_c[:, None]
        op = offs_p[None, :]
        go = tl.load(grad_out_ptr + n64 * s_go_n + oc * s_go_c + op * s_go_p, mask=mask, other=0.0)
        skip = tl.load(skip_ptr + n64 * s_skip_n + oc * s_skip_c + op * s_skip_p, mask=mask, other=0.0)
        dec = tl.load(dec_ptr + n64 * s_dec_n + oc * s_dec_c + op * s_dec_p, mask=mask, other=0.0)
        go = go.to(tl.float32)
        grad_skip = go * g
        gs_ptrs = grad_skip_ptr + n64 * s_gs_n + oc * s_gs_c + op * s_gs_p
        gd_ptrs = grad_dec_ptr + n64 * s_gd_n + oc * s_gd_c + op * s_gd_p
        tl.store(gs_ptrs, grad_skip.to(grad_skip_ptr.dtype.element_ty), mask=mask)
        tl.store(gd_ptrs, (go - grad_skip).to(grad_dec_ptr.dtype.element_ty), mask=mask)
        grad_gamma += tl.sum(go * (skip.to(tl.float32) - dec.to(tl.float32)), axis=0)

    if HAS_GRAD_GAMMA:
        gg_ptrs = grad_gamma_ptr + n64 * s_gg_n + offs_p * s_gg_p
        grad_gamma += tl.load(gg_ptrs, mask=mask_p, other=0.0).to(tl.float32)
    grad_logit = grad_gamma * gamma * (1.0 - gamma)
    if POOL:
        grad_pool = tl.load(grad_pool_ptr + n).to(tl.float32)
        gamma_p = tl.exp2(p * tl.log2(gamma) + _POOL_SCALE_LOG2)
        in_core = _in_core(offs_p, mask_p, cores_ptr, n, W, HAS_CORES)
        grad_logit += tl.where(in_core, grad_pool * p * gamma_p * (1.0 - gamma), 0.0)
    gl_ptrs = grad_logit_ptr + n64 * s_gl_n + offs_p * s_gl_p
    tl.store(gl_ptrs, grad_logit.to(grad_logit_ptr.dtype.element_ty), mask=mask_p)


# ---------------------------------------------------------------------------------------------------
# Launchers. Callable directly (tests run them on CPU tensors under TRITON_INTERPRET=1); the op
# below calls them for CUDA tensors.
# ---------------------------------------------------------------------------------------------------

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Triton compiles for NVIDIA GPUs of compute capability 7.0 (Volta) and later only, and bf16
# (converts, and the conv kernels' tl.dot) needs 8.0 (Ampere): older GPUs run the reference instead
# of failing to compile at the first call.
TRITON_MIN_CAPABILITY = (7, 0)
TRITON_BF16_MIN_CAPABILITY = (8, 0)


@functools.cache
def device_capability(index: int) -> tuple[int, int]:
    """(major, minor) compute capability of CUDA device `index` (asked once per device)."""
    return tuple(torch.cuda.get_device_capability(index))


def triton_compiles_for(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels can run on `device` in `dtype`: always on the CPU (the
    interpreter); on CUDA, from compute capability 7.0, and 8.0 for bf16."""
    if device.type != "cuda":
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    needed = TRITON_BF16_MIN_CAPABILITY if dtype == torch.bfloat16 else TRITON_MIN_CAPABILITY
    return device_capability(index) >= needed


def on_device(t: Tensor):
    """The context every Triton launch runs in: t's CUDA device made current (a no-op context for
    CPU tensors, which run interpreted). A Triton launch compiles for and runs on the *current* CUDA
    device, not its arguments' one: with tensors on cuda:1 while cuda:0 is current (one Restorer per
    GPU, each on its own thread) it would go to the wrong GPU. Under it, torch.cuda's current stream,
    events and is_current_stream_capturing also refer to t's device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _nchw_strides(t: Tensor) -> tuple[int, int, int] | None:
    """(s_n, s_c, s_pixel) if (H,W) flatten into one pixel index with one stride, else None."""
    _, _, h, w = t.shape
    s_n, s_c, s_h, s_w = t.stride()
    if h == 1:
        return s_n, s_c, s_w
    if w == 1:
        return s_n, s_c, s_h
    return (s_n, s_c, s_w) if s_h == w * s_w else None


def empty_pixels_like(t: Tensor) -> Tensor:
    """torch.empty_like, except that a dense layout the kernels cannot address with one pixel stride
    (H and W swapped, say) gets NCHW instead. The fakes use it too, so compiled graphs see the same
    strides as the kernels write."""
    out = torch.empty_like(t)
    if out.dim() == 4 and _nchw_strides(out) is None:
        out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return out


def in_layout(t: Tensor, layout: Tensor) -> Tensor:
    """t with the strides and dtype of layout (an empty tensor as an op's fake promises it): t itself
    where they already match (the CPU reference mostly keeps its inputs' layout), else copied in (a
    wider residual or bias promotes the reference's sum, not the op's output)."""
    return t if t.stride() == layout.stride() and t.dtype == layout.dtype else layout.copy_(t)


def _pixel_view(t: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    strides = _nchw_strides(t)
    if strides is None:  # a strided view the kernel cannot walk: copy once
        t = t.contiguous()
        strides = _nchw_strides(t)
    return t, strides


def tile_config(c: int, channels_last: bool) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, num_warps). Fixed, not autotuned: the pooled sum's rounding depends on
    BLOCK_P, and a fixed tile keeps it the same from run to run and machine to machine.

    NCHW: pixels are contiguous, so long pixel rows and a few channels per step. channels_last:
    channels are contiguous, so all (up to 64) channels of fewer pixels per step.
    """
    block_c = 1 << (max(c, 1) - 1).bit_length()  # a power of 2; C = 0 (an empty blend) still needs 1
    if channels_last and c > 1:
        block_c = min(block_c, 64)
        return block_c, max(16, 4096 // block_c), 4
    return min(block_c, 4), 1024, 4


def _major_minor(version: str) -> tuple[int, int] | None:
    """(3, 6) of "3.6.0", "3.6.0+git1a2b" or "2.4.0rc1"; None where the version says no such thing."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why TRITON_INTERPRET=1 cannot run the kernels with these versions, in one line; None where it can.

    Triton's interpreter before 3.7 takes a runtime int's index as int() of a 1-element array, which
    numpy 2.4 made a TypeError: every kernel that loops over `range(0, C, BLOCK)` then fails, at its
    first launch, with InterpreterError("only 0-dimensional arrays can be converted to Python
    scalars"). Compiled kernels (CUDA without TRITON_INTERPRET) are not affected."""
    triton_at, numpy_at = _major_minor(triton_version), _major_minor(numpy_version)
    if triton_at is None or numpy_at is None or triton_at >= (3, 7) or numpy_at < (2, 4):
        return None
    return (
        f"TRITON_INTERPRET=1 cannot run with triton {triton_version} and numpy {numpy_version}: triton's "
        "interpreter before 3.7 fails on numpy >= 2.4; use numpy < 2.4 or triton >= 3.7"
    )


def installed_interpreter_problem() -> str | None:
    """interpreter_problem of the installed triton and numpy where the kernels run interpreted; None
    where they are compiled (or triton is not installed)."""
    if not INTERPRETED:
        return None
    import numpy
    import triton

    return interpreter_problem(triton.__version__, numpy.__version__)


def check_interpreter() -> None:
    """Refuses a launch that triton's interpreter would fail with these versions, in one line."""
    problem = installed_interpreter_problem()
    if problem:
        raise RuntimeError(problem)


def _check_runnable(logit: Tensor, skip: Tensor, dec: Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("the Triton gate needs the triton package (pip install qairn[triton])")
    if not skip.is_cuda and not INTERPRETED:
        raise RuntimeError("Triton runs on CPU tensors only with TRITON_INTERPRET=1 set before import")
    check_interpreter()
    # Each input, not skip's alone: an fp64 logit got fp32 pool sums where the op's fake promises fp64
    # (the op sends such inputs to the reference; this guards calls to the launchers themselves).
    dtypes = [t.dtype for t in (logit, skip, dec)]
    if not all(dtype in TRITON_DTYPES for dtype in dtypes):
        takes = ", ".join(str(dtype).removeprefix("torch.") for dtype in TRITON_DTYPES)
        got = ", ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)
        raise ValueError(f"the Triton gate takes logit, skip, dec in {takes}, got {got}")
    load_triton()


def _offset_type(*tensors: Tensor):
    """The kernels' in-image offset type: int32, or int64 where an element of one image lies 2**31 or
    more elements from the image's start in any of these tensors (batch offsets are always int64)."""
    reach = max(
        sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:])) for t in tensors
    )
    return tl.int64 if reach >= 2**31 - 1 else tl.int32


def check_shapes(logit: Tensor, skip: Tensor, dec: Tensor, cores: Tensor | None = None) -> None:
    """The kernels take no broadcasting, and the op answers alike on every device (its fake too)."""
    if skip.dim() != 4 or logit.shape != (skip.shape[0], 1, *skip.shape[2:]) or dec.shape != skip.shape:
        raise ValueError(
            "the gated blend takes logit (N, 1, H, W) and skip, dec (N, C, H, W) alike, got logit "
            f"{tuple(logit.shape)}, skip {tuple(skip.shape)}, dec {tuple(dec.shape)}"
        )
    check_cores(cores, skip.shape[0])


def check_cores(cores: Tensor | None, n: int) -> None:
    if cores is not None and cores.shape != (n, 4):
        raise ValueError(
            f"cores must be one (y0, y1, x0, x1) box or (N, 4), a box per image (N = {n}), "
            f"got {tuple(cores.shape)}"
        )


def _cores_arg(cores: Tensor | None, like: Tensor) -> Tensor:
    if cores is None:
        return like  # never read: HAS_CORES is False
    return cores.to(device=like.device, dtype=torch.int32).contiguous()


def gated_blend_triton(
    logit: Tensor,
    skip: Tensor,
    dec: Tensor,
    p: float | None = None,
    cores: Tensor | None = None,
    write_gamma: bool = True,
    block_c: int | None = None,
    block_p: int | None = None,
    num_warps: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused forward. Returns (out, gamma, pool_sum, pool_count); gamma is empty (0,) unless
    write_gamma, pool_sum and pool_count are empty (0,) when p is None. out has skip's layout.
    block_c/block_p/num_warps override tile_config (for benchmarks and tests)."""
    _check_runnable(logit, skip, dec)
    check_shapes(logit, skip, dec, cores)
    n, c, h, w = skip.shape
    out = empty_pixels_like(skip)  # before _pixel_view: the layout the op's fake promises
    s_out = _nchw_strides(out)
    gamma = empty_pixels_like(logit) if write_gamma else logit.new_empty(0)
    offset = _offset_type(logit, skip, dec, out, gamma)
    logit, s_logit = _pixel_view(logit)
    skip, s_skip = _pixel_view(skip)
    dec, s_dec = _pixel_view(dec)
    s_gamma = _nchw_strides(gamma) if write_gamma else (0, 0, 0)

    cfg_c, cfg_p, cfg_w = tile_config(c, channels_last=s_skip[1] == 1)
    block_c, block_p, num_warps = block_c or cfg_c, block_p or cfg_p, num_warps or cfg_w
    num_blocks = triton.cdiv(h * w, block_p)
    pool = p is not None
    partial = torch.empty((n, num_blocks) if pool else (0,), dtype=torch.float32, device=skip.device)
    cores_arg = _cores_arg(cores, logit)

    with on_device(skip):
        _gate_fwd_kernel[(num_blocks * n,)](
            logit, skip, dec, out, gamma, partial, cores_arg,
            c, h * w, w, float(p or 0.0), num_blocks,
            s_logit[0], s_logit[2],
            *s_skip, *s_dec, *s_out,
            s_gamma[0], s_gamma[2],
            BLOCK_C=block_c, BLOCK_P=block_p,
            WRITE_GAMMA=write_gamma, POOL=pool, HAS_CORES=cores is not None, OFFSET=offset,
            num_warps=num_warps,
        )  # fmt: skip
    if not pool:
        empty = skip.new_empty(0, dtype=torch.float32)
        return out, gamma, empty, empty.long()
    pool_sum = torch.empty(n, dtype=torch.float32, device=skip.device)
    pool_count = torch.empty(n, dtype=torch.int64, device=skip.device)
    with on_device(skip):
        _pool_finish_kernel[(n,)](
            partial, cores_arg, pool_sum, pool_count, num_blocks, h, w,
            BLOCK=512, HAS_CORES=cores is not None,
        )  # fmt: skip
    return out, gamma, pool_sum, pool_count


def gated_blend_backward_triton(
    grad_out: Tensor | None,
    grad_gamma: Tensor | None,
    grad_pool_sum: Tensor | None,
    logit: Tensor,
    skip: Tensor,
    dec: Tensor,
    p: float | None,
    cores: Tensor | None,
    block_c: int | None = None,
    block_p: int | None = None,
    num_warps: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused backward: (grad_logit, grad_skip, grad_dec), each in its input's dtype and layout.
    gamma is recomputed from logit (one read of N*H*W values) rather than saved."""
    _check_runnable(logit, skip, dec)
    n, c, h, w = skip.shape
    if grad_out is None:
        grad_out = torch.zeros_like(skip)
    grad_logit = empty_pixels_like(logit)  # before _pixel_view: the layouts the op's fake promises
    grad_skip = empty_pixels_like(skip)
    grad_dec = empty_pixels_like(dec)
    grad_out, s_go = _pixel_view(grad_out)
    logit, s_logit = _pixel_view(logit)
    skip, s_skip = _pixel_view(skip)
    dec, s_dec = _pixel_view(dec)
    has_grad_gamma = grad_gamma is not None and grad_gamma.numel() > 0
    if has_grad_gamma:
        grad_gamma, s_gg = _pixel_view(grad_gamma)
    else:
        grad_gamma, s_gg = logit, (0, 0, 0)  # never read
    pool = p is not None and grad_pool_sum is not None and grad_pool_sum.numel() > 0
    grad_pool = grad_pool_sum.contiguous() if pool else logit

    cfg_c, cfg_p, cfg_w = tile_config(c, channels_last=s_skip[1] == 1)
    block_c, block_p, num_warps = block_c or cfg_c, block_p or cfg_p, num_warps or cfg_w
    s_gl = _nchw_strides(grad_logit)
    num_blocks = triton.cdiv(h * w, block_p)
    offset = _offset_type(grad_out, grad_gamma, logit, skip, dec, grad_logit, grad_skip, grad_dec)
    cores_arg = _cores_arg(cores, logit)
    with on_device(skip):
        _gate_bwd_kernel[(num_blocks * n,)](
            grad_out, grad_gamma, grad_pool, logit, skip, dec,
            grad_logit, grad_skip, grad_dec, cores_arg,
            c, h * w, w, float(p or 0.0), num_blocks,
            *s_go, s_gg[0], s_gg[2], s_logit[0], s_logit[2], *s_skip, *s_dec,
            *_nchw_strides(grad_skip), *_nchw_strides(grad_dec), s_gl[0], s_gl[2],
            BLOCK_C=block_c, BLOCK_P=block_p,
            HAS_GRAD_GAMMA=has_grad_gamma, POOL=pool, HAS_CORES=cores is not None, OFFSET=offset,
            num_warps=num_warps,
        )  # fmt: skip
    return grad_logit, grad_skip, grad_dec


# ---------------------------------------------------------------------------------------------------
# torch.library ops: one op each for forward and backward, so torch.compile and torch.export see a
# single node. CUDA runs the Triton launchers; every other device (and fp64) runs the reference.
# register_autograd wraps the pair in a torch.autograd.Function for training.
# ---------------------------------------------------------------------------------------------------


def _gated_blend_impl(
    logit: Tensor, skip: Tensor, dec: Tensor, p: float | None, cores: Tensor | None, write_gamma: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, gamma, pool_sum, pool_count); gamma is empty unless write_gamma, the pool empty if p is None."""
    check_shapes(logit, skip, dec, cores)
    gamma = torch.sigmoid(logit)
    out = empty_pixels_like(skip)  # skip's layout, as the Triton path and the fake promise
    torch.add(dec, gamma * (skip - dec), out=out)
    if p is None:
        pool_sum, pool_count = _empty_pool(logit)
    else:
        pool_sum, pool_count = pool_reference(_pool_gamma(logit, gamma), p, cores)
    if not write_gamma:
        return out, logit.new_empty(0), pool_sum, pool_count
    # the layout the fake promises (sigmoid keeps an odd one)
    return out, in_layout(gamma, empty_pixels_like(logit)), pool_sum, pool_count


gated_blend_op = torch.library.custom_op("qairn::gated_blend", _gated_blend_impl, mutates_args=())


@gated_blend_op.register_fake
def _(logit, skip, dec, p, cores, write_gamma):
    check_shapes(logit, skip, dec, cores)
    return (
        empty_pixels_like(skip),
        empty_pixels_like(logit) if write_gamma else logit.new_empty(0),
        *_empty_pool(logit, 0 if p is None else skip.shape[0]),
    )


def _empty_pool(logit: Tensor, n: int = 0) -> tuple[Tensor, Tensor]:
    """(pool_sum, pool_count) of n images, uninitialised; n = 0: what the op returns without p."""
    pool_dtype = torch.promote_types(logit.dtype, torch.float32)
    return logit.new_empty(n, dtype=pool_dtype), logit.new_empty(n, dtype=torch.int64)


def _gated_blend_backward_impl(
    grad_out: Tensor | None,
    grad_gamma: Tensor | None,
    grad_pool_sum: Tensor | None,
    logit: Tensor,
    skip: Tensor,
    dec: Tensor,
    p: float | None,
    cores: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_logit, grad_skip, grad_dec), each in its input's layout."""
    grads = gated_blend_backward_reference(grad_out, grad_gamma, grad_pool_sum, logit, skip, dec, p, cores)
    return tuple(
        in_layout(grad, empty_pixels_like(x)) for x, grad in zip((logit, skip, dec), grads, strict=True)
    )


gated_blend_backward_op = torch.library.custom_op(
    "qairn::gated_blend_backward", _gated_blend_backward_impl, mutates_args=()
)


@gated_blend_backward_op.register_fake
def _(grad_out, grad_gamma, grad_pool_sum, logit, skip, dec, p, cores):
    return empty_pixels_like(logit), empty_pixels_like(skip), empty_pixels_like(dec)


def _triton_takes(*tensors: Tensor) -> bool:
    """Every input, not just the first: a bf16 skip under an fp16 logit needs Ampere as well."""
    return HAS_TRITON and all(
        t.dtype in TRITON_DTYPES and triton_compiles_for(t.device, t.dtype) for t in tensors
    )


if HAS_TRITON:

    @gated_blend_op.register_kernel("cuda")
    def _(logit, skip, dec, p, cores, write_gamma):
        if not _triton_takes(logit, skip, dec):
            return _gated_blend_impl(logit, skip, dec, p, cores, write_gamma)
        return gated_blend_triton(logit, skip, dec, p, cores, write_gamma)

    @gated_blend_backward_op.register_kernel("cuda")
    def _(grad_out, grad_gamma, grad_pool_sum, logit, skip, dec, p, cores):
        if not _triton_takes(logit, skip, dec):
            return _gated_blend_backward_impl(grad_out, grad_gamma, grad_pool_sum, logit, skip, dec, p, cores)
        return gated_blend_backward_triton(grad_out, grad_gamma, grad_pool_sum, logit, skip, dec, p, cores)


def _setup_context(ctx, inputs, output):
    logit, skip, dec, p, cores, _ = inputs
    ctx.save_for_backward(logit, skip, dec, cores)
    ctx.p = p
    ctx.set_materialize_grads(False)  # unused outputs (gamma, the pool) pass None, not zeros to read


def _backward(ctx, grad_out, grad_gamma, grad_pool_sum, _grad_pool_count):
    logit, skip, dec, cores = ctx.saved_tensors
    if grad_gamma is not None and grad_gamma.numel() == 0:  # gamma was not written
        grad_gamma = None
    if grad_pool_sum is not None and grad_pool_sum.numel() == 0:
        grad_pool_sum = None
    grads = gated_blend_backward_op(grad_out, grad_gamma, grad_pool_sum, logit, skip, dec, ctx.p, cores)
    return *grads, None, None, None


gated_blend_op.register_autograd(_backward, setup_context=_setup_context)


def _gated_blend_decomposition(logit, skip, dec, p, cores, write_gamma):
    """The op in standard torch ops, for exporters that cannot call it (ONNX)."""
    gamma = torch.sigmoid(logit)
    out = dec + gamma * (skip - dec)
    pool_sum, pool_count = (
        _empty_pool(logit) if p is None else pool_reference(_pool_gamma(logit, gamma), p, cores)
    )
    return out, gamma if write_gamma else logit.new_empty(0), pool_sum, pool_count


# torch.onnx.export (dynamo) decomposes every op found in torch._decomp's table before translating;
# listing the op there makes a plain torch.onnx.export emit standard ONNX ops. torch.export's own
# default decompositions do not read this table, so exported programs keep the single op.
torch._decomp.register_decomposition(torch.ops.qairn.gated_blend.default)(_gated_blend_decomposition)


def decompositions() -> dict:
    """{op: decomposition}, for ExportedProgram.run_decompositions before other exporters."""
    return {torch.ops.qairn.gated_blend.default: _gated_blend_decomposition}


# ---------------------------------------------------------------------------------------------------
# Public helpers
# ---------------------------------------------------------------------------------------------------


def as_cores(cores, like: Tensor) -> Tensor | None:
    """None, an (N,4) tensor, or one (y0, y1, x0, x1) box for every image -> None or (N,4) int32."""
    if cores is None:
        return None
    cores = torch.as_tensor(cores, dtype=torch.int32, device=like.device)
    if cores.shape == (4,):
        cores = cores.expand(like.shape[0], 4)
    check_cores(cores, like.shape[0])
    return cores


def gated_blend(
    logit: Tensor, skip: Tensor, dec: Tensor, p: float | None = None, cores=None, write_gamma=True
):
    """The fused, differentiable op; returns like gated_blend_reference: (out, gamma), or with p
    (out, gamma, pool_sum, pool_count). cores: None (whole image), one (y0, y1, x0, x1) box, or an
    (N,4) int tensor of boxes. write_gamma=False skips writing gamma (returned empty)."""
    out, gamma, pool_sum, pool_count = gated_blend_op(
        logit, skip, dec, p, as_cores(cores, logit), write_gamma
    )
    return (out, gamma) if p is None else (out, gamma, pool_sum, pool_count)


def minkowski_from_sums(pool_sum: Tensor, pool_count: Tensor, p: float) -> Tensor:
    """Q = (mean of gamma**p) ** (1/p) from the scaled sums; add sums and counts over tiles first to
    pool a tiled image. Unscaled in the log domain: no power of 2**(POOL_SCALE_LOG2/p) is formed, so
    no p (p < 1 included) can overflow or underflow it."""
    mean = pool_sum / pool_count
    return torch.exp2((torch.log2(mean) - POOL_SCALE_LOG2) / p)


def scale_cores(cores: Tensor | None, n: int, h: int, w: int, scale: int, device=None) -> Tensor:
    """Core boxes at 1/scale resolution, (N,4) int32. Coordinates round up, so boxes that tile an
    image at full resolution still tile it at every scale, and the image's last box ends at
    ceil(h/scale), where the model crops its lower-scale gammas. None means the whole h x w image."""
    if cores is None:
        cores = torch.zeros(n, 4, dtype=torch.int32, device=device)
        cores[:, 1], cores[:, 3] = h, w  # fills, not a host copy: safe under CUDA graph capture
    cores = as_cores(cores, torch.empty(n, 0, device=device if device is not None else cores.device))
    return -torch.div(-cores, scale, rounding_mode="floor")


GATE_BACKENDS = {"reference": gated_blend_reference, "eager": gated_blend_reference, "triton": gated_blend}


def use_gate_backend(model: torch.nn.Module, name: str, load: bool = True) -> torch.nn.Module:
    """Swap the gated blend of every QAIRN in model: "reference"/"eager" (plain torch) or "triton"
    (the fused op: Triton on CUDA, the reference on other devices). Call it before torch.compile.
    load=False: triton is imported at the first CUDA launch, not now (for a model that runs on the CPU,
    which never launches one: the import costs 0.4 s). A missing triton is refused either way."""
    if name not in GATE_BACKENDS:
        raise ValueError(f"unknown gate backend {name!r}; choose one of {', '.join(sorted(GATE_BACKENDS))}")
    if name == "triton" and not HAS_TRITON:
        raise RuntimeError("gate backend 'triton' needs the triton package (pip install qairn[triton])")
    if name == "triton" and load:  # a broken install is refused here, not at every image's first launch
        try:
            load_triton()
        except ImportError as e:
            raise RuntimeError(f"gate backend 'triton': {e}") from e
    for module in qairns_in(model):
        module.gate = GATE_BACKENDS[name]
    return model


def qairns_in(model: torch.nn.Module) -> list:
    """Every QAIRN module in model, for the backend swaps; refuses a model with none."""
    from qairn.model import QAIRN  # here, not at the top: qairn.model imports this module

    qairns = [module for module in model.modules() if isinstance(module, QAIRN)]
    if not qairns:
        raise ValueError("no QAIRN module found in model")
    return qairns
