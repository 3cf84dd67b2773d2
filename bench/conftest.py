"""pytest-benchmark suite: `pytest bench/ --benchmark-only` (small shapes on CPU, real ones on CUDA;
bench_ort, ONNX Runtime on the host CPU, times its real sizes only beside a GPU: --bench-device cuda).

Files here are named bench_*.py; this hook collects them (the test suite's python_files does not),
so `pytest bench/` finds them without a config of its own. The device: `--bench-device cuda:1` (or
$QAIRN_BENCH_DEVICE); default the current GPU, else the CPU.
"""

import os
from fnmatch import fnmatch

import pytest
import torch


def pytest_collect_file(file_path, parent):
    if file_path.suffix != ".py" or not fnmatch(file_path.name, "bench_*.py"):
        return None
    # Not twice: pytest itself collects files named on the command line or matching python_files.
    if parent.session.isinitpath(file_path):
        return None
    if any(fnmatch(file_path.name, p) for p in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_addoption(parser):
    parser.addoption(
        "--bench-device",
        default=os.environ.get("QAIRN_BENCH_DEVICE", "auto"),
        help="device the benchmarks run on: auto (the current GPU, else the CPU), cpu, cuda or cuda:N "
        "(default $QAIRN_BENCH_DEVICE, else auto)",
    )


def pytest_configure(config):
    # The bench modules choose their sizes and cases when imported (a 4K frame and fp16/bf16 for a
    # GPU, tiny fp32 for the CPU), before any fixture runs: resolve the device first and hand it to
    # them through the environment, so --bench-device cpu on a GPU machine runs the CPU sizes.
    from qairn.engine.restorer import resolve_device

    try:
        device = resolve_device(config.getoption("--bench-device"))
    except ValueError as e:
        raise pytest.UsageError(f"--bench-device: {e}") from None
    os.environ["QAIRN_BENCH_DEVICE"] = str(device)


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device benchmarked, with its index; a GPU is also made the current device, for the work
    that names none (Triton launches, events, synchronize): CUDA_VISIBLE_DEVICES is not the only way."""
    from qairn.engine.restorer import resolve_device

    try:
        device = resolve_device(request.config.getoption("--bench-device"))
    except ValueError as e:
        raise pytest.UsageError(f"--bench-device: {e}") from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


@pytest.fixture(scope="session")
def sync(device):
    """Call after the timed work: CUDA is asynchronous, the host clock must wait for the device."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


@pytest.fixture
def gpu(device) -> torch.device:
    """The benchmarked device for the CUDA-only benchmarks: skipped when it is the CPU."""
    if device.type != "cuda":
        pytest.skip(f"a CUDA benchmark; --bench-device is {device}")
    return device


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """A benchmark that sets torch's thread count (bench_ort's 1- and 2-thread cases) must not leave it
    set for the ones after it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
