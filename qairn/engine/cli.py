"""`qairn restore` and `qairn score`: many files in, one clear line per problem, nothing lost."""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import traceback
import unicodedata
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qairn.engine.caveats import score_caveat
from qairn.engine.imageio import (
    ALPHA_SUFFIXES,
    DEEP_SUFFIXES,
    DEFAULT_MAX_PIXELS,
    EXIF_SUFFIXES,
    ICC_SUFFIXES,
    IMAGE_SUFFIXES,
    WRITE_SUFFIXES,
    ImageError,
    gray_as_colour,
    icc_fits,
    icc_space,
    path_arg,
    read_exif,
    read_icc,
    read_image,
    write_atomic,
    write_image,
)
from qairn.engine.progress import add_quiet, progress_bar
from qairn.engine.tiling import overlap_arg, tile_arg
from qairn.messages import counted

MIN_MAP_HEIGHT = 96  # smaller images get their quality map enlarged, so that its labels fit
# Larger images get their quality map at 1/k size: pixel for pixel, a 200 MP photo's two panels took
# several GB to draw and made a PNG no viewer shows whole (12 MP: 765 MB peak, 45 MB PNG).
MAX_MAP_PIXELS = 4096 * 4096


class InputError(ValueError):
    pass


def scanned_image(f: Path) -> bool:
    """Whether a folder scan takes f: an image, but not our own heat maps (a rerun into the same folder
    restored a.quality.png into a.quality.quality.png) nor hidden files (macOS's ._a.jpg, not images).
    Named on the command line (or by a glob) they are still taken."""
    name = f.name.lower()
    return (
        f.suffix.lower() in IMAGE_SUFFIXES and not name.endswith(".quality.png") and not name.startswith(".")
    )


def expand_inputs(items: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, directories (their images, sorted; not heat maps or hidden files) and globs -> (paths,
    [(an input that gave no image, why)])."""
    paths, missing = [], []
    for item in items:
        if not item:  # an unset shell variable: Path("") is the working folder, whose images it took
            missing.append(("''", "an empty name, not a file or folder"))
            continue
        if any(ch in item for ch in "*?[") and not Path(item).exists():  # "photo [1].png" is a file
            hits = sorted(Path(h) for h in glob.glob(item, recursive=True))
            hits = [h for h in hits if h.is_file()]
            if not hits:
                missing.append((item, "no files match this pattern"))
            paths += hits
            continue
        p = Path(item)
        if p.is_dir():
            try:
                imgs = sorted(f for f in p.iterdir() if f.is_file() and scanned_image(f))
                subfolders = not imgs and any(f.is_dir() and not f.name.startswith(".") for f in p.iterdir())
            except OSError as e:  # an unreadable folder ended the whole run, the other inputs untouched
                missing.append((str(p), f"cannot read the folder ({e.strerror or e})"))
                continue
            if not imgs:
                why = "directory contains no images"
                if subfolders:  # photos kept in per-day folders: the line alone read as wrong
                    glob_hint = p / "**" / "*.jpg"
                    why += (
                        f" (its subfolders are not searched: name them, or give a glob such as '{glob_hint}')"
                    )
                missing.append((str(p), why))
            paths += imgs
        elif item == "-" and not p.exists():  # (`qairn video -` reads a pipe; this said "no such file")
            missing.append(
                ("-", "images are not read from standard input; save the image to a file and name it")
            )
        elif not p.exists():
            missing.append((str(p), "no such file or directory"))
        elif not p.is_file():  # a pipe (`cat a.jpg | qairn score /dev/stdin`) was an 'empty file'
            missing.append((str(p), "not a regular file (a pipe or device); save the image to a file first"))
        else:
            paths.append(p)
    # A file named twice (a glob and its folder, say) is restored once.
    unique = {}
    for p in paths:
        unique.setdefault(p.resolve(), p)
    return list(unique.values()), missing


def unique_names(inputs: list[Path]) -> list[str]:
    """One output name per input: its stem, and where stems collide, the folders that tell the inputs
    apart (a/img/x.jpg, b/img/x.jpg -> a_img_x, b_img_x), then the suffix (x.bmp, x.tif -> x_bmp, x_tif).
    Names are compared ignoring case: X.png and x.png are one file on macOS and Windows, where the
    second output replaced the first."""
    names = [p.stem for p in inputs]
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n.casefold(), []).append(i)
    for idx in (g for g in groups.values() if len(g) > 1):
        full = [inputs[i].resolve() for i in idx]
        common = Path(os.path.commonpath([f.parent for f in full]))
        for i, f in zip(idx, full):
            names[i] = "_".join(f.parent.relative_to(common).parts + (f.stem,))
        clash = [names[i].casefold() for i in idx]
        for i, f in zip(idx, full):
            if clash.count(names[i].casefold()) > 1:
                names[i] += "_" + f.suffix.lstrip(".")
    # Whatever still collides (a renamed a/x.png meeting an input a_x.png) gets its input's position.
    folded = [n.casefold() for n in names]
    return [f"{n}_{i + 1}" if folded.count(n.casefold()) > 1 else n for i, n in enumerate(names)]


def output_paths(inputs: list[Path], out: str, suffix: str | None) -> tuple[list[Path], Path | None]:
    """OUT is a directory (existing, ending in '/', without a suffix, or several inputs) or a file.
    Several inputs into a name with an image suffix (out.png) that is no folder yet are refused.
    Returns the output paths and the directory to create (None for a file), which the caller makes
    only once every other check has passed: a refused run leaves no empty folder behind."""
    if not out:  # an unset shell variable: Path("") is the working folder, where it wrote
        raise InputError("-o '': an empty name; give a file or folder name")
    if out == "-":  # it made a folder named '-' and wrote into it
        raise InputError("-o -: images are not written to standard output; give a file or folder name")
    o = Path(out)
    named_dir = o.is_dir() or out.endswith(("/", "\\"))
    # Python gives out. and .png no suffix: one input went into a new folder of that name.
    if not named_dir and o.name not in ("", "..") and o.name.endswith("."):
        raise InputError(
            f"-o {out}: ends in '.': give a file name with its type, such as {o.name}png, or a folder"
        )
    if not named_dir and o.name.lower() in IMAGE_SUFFIXES:
        raise InputError(
            f"-o {out}: is a hidden name with no stem: give a file name such as out{o.name.lower()}, "
            f"or {o.name}/ for a folder"
        )
    as_dir = named_dir or not o.suffix or len(inputs) > 1
    if as_dir:
        if o.exists() and not o.is_dir():
            raise InputError(f"{o}: is a file; several inputs, or a name without a suffix, need a folder")
        # A glob that matched two files made a folder named out.png; an existing folder of that name
        # (or out.png/) is still taken.
        if not named_dir and o.suffix.lower() in IMAGE_SUFFIXES:
            raise InputError(f"-o {out} looks like a file but {len(inputs)} inputs were given: give a folder")
        sfx = suffix or ".png"  # lossless by default: re-encoding as JPEG would add artifacts back
        return [o / (n + sfx) for n in unique_names(inputs)], o
    if o.suffix.lower() not in WRITE_SUFFIXES:
        raise InputError(
            f"{o}: unsupported output type {o.suffix!r}; use one of {', '.join(sorted(WRITE_SUFFIXES))}"
        )
    return [o], None


def quality_map_png(gamma2: np.ndarray, size: tuple[int, int]) -> bytes:
    """gamma2 as heat maps at the image's size, PNG bytes: left on the fixed 0..1 scale (comparable
    across images), right stretched to this image's own range (where in the picture quality changes;
    trained gates often sit in a narrow band such as 0.7..0.9), each with a labelled colour bar whose
    ends say which way is better: a high gamma means the encoder's features passed through, little
    to restore (a colour bar of bare numbers left the reader to guess).
    Titles sit in a white band above the maps, in black, at a size that follows the picture's (its
    height, up to twice its width): a fixed 8-pixel font was unreadable on a photo viewed whole, and
    white titles vanished on the map's yellow. An image under MIN_MAP_HEIGHT pixels tall is enlarged by
    a whole factor (each pixel a square), so that its labels fit beside it; one too wide to enlarge
    (2560 x 4) keeps its height and gets a colour bar taller than the map, so that the two bar labels do
    not print over each other."""
    import cv2

    w, h = size
    shrink = math.ceil(math.sqrt(w * h / MAX_MAP_PIXELS))  # 1 up to MAX_MAP_PIXELS
    w, h = -(-w // shrink), -(-h // shrink)
    zoom = max(1, min(-(-MIN_MAP_HEIGHT // h), max(1, 4096 // w)))
    zw, zh = w * zoom, h * zoom
    # viridis as a 256-entry uint8 table, indexed as matplotlib bins [0, 1]: OpenCV's table is
    # matplotlib's to the byte, in BGR, so the maps are drawn in the order cv2.imencode takes (no
    # reversed copy of the picture) and matplotlib is not imported (0.12-0.18 s of a `qairn restore`).
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_VIRIDIS)[:, 0]
    lo, hi = float(np.min(gamma2)), float(np.max(gamma2))
    # From the height, but at most twice the width: from the height alone, a 400 x 3000 scroll
    # capture's labels took three quarters of the picture's width, its maps a quarter.
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.4, min(zh, 2 * zw) / 700)
    thick = max(1, round(scale * 1.5))
    (label_w, text_h), base = cv2.getTextSize("0.000 better", font, scale, thick)
    gap = max(4, text_h // 2)
    header = text_h + base + 2 * gap
    bar_w = max(12, zw // 40)
    bar_h = max(zh, 2 * (text_h + base) + gap)  # room for both labels, one above the other

    def panel(values: np.ndarray, vmin: float, vmax: float, title: str) -> np.ndarray:
        if vmax - vmin > 1e-6:
            unit = np.clip((values - vmin) / (vmax - vmin), 0, 1)
        else:  # a flat map stretched: mid colour, not the 'worse' end (0.8 everywhere showed as the worst)
            unit = np.full_like(values, 0.5)
        bgr = lut[np.minimum(unit * 256, 255).astype(np.uint8)]
        bgr = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_NEAREST)  # map cell k: pixels s*k..s*k+s-1
        bgr = np.repeat(np.repeat(bgr, zoom, 0), zoom, 1)
        ramp = np.linspace(1, 0, bar_h)[:, None].repeat(bar_w, 1)  # top = vmax
        bar = lut[np.minimum(ramp * 256, 255).astype(np.uint8)]
        title_w = cv2.getTextSize(title, font, scale, thick)[0][0]  # a narrow image's title runs on
        canvas = np.full(
            (header + bar_h, max(zw + bar_w + label_w + 3 * gap, title_w + gap), 3), 255, np.uint8
        )
        canvas[header : header + zh, :zw], canvas[header:, zw + gap : zw + gap + bar_w] = bgr, bar
        x, black = zw + bar_w + 2 * gap, (0, 0, 0)
        cv2.putText(canvas, title, (0, header - gap - base), font, scale, black, thick, cv2.LINE_AA)
        top, bottom = f"{vmax:.3f} better", f"{vmin:.3f} worse"
        cv2.putText(canvas, top, (x, header + text_h), font, scale, black, thick, cv2.LINE_AA)
        cv2.putText(canvas, bottom, (x, header + bar_h - base), font, scale, black, thick, cv2.LINE_AA)
        return canvas

    scale_note = f" (1/{shrink} size)" if shrink > 1 else ""
    fixed = panel(gamma2, 0.0, 1.0, "quality gamma2, 0..1" + scale_note)
    stretched = panel(gamma2, lo, hi, "quality gamma2, stretched" + scale_note)
    bgr = np.concatenate([fixed, np.full((header + bar_h, 2 * gap, 3), 255, np.uint8), stretched], axis=1)
    ok, buf = cv2.imencode(".png", bgr)
    if not ok:
        raise RuntimeError("could not encode the quality map")
    return buf.tobytes()


def pixel_count(text: str) -> int:
    """--max-pixels: a number above 0, 5e8 too; 0 or -5 failed every image in turn ('32x24 = 0.000768 MP
    is over the pixel limit of -5e-06 MP')."""
    try:
        n = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a number of pixels, e.g. 200000000 or 2e8"
        ) from None
    if n == float("inf"):  # 1e400 too: 'must be 1 or more' said of a number above it
        raise argparse.ArgumentTypeError(f"{text!r}: the pixel limit must be a finite number")
    if not n >= 1:  # nan as well
        raise argparse.ArgumentTypeError(f"{text!r}: the pixel limit must be 1 or more")
    return int(n)


def suffix_arg(text: str) -> str:
    """--format: a suffix, "png" meaning ".png". '' (an unset shell variable) was taken as no --format
    and wrote PNGs without a word."""
    if not text:
        raise argparse.ArgumentTypeError("an empty suffix; give one such as .png")
    return text if text.startswith(".") else "." + text


def ensemble_arg(p, note: str = "") -> None:
    """--ensemble, for the commands that write pictures (restore, video, eval) and bench, which times
    them (note: what it means there): score gives the plain pass's quality, which the ensemble leaves
    as it is."""
    p.add_argument(
        "--ensemble",
        type=int,
        choices=(1, 2, 4, 8),
        default=1,
        help="restore each image this many times, turned and mirrored, and average (+0.07 dB on LIVE1 at 8, "
        f"8 times the work; the quality scores stay the plain pass's){note} (default 1)",
    )


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="+",
        help="image files, directories (their images; not *.quality.png heat maps or hidden files) or globs",
    )
    p.add_argument("--weights", default=None, help="qairn safetensors weights (default: shipped)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument(
        "--backend",
        default="auto",
        help="auto (default: eager on CPU, triton on CUDA), eager, compile, triton, onnxruntime, tensorrt",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "fp16", "bf16"],
        help="auto (default): fp32 on CPU, fp16 on CUDA",
    )
    export_file_args(p)
    p.add_argument(
        "--fused-conv",
        action="store_true",
        help="eager/compile/triton: run the thin convs on the fused Triton kernels (CUDA, not yet timed; "
        "elsewhere the plain convs run, with a warning)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="CUDA (eager/triton/compile): one CUDA graph per image size, captured once, replayed "
        "(elsewhere none, with a warning)",
    )
    p.add_argument(
        "--tile",
        type=tile_arg,
        default="auto",
        help="tile size in pixels, 0 = whole image, auto (default): whole up to 4 x 512^2 pixels, else 512",
    )
    p.add_argument(
        "--overlap",
        type=overlap_arg,
        help="tile overlap in pixels (default 32; 0 for a tile under 48; a static export's own tile: a "
        "quarter of it in steps of 16, up to 32)",
    )
    p.add_argument(
        "--max-pixels",
        type=pixel_count,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse images larger than this (default {DEFAULT_MAX_PIXELS})",
    )


def export_file_args(p) -> None:
    """--onnx and --engine, for restore, score and video: run a file the user exported and checked,
    not qairn's own cached export of the weights."""
    p.add_argument(
        "--onnx",
        type=path_arg,
        metavar="FILE",
        help="onnxruntime/tensorrt: run this `qairn export onnx --maps` file, its own network and weights "
        "(without --weights)",
    )
    p.add_argument(
        "--engine",
        type=path_arg,
        metavar="FILE",
        help="tensorrt: run this engine file, from `qairn export tensorrt -o`",
    )


def missing_package(backend: str) -> str | None:
    """What to install for backend onnxruntime or tensorrt (and onnx, which both read exports with), in
    the backends' own words, or None: said before the model loads, and with exit 2 in every command
    (`qairn video` said it only after loading the model, with exit 1)."""
    if backend not in ("onnxruntime", "tensorrt"):
        return None
    from qairn.engine.backends import BackendError

    try:
        if backend == "onnxruntime":
            from qairn.export.ort_backend import require_onnxruntime

            require_onnxruntime()
        else:
            from qairn.export.trt_backend import import_tensorrt

            import_tensorrt()
        from qairn.export.onnx_export import require

        require("onnx")
    except ImportError as e:  # one of qairn's own modules (make_backend's words)
        return f"backend {backend!r} is not available: {e}"
    except BackendError as e:
        return str(e)
    return None


def backend_problem(a) -> str | None:
    """Why --backend, --onnx, --engine and --weights cannot run together (or a package is missing), in
    one line, or None: found before the model loads, where the Restorer would refuse them after it (or,
    for --onnx with eager, as an unknown option of that backend), or not at all (--weights beside a file
    that runs its own)."""
    if a.onnx is not None and a.backend not in ("onnxruntime", "tensorrt"):
        return f"--onnx runs with --backend onnxruntime or tensorrt, not {a.backend}"
    if a.engine is not None and a.backend != "tensorrt":
        return f"--engine runs with --backend tensorrt, not {a.backend}"
    missing = missing_package(a.backend)
    if missing:
        return missing
    # A new --engine path would be built there (minutes), and a folder is no file: the user asked to run
    # a file they have.
    for option, path in (("--onnx", a.onnx), ("--engine", a.engine)):
        if path is not None and not Path(path).is_file():
            why = "is a directory" if Path(path).is_dir() else "no such file"
            build = f" (build one: qairn export tensorrt WEIGHTS -o {path})" if option == "--engine" else ""
            return f"{option} {path}: {why}{build}"
    if a.onnx is not None and a.weights is not None:
        from qairn.engine.backends import BackendError
        from qairn.export.ort_backend import file_config

        try:
            config = file_config(a.onnx)
        except BackendError as e:  # not an ONNX file, an unreadable one
            return str(e)
        if config is not None:  # the Restorer runs the file's network; the weights would not run
            return (
                f"--weights with --onnx {a.onnx}: the file's own network and weights run, not "
                f"{a.weights}; drop --weights"
            )
    return None


def check_tile_options(p: argparse.ArgumentParser, a) -> None:
    """--tile against --overlap, as argparse's error before the model loads: an overlap as wide as the
    tile was refused only once it had loaded, naming neither option. (The Restorer checks again, against
    a static export's own tile.)"""
    from qairn.engine.restorer import check_tiling, default_overlap

    # Whole images have no tiles: --tile 0 --overlap 5 ran without a word of the overlap given. (Only a
    # CUDA out-of-memory retry cuts a whole image into tiles, and its overlap is the default's.)
    if a.tile is None and a.overlap is not None:
        p.error(
            f"--tile 0 with --overlap {a.overlap}: whole images are not tiled; drop --overlap or give a tile"
        )
    # No --overlap: None goes on to the Restorer, which fits its default to a small or static tile.
    overlap = default_overlap(a.tile) if a.overlap is None else a.overlap
    try:
        check_tiling(a.tile, overlap)
    except ValueError as e:
        p.error(f"--tile {a.tile or 0} with --overlap {overlap}: {e}")


def columns(text: str) -> int:
    """Terminal columns text takes: two for a wide (CJK) character, none for a combining mark."""
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text
    )


def pad(text: str, width: int) -> str:
    """text padded to width terminal columns (f"{text:<{width}}" counts characters)."""
    return text + " " * (width - columns(text))


def drop_cuda_only_options(a) -> None:
    """--fused-conv and --cuda-graph speed up CUDA runs and change no output: on another device each is
    one warning and the run goes on without it (the fused convs' plain-torch reference, or no graph), so
    one command line serves a GPU machine and a CPU one (--device auto). --cuda-graph was refused there
    while --fused-conv warned. Backends that take neither still refuse them (the Restorer's line)."""
    from qairn.engine.restorer import resolve_device

    if not (a.fused_conv or a.cuda_graph) or a.backend not in ("auto", "eager", "compile", "triton"):
        return
    try:
        device = resolve_device(a.device)
    except ValueError:  # (a device that is not there: the Restorer's one line says so)
        return
    if device.type == "cuda":
        return
    if a.fused_conv:
        warning(f"--fused-conv: the fused Triton convs run on CUDA only; on {device} the plain convs run")
    if a.cuda_graph:
        warning(f"--cuda-graph: CUDA graphs need a CUDA device; on {device} the run goes on without one")
        a.cuda_graph = False


class SetupError(Exception):
    """The Restorer could not be made from the command line's model options (weights, device, backend,
    precision): the user's to fix, so exit 2, as a usage error, in every command; a failure during the
    run is 1."""


def make_restorer(a):
    from qairn.engine.restorer import Restorer

    drop_cuda_only_options(a)  # before the model loads
    try:
        return Restorer(
            weights=a.weights,
            device=a.device,
            backend=a.backend,
            precision=a.precision,
            tile=a.tile,
            overlap=a.overlap,
            cuda_graph=a.cuda_graph,
            ensemble=getattr(a, "ensemble", 1),  # (score has no --ensemble: its quality is the plain pass's)
            **({"fused_conv": True} if a.fused_conv else {}),
            **{k: v for k, v in (("onnx", a.onnx), ("engine", a.engine)) if v is not None},
            # An --engine file is an input, run as it is: a stale or foreign one is refused, not rebuilt
            # over.
            **({"rebuild": False} if a.engine is not None else {}),
        )
    except Exception as e:  # weights/backends/devices: one line, no traceback
        raise SetupError(str(e).splitlines()[0] if str(e) else type(e).__name__) from e


class TileBar:
    """A second, transient bar for the tiles of one large image (a 50 MP photo takes minutes on a
    CPU with no other sign of life); images restored in one batch never show it. quiet: none at all."""

    def __init__(self, quiet: bool = False):
        self.bar = None
        self.quiet = quiet

    def __call__(self, done: int, total: int) -> None:
        if total == 1 or self.quiet:
            return
        if self.bar is None or self.bar.total != total:  # a retry with smaller tiles starts over
            self.close()
            self.bar = progress_bar(total=total, desc="tiles", unit="tile", leave=False, position=1)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def debug_traceback() -> None:
    """QAIRN_DEBUG=1: the traceback of the error being reported in one line (inside an except block)."""
    if os.environ.get("QAIRN_DEBUG") == "1" and sys.exc_info()[0] is not None:
        traceback.print_exc(file=sys.stderr)


def error(msg: str) -> None:
    debug_traceback()
    tqdm.write(f"qairn: error: {msg}", file=sys.stderr)


def warning(msg: str) -> None:
    tqdm.write(f"qairn: warning: {msg}", file=sys.stderr)


def result(line: str) -> None:
    """A line on stdout, clear of the progress bar: on a terminal showing both, print() put each
    row at the end of the bar's line ('score:  33%|###3 | 1/3 [...]b.jpg   0.4979 ...')."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()  # rows go out as they come, to a pipe too


def fatal(msg: str) -> int:
    debug_traceback()
    print(f"qairn: error: {msg}", file=sys.stderr)
    return 2


def found_inputs(items: list[str]) -> tuple[list[Path], list[str]]:
    """expand_inputs for restore and score: (the images, the inputs that gave none), each of those
    said in one line."""
    inputs, missing = expand_inputs(items)
    for name, why in missing:
        error(f"{name}: {why}")
    return inputs, [name for name, _ in missing]


def file_bits(img) -> int | None:
    """16 for a 16-bit file's pixels: PNG and TIFF store them so, however dark (the Restorer's hint that
    uint16 values all under 1024 may be 10-bit samples is for decoders' frames, not for files)."""
    return 16 if img.dtype == np.uint16 else None


def check_output(a, src: Path, dst: Path, input_set: set[Path], taken: set[Path]) -> None:
    """dst (and its quality map) may be written for src: not another input, nor an existing file
    without --overwrite. InputError with its one line."""
    if dst.resolve() in input_set and dst.resolve() != src.resolve():  # --overwrite or not: it would be
        # replaced before it is read (or after, by another image), its original lost
        raise InputError(f"{dst}: is another input; {src}'s output would replace it (give another -o)")
    if dst.resolve() in input_set and not a.overwrite:
        raise InputError(f"{dst}: would overwrite an input (use --overwrite)")
    if dst.exists() and not a.overwrite:
        raise InputError(f"{dst}: output exists (use --overwrite)")
    qm = dst.with_name(dst.stem + ".quality.png")
    if a.quality_map and qm.resolve() in taken:  # e.g. a.png beside a.quality.png
        raise InputError(f"{qm}: the quality map would replace another input or output; rename it")
    if a.quality_map and qm.exists() and not a.overwrite:
        raise InputError(f"{qm}: quality map exists (use --overwrite)")


def restore_one(r, a, src: Path, dst: Path, input_set: set[Path], taken: set[Path]) -> dict:
    """Restore src into dst (and its quality map) for `qairn restore`'s options a; its JSON record.
    A problem raises: InputError or ImageError with its one line, OSError from the write."""
    check_output(a, src, dst, input_set, taken)  # (a single output file: checked up front too)
    qm = dst.with_name(dst.stem + ".quality.png")
    if not dst.parent.is_dir():
        raise InputError(f"{dst}: output folder does not exist")
    img = read_image(src, a.max_pixels, warn=warning)
    with TileBar(a.quiet) as tiles:
        res = r.restore(img, return_maps=a.quality_map, progress=tiles, bits=file_bits(img))
    # (here: scipy is not imported before the command line is parsed)
    from qairn.engine.jpeg import HIGH_QUALITY, consistent, jpeg_fits, read_jpeg

    jpeg = read_jpeg(src)
    clipped = jpeg is not None and not a.no_jpeg_clip and jpeg_fits(jpeg, img)
    if jpeg is not None and jpeg.quality >= HIGH_QUALITY:  # the output may well be worse than the input
        saved = f"quality {jpeg.quality}" if jpeg.exact else f"about quality {jpeg.quality} (its own tables)"
        lost = "+0.01 dB at 95, -0.22 at 98" if clipped else "-0.61 dB at 95, -2.02 at 98, unclipped"
        warning(
            f"{src}: a JPEG saved at {saved}: restoring JPEGs of quality {HIGH_QUALITY} and up gained "
            f"nothing on LIVE1 (mean {lost}); keep the input if it looks as good"
        )
    if clipped:  # the network's picture, moved back within what the file's coefficients allow
        res.image = consistent(res.image, img, jpeg)
    if res.info["caveat"]:  # score_caveat's, made with the quality: not a second pass over the image
        warning(f"{src}: {res.info['caveat']}")
    icc = read_icc(src)  # the pixels keep their colour space, so the output keeps its profile
    if icc and not icc_fits(icc, res.image):
        warning(
            f"{src}: its {icc_space(icc)} colour profile does not describe the RGB/gray pixels "
            "restored; the output has none"
        )
        icc = None
    exif = read_exif(src, size=(img.shape[1], img.shape[0]))  # camera, date, GPS: the photo's record
    alpha = res.image.ndim == 3 and res.image.shape[2] in (2, 4)  # JPEG and BMP outputs have none
    dropped = [
        n
        for n, v, keep in (
            ("colour profile", icc, ICC_SUFFIXES),
            ("EXIF", exif, EXIF_SUFFIXES),
            ("alpha channel", alpha, ALPHA_SUFFIXES),
            ("16-bit depth", res.image.dtype == np.uint16, DEEP_SUFFIXES),
        )
        if v and dst.suffix.lower() not in keep
    ]
    if dropped:
        warning(
            f"{dst}: {dst.suffix} output drops the input's {' and '.join(dropped)}; write .png to keep it"
        )
    if gray_as_colour(res.image, dst.suffix):  # a gray photo turning into three equal channels
        webp = dst.suffix.lower() == ".webp"
        why = "has no gray mode" if webp else "is written without 16-bit gray + alpha"
        warning(
            f"{dst}: {dst.suffix} output {why}: the gray input is written as "
            f"{'RGBA' if alpha else 'RGB'}; write .png to keep it gray"
        )
    if a.quality_map:  # first: a map failing after the image had the written image reported as failed
        try:
            write_atomic(qm, quality_map_png(res.maps[1], (img.shape[1], img.shape[0])))
        except OSError as e:
            raise InputError(f"{qm}: cannot write ({e.strerror or e})") from e
    try:
        write_image(dst, res.image, icc=icc, exif=exif)
    except BaseException:  # no map without its image (a map is never an input: checked above)
        if a.quality_map:
            qm.unlink(missing_ok=True)
        raise
    return {
        "path": str(src),
        "output": str(dst),
        **json_quality(res.quality),
        **jpeg_record(jpeg),
        "jpeg_clipped": clipped,
        **r.scored_by(),
    }


def jpeg_record(jpeg) -> dict:
    """What restore --json and score --json say of a JPEG input's tables (nulls for other files): the
    libjpeg quality they are, or are nearest, and whether they are exactly libjpeg's (the table's ~)."""
    return {"jpeg_quality": jpeg and jpeg.quality, "jpeg_quality_exact": jpeg and jpeg.exact}


def json_quality(quality: dict) -> dict:
    """Q1..Q3 as score --json, restore --json and the video trace write them: 6 decimals (a float32's
    digits beyond are noise, and restore --json's full ones did not match score --json's)."""
    return {k: round(v, 6) for k, v in quality.items()}


def write_records(json_arg: str, records: list[dict]) -> bool:
    """restore --json: the scores as a JSON list, to stdout ('-') or atomically to a file; False if
    it could not be written (said in one line)."""
    # Absolute paths: the file is read later, from elsewhere, where a path relative to this run's
    # working folder names nothing (symlinks kept: the names the user gave).
    rows = [
        {**r, "path": os.path.abspath(r["path"]), "output": os.path.abspath(r["output"])} for r in records
    ]
    text = json.dumps(rows, indent=2) + "\n"
    try:
        if json_arg == "-":  # it wrote a file named '-'; stdout carries nothing else
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            write_atomic(Path(json_arg), text.encode())
    except OSError as e:
        error(f"{json_arg}: cannot write ({e.strerror or e})")
        return False
    return True


def json_problem(
    json_path: Path, images: set[Path], overwrite: bool, folder: Path | None = None
) -> str | None:
    """Why restore --json could not be written to json_path (resolved), or None: checked before any
    work, as a long run must not end unable to write its scores. images: inputs, outputs and maps;
    folder: the output folder (resolved) of a run that makes it, with its missing parents, or None."""
    made = {d for d in ([folder, *folder.parents] if folder is not None else []) if not d.exists()}
    if json_path in images:  # a map is written first, then the scores went over it
        return "--json would replace an input or output image"
    if json_path.is_dir() or json_path in made:  # made: it failed after every image was restored
        return "is a directory; give a file name for --json"
    if json_path.exists() and not overwrite:
        return "exists (use --overwrite)"
    if not json_path.parent.is_dir():  # -o out --json out/q.json: out is made before the scores
        return None if json_path.parent in made else "output folder does not exist"
    if not writable(json_path.parent):
        return "output folder is not writable"
    return None


def writable(folder: Path) -> bool:
    """Whether files can be made in folder (its mode, a read-only mount, chattr +i)."""
    return os.access(folder, os.W_OK | os.X_OK)


def remove_empty(folder: Path, top: Path) -> None:
    """Remove folder and its parents up to top, as far as they are empty."""
    for d in [folder, *folder.parents]:
        try:
            d.rmdir()
        except OSError:  # not empty (something else wrote there), or gone
            return
        if d == top:
            return


def main_restore(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qairn restore", description="Remove JPEG artifacts from images.")
    common_args(p)
    ensemble_arg(p)
    p.add_argument("-o", "--output", required=True, help="output file, or directory for several inputs")
    p.add_argument(
        "--format", type=suffix_arg, default=None, help="output suffix in a directory, e.g. .png (default)"
    )
    p.add_argument("--quality-map", action="store_true", help="write a gamma2 heat map beside each output")
    p.add_argument(
        "--json",
        type=path_arg,
        help="write each image's absolute input and output paths, Q1..Q3 and what scored them (p, weights and"
        " weights_sha256) to this JSON file (- for stdout)",
    )
    p.add_argument(
        "--no-jpeg-clip",
        action="store_true",
        help="write the network's picture as it is; by default a JPEG input's restoration is clipped to "
        "its quantization bins, where the original picture must lie (most help at high qualities: on "
        "LIVE1 at QF 95, +0.01 dB over the JPEG instead of -0.61)",
    )
    p.add_argument("--overwrite", action="store_true", help="allow replacing existing files (and inputs)")
    add_quiet(p)
    a = p.parse_args(argv)
    check_tile_options(p, a)
    problem = backend_problem(a)
    if problem:
        return fatal(problem)

    inputs, missing = found_inputs(a.inputs)
    if not inputs:  # a run where every image failed: the closing line, and a --json of no records
        problem = a.json and a.json != "-" and json_problem(Path(a.json).resolve(), set(), a.overwrite)
        if problem:
            return fatal(f"{a.json}: {problem}")
        if a.json:  # else an earlier run's file stayed, and read as this run's
            write_records(a.json, [])
        if not a.quiet:  # (each input's error line has said it)
            tqdm.write(restore_summary([], len(missing), missing), file=sys.stderr)
        return 1
    try:
        outputs, folder = output_paths(inputs, a.output, a.format)
    except (InputError, OSError) as e:
        return fatal(str(e))
    if a.format and a.format.lower() not in WRITE_SUFFIXES:
        return fatal(f"--format {a.format}: use one of {', '.join(sorted(WRITE_SUFFIXES))}")
    # A file output's type is its suffix: a.jpg -o x.png --format .jpg wrote a PNG without a word.
    same = {".jpeg": ".jpg", ".tiff": ".tif"}
    kinds = {same.get(x, x) for x in ((a.format or "").lower(), outputs[0].suffix.lower())}
    if a.format and folder is None and len(kinds) > 1:
        return fatal(f"--format {a.format} contradicts -o {a.output}; the output file's suffix sets its type")
    # Named again in the summary (their lines scroll away in a long run): inputs never found, then
    # images that failed.
    failed_names = list(missing)
    records = []
    input_set = {q.resolve() for q in inputs}
    taken = input_set | {q.resolve() for q in outputs}  # what a quality map must not replace
    # Checked before any work: a long run must not end unable to write its scores.
    if a.json and a.json != "-":
        maps = {d.with_name(d.stem + ".quality.png").resolve() for d in outputs} if a.quality_map else set()
        made = folder.resolve() if folder is not None else None
        problem = json_problem(Path(a.json).resolve(), taken | maps, a.overwrite, made)
        if problem:
            return fatal(f"{a.json}: {problem}")
    # A read-only folder failed every image only once it was restored (a folder still to be made
    # is checked by making it).
    out_dir = folder or outputs[0].parent
    # One output file into a missing folder was found only after the model had loaded (exit 1).
    if folder is None and not out_dir.is_dir():
        return fatal(f"{outputs[0]}: output folder does not exist")
    if out_dir.is_dir() and not writable(out_dir):
        return fatal(f"{out_dir}: output folder is not writable")
    if folder is None:  # one output file: found taken only after the model had loaded (exit 1)
        try:
            check_output(a, inputs[0], outputs[0], input_set, taken)
        except InputError as e:
            return fatal(str(e))
    elif not a.overwrite:
        # Outputs already there (an earlier run's) failed their images one by one after the model had
        # loaded. (Clashes between this run's own names stay per image: the others still run.)
        there = [
            (src, dst)
            for src, dst in zip(inputs, outputs)
            if dst.exists() or (a.quality_map and dst.with_name(dst.stem + ".quality.png").exists())
        ]
        if there:
            try:
                check_output(a, *there[0], input_set, taken)
            except InputError as e:
                more = f"; {len(there)} of the {len(outputs)} outputs are there" if len(there) > 1 else ""
                return fatal(f"{e}{more}")
    try:
        r = make_restorer(a)
    except SetupError as e:
        return fatal(str(e))
    made = None  # the topmost folder this run makes, removed again if no image is written
    if folder is not None:
        made = next((d for d in [*reversed(folder.parents), folder] if not d.exists()), None)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return fatal(f"{folder}: cannot create the output folder ({e.strerror or e})")
    try:
        for src, dst in progress_bar(list(zip(inputs, outputs)), desc="restore", unit="img", disable=a.quiet):
            try:
                records.append(restore_one(r, a, src, dst, input_set, taken))
                continue
            except (ImageError, InputError) as e:
                error(str(e))
            except OSError as e:
                error(f"{dst}: cannot write ({e.strerror or e})")
            except Exception as e:
                error(f"{src}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            failed_names.append(str(src))
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: the images already written keep their scores
        if a.json:
            write_records(a.json, records)
        raise
    # Not counted with the images: 'restored 2 of 2 images, 1 failed' when only the JSON failed.
    json_written = not a.json or write_records(a.json, records)
    if made is not None and not records:  # every image failed: no empty folder left behind (after the
        remove_empty(folder, made)  # JSON, which may lie in it: -o out --json out/q.json)
    if not a.quiet:  # failures too: each had its error line, and the exit code says 1
        tqdm.write(
            restore_summary(records, len(inputs) + len(missing), failed_names, folder is not None),
            file=sys.stderr,
        )
    return 1 if failed_names or not json_written else 0


SUMMARY_NAMES = 5  # failed inputs named in the closing line; the rest is "..."


def restore_summary(records: list[dict], total: int, failed_names: list[str], folder=True) -> str:
    """The closing line of `qairn restore`: what was written, with the quality of a single image, and
    the inputs that failed or were never found. folder: OUT is a folder, not one output file."""
    # One image written to one named file: the pair, also where others of several failed (a.png b.png
    # -o z.png, b.png missing: "restored 1 of 2 images into ." named z.png's folder).
    if len(records) == 1 and (total == 1 or not folder):
        r = records[0]
        quality = ", ".join(f"{q} {r[q]:.3f}" for q in ("Q1", "Q2", "Q3"))
        of = "" if total == 1 else f"1 of {counted(total, 'image')}: "
        return f"qairn: restored {of}{r['path']} -> {r['output']} ({quality})" + failures(failed_names)
    where = f" into {Path(records[0]['output']).parent}" if records else ""
    written = f"qairn: restored {len(records)} of {counted(total, 'image')}{where}"
    return written + failures(failed_names)


def failures(failed_names: list[str]) -> str:
    """The closing line's tail: ', 2 failed (a.jpg, b.jpg)', the first SUMMARY_NAMES named; '' for none."""
    if not failed_names:
        return ""
    names = ", ".join(failed_names[:SUMMARY_NAMES]) + (" ..." if len(failed_names) > SUMMARY_NAMES else "")
    return f", {len(failed_names)} failed ({names})"


def score_summary(total: int, failed_names: list[str]) -> str:
    """The closing line of `qairn score`, said only when something failed: the table is the result,
    but in a long run the error lines have scrolled away, so (as restore does) they are named again:
    inputs never found, then images that failed."""
    scored = total - len(failed_names)
    return f"qairn: scored {scored} of {counted(total, 'image')}" + failures(failed_names)


def main_score(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qairn score", description="No-reference quality Q1..Q3 of images.")
    common_args(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line (absolute path, Q1..Q3 and what scored them: p, weights and"
        " weights_sha256) instead of a table",
    )
    add_quiet(p)
    a = p.parse_args(argv)
    check_tile_options(p, a)
    problem = backend_problem(a)
    if problem:
        return fatal(problem)

    inputs, missing = found_inputs(a.inputs)
    if not inputs:
        if not a.quiet:
            tqdm.write(score_summary(len(missing), missing), file=sys.stderr)
        return 1
    try:
        r = make_restorer(a)
    except SetupError as e:
        return fatal(str(e))
    from qairn.engine.jpeg import read_jpeg  # (scipy: not before parsing)

    failed_names = list(missing)
    if not a.json:
        width = max(columns(str(q)) for q in inputs)
        print(f"{pad('path', width)}  {'Q1':>7} {'Q2':>7} {'Q3':>7} {'QF':>5}")
    for src in progress_bar(inputs, desc="score", unit="img", disable=a.quiet or len(inputs) < 2):
        try:
            with TileBar(a.quiet) as tiles:
                img = read_image(src, a.max_pixels, warn=warning)
                caveat = score_caveat(img)
                if caveat:
                    warning(f"{src}: {caveat}")
                q = r.score(img, progress=tiles, bits=file_bits(img))
        except ImageError as e:
            failed_names.append(str(src))
            error(str(e))
            continue
        except Exception as e:  # one file's problem (an unsupported pixel type, say) ends only that file
            failed_names.append(str(src))
            error(f"{src}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        jpeg = read_jpeg(src)  # the quality it was saved at, beside the quality it shows
        if a.json:  # absolute, as in restore --json: the lines are read later, from elsewhere
            quality = {**json_quality(q), **jpeg_record(jpeg)}
            result(json.dumps({"path": os.path.abspath(src), **quality, **r.scored_by()}))
        else:
            saved = "-" if jpeg is None else f"{'' if jpeg.exact else '~'}{jpeg.quality}"
            result(f"{pad(str(src), width)}  {q['Q1']:7.4f} {q['Q2']:7.4f} {q['Q3']:7.4f} {saved:>5}")
    if failed_names:
        if not a.quiet:  # (each failure had its error line)
            tqdm.write(score_summary(len(inputs) + len(missing), failed_names), file=sys.stderr)
        return 1
    return 0
