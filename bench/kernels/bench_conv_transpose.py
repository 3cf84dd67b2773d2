"""pytest-benchmark of the fused 2x2 stride-2 transposed conv: `pytest bench/kernels/bench_conv_transpose.py`.

The RQAttention decoder step `relu(conv_transpose2x2(e) + bias) + skip` two ways: ATen/cuDNN eager
(transposed conv, ReLU, add: three kernels) and the fused op (one Triton kernel on CUDA; the
reference on CPU, so that the CPU rows show what the op's fallback costs). Shapes: the small model's
decoder steps from 1/2 to full scale of a batch of four 544x544 tiles on CUDA (the GPU of
--bench-device, see bench/conftest.py); one 128x128 tile on CPU. Triton is never timed under the interpreter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qairn.kernels import conv_transpose as ct


def inputs(cin: int, cout: int, n: int, size: int, dtype, device, channels_last: bool):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, cin, size // 2, size // 2, device=device, dtype=dtype).contiguous(memory_format=fmt)
    skip = torch.randn(n, cout, size, size, device=device, dtype=dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(cin, cout, 2, 2, device=device) / (4 * cin) ** 0.5).to(dtype)
    bias = torch.randn(cout, device=device, dtype=dtype) * 0.1
    return x, weight, bias, skip


def eager(x, weight, bias, skip):
    return F.relu(F.conv_transpose2d(x, weight, bias, stride=2)) + skip


def fused(x, weight, bias, skip):
    return ct.conv_transpose(x, weight, bias, relu=True, residual=skip)


@pytest.mark.parametrize("impl", ["eager", "fused"])
def test_up_step_cpu(benchmark, impl):
    args = inputs(32, 16, 1, 128, torch.float32, "cpu", channels_last=True)
    with torch.inference_mode():
        benchmark(eager if impl == "eager" else fused, *args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton path benchmarks need CUDA")
@pytest.mark.skipif(ct.INTERPRETED, reason="TRITON_INTERPRET=1 is set: Triton would be interpreted")
@pytest.mark.parametrize("impl", ["eager", "fused"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cin,cout,size", [(32, 16, 544), (64, 32, 272)])
def test_up_step_cuda(benchmark, gpu, sync, impl, dtype, cin, cout, size):
    torch.backends.cudnn.benchmark = True
    args = inputs(cin, cout, 4, size, dtype, gpu, channels_last=True)
    fn = eager if impl == "eager" else fused

    def step():
        with torch.inference_mode():
            fn(*args)
        sync()

    benchmark.pedantic(step, warmup_rounds=5, rounds=30)
    x, _, _, skip = args
    nbytes = x.numel() * x.element_size() + 2 * skip.numel() * skip.element_size()  # x, skip in; out
    benchmark.extra_info["min_bytes"] = nbytes
    if benchmark.stats is not None:  # None with --benchmark-disable: nothing was timed
        benchmark.extra_info["GBps_at_min_bytes"] = nbytes / benchmark.stats.stats.median / 1e9
