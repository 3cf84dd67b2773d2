"""Video throughput: Restorer.restore_stream on yuv420p planes, and the whole `qairn video` pipeline
(PyAV decode + restore + libx264 encode + quality trace). 32 frames of 720p per round on CUDA; on the
CPU 2 frames of 640x360 (still two 512 tiles wide), as 720p took minutes on 2 busy cores.

Model: preset "small", random init (qairn.engine.bench.bench_model; speed does not depend on the
values). Frames: LIVE1 images resized to the frame size and JPEG-compressed at QF 30 (a synthetic
picture if LIVE1 is absent). fps = frames / mean round time and the frames' source, stored in extra_info.

    pytest bench/ -k video --benchmark-only
(bench/conftest.py collects bench_*.py; naming the file on the command line collects it twice.)
"""

import os
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from qairn.engine import bench as qb
from qairn.engine.restorer import Restorer
from qairn.engine.video import VideoOptions, transcode

av = pytest.importorskip("av", reason="PyAV (qairn[video]) is not installed")

# The benchmarked device, resolved from --bench-device by conftest.pytest_configure before import.
CUDA = os.environ.get("QAIRN_BENCH_DEVICE", "").startswith("cuda")
W, H = (1280, 720) if CUDA else (640, 360)
FRAMES = 32 if CUDA else 2
BATCH = 4  # frames per restore_stream batch (on CPU all FRAMES in one)
LIVE1 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "live1"


@pytest.fixture(scope="module")
def model():
    return qb.bench_model(preset="small")[0]


def live1_files() -> list[Path]:
    return sorted(LIVE1.glob("*.png"))[:FRAMES]


@pytest.fixture(scope="module")
def rgb_frames():
    files = live1_files()
    out = []
    for i in range(FRAMES):
        if files:
            bgr = cv2.resize(cv2.imread(str(files[i % len(files)])), (W, H), interpolation=cv2.INTER_AREA)
        else:
            x = qb.synthetic_frame(H, W, torch.device("cpu"), seed=i)[0]
            bgr = (x.permute(1, 2, 0).numpy()[..., ::-1] * 255).round().astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 30])
        out.append(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy())
    return out


@pytest.fixture(scope="module")
def yuv_frames(rgb_frames):
    out = []
    for rgb in rgb_frames:
        f = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        f = f.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")
        out.append(
            tuple(
                np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width].copy()
                for p in f.planes
            )
        )
    return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory, rgb_frames):
    path = tmp_path_factory.mktemp("bench") / "clip.mp4"
    with av.open(str(path), "w") as o:
        s = o.add_stream("libx264", rate=Fraction(30000, 1001))
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.codec_context.options = {"crf": "18", "preset": "ultrafast"}
        for i, rgb in enumerate(rgb_frames):
            f = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            f.pts = i
            o.mux(s.encode(f))
        o.mux(s.encode(None))
    return path


def record(benchmark, tile):
    if getattr(benchmark, "stats", None) is None:  # --benchmark-disable
        return
    benchmark.extra_info.update(
        frames=FRAMES,
        size=f"{W}x{H}",
        tile=tile,
        threads=torch.get_num_threads(),
        fps=FRAMES / benchmark.stats.stats.mean,
        model="preset small, random init",
        frames_from=f"LIVE1 ({LIVE1})" if live1_files() else f"synthetic (no LIVE1 images in {LIVE1})",
    )


@pytest.mark.parametrize("tile", [None, 512], ids=["whole", "tile512"])
def test_stream(benchmark, model, device, sync, yuv_frames, tile):
    """restore_stream over yuv420p planes (numpy in, numpy out: the copies are part of the time)."""
    r = Restorer(model=model, device=device, tile=tile)
    # Warm-up on a whole batch: the shape every timed batch has (FRAMES is a multiple of BATCH).
    list(r.restore_stream(yuv_frames[:BATCH], batch=BATCH))
    benchmark.group = f"video {W}x{H}"
    benchmark.pedantic(
        lambda: (list(r.restore_stream(yuv_frames, batch=BATCH)), sync()), rounds=1 if not CUDA else 3
    )
    record(benchmark, tile)


def test_transcode(benchmark, model, device, clip, tmp_path):
    """The whole `qairn video` pipeline: decode, restore (whole frames), encode (libx264 CRF 18 medium)."""
    r = Restorer(model=model, device=device, tile=None)
    out = tmp_path / "out.mp4"
    benchmark.group = f"video {W}x{H}"
    s = benchmark.pedantic(
        lambda: transcode(r, clip, out, VideoOptions(plot=False)),
        rounds=1 if not CUDA else 3,
        warmup_rounds=1,  # a fresh Restorer: its first-call costs (allocations, cuDNN choices) stay out
    )
    assert s["frames"] == FRAMES
    record(benchmark, None)
