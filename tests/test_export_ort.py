"""backend="onnxruntime": same results as eager through the Restorer (tiled and whole), cache reuse."""

import re
import sys
import warnings

import cv2
import numpy as np
import pytest
import torch
from conftest import live1_files, lively_model

import qairn
from qairn.engine.backends import BackendError
from qairn.export import onnx_export as ox
from qairn.export.ort_backend import OrtBackend


@pytest.fixture(scope="module")
def model():
    return lively_model("tiny", seed=3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def image():
    # A real JPEG at an odd size: 150x200 pixels of a LIVE1 image at QF 20.
    bgr = cv2.imread(str(live1_files()[0]), cv2.IMREAD_COLOR)[:150, :200]
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 20])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()


def restorers(model, cache, **kw):
    ort_backend = qairn.Restorer(
        model=model, device="cpu", backend="onnxruntime", cache_dir=cache, threads=1, **kw
    )
    eager = qairn.Restorer(model=model, device="cpu", backend="eager", **kw)
    return ort_backend, eager


@pytest.mark.parametrize("tile", [64, None])
def test_restorer_matches_eager(model, cache, image, tile):
    r_ort, r_eager = restorers(model, cache, tile=tile, overlap=16)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    y_ort, q_ort, maps_ort = r_ort.restore_tensor(x, return_maps=True)
    y_eager, q_eager, maps_eager = r_eager.restore_tensor(x, return_maps=True)
    assert y_ort.shape == (1, 3, 150, 200)
    torch.testing.assert_close(y_ort, y_eager, atol=1e-4, rtol=0)
    for a, b in zip(maps_ort, maps_eager):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    for k in q_eager:
        torch.testing.assert_close(q_ort[k], q_eager[k], atol=1e-5, rtol=0)
    # uint8 in, uint8 out: at most one level apart (a 1e-7 difference can cross a rounding boundary)
    a, b = r_ort.restore(image).image.astype(int), r_eager.restore(image).image.astype(int)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3


def test_fp16_restorer_within_tolerance(model, cache, image):
    r_eager = qairn.Restorer(model=model, device="cpu", backend="eager", tile=64, overlap=16)
    with warnings.catch_warnings():  # fp16 on the CPU provider is warned of (tested below): meant here
        warnings.filterwarnings("ignore", "backend 'onnxruntime' fp16 on the CPU provider")
        r16 = qairn.Restorer(
            model=model,
            device="cpu",
            backend="onnxruntime",
            precision="fp16",
            cache_dir=cache,
            tile=64,
            overlap=16,
        )
    a, b = r16.restore(image, return_maps=True), r_eager.restore(image, return_maps=True)
    assert np.abs(a.image.astype(int) - b.image).max() <= 1  # tolerance 2e-3 < 1/255
    for k in b.quality:
        assert abs(a.quality[k] - b.quality[k]) < ox.TOLERANCE["fp16"]["gamma"]


def test_onnx_cache_is_reused_and_keyed_by_weights(model, cache):
    first = OrtBackend(model, torch.device("cpu"), cache_dir=cache).path
    stamp = first.stat().st_mtime_ns
    again = OrtBackend(model, torch.device("cpu"), cache_dir=cache).path
    assert again == first and again.stat().st_mtime_ns == stamp
    other = OrtBackend(lively_model("tiny", seed=4), torch.device("cpu"), cache_dir=cache).path
    assert other != first
    fp16 = OrtBackend(model, torch.device("cpu"), precision="fp16", cache_dir=cache).path
    assert fp16 not in (first, other)


def test_a_given_onnx_file_runs_and_reports_its_own_precision(model, cache):
    # An fp16 file given with precision "auto" on the CPU ran as fp16 but the Restorer said "fp32";
    # asked for explicitly, the other precision is refused in one line instead of being ignored.
    fp16 = OrtBackend(model, torch.device("cpu"), precision="fp16", cache_dir=cache).path
    r = qairn.Restorer(model=model, device="cpu", backend="onnxruntime", onnx=fp16)
    assert (r.precision, r.backend.precision) == ("fp16", "fp16")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(fp16))} is a fp16 export: .* precision 'fp32'"):
        qairn.Restorer(model=model, device="cpu", backend="onnxruntime", onnx=fp16, precision="fp32")
    fp32 = OrtBackend(model, torch.device("cpu"), cache_dir=cache).path
    assert qairn.Restorer(model=model, device="cpu", backend="onnxruntime", onnx=fp32).precision == "fp32"


def test_closing_frees_the_session_and_refuses_more_runs(model, tmp_path, image):
    # A static file's runner refers back to its backend: without close() the session (GPU memory with
    # the CUDA provider) waited for the garbage collector's next full pass.
    path = ox.export_onnx(model, tmp_path / "static.onnx", outputs="maps", shape=(1, 64, 64))
    with qairn.Restorer(model=model, device="cpu", backend="onnxruntime", onnx=path) as r:
        backend = r.backend
        r.restore(image[:64, :64])
    assert backend.session is None
    with pytest.raises(BackendError, match="was closed"):
        backend(torch.zeros(1, 3, 64, 64))


def test_rejects_sums_export_and_bf16(model, tmp_path, cache):
    path = ox.export_onnx(model, tmp_path / "sums.onnx", outputs="sums")
    with pytest.raises(BackendError, match="--maps"):
        qairn.Restorer(model=model, device="cpu", backend="onnxruntime", onnx=path)
    with pytest.raises(BackendError, match="fp32 or fp16"):
        qairn.Restorer(model=model, device="cpu", backend="onnxruntime", precision="bf16", cache_dir=cache)


@pytest.mark.parametrize("given_file", [False, True])
def test_a_restorer_without_the_onnx_package_says_what_to_install(tmp_path, monkeypatch, given_file):
    """Restorer(backend="onnxruntime") without the onnx package (onnxruntime alone installed) ended in
    a bare ModuleNotFoundError from deep in the export or the metadata read, where a missing
    onnxruntime is 'needs ONNX Runtime: pip install ...'."""
    model = lively_model()
    onnx_file = ox.cached_onnx(model, tmp_path, outputs="maps") if given_file else None
    monkeypatch.setitem(sys.modules, "onnx", None)  # import fails, as when it is not installed
    options = dict(onnx=onnx_file) if given_file else dict(model=model, cache_dir=tmp_path / "fresh")
    with pytest.raises(ox.ExportError) as e:
        qairn.Restorer(device="cpu", backend="onnxruntime", **options)
    assert str(e.value) == (
        "onnx is not installed (to export and read ONNX files): pip install 'qairn[export]'"
    )


def test_a_missing_or_folder_onnx_path_is_one_line(tmp_path):
    # protobuf's raw FileNotFoundError / IsADirectoryError ([Errno 2] ...) reached the caller.
    for path, why in [(tmp_path / "typo.onnx", "No such file"), (tmp_path, "Is a directory")]:
        with pytest.raises(ox.ExportError, match=rf"^{re.escape(str(path))}: cannot read \({why}"):
            qairn.Restorer(device="cpu", backend="onnxruntime", onnx=path)


def test_an_unusable_onnx_file_is_a_backend_error_as_the_readme_says_to_catch(tmp_path):
    # ExportError was a bare RuntimeError: `except (ValueError, qairn.BackendError)`, what the README
    # lists for a caller, missed Restorer(backend="onnxruntime", onnx="typo.onnx") and a file that is
    # no qairn export, though both mean the backend cannot run.
    (tmp_path / "text.onnx").write_text("not a graph")
    for path in (tmp_path / "typo.onnx", tmp_path / "text.onnx"):
        with pytest.raises(qairn.BackendError, match=re.escape(str(path))):
            qairn.Restorer(device="cpu", backend="onnxruntime", onnx=path)


def test_static_onnx_runs_restorer_tiles(model, tmp_path, image):
    # A static 2x64x64 file behind the Restorer: tiles of 64, batches of 2, the last one filled up.
    path = ox.export_onnx(model, tmp_path / "static.onnx", outputs="maps", shape=(2, 64, 64))
    r_static = qairn.Restorer(
        model=model, device="cpu", backend="onnxruntime", onnx=path, tile=64, overlap=16, tile_batch=2
    )
    assert r_static.backend.fixed_tile
    r_eager = qairn.Restorer(model=model, device="cpu", backend="eager", tile=64, overlap=16, tile_batch=2)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    (y_static, q_static, _), (y_eager, q_eager, _) = r_static.restore_tensor(x), r_eager.restore_tensor(x)
    torch.testing.assert_close(y_static, y_eager, atol=1e-4, rtol=0)
    for k in q_eager:
        torch.testing.assert_close(q_static[k], q_eager[k], atol=1e-5, rtol=0)
    big = qairn.Restorer(model=model, device="cpu", backend="onnxruntime", onnx=path, tile=None)
    with pytest.raises(BackendError, match="static for N,H,W"):
        big.restore(image)
    # tile="auto" (the default) takes the file's own tile: it cut 512 tiles, which no 64x64 file runs.
    auto = qairn.Restorer(model=model, device="cpu", backend="onnxruntime", onnx=path, overlap=16)
    assert auto.tile_for(*image.shape[:2]) == 64
    y_auto, q_auto, _ = auto.restore_tensor(x)
    torch.testing.assert_close(y_auto, y_eager, atol=1e-4, rtol=0)
    # An overlap the file's 64-pixel tile cannot hold is refused when the Restorer is made, not at the
    # first image (it passed the check against 512 before the file was opened).
    with pytest.raises(ValueError, match="overlap 64 .* must be smaller than the tile 64"):
        qairn.Restorer(model=model, device="cpu", backend="onnxruntime", onnx=path, overlap=64)


def test_a_static_files_tile_gets_a_fitting_overlap_unless_one_is_given(model, tmp_path, image):
    """A static 16x16 file with the default tiling failed with "overlap 32 ... must be smaller than the
    tile 16": tile="auto" took the file's 16, the default overlap stayed 32. Without an overlap given,
    a static file's tile now gets a quarter of it in steps of 16, up to 32; one given is still checked."""
    path = ox.export_onnx(model, tmp_path / "s16.onnx", outputs="maps", shape=(1, 16, 16))
    r = qairn.Restorer(model=model, device="cpu", backend="onnxruntime", onnx=path)
    assert r.tiling_for(40, 56) == (16, 0)
    x = torch.from_numpy(image[:40, :56]).permute(2, 0, 1)[None].float() / 255
    assert r.restore_tensor(x)[0].shape == (1, 3, 40, 56)
    with pytest.raises(ValueError, match="overlap 32 .* must be smaller than the tile 16"):
        qairn.Restorer(model=model, device="cpu", backend="onnxruntime", onnx=path, overlap=32)
    with pytest.raises(ValueError, match="overlap 16 .* must be smaller than the tile 16"):
        r.set_tiling("auto", 16)
    r.backend.static_tile = 64  # what a 64x64 file says: a quarter of 64
    r.set_tiling("auto")
    assert r.tiling_for(150, 200) == (64, 16)
    r.backend.static_tile = 256
    r.set_tiling("auto")
    assert r.tiling_for(150, 200) == (256, 32)
    r.set_tiling(128)  # no static tile in use: the usual 32
    assert r.tiling_for(150, 200) == (128, 32)


def test_a_non_square_static_file_runs_tile_auto_at_its_largest_square(model, tmp_path, image):
    """A --static 1,32,64 file had no static_tile: tile="auto" cut 512 tiles (or ran a small image
    whole), which the file refuses ("is static for N,H,W = (1, 32, 64) and cannot run (1, 112, 160)").
    It now takes the largest square its shape holds (32), each tile padded into the file's 32x64."""
    path = ox.export_onnx(model, tmp_path / "s32x64.onnx", outputs="maps", shape=(1, 32, 64))
    r = qairn.Restorer(model=model, device="cpu", backend="onnxruntime", onnx=path)
    assert r.tiling_for(100, 150) == (32, 0)
    r_eager = qairn.Restorer(model=model, device="cpu", backend="eager", tile=32, overlap=0)
    x = torch.from_numpy(image[:100, :150]).permute(2, 0, 1)[None].float() / 255
    (y, q, _), (y_eager, q_eager, _) = r.restore_tensor(x), r_eager.restore_tensor(x)
    assert y.shape == (1, 3, 100, 150)
    # Tiles run padded to 32x64: the network sees replicated pixels past each tile's right edge,
    # which only the outputs near that edge feel (no overlap blends them away at tile 32).
    assert (y - y_eager).abs().mean() < 0.02
    for k in q_eager:  # pooled over each tile's core only: the padding is not scored
        torch.testing.assert_close(q[k], q_eager[k], atol=2e-3, rtol=0)


# ---- which GPU the providers run on (checked on the CPU: onnxruntime's session is watched) ----------
GPU_EPS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


class Session:
    """A real CPU session that reports the providers it was given (or `running`) as the ones it runs
    on, as a session on a GPU machine would (or one that fell back to the CPU)."""

    def __init__(self, real, path, options, providers, running=None):
        self.real = real(path, options, providers=["CPUExecutionProvider"])
        names = [p if isinstance(p, str) else p[0] for p in providers or ["CPUExecutionProvider"]]
        self.running = names if running is None else running

    def get_providers(self):
        return list(self.running)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.fixture
def sessions(monkeypatch):
    """onnxruntime claiming the GPU providers, and every InferenceSession's providers recorded (the
    last is the backend's: a first export is verified in a CPU session before it); the session itself
    is a real CPU one that says it runs on the providers asked for, so the backend finishes
    construction as on a GPU machine. sessions.running = [...]: what the next sessions say instead."""
    import onnxruntime as ort

    class Made(list):
        running = None

    real, made = ort.InferenceSession, Made()

    def session(path, options=None, providers=None, **kw):
        made.append(providers)
        return Session(real, path, options, providers, made.running)

    monkeypatch.setattr(ort, "get_available_providers", lambda: list(GPU_EPS))
    monkeypatch.setattr(ort, "InferenceSession", session)
    return made


def test_gpu_providers_run_on_the_restorers_gpu(model, cache, sessions, monkeypatch):
    """A Restorer on cuda:1 (cuda:0 current): the CUDA and TensorRT providers get device_id 1. Without
    it ONNX Runtime runs them on GPU 0 (its default), whatever the Restorer's device."""
    from qairn.kernels import gate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(gate, "triton_compiles_for", lambda device, dtype: True)
    r = qairn.Restorer(model=model, device="cuda:1", backend="onnxruntime", precision="fp32", cache_dir=cache)
    assert r.device == torch.device("cuda", 1)
    assert sessions[-1] == [
        ("TensorrtExecutionProvider", {"device_id": 1}),
        ("CUDAExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider",
    ]
    # A bare "cuda" handed to the backend is the current GPU, as in the Restorer.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    OrtBackend(model, torch.device("cuda"), cache_dir=cache)
    assert sessions[-1][1] == ("CUDAExecutionProvider", {"device_id": 1})
    # On the CPU: the CPU provider alone, by name, as before.
    OrtBackend(model, torch.device("cpu"), cache_dir=cache)
    assert sessions[-1] == ["CPUExecutionProvider"]


def test_given_providers_get_the_device_unless_they_name_one(model, cache, sessions):
    """providers= by name get device_id too; an entry with its own options keeps them, its own
    device_id included; providers that are not CUDA's or TensorRT's are passed as they are."""
    gpu = torch.device("cuda", 3)
    OrtBackend(model, gpu, cache_dir=cache, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert sessions[-1] == [("CUDAExecutionProvider", {"device_id": 3}), "CPUExecutionProvider"]
    given = [
        ("TensorrtExecutionProvider", {"trt_fp16_enable": True}),
        ("CUDAExecutionProvider", {"device_id": 0}),
        ("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"}),
    ]
    OrtBackend(model, gpu, cache_dir=cache, providers=given)
    assert sessions[-1] == [
        ("TensorrtExecutionProvider", {"device_id": 3, "trt_fp16_enable": True}),
        ("CUDAExecutionProvider", {"device_id": 0}),
        ("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"}),
    ]


def gpu_restorer(model, cache, **kw):
    return qairn.Restorer(
        model=model, device="cuda:0", backend="onnxruntime", precision="fp32", cache_dir=cache, **kw
    )


@pytest.fixture
def one_gpu(monkeypatch):
    from qairn.kernels import gate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(gate, "triton_compiles_for", lambda device, dtype: True)


def test_a_session_that_fell_back_to_the_cpu_is_refused(model, cache, sessions, one_gpu):
    """ONNX Runtime drops a GPU provider it lacks, or one whose CUDA libraries fail to load, and runs on
    the CPU; the Restorer on cuda:0 must not go on as if it were on the GPU. One that runs the CUDA
    provider without TensorRT is only warned of."""
    sessions.running = ["CPUExecutionProvider"]
    with pytest.raises(BackendError) as e:
        gpu_restorer(model, cache)
    assert str(e.value) == (
        "backend 'onnxruntime' on cuda:0: ONNX Runtime was asked for TensorrtExecutionProvider, "
        "CUDAExecutionProvider but runs on CPUExecutionProvider only (provider missing or failed to load: "
        "see ONNX Runtime's log above); install onnxruntime-gpu with the CUDA libraries it needs, "
        "or pass device='cpu'"
    )
    sessions.running = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.warns(UserWarning, match="TensorrtExecutionProvider missing or failed to load"):
        gpu_restorer(model, cache)
    sessions.running = None  # runs on all it was asked for: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpu_restorer(model, cache)
    # Asked for by name on a CPU Restorer: refused too.
    sessions.running = ["CPUExecutionProvider"]
    with pytest.raises(BackendError, match="leave the GPU providers out"):
        OrtBackend(model, torch.device("cpu"), cache_dir=cache, providers=["CUDAExecutionProvider"])


def test_a_cpu_only_onnxruntime_is_refused_on_a_gpu(model, cache, sessions, one_gpu, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(BackendError) as e:
        gpu_restorer(model, cache)
    assert str(e.value) == (
        "backend 'onnxruntime' on cuda:0: this onnxruntime has no CUDA or TensorRT provider "
        "(it has CPUExecutionProvider); install onnxruntime-gpu, or pass device='cpu'"
    )
    # The CPU provider by name is the caller's choice: it runs.
    OrtBackend(model, torch.device("cuda", 0), cache_dir=cache, providers=["CPUExecutionProvider"])


def test_an_onnx_file_alone_is_pooled_with_its_own_p(tmp_path, image, monkeypatch):
    """Restorer(backend="onnxruntime", onnx=PATH) without weights loaded the shipped weights for their
    config and pooled the file's gates with their p (64) instead of the file's own (4 here): Q1 0.4897
    where eager gave 0.4808 on a 40x50 crop. Now the file's config is taken from its metadata and no
    weights are loaded (a missing shipped file is no obstacle); weights of another network are refused."""
    from qairn.engine import restorer as rs

    net = lively_model("tiny", seed=3, p=4.0)
    path = ox.export_onnx(net, tmp_path / "p4.onnx", outputs="maps")
    crop = np.ascontiguousarray(image[:40, :50])
    monkeypatch.setattr(rs, "DEFAULT_WEIGHTS", tmp_path / "none.safetensors")  # nothing to load
    r = qairn.Restorer(device="cpu", backend="onnxruntime", onnx=path)
    assert r.p == 4.0 and r.config == net.config
    expect = qairn.Restorer(model=net, device="cpu").score(crop)
    got = r.score(crop)
    for k in expect:
        assert abs(got[k] - expect[k]) < 1e-5, (k, got, expect)
    # An explicit p still wins; the same network given as model= runs; another one is refused.
    assert qairn.Restorer(device="cpu", backend="onnxruntime", onnx=path, p=2).p == 2.0
    qairn.Restorer(model=net, device="cpu", backend="onnxruntime", onnx=path)
    with pytest.raises(ValueError) as e:
        qairn.Restorer(model=lively_model("tiny", seed=3), device="cpu", backend="onnxruntime", onnx=path)
    assert str(e.value) == (
        f"{path} holds another network than the one given (p 4.0 there, 2.0 given): give the weights it "
        "was exported from, or neither weights= nor model= to use its own"
    )


def test_a_bare_or_misspelt_provider_name_is_not_run_on_the_cpu(model, cache, sessions):
    """providers="CUDAExecutionProvider" (a string, not a list) was taken letter by letter and
    providers=["cuda"] as it was: ONNX Runtime printed an "EP Error", dropped them and ran on the CPU,
    which the GPU check cannot tell from a CPU provider asked for. A bare name is now a list of one,
    and a name ONNX Runtime does not know is refused before anything is exported."""
    gpu = torch.device("cuda", 1)
    OrtBackend(model, gpu, cache_dir=cache, providers="CUDAExecutionProvider")
    assert sessions[-1] == [("CUDAExecutionProvider", {"device_id": 1})]
    OrtBackend(model, gpu, cache_dir=cache, providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert sessions[-1] == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    made = len(sessions)
    for bad, name in ((["cuda"], "cuda"), ("CUDA", "CUDA"), ([("Cuda", {"device_id": 0})], "Cuda")):
        with pytest.raises(BackendError) as e:
            OrtBackend(model, gpu, cache_dir=cache, providers=bad)
        assert str(e.value) == (
            f"unknown ONNX Runtime provider {name!r} in providers=: use names such as "
            "CUDAExecutionProvider, TensorrtExecutionProvider or CPUExecutionProvider"
        )
    assert len(sessions) == made  # refused before any session


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter
def test_another_networks_onnx_is_named_as_such(tmp_path):
    """onnx= another network's file (a Linear's): "the Restorer needs gamma maps; export with
    `qairn export onnx --maps`", as if it were a qairn export of Q sums. It now says what it is."""
    linear = tmp_path / "linear.onnx"
    torch.onnx.export(
        torch.nn.Linear(4, 2), (torch.rand(1, 4),), str(linear), dynamo=False, input_names=["input"]
    )
    with pytest.raises(BackendError) as e:
        OrtBackend(None, torch.device("cpu"), onnx=linear)
    assert str(e.value) == f"{linear}: not an ONNX file exported by qairn (no qairn.outputs metadata)"


def test_one_name_and_options_pair_is_a_list_of_one(model, cache, sessions):
    """providers=("CUDAExecutionProvider", {"device_id": 1}), one (name, options) pair rather than a
    list of them, was read as two entries, the second a dict: a bare KeyError: 0 traceback. It is
    now a list of one; an entry that is neither a name nor such a pair is one line naming it."""
    gpu = torch.device("cuda", 1)
    OrtBackend(model, gpu, cache_dir=cache, providers=("CUDAExecutionProvider", {"arena_extend_strategy": 1}))
    assert sessions[-1] == [("CUDAExecutionProvider", {"device_id": 1, "arena_extend_strategy": 1})]
    made = len(sessions)
    for bad in ([{"device_id": 0}], [("CUDAExecutionProvider", "0")], [None]):
        with pytest.raises(BackendError) as e:
            OrtBackend(model, gpu, cache_dir=cache, providers=bad)
        assert str(e.value) == (
            f"providers= entry {bad[0]!r}: expected a provider name or a (name, options dict) pair"
        )
    assert len(sessions) == made  # refused before any session


def test_threads_must_be_a_whole_number_from_zero(model, cache):
    # ONNX Runtime takes any int: -1 (a "use every core" guess) and -5 quietly ran with its default
    # thread pool, as 0 does; 1.5 was cut to 1 and True ran as 1 thread. Refused before the export.
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(BackendError, match=rf"^threads={bad!r}: expected 0 \(ONNX Runtime's default\)"):
            OrtBackend(model, torch.device("cpu"), cache_dir=cache, threads=bad)
    assert OrtBackend(model, torch.device("cpu"), cache_dir=cache, threads=0).session is not None


def test_fp16_on_the_cpu_provider_is_warned_of_once(model, cache, monkeypatch):
    # Measured: the shipped weights' fp16 export ran a 256x256 restore in 0.28 s on one thread, the
    # fp32 one in 0.27 s: the CPU provider runs fp16 layers in fp32, and nothing said so.
    from qairn.export import ort_backend

    monkeypatch.setattr(ort_backend, "_FP16_CPU_WARNED", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            OrtBackend(model, torch.device("cpu"), precision="fp16", cache_dir=cache)
        OrtBackend(model, torch.device("cpu"), cache_dir=cache)
    said = [str(w.message) for w in caught if "fp16 on the CPU provider" in str(w.message)]
    assert len(said) == 1 and "at fp32 speed or slower" in said[0]


def test_warnings_name_the_callers_line_not_qairns(model, cache, monkeypatch):
    """The fp16-on-CPU warning, reached through Restorer -> make_backend -> OrtBackend, named
    qairn/engine/backends.py:184 (a fixed stacklevel counted from another depth). qairn.messages.warn()
    walks to the first frame outside qairn: here, this test's Restorer(...) line."""
    from qairn.export import ort_backend

    monkeypatch.setattr(ort_backend, "_FP16_CPU_WARNED", False)
    with pytest.warns(UserWarning, match="fp16 on the CPU provider") as caught:
        qairn.Restorer(model=model, device="cpu", backend="onnxruntime", precision="fp16", cache_dir=cache)
    assert [w.filename for w in caught] == [__file__]
