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
