"""pytest-benchmark suite: `pytest bench/ --benchmark-only` (small shapes on CPU, real ones on CUDA).

Files here are named bench_*.py; this hook collects them (the test suite's python_files does not),
so `pytest bench/` finds them without a config of its own.
"""

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


CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def sync():
    """Call after the timed work: CUDA is asynchronous, the host clock must wait for the device."""
    return (lambda: torch.cuda.synchronize()) if CUDA else (lambda: None)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """A benchmark that sets torch's thread count (bench_ort's 1- and 2-thread cases) must not leave it
    set for the ones after it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
