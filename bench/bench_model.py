"""Micro benchmarks: the network's pieces and whole forward passes (small shapes on CPU)."""

import os

import pytest
import torch

from qairn.kernels.gate import gated_blend, gated_blend_reference
from qairn.model import PRESETS, QAIRN, ResBlock, RQAttention

# The benchmarked device, resolved from --bench-device by conftest.pytest_configure before import.
CUDA = os.environ.get("QAIRN_BENCH_DEVICE", "").startswith("cuda")
HW = (1080, 1920) if CUDA else (64, 64)  # one full-HD frame on CUDA; 2 busy cores here
PRECISIONS = ["fp32", "fp16", "bf16"] if CUDA else ["fp32"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def prepare(module, dtype, device):
    module = module.to(device=device, dtype=dtype).eval()
    return module.to(memory_format=torch.channels_last) if CUDA else module


def data(*shape, dtype, device):
    x = torch.rand(*shape, device=device, dtype=dtype)  # never time on zeros
    return x.contiguous(memory_format=torch.channels_last) if CUDA and x.dim() == 4 else x


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("c", [16, 64])
def test_gate_blend(benchmark, device, sync, c, precision):
    """The gated skip blend alone: reference (plain torch) vs the fused op (Triton on CUDA)."""
    dtype = DTYPES[precision]
    logit = data(1, 1, *HW, dtype=dtype, device=device) - 0.5
    skip, dec = (data(1, c, *HW, dtype=dtype, device=device) for _ in range(2))
    fn = gated_blend if CUDA else gated_blend_reference
    benchmark.group = f"gate c={c} {precision}"
    with torch.inference_mode():
        benchmark(lambda: (fn(logit, skip, dec), sync()))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("c", [16, 128])
def test_resblock(benchmark, device, sync, c, precision):
    dtype = DTYPES[precision]
    h, w = (HW[0] // (c // 16), HW[1] // (c // 16))  # wider blocks sit deeper: fewer pixels
    block = prepare(ResBlock(c), dtype, device)
    x = data(1, c, h, w, dtype=dtype, device=device)
    benchmark.group = f"resblock c={c} {precision}"
    with torch.inference_mode():
        benchmark(lambda: (block(x), sync()))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_rqa_logit(benchmark, device, sync, precision):
    dtype = DTYPES[precision]
    rqa = prepare(RQAttention(16, 16), dtype, device)
    skip, dec = (data(1, 16, *HW, dtype=dtype, device=device) for _ in range(2))
    with torch.inference_mode():
        benchmark(lambda: (rqa.logit(skip, dec), sync()))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_forward(benchmark, device, sync, preset, precision):
    """One whole forward pass of a tile-sized input (512x512 on CUDA)."""
    dtype = DTYPES[precision]
    torch.manual_seed(0)
    model = prepare(QAIRN(PRESETS[preset]), dtype, device)
    x = data(1, 3, *((512, 512) if CUDA else (64, 64)), dtype=dtype, device=device)
    benchmark.group = f"forward {preset}"
    with torch.inference_mode():
        model(x)
        sync()
        benchmark.pedantic(lambda: (model(x), sync()), rounds=5, warmup_rounds=1)
