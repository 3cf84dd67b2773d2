"""qairn's public API called as README.md shows it, from typed code: checked by mypy (tests/test_typing.py),
never run. Every value is returned from a function that declares its type, or kept in an annotated variable:
an annotation missing in qairn (the value is Any) fails as "Returning Any", a wrong one as a type error.
Not collected by pytest (its name does not start with test_)."""

from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import torch

import qairn
import qairn.engine.video
from qairn.engine.imageio import read_image
from qairn.engine.jpeg import JpegFile, consistent, read_jpeg
from qairn.engine.video import VideoOptions, frame_planes, transcode
from qairn.export.onnx_export import export_onnx


def image(path: str) -> np.ndarray:
    return read_image(path)


def restorer() -> qairn.Restorer:
    return qairn.Restorer(weights=Path("w.safetensors"), device="cpu", backend="eager", precision="fp32")


def ensemble_restorer() -> qairn.Restorer:
    return qairn.Restorer(ensemble=8)  # README: the mean of 8 passes, turned and mirrored


def passes(r: qairn.Restorer) -> int:
    return r.ensemble


def exponent(r: qairn.Restorer) -> float:
    return r.p  # the Minkowski p that pools the gate maps into Q1..Q3


def tiling(r: qairn.Restorer) -> tuple[int | str | None, int]:
    tile: int | str | None = r.tile
    return tile, r.overlap


def is_closed(r: qairn.Restorer) -> bool:
    return r.closed


def restored(r: qairn.Restorer, img: np.ndarray) -> qairn.Result:
    return r.restore(img, return_maps=True, channel_order="bgr", progress=lambda done, total: None, bits=None)


def restored_pixels(res: qairn.Result) -> np.ndarray:
    # None where only the quality was asked for (image=False); restore_yuv's are the planes (y, u, v).
    if res.image is None:
        raise ValueError("scored only")
    if isinstance(res.image, tuple):
        luma = res.image[0]
        return luma if isinstance(luma, np.ndarray) else luma.cpu().numpy()
    if isinstance(res.image, torch.Tensor):
        return res.image.cpu().numpy()
    return res.image


def quality(res: qairn.Result) -> float:
    q2: float = res.quality["Q2"]
    return q2


def as_restore_writes_it(r: qairn.Restorer, path: str) -> np.ndarray:
    # README: a JPEG file's restoration clipped to its quantization bins, as `qairn restore` writes it
    img = read_image(path)
    out = r.restore(img).image
    assert isinstance(out, np.ndarray)
    jpeg: JpegFile | None = read_jpeg(path)
    return consistent(out, img, jpeg) if jpeg is not None else out


def saved_quality(path: str) -> tuple[int, bool] | None:
    jpeg = read_jpeg(path)
    return None if jpeg is None else (jpeg.quality, jpeg.exact)


def maps(res: qairn.Result) -> list[np.ndarray] | None:
    return res.maps


def caveat(res: qairn.Result) -> str | None:
    why: str | None = res.info["caveat"]
    return why


def score(r: qairn.Restorer, img: np.ndarray) -> float:
    return r.score(img)["Q2"]


def batch_score(r: qairn.Restorer, batch: torch.Tensor) -> torch.Tensor:
    return r.score(batch)["Q2"]  # (N,)


def either_score(r: qairn.Restorer, img: np.ndarray | torch.Tensor) -> float | torch.Tensor:
    return r.score(img)["Q2"]


def batch_quality(r: qairn.Restorer, batch: torch.Tensor) -> torch.Tensor:
    y, q, m = r.restore_tensor(batch)
    return q["Q1"]  # (N,) on the Restorer's device


def planes(frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return frame_planes(frame)


def frame_quality(r: qairn.Restorer, frame: av.VideoFrame) -> qairn.Result:
    y, u, v = qairn.engine.video.frame_planes(frame)
    return r.restore_yuv(y, u, v, matrix=frame.colorspace, range=frame.color_range, bits=None)


def stream(r: qairn.Restorer, frames: list[np.ndarray]) -> Iterator[qairn.Result]:
    return r.restore_stream(frames, batch=4, image=False)


def closed_after_use(weights: str, img: np.ndarray) -> float:
    with qairn.Restorer(weights=weights) as r:
        res = r.restore(img)
        q: float = res.quality["Q1"]
    r.close()
    r.drop_caches()
    return q


def entered(weights: str) -> qairn.Restorer:
    with qairn.Restorer(weights=weights) as r:  # README: `with Restorer() as r:`
        return r


def scored_with_p(r: qairn.Restorer) -> float:
    return r.scored_by()["p"]


def scored_by_weights(r: qairn.Restorer) -> str | None:
    return r.scored_by()["weights"]


def scored_by_sha256(r: qairn.Restorer) -> str:
    return r.scored_by()["weights_sha256"]


def video(r: qairn.Restorer, src: str, dst: str) -> list[Path]:
    summary = transcode(r, src, dst, VideoOptions(codec="libx264", crf=20.0, batch=4))
    return summary["written"]


def video_frames(r: qairn.Restorer, src: str) -> int:
    return transcode(r, src, opts=VideoOptions(score_only=True))["frames"]


def video_quality(r: qairn.Restorer, src: str) -> float:
    return transcode(r, src, opts=VideoOptions(score_only=True))["mean_quality"]["Q2"]


def wrong_arguments(r: qairn.Restorer, model: qairn.QAIRN) -> None:
    # Each is refused by qairn's annotations (else its ignore is unused: --strict warns of that).
    transcode(model, "in.mp4", "out.mkv")  # type: ignore[arg-type]
    transcode(r, 3, "out.mkv")  # type: ignore[arg-type]
    transcode(r, "in.mp4", ["out.mkv"])  # type: ignore[arg-type]
    frame_planes("in.mp4")  # type: ignore[arg-type]
    read_image("a.png", warn="loud")  # type: ignore[arg-type]
    qairn.save_weights(model, "w.safetensors", dtype="fp16")  # type: ignore[arg-type]


def network(path: str) -> qairn.QAIRN:
    return qairn.load_model(path, device="cpu")


def saved(model: qairn.QAIRN, path: str) -> Path:
    return qairn.save_weights(model, path)


def config() -> qairn.QAIRNConfig:
    return qairn.preset("small", p=2.0)


def pooled(gamma: torch.Tensor) -> torch.Tensor:
    return qairn.minkowski(gamma, 2.0)


def presets() -> dict[str, qairn.QAIRNConfig]:
    return qairn.PRESETS


def exported(model: qairn.QAIRN) -> Path:
    return export_onnx(model, "q.onnx", outputs="maps", shape=(4, 512, 512))


def version() -> str:
    return qairn.__version__


# What a caller catches (README); the image and video ones load when first asked for.
def image_error() -> type[ValueError]:
    return qairn.ImageError


def video_error() -> type[RuntimeError]:
    return qairn.VideoError


def misspelt() -> object:
    # A name qairn lacks is an error (else this ignore is unused: --strict warns of that).
    return qairn.Restorr  # type: ignore[attr-defined]


def errors() -> tuple[type[Exception], ...]:
    return (qairn.ColorError, qairn.WeightsError, qairn.BackendError, qairn.engine.video.VideoError)


def caught(path: str) -> str:
    try:
        return str(read_image(path).shape)
    except qairn.ImageError as e:
        error: ValueError = e
        return str(error)
