"""Restorer(cuda_graph=True): each input shape's whole tiled restore captured in one CUDA graph
(engine.restorer.FrameGraph). Runs on CUDA only; the CPU refusals are in test_cli.py."""

import importlib.util
import threading

import numpy as np
import pytest
import torch
from conftest import lively_model as model

import qairn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def frames(n, h, w, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.rand(n, 3, h, w, device="cuda", generator=g)


# The compile backend inside a frame graph is checked by the GPU run's bench (graph-compile-triton-fp16,
# PSNR against eager): compiling here would cost the tests stage its time box.
@pytest.mark.parametrize("backend,precision", [("eager", "fp32"), ("triton", "fp16")])
@pytest.mark.parametrize("tile,return_maps", [(64, False), (64, True), (None, False)])
def test_graph_replay_matches_eager_and_owns_its_outputs(backend, precision, tile, return_maps):
    if backend == "triton":
        pytest.importorskip("triton", reason="the triton backend needs triton")
    opts = dict(device="cuda", backend=backend, precision=precision, tile=tile, overlap=16, tile_batch=3)
    eager = qairn.Restorer(model=model(), **opts)  # two copies of one seeded model: backends convert
    graph = qairn.Restorer(model=model(), cuda_graph=True, **opts)  # and patch the module they get
    first, second = frames(2, 150, 190, seed=1), frames(2, 150, 190, seed=2)
    # The same kernels run in both, so this is tight; a replay that read a stale input or returned a
    # buffer a later replay overwrote would be off by tenths. (fp16: room for another cuDNN algorithm.)
    atol = 1e-5 if precision == "fp32" else 2e-3
    results = []
    for x in (first, second, first):  # capture, then replays with new contents in the static input
        want, got = eager.restore_tensor(x, return_maps), graph.restore_tensor(x, return_maps)
        torch.testing.assert_close(got[0], want[0], atol=atol, rtol=0)
        for k in ("Q1", "Q2", "Q3"):
            torch.testing.assert_close(got[1][k], want[1][k], atol=atol, rtol=0)
        if return_maps:
            for a, b in zip(got[2], want[2]):
                torch.testing.assert_close(a, b, atol=atol, rtol=0)
        else:
            assert got[2] is None
        results.append(got)
    assert len(graph._graphs) == 1  # one shape, one capture
    # Results are copies: later replays did not overwrite the first call's picture.
    torch.testing.assert_close(results[0][0], results[2][0], atol=0, rtol=0)
    assert not torch.equal(results[0][0], results[1][0])


def test_graph_per_shape_and_numpy_images():
    r = qairn.Restorer(model=model(), device="cuda", tile=64, overlap=16, cuda_graph=True)
    ref = qairn.Restorer(model=model(), device="cuda", tile=64, overlap=16)
    rng = np.random.default_rng(0)
    for h, w in ((100, 130), (90, 70), (100, 130)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        got, want = r.restore(img), ref.restore(img)
        assert np.abs(got.image.astype(int) - want.image.astype(int)).max() <= 1
        assert got.quality == pytest.approx(want.quality, abs=2e-3)  # the CUDA default is fp16
    assert len(r._graphs) == 2


def test_capture_survives_another_threads_cuda_work():
    """One Restorer per GPU, each on its own thread: another thread's cudaMalloc and synchronize
    while this one captures must not spoil the capture (capture_error_mode="thread_local"; in the
    default global mode the other thread's calls fail, and the capture with them)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    opts = dict(device=dev, backend="eager", precision="fp32", tile=64, overlap=16)
    graph, eager = (
        qairn.Restorer(model=model(), cuda_graph=True, **opts),
        qairn.Restorer(model=model(), **opts),
    )
    capturing, done, errors = threading.Event(), threading.Event(), []

    def other_work():
        try:
            if not capturing.wait(timeout=300):
                raise AssertionError("the capture never began")
            with torch.cuda.device(dev), torch.cuda.stream(torch.cuda.Stream(dev)):
                # More bytes than the allocator holds: a real cudaMalloc, then a synchronize (item).
                big = torch.ones(torch.cuda.memory_reserved(dev) + 2**26, dtype=torch.uint8, device=dev)
                assert int(big[:1000].sum()) == 1000
        except Exception as e:  # noqa: BLE001 - reported by the test thread below
            errors.append(e)
        finally:
            done.set()

    run_plan = graph._run_plan

    def run_plan_waiting_inside_the_capture(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            capturing.set()
            assert done.wait(timeout=300), "the other thread hung"
        return run_plan(*args, **kwargs)

    graph._run_plan = run_plan_waiting_inside_the_capture
    other = threading.Thread(target=other_work)
    other.start()
    try:
        x = frames(1, 150, 190, seed=3)
        got, want = graph.restore_tensor(x), eager.restore_tensor(x)
    finally:
        capturing.set()  # never leave the other thread waiting
        other.join(timeout=300)
    assert capturing.is_set() and done.is_set() and errors == [], errors
    assert len(graph._graphs) == 1
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)


def test_one_restorer_per_gpu_each_on_its_own_thread():
    """Frame graphs on cuda:0 and cuda:1 made and replayed at once from two threads, cuda:0 current
    in both: each must match eager on its own GPU (captures went to the current device's stream
    before, and Triton launches to cuda:0), and neither capture may trip over the other's (one at a
    time: restorer._CAPTURE_LOCK)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    backend = "triton" if importlib.util.find_spec("triton") else "eager"
    results, errors = {}, []

    def serve(index):
        try:
            dev = torch.device("cuda", index)
            opts = dict(device=dev, backend=backend, precision="fp16", tile=64, overlap=16, tile_batch=3)
            graph, eager = (
                qairn.Restorer(model=model(), cuda_graph=True, **opts),
                qairn.Restorer(model=model(), **opts),
            )
            with torch.cuda.device(0):
                for seed in (1, 2, 1):  # capture, then replays
                    x = frames(2, 150, 190, seed=seed).to(dev)
                    got, want = graph.restore_tensor(x), eager.restore_tensor(x)
                    assert got[0].device == dev
                    torch.testing.assert_close(got[0], want[0], atol=2e-3, rtol=0)
                    for k in ("Q1", "Q2", "Q3"):
                        torch.testing.assert_close(got[1][k], want[1][k], atol=2e-3, rtol=0)
            results[index] = len(graph._graphs)
        except Exception as e:  # noqa: BLE001 - reported by the test thread below
            errors.append((index, e))

    threads = [threading.Thread(target=serve, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert errors == [] and results == {0: 1, 1: 1}, errors
