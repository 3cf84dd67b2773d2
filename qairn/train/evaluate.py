"""Evaluation. `qairn eval`: JPEG restoration in the layout of the paper's Table I (DESIGN section 3).
`qairn eval-quality`: the gamma-pooled scores Q1..Q3 against distortions we generate on the LIVE1
references (Tables II and III layout), and the sweep that picks the Minkowski exponent p on
held-out training images. These are generated distortions, not human opinion scores."""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import multiprocessing
import sys
import time
import warnings
import zlib
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy import optimize, stats

from qairn.engine.cli import ensemble_arg
from qairn.engine.imageio import (
    check_distinct,
    check_figure,
    check_writable,
    path_arg,
    save_figure,
    write_atomic,
)
from qairn.engine.progress import add_quiet, progress_bar
from qairn.messages import counted
from qairn.metrics import psnr, psnr_b, ssim
from qairn.train.data import list_images

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared beside the checkout
QFS = (10, 20, 30, 40)
PROTOCOL = (
    "../shared/DESIGN.md section 3: the PNG's BGR array is compressed with cv2.imencode at the QF and "
    "decoded; PSNR over all RGB channels; SSIM 11x11 Gaussian sigma 1.5, valid region, per RGB channel; "
    "PSNR-B with the BEF of the studio-range BT.601 Y of the tested image; no border crop"
)
# Published on the same protocol (LIVE1 colour): PSNR, SSIM, PSNR-B. ../shared/DESIGN.md section 3.
PUBLISHED = {
    "QAIRN (paper)": {
        10: (27.25, 0.803, 26.90),
        20: (29.60, 0.868, 29.14),
        30: (30.94, 0.896, 30.41),
        40: (31.86, 0.911, 31.29),
    },
    "FBCNN (paper)": {10: (27.77, 0.803, 27.51)},
}
METRICS = ("psnr", "ssim", "psnrb")
NOT_HUMAN = (
    "NOTE: these are distortions generated here (JPEG, JPEG 2000, blur, noise on the LIVE1 "
    "references) scored against their level and against full-reference SSIM; they are NOT "
    "human opinion scores (LIVE/CSIQ/TID2013 cannot be used on these machines)."
)


# ---- images --------------------------------------------------------------------------------------
def read_rgb(path: str | Path, crop: int = 0) -> np.ndarray:
    """RGB uint8; crop > 0 takes a centred crop of at most crop x crop (for quick runs)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{path}: cannot read image")
    if crop:
        h, w = bgr.shape[:2]
        y, x = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
        bgr = bgr[y : y + crop, x : x + crop]
    return np.ascontiguousarray(bgr[..., ::-1])


SSIM_MIN = 11  # SSIM's 11x11 window


def read_reference(path: str | Path, crop: int = 0) -> np.ndarray:
    """read_rgb for the metrics: SSIM's 11x11 window needs at least 11x11 pixels (said here, with the
    file's name, rather than by ssim() deep in a metrics worker)."""
    rgb = read_rgb(path, crop)
    h, w = rgb.shape[:2]
    if min(h, w) < SSIM_MIN:
        raise ValueError(too_small_for_ssim(path, w, h, crop))
    return rgb


def too_small_for_ssim(path, w: int, h: int, crop: int) -> str:
    return (
        f"{path}: {w}x{h} pixels{' after --crop' if crop else ''}; SSIM needs at least {SSIM_MIN}x{SSIM_MIN}"
    )


def header_sizes(files, crop: int = 0):
    """(file, width, height) of each image as read_rgb gives it (EXIF quarter turns, --crop), from its
    header alone: Pillow reads no pixels for the size. A file Pillow cannot read is left out: its own
    error comes when it is decoded. For refusing a small image before any work: the checks as each
    image is reached came after the images before it (minutes each on a CPU)."""
    from PIL import Image

    for f in files:
        try:
            with Image.open(f) as im:
                w, h = im.size
                if im.getexif().get(0x0112) in (5, 6, 7, 8):  # turned a quarter, as cv2.imread turns it
                    w, h = h, w
        except Exception:
            continue
        yield (f, min(w, crop), min(h, crop)) if crop else (f, w, h)


def encoded_rgb(rgb: np.ndarray, ext: str, params: list[int]) -> tuple[np.ndarray, bytes]:
    """rgb through OpenCV's codec (on the BGR array): the decoded RGB, and the file's bytes."""
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]), params)
    if not ok:
        raise RuntimeError(f"cv2.imencode({ext!r}) failed")
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]), buf.tobytes()


def encode_rgb(rgb: np.ndarray, ext: str, params: list[int]) -> np.ndarray:
    return encoded_rgb(rgb, ext, params)[0]


def jpeg_rgb(rgb: np.ndarray, qf: int) -> np.ndarray:
    """The protocol's JPEG: OpenCV's codec on the BGR array, decoded back to RGB."""
    return encode_rgb(rgb, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, int(qf)])


def measure(ref: np.ndarray, test: np.ndarray) -> dict:
    return {"psnr": psnr(ref, test), "ssim": ssim(ref, test), "psnrb": psnr_b(ref, test)}


class Inline(Executor):
    """An Executor that runs each call at once (one process; no pickling)."""

    def submit(self, fn, /, *args, **kwargs):
        f = Future()
        f.set_result(fn(*args, **kwargs))
        return f


def _pool_init():
    cv2.setNumThreads(1)  # a forked child must not use the parent's OpenCV thread pool


@contextlib.contextmanager
def executor(workers: int):
    """A metrics executor for a `with` block. Metrics are numpy/OpenCV only (no torch, no CUDA):
    worker processes overlap them with the restoration on a GPU. Leaving the block by an exception
    (Ctrl-C, SIGTERM) cancels the queued jobs instead of waiting for them all: on a GPU the queue
    runs far ahead of the workers."""
    if workers <= 1:
        yield Inline()
        return
    # spawn, not fork: a child forked while OpenCV's or OpenMP's thread pool holds a lock deadlocks
    # (seen in CI: the child hung in cv2.setNumThreads inside the initializer).
    ex = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_pool_init)
    try:
        yield ex
    except BaseException:
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown(wait=True)


def make_restorer(weights=None, model=None, device="cpu", tile=None, precision="fp32", p=None, ensemble=1):
    from qairn.engine.restorer import Restorer

    return Restorer(
        weights=weights, model=model, device=device, tile=tile, precision=precision, p=p, ensemble=ensemble
    )


def describe(restorer) -> dict:
    model = restorer.backend.model if hasattr(restorer.backend, "model") else None
    d = {
        "preset": restorer.config.preset,
        "widths": list(restorer.config.widths),
        "nb": restorer.config.nb,
        "p": restorer.p,
        "device": str(restorer.device),
        "tile": restorer.tile,
        "ensemble": restorer.ensemble,
    }
    if model is not None:
        d["params"] = sum(t.numel() for t in model.parameters())
    return d


# ---- restoration (Table I) -----------------------------------------------------------------------
def eval_restoration(
    files, qfs=QFS, restorer=None, workers: int = 1, crop: int = 0, progress: bool = True, jpeg_clip=False
):
    """Per image and QF: metrics of the JPEG and (when restorer is given) of its restoration; with
    jpeg_clip, the restoration clipped to the JPEG's quantization bins, as `qairn restore` writes it."""
    from qairn.engine.jpeg import consistent, read_jpeg

    rows, futures = [], []
    with executor(workers) as ex:
        bar = progress_bar(total=len(files) * len(qfs), desc="eval", disable=not progress, dynamic_ncols=True)
        for f in files:
            ref = read_reference(f, crop)
            for qf in qfs:
                jp, data = encoded_rgb(ref, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, int(qf)])
                row = {"image": Path(f).stem, "qf": int(qf)}
                futures.append((row, "jpeg", ex.submit(measure, ref, jp)))
                if restorer is not None:
                    t0, c0 = time.perf_counter(), time.process_time()
                    out = restorer.restore(jp).image
                    if jpeg_clip:  # (timed with the network: it is part of what restore does)
                        out = consistent(out, jp, read_jpeg(data))
                    row["seconds"] = time.perf_counter() - t0
                    row["cpu_seconds"] = time.process_time() - c0
                    futures.append((row, "restored", ex.submit(measure, ref, out)))
                rows.append(row)
                bar.update(1)
        bar.close()
        for row, key, fut in futures:
            row[key] = fut.result()
    return rows


def summarize(rows, qfs=QFS) -> dict:
    out = {}
    for qf in qfs:
        sel = [r for r in rows if r["qf"] == qf]
        out[qf] = {}
        for key in ("jpeg", "restored"):
            if sel and key in sel[0]:
                out[qf][key] = {m: float(np.mean([r[key][m] for r in sel])) for m in METRICS}
        if "restored" in out[qf]:
            out[qf]["gain"] = {m: out[qf]["restored"][m] - out[qf]["jpeg"][m] for m in METRICS}
    return out


def cell(v) -> str:
    if v is None:
        return "-"
    p, s, b = (v[m] for m in METRICS) if isinstance(v, dict) else v
    return f"{p:.2f} / {s:.3f} / {b:.2f}"


def crop_note(crop: int) -> str:
    return f", centre crops of at most {crop}x{crop}" if crop else ""


def table1(summary: dict, n_images: int, data: str, crop: int = 0) -> str:
    cols = ["JPEG", "ours"] + list(PUBLISHED)
    lines = [
        f"Restoration, {data} ({counted(n_images, 'image')}{crop_note(crop)}), colour: "
        "mean PSNR (dB) / SSIM / PSNR-B (dB)",
        f"{'QF':>3}  " + "  ".join(f"{c:<22}" for c in cols),
    ]
    for qf, s in summary.items():
        vals = [s.get("jpeg"), s.get("restored")] + [PUBLISHED[k].get(qf) for k in PUBLISHED]
        lines.append(f"{qf:>3}  " + "  ".join(f"{cell(v):<22}" for v in vals))
    lines.append(f"protocol: {PROTOCOL}")
    if crop:  # the published columns are whole images: say so under a table that sets them side by side
        lines.append(
            f"NOT the protocol's whole images: --crop {crop} scored centre crops, not comparable with the "
            "published columns"
        )
    return "\n".join(lines)


def plot_restoration(summary: dict, png: str | Path, n_images: int, data: str, crop: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qfs = list(summary)
    # --limit 3 drew 3 images' means beside the papers' 29 with nothing saying so: the legend and the
    # title give each line's image count, as the table's header does.
    ours = counted(n_images, "image")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.9))
    fig.suptitle(
        f"{data}: means of {ours}{crop_note(crop)}; the published rows: the 29 LIVE1 images", fontsize=10
    )
    for ax, (i, m) in zip(axes, enumerate(METRICS), strict=False):
        for key, style in (("jpeg", "o-"), ("restored", "s-")):
            if key in summary[qfs[0]]:
                label = f"{'JPEG' if key == 'jpeg' else 'ours'} ({ours})"
                ax.plot(qfs, [summary[q][key][m] for q in qfs], style, label=label)
        for name, rows in PUBLISHED.items():
            q = [q for q in qfs if q in rows]
            ax.plot(q, [rows[x][i] for x in q], "x--", label=f"{name}, 29 images")
        ax.set_xlabel("JPEG quality factor")
        ax.set_title({"psnr": "PSNR (dB)", "ssim": "SSIM", "psnrb": "PSNR-B (dB)"}[m])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, png)
    plt.close(fig)


def model_args(ap: argparse.ArgumentParser) -> None:
    """qairn eval's and eval-quality's model: its weights, device and tiling."""
    ap.add_argument("--weights", default=None, help="qairn safetensors (default: the shipped weights)")
    ap.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N (default: auto)",
    )
    ap.add_argument("--tile", type=int, default=0, help="tile size (default 0: whole images)")


def subset_args(ap: argparse.ArgumentParser) -> None:
    """qairn eval's and eval-quality's quick runs on fewer or smaller images."""
    ap.add_argument("--limit", type=int, default=0, help="first N images only (default 0: all)")
    ap.add_argument(
        "--crop",
        type=int,
        default=0,
        help="centre crop of at most N x N (quick runs; default 0: whole images)",
    )


def check_outputs(json_path: str | None, plot: str | None, weights: str | None) -> None:
    """--json and --plot, refused before any work: a missing folder, a figure not named .png, both
    naming one file (the figure was renamed over the report), a report over the weights file (the
    model was gone after the run; a figure must end in .png)."""
    check_writable(json_path, plot)
    check_figure(plot)
    check_distinct({"--json": json_path, "--plot": plot}, {"the weights file": weights})


def check_not_images(outputs: dict, images: list[Path]) -> None:
    """--json and --plot ({flag: path or None}) against every image read, --limit or not: `--data live1
    --plot live1/bikes.png` replaced that reference image with the figure."""
    read = {Path(f).resolve() for f in images}
    for flag, out in outputs.items():
        if out and Path(out).resolve() in read:
            raise SystemExit(f"{flag} {out}: is one of the images read; write to another file")


# option -> what its 0 means
COUNTS = {"limit": "all", "crop": "all", "threads": "torch's default", "tile": "whole images"}


def check_counts(a) -> None:
    """--limit -1 took all images but the last (a slice), --crop -5 failed as a '0x0 pixels' image,
    --threads -1 ended in torch's traceback, --tile -5 was refused once the model had loaded, naming no
    option, and --workers 0 or -2 ran as 1 without a word."""
    for name, zero in COUNTS.items():
        if getattr(a, name) < 0:
            raise SystemExit(f"--{name} {getattr(a, name)}: must be 0 ({zero}) or a positive number")
    if a.workers < 1:
        raise SystemExit(f"--workers {a.workers}: must be 1 or more (processes)")


def main_eval(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qairn eval", description="JPEG restoration metrics (paper Table I).")
    ap.add_argument(
        "--data",
        type=path_arg,
        default=str(DATA / "live1"),
        help=f"folder of lossless reference images (default: {DATA / 'live1'})",
    )
    ap.add_argument(
        "--qf", type=int, nargs="+", default=list(QFS), help="JPEG qualities (default 10 20 30 40)"
    )
    model_args(ap)
    ensemble_arg(ap)
    ap.add_argument("--jpeg-only", action="store_true", help="only the unrestored JPEG (the floor)")
    ap.add_argument(
        "--jpeg-clip",
        action="store_true",
        help="clip each restoration to its JPEG's quantization bins, as `qairn restore` does to a JPEG "
        "file (default: the network's picture, the paper's protocol)",
    )
    subset_args(ap)
    ap.add_argument("--workers", type=int, default=1, help="processes for the metrics (default 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", type=path_arg, help="write the means per QF and every image's metrics here")
    ap.add_argument("--plot", type=path_arg, help="PNG figure: metrics against QF")
    add_quiet(ap)
    a = ap.parse_args(argv)
    bad_qf = [q for q in a.qf if not 1 <= q <= 100]
    if bad_qf:
        raise SystemExit(f"--qf {' '.join(map(str, bad_qf))}: JPEG quality factors are 1..100")
    a.qf = list(dict.fromkeys(a.qf))  # --qf 10 10 measured every image twice at 10
    if a.jpeg_clip and a.jpeg_only:  # (the clip was ignored without a word)
        ap.error("--jpeg-clip with --jpeg-only: nothing is restored to clip")
    check_counts(a)
    check_outputs(a.json, a.plot, a.weights)
    if a.threads:
        torch.set_num_threads(a.threads)
    images = list_images(a.data)
    check_not_images({"--json": a.json, "--plot": a.plot}, images)
    files = images[: a.limit or None]
    for f, w, h in header_sizes(files, a.crop):  # before any work (read_reference checks it again)
        if min(w, h) < SSIM_MIN:
            raise ValueError(too_small_for_ssim(f, w, h, a.crop))
    restorer = None
    if not a.jpeg_only:
        restorer = make_restorer(a.weights, device=a.device, tile=a.tile or None, ensemble=a.ensemble)
    rows = eval_restoration(
        files, a.qf, restorer, a.workers, a.crop, progress=not a.quiet, jpeg_clip=a.jpeg_clip
    )
    summary = summarize(rows, a.qf)
    print(table1(summary, len(files), Path(a.data).name, a.crop))
    if a.jpeg_clip and restorer is not None:
        print(
            "restorations clipped to each JPEG's quantization bins (--jpeg-clip), as `qairn restore` "
            "writes them"
        )
    result = {
        "protocol": PROTOCOL,
        "data": str(a.data),
        "n_images": len(files),
        "crop": a.crop,
        "qfs": {str(k): v for k, v in summary.items()},
        "published": PUBLISHED,
        "images": rows,
    }
    if restorer is not None:
        result["model"] = describe(restorer) | {"weights": a.weights or "shipped default"}
        result["jpeg_clip"] = a.jpeg_clip
        result["seconds_per_image"] = float(np.mean([r["seconds"] for r in rows]))
        result["cpu_seconds_per_image"] = float(np.mean([r["cpu_seconds"] for r in rows]))
        print(
            f"{result['seconds_per_image']:.3f} s per image ({result['cpu_seconds_per_image']:.3f} CPU s) "
            f"on {restorer.device}"
        )
    writes = {}
    if a.json:
        # Strict JSON: an image that comes back identical has an infinite PSNR, which json.dumps wrote
        # as the bare word Infinity that jq, JavaScript and most parsers refuse; it is null here.
        result["null_means"] = "an infinite PSNR / PSNR-B: the image equals its reference"
        report = json.dumps(without_nan(result), indent=1, allow_nan=False).encode()
        writes[a.json] = lambda: write_atomic(a.json, report)
    if a.plot:
        writes[a.plot] = lambda: plot_restoration(summary, a.plot, len(files), Path(a.data).name, a.crop)
    return write_results(ap.prog, writes)


def write_results(prog: str, writes: dict) -> int:
    """Run each write (path -> a function writing it), once the work is done: 0, or 1 with one line
    naming the file where one fails (a full disk). The qairn command said such an OSError as a usage
    error, exit 2 (refused before any work), naming no file: "[Errno 28] No space left on device"."""
    for path, write in writes.items():
        try:
            write()
        except OSError as e:
            print(f"{prog}: error: {path}: cannot write ({e.strerror or e})", file=sys.stderr)
            return 1
    return 0


# ---- fp16 export check ---------------------------------------------------------------------------
def jpeg_pairs(files, qfs, crop: int = 0) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(qf, reference, its protocol JPEG) for each file at each QF; crop > 0: centre crops."""
    refs = [read_rgb(f, crop) for f in files]
    return [(qf, ref, jpeg_rgb(ref, qf)) for ref in refs for qf in qfs]


# A restored image equal to its reference (a flat image) has an infinite PSNR: the fp16 check's loss was
# then inf - inf = NaN, written into the weights' metadata as NaN (not JSON). It counts as this many dB.
PSNR_CAP_DB = 100.0


def restored_psnrs(restorer, pairs) -> list[float]:
    """PSNR of each restored JPEG against its reference, in the pairs' order, at most PSNR_CAP_DB."""
    return [min(psnr(ref, restorer.restore(jpeg).image), PSNR_CAP_DB) for _, ref, jpeg in pairs]


def fp16_check(model, files, qfs=QFS, device="cpu", max_loss_db: float = 0.02, crop: int = 0) -> dict:
    """Restored PSNR on the held-out images with the fp32 weights and with fp16-rounded weights.

    The decision is fp16 only when the mean PSNR loss is below max_loss_db.
    """
    if not files:
        return {"dtype": "fp32", "reason": "no validation images to check fp16 on"}
    m32 = copy.deepcopy(model).float()
    m16 = copy.deepcopy(m32)
    with torch.no_grad():
        for t in m16.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    pairs = jpeg_pairs(files, qfs, crop)
    p32 = restored_psnrs(make_restorer(model=m32, device=device), pairs)
    p16 = restored_psnrs(make_restorer(model=m16, device=device), pairs)
    loss = float(np.mean(p32) - np.mean(p16))
    return {
        "dtype": "fp16" if loss < max_loss_db else "fp32",
        "psnr_fp32": float(np.mean(p32)),
        "psnr_fp16": float(np.mean(p16)),
        "loss_db": loss,
        "max_loss_db": max_loss_db,
        "qfs": list(qfs),
        "images": [Path(f).name for f in files],
        "crop": crop,
    }


# ---- quality (Tables II and III) -----------------------------------------------------------------
# kind -> (label, levels, direction): direction +1 when a larger level means less distortion.
DISTORTIONS = {
    "jpeg": ("QF", (5, 10, 20, 30, 50, 80), +1),
    "jp2k": ("rate x1000", (5, 10, 20, 40, 80, 160), +1),
    "blur": ("sigma", (0.5, 1.0, 1.5, 2.0, 3.0, 5.0), -1),
    "noise": ("sigma", (5.0, 10.0, 20.0, 30.0, 50.0), -1),
}
JP2K_MIN = 32  # OpenJPEG's default 6 resolutions halve a side 5 times: smaller images cannot be encoded
# The range reaches past p=16 (once chosen on the shipped weights) on both sides. (The H200 run's 0.25
# was no choice: its Q2 was constant at every p, all SRCC NaN, and sweep_p then took the first p.)
P_GRID = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0, 64.0)


def distort(rgb: np.ndarray, kind: str, level: float, seed: int = 0) -> np.ndarray:
    if kind == "jpeg":
        return jpeg_rgb(rgb, int(level))
    if kind == "jp2k":  # OpenCV's .jp2 writer; the level is IMWRITE_JPEG2000_COMPRESSION_X1000
        return encode_rgb(rgb, ".jp2", [cv2.IMWRITE_JPEG2000_COMPRESSION_X1000, int(level)])
    if kind == "blur":
        return cv2.GaussianBlur(rgb, (0, 0), float(level))
    if kind == "noise":
        rng = np.random.default_rng(seed)
        return np.clip(rgb + rng.normal(0.0, float(level), rgb.shape), 0, 255).round().astype(np.uint8)
    raise ValueError(f"unknown distortion {kind!r}")


def minkowski_np(g: np.ndarray, p: float) -> float:
    return float(np.mean(g.astype(np.float64) ** p) ** (1.0 / p))


def score_job(ref, img, maps, p_grid):
    """SSIM to the reference and, for each p of p_grid, Q1..Q3 from the gamma maps (CPU work)."""
    out = {"ssim": ssim(ref, img)}
    if p_grid is not None:
        out["grid"] = {f"Q{n + 1}": [minkowski_np(g, p) for p in p_grid] for n, g in enumerate(maps)}
    return out


def too_small_for_jp2k(path, w: int, h: int, crop: int) -> str:
    return (
        f"{path}: {w}x{h} pixels{' after --crop' if crop else ''}; the JPEG 2000 distortion "
        f"(OpenJPEG, 5 wavelet levels) needs at least {JP2K_MIN}x{JP2K_MIN}"
    )


def check_quality_sizes(files, crop: int = 0) -> None:
    """Refuse an image too small for the JPEG 2000 distortion before any work (header_sizes)."""
    for f, w, h in header_sizes(files, crop):
        if min(w, h) < JP2K_MIN:
            raise ValueError(too_small_for_jp2k(f, w, h, crop))


def quality_records(restorer, files, crop=0, p_grid=None, workers=1, seed=0, progress=True):
    """One record per (image, distortion, level): Q1..Q3 (at the restorer's p), SSIM to the reference,
    and with p_grid, Q1..Q3 for every p of the grid (from the same gamma maps)."""
    recs, futures = [], []
    jobs = [(f, k, lv) for f in files for k, (_, levels, _) in DISTORTIONS.items() for lv in levels]
    refs = {}
    with executor(workers) as ex:
        for f, kind, level in progress_bar(jobs, desc="quality", disable=not progress, dynamic_ncols=True):
            if f not in refs:
                refs = {f: read_reference(f, crop)}
                h, w = refs[f].shape[:2]
                if min(h, w) < JP2K_MIN:  # else cv2.imencode('.jp2') fails with no word of why
                    raise ValueError(too_small_for_jp2k(f, w, h, crop))
            ref = refs[f]
            name = Path(f).stem
            img = distort(ref, kind, level, seed=zlib.crc32(f"{seed}:{name}:{level}".encode()))
            res = restorer.restore(img, return_maps=p_grid is not None)
            rec = {"image": name, "kind": kind, "level": level, **res.quality}
            futures.append((rec, ex.submit(score_job, ref, img, res.maps, p_grid)))
            recs.append(rec)
        for rec, fut in futures:
            rec.update(fut.result())
    return recs


def logistic5(x, b1, b2, b3, b4, b5):
    with np.errstate(over="ignore"):  # exp overflow -> inf -> the logistic's limit, as intended
        return b1 * (0.5 - 1.0 / (1.0 + np.exp(b2 * (x - b3)))) + b4 * x + b5


def pcc_logistic(x: np.ndarray, y: np.ndarray) -> float:
    """PCC after the 5-parameter logistic of Sheikh, Sabir, Bovik (2006) maps x onto y, with the sign
    of the raw PCC: the fitted values always rise with y, and an unsigned value beside the signed
    PCC, SRCC and KCC read as if a score that runs against the level followed it
    (NaN with fewer than 6 points: five parameters would fit anything)."""
    if len(x) < 6:
        return math.nan
    sx = x.std() or 1.0
    sign = np.sign(stats.pearsonr(x, y)[0] or 1.0)
    raw = float(abs(stats.pearsonr(x, y)[0]))  # where no fit converges (a fit is never worse)

    def fit(p0, maxfev):  # (sum of squared errors, PCC of the fitted values), or None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # OptimizeWarning, overflow in exp far out
                b, _ = optimize.curve_fit(logistic5, x, y, p0=p0, maxfev=maxfev)
                fitted = logistic5(x, *b)
        except (RuntimeError, ValueError):
            return None
        if not np.all(np.isfinite(fitted)) or np.ptp(fitted) == 0:
            return None
        return float(np.sum((fitted - y) ** 2)), float(stats.pearsonr(fitted, y)[0])

    best = fit([y.max() - y.min(), sign / sx, x.mean(), 0.0, y.mean()], 20000)
    if best is None or best[1] < raw:
        # The one start stopped early or in a poor local optimum: try other slopes and centres, and
        # keep the fit with the least squared error (the fit's own criterion, not the best-looking PCC).
        for scale in (0.5, 3.0, 10.0):
            for centre in np.quantile(x, (0.25, 0.5, 0.75)):
                f = fit([y.max() - y.min(), sign * scale / sx, centre, 0.0, y.mean()], 2000)
                if f is not None and (best is None or f[0] < best[0]):
                    best = f
    return sign * (raw if best is None else max(best[1], raw))


def correlations(x, y) -> dict:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"pcc": math.nan, "pcc_log": math.nan, "srcc": math.nan, "kcc": math.nan}
    return {
        "pcc": float(stats.pearsonr(x, y)[0]),
        "pcc_log": pcc_logistic(x, y),
        "srcc": float(stats.spearmanr(x, y)[0]),
        "kcc": float(stats.kendalltau(x, y)[0]),
    }


def quality_tables(recs) -> dict:
    """{"level": {kind: {Qn: corr}}, "ssim": {kind or "all": {Qn: corr}}}."""
    out = {"level": {}, "ssim": {}}
    for kind, (_, _, direction) in DISTORTIONS.items():
        sel = [r for r in recs if r["kind"] == kind]
        out["level"][kind] = {
            q: correlations([r[q] for r in sel], [direction * r["level"] for r in sel])
            for q in ("Q1", "Q2", "Q3")
        }
        out["ssim"][kind] = {
            q: correlations([r[q] for r in sel], [r["ssim"] for r in sel]) for q in ("Q1", "Q2", "Q3")
        }
    out["ssim"]["all"] = {
        q: correlations([r[q] for r in recs], [r["ssim"] for r in recs]) for q in ("Q1", "Q2", "Q3")
    }
    return out


def format_table(title: str, table: dict) -> str:
    head = "  ".join(
        f"{q + ' ' + c:>9}" for q in ("Q1", "Q2", "Q3") for c in ("PCC", "PCClog", "SRCC", "KCC")
    )
    lines = [title, f"{'':<18}" + head]
    for kind, row in table.items():
        label = (
            kind
            if kind == "all"
            else f"{kind} ({'' if DISTORTIONS[kind][2] > 0 else '-'}{DISTORTIONS[kind][0]})"
        )
        vals = [row[q][c] for q in ("Q1", "Q2", "Q3") for c in ("pcc", "pcc_log", "srcc", "kcc")]
        lines.append(f"{label:<18}" + "  ".join(f"{v:>9.3f}" for v in vals))
    return "\n".join(lines)


def _srcc_or_zero(x, y) -> float:
    """SRCC, 0 where it is undefined (a constant or NaN score ranks nothing): NaN would drop the type
    from a nanmean, or win max() as the first row's NaN key (no comparison with NaN is true)."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:  # (and no ConstantInputWarning)
        return 0.0
    r = float(stats.spearmanr(x, y)[0])
    return 0.0 if math.isnan(r) else r


def sweep_p(recs, p_grid=P_GRID, q: str = "Q2", prefer: float = 2.0) -> dict:
    """Pick p: the mean over distortion types of SRCC(Q(p), SSIM to the reference) is largest
    (ties, to 1e-6: the p closest to `prefer`, on a log scale). A type on which Q(p) is constant
    counts 0; where Q is constant at every p, all tie and `prefer` is kept, with a note."""
    rows, ranked = [], False
    for i, p in enumerate(p_grid):
        by_ssim, by_level = [], []
        for kind, (_, _, direction) in DISTORTIONS.items():
            sel = [r for r in recs if r["kind"] == kind]
            if not sel:  # a type not in the records is not in the mean
                continue
            qs = np.array([r["grid"][q][i] for r in sel], np.float64)
            ranked |= bool(np.ptp(qs) > 0)
            by_ssim.append(_srcc_or_zero(qs, [r["ssim"] for r in sel]))
            by_level.append(_srcc_or_zero(qs, [direction * r["level"] for r in sel]))
        rows.append({"p": p, "srcc_ssim": float(np.mean(by_ssim)), "srcc_level": float(np.mean(by_level))})
    best = max(rows, key=lambda r: (round(r["srcc_ssim"], 6), -abs(math.log(r["p"] / prefer))))
    out = {
        "p": best["p"],
        "criterion": f"max mean over distortion types of SRCC({q}(p), SSIM)",
        "q": q,
        "grid": rows,
    }
    if not ranked:  # the tie-break would take the grid's p nearest `prefer`, not `prefer` itself
        out["p"] = float(prefer)
        out["note"] = (
            f"{q} is constant within each distortion type at every p: nothing to choose p by; "
            f"p kept at {prefer:g}"
        )
    return out


def write_p(path: str | Path, p: float, info: dict) -> None:
    """Rewrite the weights file's config p (and record the sweep), atomically."""
    from safetensors import safe_open

    from qairn.model import QAIRNConfig
    from qairn.weights_io import read_metadata, write_weights

    path = Path(path)
    meta = dict(read_metadata(path))
    config = json.loads(meta["config"])
    config["p"] = float(p)
    QAIRNConfig.from_json(json.dumps(config))  # still a valid config
    meta["config"] = json.dumps(config, sort_keys=True)
    meta["p_sweep"] = json.dumps(info, sort_keys=True)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    write_weights(path, tensors, meta)


def validation_files(weights, train_data: str, holdout: int, val_data: str | None) -> list[Path]:
    """The training run's held-out images: a --val-data folder, the names the weights recorded, or
    trainer.split_files on the training folder. Never LIVE1."""
    if val_data:
        return list_images(val_data)
    from qairn.engine.restorer import default_weights
    from qairn.train.trainer import split_files
    from qairn.weights_io import read_metadata

    weights = weights or default_weights()  # the shipped file records its held-out images too
    training = json.loads(read_metadata(weights).get("training", "{}") or "{}")
    recorded = training.get("val_files")
    if recorded == []:  # trained on every image (--val-holdout 0): none of them is held out
        raise SystemExit(
            f"{weights}: its run held no images out (--val-holdout 0); sweep p on others with --val-data DIR"
        )
    if recorded:
        # A run given --val-data recorded its images' paths under that folder, not the training folder.
        folder = training.get("args", {}).get("val_data") or train_data
        files = [Path(folder) / n for n in recorded]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            where = (
                "the run's --val-data"
                if folder != train_data
                else "point --train-data at the run's training folder"
            )
            raise FileNotFoundError(
                f"held-out images recorded in {weights} not in {folder}: {missing[:3]}... "
                f"({where}, or give the images with --val-data DIR)"
            )
        return files
    if holdout < 1:  # else the sweep ran on no image: a grid of nan SRCCs, and p "kept", exit 0
        raise SystemExit(
            f"--val-holdout {holdout}: no held-out image to choose p on ({weights} does not name its "
            "run's); give the run's number of held-out images, or the images with --val-data DIR"
        )
    return split_files(train_data, holdout)[1]


def plot_quality(recs, png: str | Path, q: str = "Q2") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DISTORTIONS), figsize=(4 * len(DISTORTIONS), 3.6), sharey=True)
    for ax, (kind, (label, _levels, _)) in zip(axes, DISTORTIONS.items(), strict=False):
        for name in dict.fromkeys(r["image"] for r in recs):
            sel = [r for r in recs if r["kind"] == kind and r["image"] == name]
            ax.plot([r["level"] for r in sel], [r[q] for r in sel], "-", lw=0.8, alpha=0.7)
        ax.set_xlabel(f"{kind}: {label}")
        if kind == "jp2k":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{q} (one line per image)")
    fig.suptitle("generated distortions, not human scores", fontsize=9)
    fig.tight_layout()
    save_figure(fig, png)
    plt.close(fig)


def main_quality(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="qairn eval-quality",
        description="Q1..Q3 against distortions generated on reference images (the paper's Tables II "
        "and III layout), and with --sweep-p the choice of the Minkowski exponent p on held-out "
        "training images. Generated distortions, not human opinion scores.",
    )
    ap.add_argument(
        "--data",
        type=path_arg,
        default=str(DATA / "live1"),
        help=f"reference images for the report (default: {DATA / 'live1'})",
    )
    model_args(ap)
    subset_args(ap)
    ap.add_argument("--workers", type=int, default=1, help="processes for SSIM (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="white-noise seed (default 0)")
    ap.add_argument("--sweep-p", action="store_true", help="choose p on the training run's held-out images")
    ap.add_argument(
        "--train-data",
        type=path_arg,
        default=str(DATA / "train"),
        help="--sweep-p: the run's training folder, where its held-out images are (default: %(default)s)",
    )
    ap.add_argument(
        "--val-holdout",
        type=int,
        default=8,
        help="--sweep-p: images the run held out, where its weights do not name them (default 8)",
    )
    ap.add_argument("--val-data", type=path_arg, help="held-out images (default: those of the training run)")
    ap.add_argument("--write-p", type=path_arg, metavar="WEIGHTS", help="store the chosen p in this file")
    ap.add_argument("--no-report", action="store_true", help="skip the LIVE1 report (sweep only)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument(
        "--json", type=path_arg, help="write the tables, every record and the p sweep (--sweep-p) here"
    )
    ap.add_argument("--plot", type=path_arg, help="PNG figure: Q2 against the level, one line per image")
    add_quiet(ap)
    a = ap.parse_args(argv)
    check_counts(a)
    check_outputs(a.json, a.plot, a.weights or a.write_p)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.write_p and not a.sweep_p:
        ap.error("--write-p needs --sweep-p")
    if a.plot and a.no_report:
        raise SystemExit("--plot draws the LIVE1 report, which --no-report skips")
    if a.write_p and a.weights and Path(a.write_p).resolve() != Path(a.weights).resolve():
        raise SystemExit(
            f"--write-p {a.write_p}: p is swept for --weights {a.weights}; it belongs in that file"
        )
    weights = a.weights or a.write_p
    # The images first: a --data typo was one line of error after the long NOTE below.
    val = (
        validation_files(weights, a.train_data, a.val_holdout, a.val_data)[: a.limit or None]
        if a.sweep_p
        else []
    )
    if any(Path(f).resolve().parent == Path(a.data).resolve() for f in val):
        raise SystemExit("refusing to choose p on the report's own images")
    images = [] if a.no_report else list_images(a.data)
    check_not_images({"--json": a.json, "--plot": a.plot}, [*val, *images])
    files = images[: a.limit or None]
    check_quality_sizes([*val, *files], a.crop)
    restorer = make_restorer(weights, device=a.device, tile=a.tile or None)
    result = {
        "note": NOT_HUMAN,
        "distortions": {k: list(v[1]) for k, v in DISTORTIONS.items()},
        "model": describe(restorer) | {"weights": weights or "shipped default"},
    }
    print(NOT_HUMAN)
    if a.sweep_p:
        recs = quality_records(restorer, val, a.crop, P_GRID, a.workers, a.seed, progress=not a.quiet)
        sweep = sweep_p(recs, prefer=restorer.p)
        sweep["images"] = [Path(f).name for f in val]
        sweep["crop"] = a.crop
        print(
            f"p sweep on {counted(len(val), 'held-out training image')} "
            f"(not LIVE1{crop_note(a.crop)}), {sweep['criterion']}:"
        )
        for r in sweep["grid"]:
            mark = "  <- chosen" if r["p"] == sweep["p"] else ""
            print(
                f"  p={r['p']:<5g} SRCC vs SSIM {r['srcc_ssim']:.4f}  "
                f"SRCC vs level {r['srcc_level']:.4f}{mark}"
            )
        if "note" in sweep:
            print(sweep["note"])
        result["p_sweep"] = sweep
        if a.write_p:
            if write_results(ap.prog, {a.write_p: lambda: write_p(a.write_p, sweep["p"], sweep)}):
                return 1
            if not a.quiet:
                print(f"wrote p={sweep['p']:g} into {a.write_p}")
        restorer.p = float(sweep["p"])
    if not a.no_report:
        recs = quality_records(restorer, files, a.crop, None, a.workers, a.seed, progress=not a.quiet)
        tables = quality_tables(recs)
        n = len(files)
        print(
            format_table(
                f"Q against distortion level ({n} {Path(a.data).name} references{crop_note(a.crop)}, "
                f"p={restorer.p:g}; "
                "Table II layout)",
                tables["level"],
            )
        )
        print(format_table("Q against SSIM to the reference (Table III layout)", tables["ssim"]))
        result |= {
            "data": str(a.data),
            "n_images": n,
            "crop": a.crop,
            "p": restorer.p,
            "tables": tables,
            "records": recs,
        }
    writes = {a.plot: lambda: plot_quality(recs, a.plot)} if a.plot else {}
    if a.json:  # NaN (a correlation over too few points) is not JSON: written as null
        report = json.dumps(without_nan(result), indent=1, allow_nan=False).encode()
        writes[a.json] = lambda: write_atomic(a.json, report)
    return write_results(ap.prog, writes)


def without_nan(v):
    """v with its NaN and infinite floats as None (JSON's null: strict JSON has no NaN or Infinity)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: without_nan(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [without_nan(x) for x in v]
    return v


if __name__ == "__main__":
    sys.exit(main_quality())
