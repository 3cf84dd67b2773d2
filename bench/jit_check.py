"""Compile every shipped Triton kernel for sm_90 (H200) as a GPU run would, on a machine without a GPU.

    env -u TRITON_INTERPRET PYTHONPATH=. python bench/jit_check.py

The launchers (gate forward and backward, conv, transposed conv, and the fused small model's layers
through them, in fp16) are called on CPU tensors with triton's real JIT path behind them: argument
specialisation (the divisible-by-16 and == 1 ints, pointer alignment), constexprs, and compilation to
a cubin through ptxas, for a faked current device of compute capability 9.0. Every launch is turned
into a warm-up (compile, cache, return), so nothing runs. Covered: fp16, bf16 and fp32, NCHW and
channels_last, the epilogue flags, the conv geometries, and every tiling the CUDA autotuner may try
(on the narrowest and the widest conv tiles). Compiled kernels land in triton's cache as any run's do
($TRITON_CACHE_DIR, ~/.triton/cache): a second run with the same triton compiles only what changed.

What it proves: the installed triton compiles these kernels for Hopper with the arguments the
launchers really pass (a kernel that fails here fails its first launch on the GPU).
What it does not: nothing is launched, so no result is checked (the tests do that, interpreted or on
CUDA), nor a register or shared-memory limit met at launch, nor timing. The CPU tensors' pointers are
aligned as a CUDA allocation's usually are, not necessarily as the GPU run's views.

Prints one line per kernel family (how many distinct kernels compiled, and the most shared memory
one needs) and exits 1 with the first compile error.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # before qairn is imported: the kernels must be compiled
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice; its default

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from qairn.kernels import conv as cv  # noqa: E402
from qairn.kernels import conv_transpose as ct  # noqa: E402
from qairn.kernels import fuse, gate  # noqa: E402
from qairn.model import QAIRN, preset  # noqa: E402

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LAYOUTS = ("nchw", "channels_last")


class Hopper:
    """The driver calls a launch makes before it compiles: current device 0, of compute capability 9.0."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


compiled: dict[str, dict] = {}  # kernel name: {id of its compiled kernel: shared memory in bytes}
_run = JITFunction.run


def compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    compiled.setdefault(self.__name__, {})[id(kernel)] = kernel.metadata.shared
    return kernel


def runs_on_cpu_tensors():
    """The launchers refuse CPU tensors without the interpreter: let them through, and nothing else
    (cv.INTERPRETED would also switch bf16 to the interpreter's upcast variant, which the GPU never runs)."""
    driver.set_active(Hopper())
    JITFunction.run = compile_only
    gate.load_triton()
    gate._check_runnable = lambda *tensors: None
    cv.check_runnable = ct.check_runnable = lambda *args: None
    assert not gate.INTERPRETED and not cv.INTERPRETED


def as_layout(layout, *tensors):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return [t.contiguous(memory_format=fmt) for t in tensors]


def check_gate(dtype, layout):
    gen = torch.Generator().manual_seed(0)
    for c in (1, 3, 64):  # one channel; not a power of 2; a whole channels_last block
        n, h, w = 2, 37, 45
        logit, skip, dec = (torch.randn(n, k, h, w, generator=gen, dtype=dtype) for k in (1, c, c))
        logit, skip, dec = as_layout(layout, logit, skip, dec)
        cores = torch.tensor([[1, 30, 2, 40]] * n)
        gate.gated_blend_triton(logit, skip, dec)
        gate.gated_blend_triton(logit, skip, dec, 2.0, cores, write_gamma=False)
        gate.gated_blend_triton(logit, skip, dec, 64.0, None)
        grad_out, grad_gamma = torch.randn_like(skip), torch.randn_like(logit)
        gate.gated_blend_backward_triton(grad_out, grad_gamma, torch.randn(n), logit, skip, dec, 2.0, cores)
        gate.gated_blend_backward_triton(grad_out, None, None, logit, skip, dec, None, None)


# Each case compiles its own kernels (about a second each), so the cases are chosen, not crossed:
# every geometry on a 16 -> 16 layer; the channel counts (RGB in; 3 and 1 out; odd; wide, Cin past
# BLOCK_K, Cout past BLOCK_N) at 3x3 stride 1; every tiling the CUDA autotuner may try on the
# narrowest and the widest tiles.
GEOMETRIES = [(3, 1, 1), (3, 2, 1), (2, 2, 0), (1, 1, 0)]  # (kernel, stride, padding)
CHANNELS = [(3, 16), (16, 3), (16, 1), (33, 17), (80, 96)]  # (Cin, Cout)
TUNED = [(16, 16), (80, 96)]


def check_conv(dtype, layout):
    gen = torch.Generator().manual_seed(0)

    def tensors(cin, cout, k):
        (x,) = as_layout(layout, torch.randn(2, cin, 19, 17, generator=gen, dtype=dtype))
        weight = torch.randn(cout, cin, k, k, generator=gen, dtype=dtype)
        return x, weight, torch.randn(cout, generator=gen, dtype=dtype)

    for k, stride, padding in GEOMETRIES:
        x, weight, bias = tensors(16, 16, k)
        out = cv.conv_triton(x, weight, bias, stride, padding, relu=True)
        cv.conv_triton(x, weight, None, stride, padding, residual=out)  # a ResBlock's second conv
    for cin, cout in CHANNELS:
        x, weight, bias = tensors(cin, cout, 3)
        cv.conv_triton(x, weight, bias, relu=True)
    for cin, cout in TUNED:
        x, weight, bias = tensors(cin, cout, 3)
        for config in cv.candidate_configs(cin, cout):
            cv.conv_triton(x, weight, bias, relu=True, config=config)
    x, weight, bias = tensors(16, 16, 3)  # RQAttention's input conv: x and x2 read as one concatenation
    cv.conv_triton(x, torch.cat([weight, weight], 1), bias, relu=True, x2=torch.randn_like(x))


def check_conv_transpose(dtype, layout):
    gen = torch.Generator().manual_seed(0)
    for cin, cout in [(16, 16), *CHANNELS]:
        (x,) = as_layout(layout, torch.randn(2, cin, 9, 7, generator=gen, dtype=dtype))
        weight = torch.randn(cin, cout, 2, 2, generator=gen, dtype=dtype)
        bias = torch.randn(cout, generator=gen, dtype=dtype)
        configs = cv.candidate_configs(cin, cout) if (cin, cout) in TUNED else [None]
        for config in configs:
            out = ct.conv_transpose_triton(x, weight, bias, relu=True, config=config)
        ct.conv_transpose_triton(x, weight, None, residual=out)  # the autoencoder's relu(up(e2)) + e1


def check_fused_model(dtype, layout):
    """The small model with its thin convs fused, every fused layer on the Triton launchers."""
    torch.manual_seed(0)
    model = fuse.fuse_convs(QAIRN(preset("small")).eval()).to(dtype)
    (x,) = as_layout(layout, torch.rand(1, 3, 64, 48, dtype=dtype))
    before = fuse.conv_op, fuse.conv_transpose_op
    fuse.conv_op, fuse.conv_transpose_op = cv.conv_triton, ct.conv_transpose_triton
    try:
        with torch.inference_mode():
            model(x)
    finally:
        fuse.conv_op, fuse.conv_transpose_op = before


def main() -> int:
    runs_on_cpu_tensors()
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_90", flush=True)
    # The model's 27 layer shapes in fp16 only (the engine's Triton backends' precision): every dtype
    # would triple a run already minutes long, and the checks above cover the dtypes.
    checks = [(check_gate, DTYPES), (check_conv, DTYPES), (check_conv_transpose, DTYPES)]
    for check, dtypes in [*checks, (check_fused_model, (torch.float16,))]:
        start, before = time.time(), {name: len(ids) for name, ids in compiled.items()}
        for dtype in dtypes:
            for layout in LAYOUTS:
                try:
                    check(dtype, layout)
                except Exception as e:  # noqa: BLE001 - the compile error, in one place
                    print(f"FAILED {check.__name__} {dtype} {layout}: {type(e).__name__}: {e}")
                    return 1
        new = {name: len(ids) - before.get(name, 0) for name, ids in compiled.items()}
        counts = ", ".join(f"{name} {count}" for name, count in new.items() if count)
        print(f"{check.__name__}: {counts or 'nothing new'} ({time.time() - start:.0f} s)", flush=True)
    total = sum(len(ids) for ids in compiled.values())
    shared = max(s for ids in compiled.values() for s in ids.values())
    print(f"ok: {total} kernels compiled; most shared memory {shared} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
