"""Restorer and GPUs, checked on the CPU: devices that are not there are refused in one line, a bare
"cuda" is pinned to the current GPU, and a frame graph is captured on the model's own GPU (torch.cuda
faked; the real capture is tested on CUDA in test_cuda_graph.py)."""

import contextlib
from types import SimpleNamespace

import torch

from qairn.engine import restorer as rs


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
