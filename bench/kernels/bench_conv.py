"""pytest-benchmark of the fused conv: `pytest bench/kernels/bench_conv.py`.

A ResBlock (conv, ReLU, conv, residual add) two ways: cuDNN/ATen eager, and the fused op (two
Triton kernels on CUDA; the reference on CPU, so that the CPU rows show what the op's fallback costs).
The shapes are the small model's two top levels on a batch of four 544x544 tiles (512 + overlap)
on CUDA (the GPU of --bench-device, see bench/conftest.py), and one 128x128 tile on CPU.
bench/conv_util.py times every layer of the model the same way, against the roofline. Triton is
never timed under the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from qairn.kernels import conv as cv
from qairn.kernels import fuse
from qairn.model import ResBlock


def resblock(c: int, dtype, device) -> tuple[ResBlock, ResBlock]:
    torch.manual_seed(0)
    plain = ResBlock(c).to(device=device, dtype=dtype).eval()
    fused = fuse.fuse_convs(ResBlock(c).to(device=device, dtype=dtype).eval())
    fused.load_state_dict(plain.state_dict())
    return plain, fused


@pytest.mark.parametrize("impl", ["eager", "fused"])
def test_resblock_cpu(benchmark, impl):
    plain, fused = resblock(16, torch.float32, "cpu")
    x = torch.randn(1, 16, 128, 128)
    block = plain if impl == "eager" else fused
    with torch.inference_mode():
        benchmark(block, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton path benchmarks need CUDA")
@pytest.mark.skipif(cv.INTERPRETED, reason="TRITON_INTERPRET=1 is set: Triton would be interpreted")
@pytest.mark.parametrize("impl", ["eager", "fused"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [16, 32])
def test_resblock_cuda(benchmark, gpu, sync, impl, dtype, c):
    torch.backends.cudnn.benchmark = True
    plain, fused = resblock(c, dtype, gpu)
    plain, fused = (b.to(memory_format=torch.channels_last) for b in (plain, fused))
    size = 544 if c == 16 else 272  # the model's level at 1 and 1/2 scale of a 512+32 tile
    x = torch.randn(4, c, size, size, device=gpu, dtype=dtype).contiguous(memory_format=torch.channels_last)
    block = plain if impl == "eager" else fused

    def step():
        with torch.inference_mode():
            block(x)
        sync()

    benchmark.pedantic(step, warmup_rounds=5, rounds=30)
    # Minimum traffic of the fused pair: x read twice (conv1, residual), h written and read, out written.
    nbytes = 5 * x.numel() * x.element_size()
    benchmark.extra_info["min_bytes"] = nbytes
    if benchmark.stats is not None:  # None with --benchmark-disable: nothing was timed
        benchmark.extra_info["GBps_at_min_bytes"] = nbytes / benchmark.stats.stats.median / 1e9
