import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from qairn.model import QAIRN, preset

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"
LIVE1 = DATA / "live1"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # CI has 2 cores: a second torch thread only spin-waits against other work (10-50x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def live1_files() -> list[Path]:
    files = sorted(LIVE1.glob("*.png"))
    if not files:
        pytest.skip(f"LIVE1 images not found at {LIVE1}")
    return files


def lively_model(name: str = "tiny", seed: int = 0, **overrides) -> QAIRN:
    """A random model whose output and gates really depend on the input (default init is nearly
    constant), so that tests comparing two ways of running it can fail."""
    torch.manual_seed(seed)
    m = QAIRN(preset(name, **overrides))
    for mod in m.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            mod.weight.data *= 0.5
            torch.nn.init.normal_(mod.bias, std=0.01)
    return m.eval()


@pytest.fixture(scope="session")
def live1_image() -> np.ndarray:
    import cv2

    f = [p for p in live1_files() if p.stem == "bikes"] or live1_files()
    return cv2.imread(str(f[0]), cv2.IMREAD_COLOR)[..., ::-1].copy()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    from qairn.weights_io import save_weights

    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_weights(lively_model(), path, training={"steps": 0, "note": "random test model"})
    return path


def run_in_threads(*targets, timeout: float = 120) -> None:
    """Run each callable in a thread of its own and wait for them all, at most `timeout` s in all: a
    deadlock fails the test that made it, not the whole run (pytest-timeout's thread method ends the
    process). Daemon threads: one left stuck does not hold the interpreter's exit."""
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = sum(t.is_alive() for t in threads)
    assert not stuck, f"{stuck} of {len(threads)} threads still running after {timeout} s (a deadlock?)"
