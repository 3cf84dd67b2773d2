"""ONNX Runtime vs eager PyTorch on this CPU, through qairn.Restorer (default tiles: 512, overlap 32).

Speed (pytest-benchmark; the ratio is eager time / ONNX Runtime time of the same group):
    pytest bench/ -k ort --benchmark-only --benchmark-group-by=group --benchmark-columns=mean,stddev,rounds
    sizes: a LIVE1-sized image (768x512) and 1920x1080 beside a GPU (--bench-device cuda: its host's
    CPU); with --bench-device cpu, 384x256 (one tile) and 640x360 (two 512 tiles): 1080p took about 3
    minutes a case on 2 busy cores. 1 and 2 threads (torch and ONNX Runtime alike).
Parity on the full LIVE1 set at every QF (fp32 and fp16 exports vs eager fp32):
    python bench/bench_ort.py --parity [--weights W.safetensors] [--qf 10,20,30,40] [--limit N]
Weights: --weights / $QAIRN_BENCH_WEIGHTS, else the shipped weights, else the small preset with a fixed
random init (speed does not depend on the values; parity numbers do, so pass trained weights for those).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LIVE1 = REPO / ".." / "shared" / "data" / "live1"
# The benchmarked device, resolved from --bench-device by conftest.pytest_configure before import.
CUDA = os.environ.get("QAIRN_BENCH_DEVICE", "").startswith("cuda")
if CUDA:
    SIZES = {"live1-768x512": (512, 768), "1920x1080": (1080, 1920)}
else:
    SIZES = {"384x256": (256, 384), "640x360": (360, 640)}


def load(weights: str | None) -> tuple:
    """The model and where its weights came from (bench_model's words, printed with the parity)."""
    from qairn.engine.bench import bench_model

    # Not a bare QAIRN(preset): its tail and gate outputs start at zero, every gamma is 0.5 and any
    # parity check passes. bench_model gives every layer weights (the shipped file when present).
    model, source = bench_model(weights or os.environ.get("QAIRN_BENCH_WEIGHTS"), None)
    return model.eval(), source


def bench_image(h: int, w: int) -> np.ndarray:
    """bikes.png from LIVE1 (768x512), resized to h x w, JPEG QF 20, as RGB uint8."""
    files = sorted(LIVE1.glob("bikes.png")) or sorted(LIVE1.glob("*.png"))
    if not files:
        pytest.skip(f"LIVE1 images not found at {LIVE1}")
    bgr = cv2.imread(str(files[0]), cv2.IMREAD_COLOR)
    if bgr.shape[:2] != (h, w):
        bgr = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_CUBIC)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 20])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()


@pytest.fixture(scope="module")
def model():
    return load(None)[0]


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_restore_speed(benchmark, model, backend, threads, size):
    import qairn

    torch.set_num_threads(threads)
    options = {"threads": threads} if backend == "onnxruntime" else {}
    restorer = qairn.Restorer(model=model, device="cpu", backend=backend, **options)
    image = bench_image(*SIZES[size])
    benchmark.group = f"{size}, {threads} thread{'s' if threads > 1 else ''}"
    benchmark.extra_info.update(backend=backend, threads=threads, size=size, preset=model.config.preset)
    benchmark.pedantic(restorer.restore, args=(image,), rounds=3, iterations=1, warmup_rounds=1)


# ---- parity on the full LIVE1 set ---------------------------------------------------------------------
def crop(outputs, h: int, w: int) -> list[np.ndarray]:
    """restored, gamma1..3 of a padded input, cropped to the image (as the Restorer does)."""
    return [o[..., : -(-h // s), : -(-w // s)].astype(np.float64) for o, s in zip(outputs, (1, 1, 2, 4))]


def minkowski(gamma: np.ndarray, p: float) -> float:
    return float((gamma**p).mean() ** (1 / p))


def parity(weights: str | None, qfs: list[int], limit: int, threads: int) -> int:
    import onnxruntime as ort

    from qairn.export import onnx_export as ox

    files = sorted(LIVE1.glob("*.png"))[: limit or None]
    if not files:  # no image compared is no parity shown: not a pass
        raise SystemExit(f"no LIVE1 images in {LIVE1}: the parity check needs them")
    torch.set_num_threads(threads)
    model, source = load(weights)
    folder = REPO / ".cache" / "bench"
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {}
    for precision in ("fp32", "fp16"):
        path = ox.export_onnx(model, folder / f"parity-{precision}.onnx", outputs="maps", precision=precision)
        sessions[precision] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    reference = ox.ExportModel(model, outputs="maps").eval()
    worst = {(p, qf): np.zeros(4) for p in sessions for qf in qfs}
    q_err = {(p, qf): 0.0 for p in sessions for qf in qfs}
    finite = {p: True for p in sessions}
    start = time.time()
    for i, f in enumerate(files):
        for name, img in ox.jpeg_images([f], qfs):
            qf = int(name.rsplit("qf", 1)[1])
            h, w = img.shape[:2]
            x = ox.image_batch(img, None)
            with torch.inference_mode():
                expected = crop([t.numpy() for t in reference(x)], h, w)
            for p, sess in sessions.items():
                got = crop(sess.run(list(ox.MAP_OUTPUTS), {ox.INPUT: x.numpy()}), h, w)
                finite[p] &= all(bool(np.isfinite(g).all()) for g in got)
                worst[p, qf] = np.maximum(
                    worst[p, qf], [float(np.abs(g - e).max()) for g, e in zip(got, expected)]
                )
                dq = [
                    abs(minkowski(g, model.config.p) - minkowski(e, model.config.p))
                    for g, e in zip(got[1:], expected[1:])
                ]
                q_err[p, qf] = max(q_err[p, qf], *dq)
        print(f"[{i + 1}/{len(files)}] {f.stem} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    print(f"{source}, {len(files)} LIVE1 images, max abs error vs eager fp32:")
    print("precision  QF  restored   gamma1     gamma2     gamma3     |dQ| max")
    for (p, qf), e in worst.items():
        print(f"{p:9s} {qf:3d}  " + "  ".join(f"{v:.2e}" for v in e) + f"   {q_err[p, qf]:.2e}")
    print("all outputs finite:", finite)
    ok = finite["fp16"] and finite["fp32"]
    ok &= all(
        e[0] <= ox.TOLERANCE[p]["restored"] and max(e[1:]) <= ox.TOLERANCE[p]["gamma"]
        for (p, _), e in worst.items()
    )
    print("within qairn.export.onnx_export.TOLERANCE:", ok)
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parity", action="store_true", required=True)
    p.add_argument("--weights", default=None)
    p.add_argument("--qf", default="10,20,30,40")
    p.add_argument("--limit", type=int, default=0, help="images (0 = all 29)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    return parity(a.weights, [int(q) for q in a.qf.split(",")], a.limit, a.threads)


if __name__ == "__main__":
    sys.exit(main())
