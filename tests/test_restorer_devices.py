"""Restorer and GPUs, checked on the CPU: devices that are not there are refused in one line, a bare
"cuda" is pinned to the current GPU, and a frame graph is captured on the model's own GPU (torch.cuda
faked; the real capture is tested on CUDA in test_cuda_graph.py)."""

import contextlib
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from conftest import lively_model

import qairn
from qairn.cli import main
from qairn.engine import restorer as rs


def fake_gpus(monkeypatch, count: int, current: int = 0):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


@pytest.mark.parametrize(
    "count, device, says",
    [
        (1, "cuda:3", "device 'cuda:3' requested, but this machine has 1 CUDA device (cuda:0)"),
        (2, "cuda:2", "device 'cuda:2' requested, but this machine has 2 CUDA devices (cuda:0 to cuda:1)"),
        (0, "cuda", "device 'cuda' requested, but this machine has no CUDA device"),
        (0, "cuda:0", "device 'cuda:0' requested, but this machine has no CUDA device"),
        (1, "gpu", "unknown device 'gpu': use cpu, cuda, cuda:N or auto"),
    ],
)
def test_a_gpu_that_is_not_there_is_refused_at_construction(monkeypatch, count, device, says):
    fake_gpus(monkeypatch, count)
    with pytest.raises(ValueError) as e:
        qairn.Restorer(model=lively_model(), device=device)
    assert str(e.value) == says


@pytest.mark.parametrize("count, device", [(1, "cuda:3"), (0, "cuda"), (0, 1), (0, "gpu")])
def test_a_device_that_cannot_run_is_a_backend_error(monkeypatch, count, device):
    """README's "what a caller catches": BackendError covers a device that cannot run. cuda:3 on a
    one-GPU machine raised a bare ValueError, which `except qairn.BackendError` let through (it stays a
    ValueError too, as the Restorer's other argument checks)."""
    fake_gpus(monkeypatch, count)
    with pytest.raises(qairn.BackendError) as e:
        qairn.Restorer(model=lively_model(), device=device)
    assert isinstance(e.value, ValueError)


def test_devices_that_are_there(monkeypatch):
    fake_gpus(monkeypatch, 2, current=1)
    assert rs.resolve_device("cuda:1") == torch.device("cuda", 1)
    # A bare "cuda" (and "auto") is the GPU current now, index and all: the Restorer stays on it when
    # a thread with another current GPU calls it later.
    assert rs.resolve_device("cuda") == torch.device("cuda", 1)
    assert rs.resolve_device("auto") == torch.device("cuda", 1)
    fake_gpus(monkeypatch, 0)
    assert rs.resolve_device("auto") == torch.device("cpu")
    assert rs.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("command", ["restore", "score"])
@pytest.mark.parametrize(
    "count, device, says",
    [
        (1, "cuda:3", "device 'cuda:3' requested, but this machine has 1 CUDA device (cuda:0)"),
        (0, "cuda", "device 'cuda' requested, but this machine has no CUDA device"),
    ],
)
def test_the_cli_says_so_in_one_line(
    tmp_path, live1_image, tiny_weights, capsys, monkeypatch, command, count, device, says
):
    src = tmp_path / "a.jpg"
    cv2.imwrite(str(src), np.ascontiguousarray(live1_image[:64, :64, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 20])
    fake_gpus(monkeypatch, count)
    out = tmp_path / "out.png"
    extra = ["-o", str(out)] if command == "restore" else []
    rc = main([command, str(src), *extra, "--weights", str(tiny_weights), "--device", device])
    _, err = capsys.readouterr()
    assert rc != 0 and err.strip().splitlines() == [f"qairn: error: {says}"], err
    assert "Traceback" not in err and not out.exists()


class FakeCuda:
    """Enough of torch.cuda for FrameGraph.capture: which device and stream are current at each step."""

    def __init__(self, monkeypatch, current: int = 0):
        self.device = torch.device("cuda", current)
        self.stream = None  # None: the device's default stream
        self.runs, self.captures, self.replays = [], [], []
        self.shared_capture_stream = SimpleNamespace(device=self.device, name="torch.cuda.graph's own")
        fake = self

        @contextlib.contextmanager
        def device(d):
            before = fake.device
            fake.device = torch.device(d)
            try:
                yield
            finally:
                fake.device = before

        @contextlib.contextmanager
        def stream(s):  # as torch.cuda.stream: the stream's device becomes current too
            before = fake.device, fake.stream
            fake.device, fake.stream = s.device, s
            try:
                yield
            finally:
                fake.device, fake.stream = before

        def new_stream(device=None):
            return SimpleNamespace(
                device=torch.device(device) if device is not None else fake.device,
                name="side",
                wait_stream=lambda other: None,
            )

        def current_stream(device=None):
            return SimpleNamespace(
                device=device or fake.device, name="default", wait_stream=lambda other: None
            )

        class Graph:
            def replay(self):
                fake.replays.append(fake.device)

        @contextlib.contextmanager
        def graph(g, pool=None, stream=None, capture_error_mode="global"):
            s = stream if stream is not None else fake.shared_capture_stream
            locked = rs._CAPTURE_LOCK.locked()
            self.captures.append(dict(device=fake.device, stream=s, mode=capture_error_mode, locked=locked))
            with fake_stream(s):
                yield

        fake_stream = stream
        for name, value in dict(
            device=device, stream=stream, Stream=new_stream, current_stream=current_stream,
            CUDAGraph=Graph, graph=graph,
        ).items():  # fmt: skip
            monkeypatch.setattr(torch.cuda, name, value)

    def run(self, x):
        self.runs.append((self.device, self.stream))
        return "outputs"


def test_frame_graph_is_captured_on_a_side_stream_of_the_models_gpu(monkeypatch):
    """The model on cuda:1, cuda:0 current (as in a thread of a process that serves several GPUs):
    warm-up and capture must run with cuda:1 current, on a side stream of cuda:1 (not torch.cuda.graph's
    shared one, made on whichever GPU was current), in thread_local mode (so that other threads' CUDA
    work cannot break the capture), one capture at a time, and leave cuda:0 current after."""
    fake = FakeCuda(monkeypatch, current=0)
    x = SimpleNamespace(device=torch.device("cuda", 1))
    replay, output = rs.FrameGraph.capture(fake.run, x)
    assert output == "outputs" and len(fake.runs) == 3  # two warm-ups, then the capture
    for device, stream in fake.runs:
        assert device == torch.device("cuda", 1)
        assert stream is not None and stream.name == "side" and stream.device == torch.device("cuda", 1)
    assert fake.runs[2][1] is fake.runs[0][1]  # captured on the stream that warmed up
    [capture] = fake.captures
    assert capture["device"] == torch.device("cuda", 1) and capture["stream"] is fake.runs[0][1]
    assert capture["mode"] == "thread_local"
    # One capture at a time in the process: torch.cuda.graph empties every GPU's cache on entry, which
    # PyTorch's allocator refuses (an internal assert) while another GPU is capturing.
    assert capture["locked"] and not rs._CAPTURE_LOCK.locked()
    assert fake.device == torch.device("cuda", 0)
    replay()
    assert fake.replays == [torch.device("cuda", 1)] and fake.device == torch.device("cuda", 0)
