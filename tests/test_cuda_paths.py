"""Restorer paths that take another road on CUDA than on the CPU, outside the kernels: drop_caches,
uint16 tensors, restore_stream's pinned copies (maps too), Y'CbCr planes, a tensor on another device
than the Restorer, backend "auto", and the GPU backends' parity with eager fp32. Each test runs on
"cpu" (CI: the same assertions on the CPU twin of the path) and on "cuda" where there is a GPU (the GPU
run's tests stage). Tiny shapes and the tests' lively_model: the file takes seconds."""

import importlib.util
import math
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import lively_model

import qairn
from qairn.engine import restorer as rs
from qairn.kernels import gate

H, W = 45, 61  # odd: the maps' ceil(h/s) sizes and the crop of padded tiles are in play


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(request.param if request.param == "cpu" else f"cuda:{torch.cuda.current_device()}")


def restorer(device, **options) -> qairn.Restorer:
    opts = dict(backend="eager", precision="fp32", tile=None) | options
    return qairn.Restorer(model=lively_model(), device=device, **opts)


def image(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """uint8 RGB with structure at several scales (smoothed noise), so the gates vary over it."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((h // 8 + 2, w // 8 + 2, 3))
    up = np.kron(coarse, np.ones((8, 8, 1)))[:h, :w]
    return np.clip(255 * (0.7 * up + 0.3 * rng.random((h, w, 3))), 0, 255).astype(np.uint8)


def batch(seed: int, n: int, device) -> torch.Tensor:
    """(n,3,H,W) float in [0, 1] on device."""
    return (
        torch.stack([torch.from_numpy(image(seed + i)).permute(2, 0, 1) for i in range(n)]).to(device) / 255
    )


def tolerance(device) -> float:
    # CUDA fp32 convs may run TF32 (cuDNN's default), and another batch size another algorithm.
    return 2e-3 if device.type == "cuda" else 1e-5


# ---- drop_caches ---------------------------------------------------------------------------------
def test_drop_caches_frees_plans_and_frame_graphs_and_the_next_call_remakes_them(device):
    cuda = device.type == "cuda"
    r = restorer(device, tile=32, overlap=16, cuda_graph=cuda)  # 45x61 in 32-pixel tiles: 6 tiles
    x = batch(1, 1, device)
    first = r.restore_tensor(x)
    assert len(r._plan_cache) == 1 and len(r._graphs) == (1 if cuda else 0)
    if cuda:  # what the allocator holds now, less what earlier tests left free in its cache
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved(device)
    r.drop_caches()
    assert r._plan_cache == {} and r._graphs == {}
    if cuda:  # the graph's own pool went back to the device, not just out of our dict
        assert torch.cuda.memory_reserved(device) < reserved
    second = r.restore_tensor(x)
    assert len(r._plan_cache) == 1 and len(r._graphs) == (1 if cuda else 0)
    # Remade, not read from freed memory: the same picture and quality as before.
    torch.testing.assert_close(second[0], first[0], atol=1e-6, rtol=0)
    for k in ("Q1", "Q2", "Q3"):
        torch.testing.assert_close(second[1][k], first[1][k], atol=1e-6, rtol=0)


# ---- uint16 tensors --------------------------------------------------------------------------------
def uint16_codes(seed: int, n: int, top: int, device) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, top + 1, (n, 3, H, W)).astype(np.uint16)).to(device)


def test_uint16_tensors_restore_and_score_as_their_float_twin(device):
    r = restorer(device)
    t = uint16_codes(2, 2, 1023, device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = r.restore(t, bits=10)
        scored = r.score(t, bits=10)
    assert caught == [], [str(w.message) for w in caught]
    assert got.image.dtype == torch.uint16 and got.image.device == t.device
    assert tuple(got.image.shape) == (2, 3, H, W)
    # The same numbers as the float tensor the codes stand for, back in 10-bit codes.
    want = r.restore(t.to(torch.int32).float() / 1023)
    want_codes = (want.image * 1023).round().to(torch.int32)
    assert torch.equal(got.image.to(torch.int32), want_codes)
    assert int(got.image.to(torch.int32).max()) <= 1023  # 10-bit codes, not 16-bit ones
    for k in ("Q1", "Q2", "Q3"):
        assert got.quality[k].device == r.device and got.quality[k].shape == (2,)
        torch.testing.assert_close(got.quality[k], want.quality[k], atol=0, rtol=0)
        torch.testing.assert_close(scored[k], got.quality[k], atol=1e-6, rtol=0)
    # And as the CPU restores them.
    cpu = restorer("cpu").restore(t.cpu(), bits=10)
    diff = (got.image.cpu().to(torch.int32) - cpu.image.to(torch.int32)).abs().max()
    assert int(diff) <= (4 if device.type == "cuda" else 0)  # of 1023 (TF32 convs on CUDA)
    for k in ("Q1", "Q2", "Q3"):
        torch.testing.assert_close(got.quality[k].cpu(), cpu.quality[k], atol=tolerance(device), rtol=0)


def test_the_10_bit_hint_is_read_on_the_cpu_only(device):
    """uint16 codes all under 1024 without bits=: one warning on the CPU; none on a GPU, where reading
    the codes would cost a host sync per call (restorer.batch_to_float)."""
    r = restorer(device)
    t = uint16_codes(3, 1, 1023, device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = r.restore(t)
    said = [str(w.message) for w in caught]
    if device.type == "cpu":
        assert len(said) == 1 and "pass bits=10" in said[0], said
    else:
        assert said == []
    assert got.image.dtype == torch.uint16 and got.image.device == t.device  # taken as 16-bit, given back so


# ---- restore_stream: maps over the pinned copies ----------------------------------------------------
def test_restore_stream_maps_match_restore_frame_by_frame(device):
    r = restorer(device)
    frames = [image(10 + i) for i in range(3)]  # batch 2: two jobs, the second launched before the first
    results = list(r.restore_stream(frames, batch=2, return_maps=True))  # is handed out (on CUDA)
    assert len(results) == 3
    sizes = [(H, W), (-(-H // 2), -(-W // 2)), (-(-H // 4), -(-W // 4))]
    for frame, got in zip(frames, results):
        want = r.restore(frame, return_maps=True)
        assert got.image.dtype == np.uint8 and got.image.shape == frame.shape
        assert np.abs(got.image.astype(int) - want.image.astype(int)).max() <= 1
        assert got.quality == pytest.approx(want.quality, abs=tolerance(device))
        assert [m.shape for m in got.maps] == sizes
        for a, b in zip(got.maps, want.maps):
            assert isinstance(a, np.ndarray) and a.dtype == np.float32
            np.testing.assert_allclose(a, b, atol=tolerance(device), rtol=0)
    # Each frame its own maps, not one buffer's last contents.
    assert not np.array_equal(results[0].maps[0], results[1].maps[0])


def test_restore_stream_tensor_frames_keep_their_maps_on_the_restorers_device(device):
    r = restorer(device)
    x = batch(20, 3, device)
    results = list(r.restore_stream(list(x), batch=2, return_maps=True))
    for i, got in enumerate(results):
        want = r.restore_tensor(x[i : i + 1], return_maps=True)
        assert got.image.device == x.device and got.image.shape == (3, H, W)
        torch.testing.assert_close(got.image, want[0][0], atol=tolerance(device), rtol=0)
        for a, b in zip(got.maps, want[2]):
            assert a.device == r.device and a.shape == b.shape[1:]
            torch.testing.assert_close(a, b[0], atol=tolerance(device), rtol=0)


# ---- Y'CbCr planes on the device ---------------------------------------------------------------
def planes(seed: int, device, n: int | None = None):
    """4:2:0 uint8 planes (limited range), (H,W) or (n,H,W), on device."""
    rng = np.random.default_rng(seed)
    lead = () if n is None else (n,)
    ch, cw = -(-H // 2), -(-W // 2)
    y = rng.integers(16, 236, lead + (H, W)).astype(np.uint8)
    u, v = (rng.integers(16, 241, lead + (ch, cw)).astype(np.uint8) for _ in range(2))
    return tuple(torch.from_numpy(p).to(device) for p in (y, u, v))


def test_restore_yuv_image_false_gives_the_quality_and_maps_of_image_true(device):
    r = restorer(device)
    y, u, v = planes(30, device, n=2)
    full = r.restore_yuv(y, u, v, return_maps=True)
    only = r.restore_yuv(y, u, v, return_maps=True, image=False)
    assert only.image is None and only.info == full.info
    assert all(o.device == y.device and o.dtype == torch.uint8 for o in full.image)
    for k in ("Q1", "Q2", "Q3"):
        assert only.quality[k].device == r.device and only.quality[k].shape == (2,)
        torch.testing.assert_close(only.quality[k], full.quality[k], atol=1e-6, rtol=0)
    for a, b in zip(only.maps, full.maps):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # As the numpy planes on the CPU.
    cpu = restorer("cpu").restore_yuv(*(p.cpu().numpy() for p in (y, u, v)), image=False)
    for k in ("Q1", "Q2", "Q3"):
        np.testing.assert_allclose(only.quality[k].cpu().numpy(), cpu.quality[k], atol=tolerance(device))


# ---- a tensor on another device than the Restorer -------------------------------------------------
def test_a_cpu_restorer_takes_a_tensor_from_the_device_and_gives_it_back_there(device):
    r = restorer("cpu")
    x = batch(40, 2, device)
    got = r.restore(x)
    assert got.image.device == x.device and got.image.dtype == torch.float32
    want = r.restore(x.cpu())
    torch.testing.assert_close(got.image.cpu(), want.image, atol=0, rtol=0)
    for k in ("Q1", "Q2", "Q3"):
        assert got.quality[k].device == r.device
        torch.testing.assert_close(got.quality[k], want.quality[k], atol=0, rtol=0)
    # Its range is read once on the CPU: 0..255 floats are refused, not clamped to white.
    with pytest.raises(ValueError, match=r"divide 0\.\.255 data by 255"):
        r.restore(x * 255)


# ---- backend "auto" -----------------------------------------------------------------------------------
def test_auto_runs_triton_in_fp16_on_cuda_and_eager_fp32_on_the_cpu(device):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = rs.resolve_auto("auto", "auto", device)
        r = qairn.Restorer(model=lively_model(), device=device, tile=None)
    if device.type == "cpu":
        want = ("eager", "fp32")
    elif importlib.util.find_spec("triton") is None:
        want = ("eager", "fp16")
    else:  # the GPU run's machine has triton: it imports there, with no warning
        want = ("triton", "fp16")
    assert chosen == want and (r.backend_name, r.precision) == want
    assert caught == [], [str(w.message) for w in caught]
    out = r.restore(image(50))
    assert out.image.shape == (H, W, 3) and all(0 <= q <= 1 for q in out.quality.values())


def test_auto_runs_eager_with_one_warning_where_triton_does_not_import(monkeypatch, device):
    """A broken triton install: auto falls back to eager on CUDA. The CPU's stand-in: a cuda:0 device
    object (torch.device needs no GPU) with triton_compiles_for faked to say it is a recent GPU."""

    def broken():
        raise ImportError("triton is installed but cannot be imported: OSError: libcuda.so.1")

    monkeypatch.setattr(gate, "HAS_TRITON", True)
    monkeypatch.setattr(gate, "load_triton", broken)
    if device.type == "cpu":
        monkeypatch.setattr(gate, "triton_compiles_for", lambda dev, dtype: True)
        device = torch.device("cuda", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = rs.resolve_auto("auto", "auto", device)
    assert chosen == ("eager", "fp16")
    assert [str(w.message) for w in caught] == [
        "backend auto runs eager: triton is installed but cannot be imported: OSError: libcuda.so.1"
    ]
    # An explicit choice is not auto's to change: precision given, backend kept.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert rs.resolve_auto("eager", "bf16", device) == ("eager", "bf16")
    assert caught == []


# ---- the GPU backends against eager fp32 -----------------------------------------------------------
def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.float() - b.float()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


# (backend, precision, options, least PSNR in dB against eager fp32, most |dQ|; maps: 10x that). On
# this CPU (2026-11-29): fp16 76 dB, |dQ| 4e-6; bf16 59 dB, 2e-5; whole vs 32-pixel tiles 71 dB.
PARITY = [  # CUDA fp32 runs TF32 convs by default (cuDNN): fp32 against fp32 is not exact there
    ("eager", "fp32", dict(channels_last=False), 50.0, 1e-3),
    ("eager", "fp16", dict(channels_last=True), 50.0, 1e-3),
    ("eager", "bf16", dict(channels_last=True), 40.0, 5e-3),
    ("triton", "fp16", dict(), 50.0, 1e-3),
    ("triton", "fp16", dict(cuda_graph=True), 50.0, 1e-3),
    ("triton", "bf16", dict(cuda_graph=True, channels_last=False), 40.0, 5e-3),
]


@pytest.mark.parametrize("backend, precision, options, least_db, most_dq", PARITY)
def test_backends_match_eager_fp32(device, backend, precision, options, least_db, most_dq):
    cuda = device.type == "cuda"
    if options.get("cuda_graph") and not cuda:
        pytest.skip("cuda_graph=True needs a CUDA device")
    if backend == "triton":
        if not importlib.util.find_spec("triton"):
            pytest.skip("the triton backend needs triton")
        if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton gate runs on the CPU only with TRITON_INTERPRET=1 set before import")
    if cuda and precision == "bf16" and not gate.triton_compiles_for(device, torch.bfloat16):
        pytest.skip("bf16 needs compute capability 8.0")
    x = batch(60, 2, device)
    ref = restorer(device, tile=32, overlap=16).restore_tensor(x, return_maps=True)
    r = restorer(device, backend=backend, precision=precision, tile=32, overlap=16, **options)
    for _ in range(2 if options.get("cuda_graph") else 1):  # a frame graph: capture, then a replay
        got = r.restore_tensor(x, return_maps=True)
        assert got[0].dtype == torch.float32 and got[0].device == x.device and got[0].shape == x.shape
        assert psnr(got[0], ref[0]) >= least_db, psnr(got[0], ref[0])
        for k in ("Q1", "Q2", "Q3"):
            assert float((got[1][k] - ref[1][k]).abs().max()) <= most_dq, (k, got[1][k], ref[1][k])
        for a, b in zip(got[2], ref[2]):
            assert a.shape == b.shape and float((a - b).abs().max()) <= 10 * most_dq


# ---- a GPU's frames and planes given to a CPU Restorer -------------------------------------------------
def test_a_cpu_restorer_reads_device_planes_only_once_they_are_copied(device):
    """restore_yuv copied a GPU's planes to a CPU Restorer with non_blocking=True: a device-to-host copy
    returns before its bytes are there, and the colour conversion read them at once. The device is kept
    busy first, so that the copy cannot be done in time by luck."""
    y, u, v = planes(70, device)
    if device.type == "cuda":
        torch.cuda._sleep(300_000_000)  # ~0.2 s of the device's time: work queued after it waits
        y, u, v = (p.clone() for p in (y, u, v))  # queued after the sleep: ready only once it ends
    r = restorer("cpu")
    got = r.restore_yuv(y, u, v)
    want = r.restore_yuv(*(p.cpu().numpy() for p in planes(70, device)))
    for a, b in zip(got.image, want.image):
        assert a.device == y.device
        np.testing.assert_array_equal(a.cpu().numpy(), b)
    for k in ("Q1", "Q2", "Q3"):
        assert float(got.quality[k]) == pytest.approx(want.quality[k], abs=1e-6)


def test_restore_stream_gives_tensor_frames_back_on_their_device_from_a_cpu_restorer(device):
    """A GPU's tensor frames (and planes) streamed through a CPU Restorer came back on the CPU, while
    restore() and restore_yuv() give them back on their own device, as restore_stream says it does."""
    r = restorer("cpu")
    x = batch(80, 2, device)
    yuv = [planes(81 + i, device) for i in range(2)]
    results = list(r.restore_stream([*x, *yuv], batch=2))
    for i, got in enumerate(results[:2]):
        assert got.image.device == x.device and got.image.shape == (3, H, W)
        torch.testing.assert_close(got.image, r.restore(x[i : i + 1]).image[0], atol=1e-6, rtol=0)
    for frame, got in zip(yuv, results[2:]):
        want = r.restore_yuv(*frame)
        for a, b in zip(got.image, want.image):
            assert a.device == b.device == frame[0].device
            assert torch.equal(a, b)


def test_a_cpu_restorer_reads_the_codes_of_a_device_uint16_tensor(device):
    """A GPU's uint16 tensor given to a CPU Restorer was converted on the GPU, where its codes are not
    read: 16-bit codes given as bits=10 became values up to 64 and a white picture, unsaid, and 10-bit
    codes without bits= got no hint. The copy to the CPU is made anyway: they are read there, as a
    CPU tensor's are (and as a GPU's float tensor's range is)."""
    r = restorer("cpu")
    wide = uint16_codes(90, 1, 65535, device)
    with pytest.raises(ValueError, match=r"outside the 10-bit range 0\.\.1023"):
        r.restore(wide, bits=10)
    with pytest.raises(ValueError, match=r"^frame 0: .*outside the 10-bit range 0\.\.1023"):
        list(r.restore_stream(list(wide), bits=10))
    t = uint16_codes(91, 1, 1023, device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = r.restore(t)
        want = r.restore(t.cpu())  # warns too
    said = [str(w.message) for w in caught]
    assert len(said) == 2 and "pass bits=10" in said[0] and said[0] == said[1], said
    assert got.image.dtype == torch.uint16 and got.image.device == t.device
    torch.testing.assert_close(got.image.cpu(), want.image, atol=0, rtol=0)


def test_a_cpu_restorer_reads_the_codes_of_device_uint16_planes(device):
    """As for uint16 tensors above: a GPU's uint16 planes given to a CPU Restorer's restore_yuv (or
    restore_stream) were not read, being on a GPU, though copied to the CPU anyway: 16-bit codes given
    as bits=10 were clamped into a wrong picture, unsaid. They are read once on the CPU now."""
    r = restorer("cpu")
    rng = np.random.default_rng(92)
    y, u, v = (
        torch.from_numpy(rng.integers(0, 65536, shape).astype(np.uint16)).to(device)
        for shape in ((H, W), (-(-H // 2), -(-W // 2)), (-(-H // 2), -(-W // 2)))
    )
    with pytest.raises(ValueError, match=r"^plane y holds codes .*outside the 10-bit range 0\.\.1023"):
        r.restore_yuv(y, u, v, bits=10)
    with pytest.raises(
        ValueError, match=r"^frame 0: plane y holds codes .*outside the 10-bit range 0\.\.1023"
    ):
        list(r.restore_stream([(y, u, v)], bits=10))
    ten = [p // 64 for p in (y.to(torch.int32), u.to(torch.int32), v.to(torch.int32))]
    got = r.restore_yuv(*(p.to(torch.uint16) for p in ten), bits=10)  # in range: restored, back on device
    assert all(p.device == device and p.dtype == torch.uint16 for p in got.image)
