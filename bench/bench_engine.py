"""End-to-end benchmarks: tile planning and Restorer calls per backend (small shapes on CPU)."""

import copy
import os

import numpy as np
import pytest
import torch

from qairn.engine import bench as qb
from qairn.engine.restorer import Restorer
from qairn.engine.tiling import plan_tiles

# The benchmarked device, resolved from --bench-device by conftest.pytest_configure before import.
CUDA = os.environ.get("QAIRN_BENCH_DEVICE", "").startswith("cuda")
SIZE = (2160, 3840) if CUDA else (96, 128)  # (H, W): a 4K frame on CUDA
TILE = 512 if CUDA else 64
LABELS = ["eager-fp32", "eager-fp16-cl", "compile-fp16", "triton-fp16"] if CUDA else ["eager-fp32"]


@pytest.fixture(scope="module")
def model():
    return qb.bench_model(preset="small" if CUDA else "tiny")[0]


def test_plan_tiles_8k(benchmark):
    plan = benchmark(plan_tiles, 4320, 7680, 512, 32)
    assert plan.count > 1


@pytest.mark.parametrize("tile", [TILE, None], ids=["tiled", "whole"])
@pytest.mark.parametrize("label", LABELS)
def test_restore_tensor(benchmark, model, device, sync, label, tile):
    """Restorer.restore_tensor on a frame already on the device (as `qairn bench` times it)."""
    if qb.skip_reason(label, device):
        pytest.skip(qb.skip_reason(label, device))
    # As `qairn bench` builds it, with its default options (tile batch, overlap).
    restorer = qb.make_restorer(model, label, device, tile, qb.parser().parse_args([]))
    x = qb.synthetic_frame(*SIZE, device)
    restorer.restore_tensor(x)  # warm-up: compilation, autotuning
    sync()
    benchmark.group = f"restore {'tiled' if tile else 'whole'}"
    benchmark.pedantic(lambda: (restorer.restore_tensor(x), sync()), rounds=5, warmup_rounds=1)


def test_restore_numpy(benchmark, model, device):
    """The public API from a uint8 numpy image to a uint8 numpy image (host copies included)."""
    img = (qb.synthetic_frame(*SIZE, torch.device("cpu"))[0].permute(1, 2, 0) * 255).round()
    img = img.to(torch.uint8).numpy()
    restorer = Restorer(model=copy.deepcopy(model), device=device, tile=TILE)
    restorer.restore(img)
    out = benchmark.pedantic(lambda: restorer.restore(img), rounds=3, warmup_rounds=1)
    assert out.image.shape == img.shape and out.image.dtype == np.uint8
