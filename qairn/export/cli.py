"""`qairn export onnx|tensorrt WEIGHTS ...`: one export path for CPU servers and TensorRT GPUs.

Every ONNX export is checked (onnx.checker, full) and run with ONNX Runtime against eager fp32 on JPEGs
of --verify-images, else of LIVE1 when found beside the checkout, else on a synthetic test card; the
export fails when the error exceeds the documented tolerance (onnx_export.TOLERANCE) or any output is
NaN/Inf. `tensorrt` verifies the export it builds from the same way; a file given as --onnx only when a
--verify-* option is given too (against WEIGHTS, before the build).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

from qairn.engine.backends import BackendError
from qairn.engine.imageio import IMAGE_SUFFIXES, check_writable
from qairn.engine.progress import add_quiet
from qairn.engine.tiling import zero_or_more
from qairn.export import onnx_export as ox
from qairn.export.trt_backend import TrtRuntimeError
from qairn.export.trt_engine import EngineError
from qairn.messages import counted

# The repository's test images (../shared/data/live1 beside the checkout), when present.
DEFAULT_IMAGES = Path(__file__).resolve().parents[3] / "shared" / "data" / "live1"


def error(msg: str, rc: int = 2) -> int:
    """One line, in every qairn command's form: 2 for a usage or input error, 1 for a failed check."""
    print(f"qairn export: error: {msg}", file=sys.stderr)
    return rc


def shape_arg(text: str) -> tuple[int, int, int]:
    try:
        n, h, w = (int(v) for v in text.lower().replace("x", ",").split(","))
        return ox.check_shape((n, h, w))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N,H,W (H, W multiples of 16): {e}") from None


def qf_list(text: str) -> list[int]:
    # An empty list verified on 0 images, and "passed" with errors of 0.
    try:
        qfs = [int(q) for q in text.split(",") if q.strip()]
    except ValueError:
        qfs = []
    if not qfs or not all(1 <= q <= 100 for q in qfs):
        raise argparse.ArgumentTypeError(f"{text!r}: expected JPEG qualities 1..100, comma separated")
    return qfs


def image_count(text: str) -> int:
    """--verify-limit: -1 quietly meant all images."""
    return zero_or_more(text, "a number of images (0 = all)", "the image count")


def crop_side(text: str) -> int:
    """--verify-crop: -5 quietly meant the whole image."""
    return zero_or_more(text, "a crop side in pixels (0 = whole image)", "the crop side")


def gib(text: str) -> float:
    """A workspace size in GiB: above 0 and finite (inf was an OverflowError traceback after the export)."""
    try:
        size = float(text)
    except ValueError:
        size = float("nan")
    if not 0 < size < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size in GiB above 0")
    return size


# The --verify-* options' defaults, filled in by verify_inputs: parsed as None, so `tensorrt --onnx`
# can tell options given (verify the file) from none (build it as it is).
VERIFY_DEFAULTS = {"verify_qf": [10, 40], "verify_limit": 2, "verify_crop": 256}


def verify_asked(args) -> bool:
    return any(getattr(args, k) is not None for k in ("verify_images", *VERIFY_DEFAULTS))


def add_verify_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("verification (ONNX Runtime vs eager fp32)")
    g.add_argument(
        "--verify-images",
        type=Path,
        default=None,
        help=f"image folder (its images; not hidden files) or file (default: {DEFAULT_IMAGES} if present)",
    )
    g.add_argument(
        "--verify-qf",
        type=qf_list,
        default=None,
        help="JPEG qualities to test, comma separated (default 10,40)",
    )
    g.add_argument(
        "--verify-limit", type=image_count, default=None, help="images to use; 0 = all (default 2)"
    )
    g.add_argument(
        "--verify-crop",
        type=crop_side,
        default=None,
        help="centre crop side in pixels; 0 = whole image (default 256)",
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qairn export", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="target", required=True)

    o = sub.add_parser("onnx", help="export an ONNX file (opset >= 17)")
    o.add_argument("weights", type=Path, help="qairn safetensors weights to export")
    o.add_argument("-o", "--output", type=Path, required=True, help="the ONNX file to write (*.onnx)")
    o.add_argument(
        "--maps",
        action="store_true",
        help="output gamma maps instead of Q1..Q3 partial sums (the Restorer backends need maps)",
    )
    o.add_argument(
        "--fp16", action="store_true", help="fp16 graph with fp32 islands (gate, pooling, last conv)"
    )
    o.add_argument(
        "--io",
        choices=("fp32", "fp16"),
        default="fp32",
        help="dtype of input and restored output (default fp32)",
    )
    o.add_argument(
        "--no-fp32-tail", dest="fp32_tail", action="store_false", help="fp16: run the last conv in fp16"
    )
    o.add_argument(
        "--static",
        type=shape_arg,
        default=None,
        metavar="N,H,W",
        help="static input shape (a tile shape); default: dynamic N, H, W",
    )
    o.add_argument("--overwrite", action="store_true", help="replace an existing file at --output")
    o.add_argument(
        "--opset",
        type=int,
        default=17,
        help="ONNX opset from 17 (default 17); up to 20 with torchscript, 23 with dynamo in torch 2.13",
    )
    o.add_argument(
        "--exporter",
        choices=("torchscript", "dynamo"),
        default="torchscript",
        help="torch.onnx exporter (default torchscript; dynamo is slower to export)",
    )
    add_verify_args(o)
    add_quiet(o)

    t = sub.add_parser("tensorrt", help="build a serialized TensorRT engine (needs TensorRT and a CUDA GPU)")
    t.add_argument("weights", type=Path, help="qairn safetensors weights to build the engine for")
    t.add_argument(
        "-o", "--output", type=Path, default=None, help="engine file (default: in the cache folder)"
    )
    t.add_argument(
        "--onnx",
        type=Path,
        default=None,
        metavar="FILE",
        help="build from this --maps export instead of WEIGHTS' (verified against WEIGHTS with --verify-*)",
    )
    t.add_argument(
        "--precision", choices=("fp16", "fp32"), default="fp16", help="engine precision (default fp16)"
    )
    t.add_argument(
        "--shape",
        type=shape_arg,
        default=None,
        metavar="N,H,W",
        help="tile shape: the Restorer's tile_batch, tile, tile (default 4,512,512 within --max-shape, "
        "or a --static --onnx's)",
    )
    t.add_argument("--dynamic", action="store_true", help="dynamic batch and size (slower than static)")
    t.add_argument(
        "--max-shape",
        type=shape_arg,
        default=None,
        metavar="N,H,W",
        help="dynamic: largest input (default: --shape's N, 2048x2048 or --shape's H, W if larger); "
        "the Restorer cuts larger images into tiles",
    )
    t.add_argument(
        "--strongly-typed", action="store_true", help="TensorRT 10: build the fp16 ONNX strongly typed"
    )
    t.add_argument(
        "--workspace-gb", type=gib, default=4.0, help="TensorRT builder workspace limit in GiB (default 4)"
    )
    t.add_argument("--overwrite", action="store_true", help="replace an existing engine file at --output")
    t.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="engine and ONNX cache folder (default: $QAIRN_CACHE_DIR, else qairn's own cache folder)",
    )
    t.add_argument(
        "--device",
        default="cuda",
        help="the CUDA device to build for and run on: cuda or cuda:N (default cuda)",
    )
    add_verify_args(t)
    add_quiet(t)
    return p


def verify_inputs(args) -> tuple[list, str]:
    for name, default in VERIFY_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    qfs = args.verify_qf
    source = args.verify_images if args.verify_images is not None else DEFAULT_IMAGES
    if source.is_dir():
        # Not hidden files: macOS leaves ._a.jpg beside a.jpg on shared drives, and it is no image.
        files = sorted(
            f for f in source.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
        )
    else:
        files = [source]
    files = [f for f in files if f.is_file()]
    if not files and args.verify_images is not None:  # asked for by name: no quiet stand-in
        raise ValueError(f"--verify-images {source}: no such file, or a folder without images")
    if not files:
        note = f"a synthetic test card (no images at {source}; pass --verify-images DIR)"
        return [ox.synthetic_image(256, 256)], note
    files = files[: args.verify_limit] if args.verify_limit > 0 else files
    crop = (args.verify_crop, args.verify_crop) if args.verify_crop > 0 else None
    # What was measured, plainly: "2 images x 2 QFs (10, 40) from DIR", not "4 images ... at QF [10, 40]".
    images = counted(len(files), "image")
    qualities = f"at QF {qfs[0]}" if len(qfs) == 1 else f"x {len(qfs)} QFs ({', '.join(map(str, qfs))})"
    note = f"{images} {qualities} from {source}"
    return ox.jpeg_images(files, qfs, crop), note


def verify(path: Path, model, inputs: tuple[list, str], quiet: bool = False) -> int:
    """Verify the ONNX file at path; its figures are printed, with -q only when they fail (beside the
    error they explain)."""
    images, note = inputs
    stats = ox.verify_onnx(path, model, images)
    try:
        ox.check_parity(stats, stats["precision"])
    except ox.ExportError as e:
        print(ox.summary(stats, note))
        return error(f"verification failed: {e}", 1)
    if not quiet:
        print(ox.summary(stats, note))
    return 0


def main_onnx(args) -> int:
    from qairn.weights_io import load_model

    inputs = verify_inputs(args)  # a --verify-images typo is one line before the export, not after
    model = load_model(args.weights)
    precision = "fp16" if args.fp16 else "fp32"
    if args.io == "fp16" and not args.fp16:
        return error("--io fp16 needs --fp16")
    out = args.output
    if out.suffix.lower() != ".onnx":
        return error(f"{out}: name the ONNX file *.onnx")
    if out.exists() and not args.overwrite:
        return error(f"{out}: exists (use --overwrite)")
    check_writable(out)  # a typo in the folder is refused, not created (with the file's unverified twin)
    # Written beside the output and renamed only once verified: a graph that fails its check
    # replaces nothing and is not left where a deployment would pick it up.
    # Named per process: two exports to one -o (a parallel make) each verify and rename their own file.
    unverified = out.with_name(f".{out.name}.{os.getpid()}.unverified")
    try:
        path = ox.export_onnx(
            model,
            unverified,
            outputs="maps" if args.maps else "sums",
            precision=precision,
            io=args.io,
            shape=args.static,
            opset=args.opset,
            exporter=args.exporter,
            fp32_tail=args.fp32_tail,
        )
    except OSError as e:  # a full disk, once the export ran: a failed export (main's 2 is for refusals)
        return error(f"{out}: cannot write ({e.strerror or e})", 1)
    try:
        if rc := verify(path, model, inputs, args.quiet):
            return rc
        path.replace(out)
    finally:
        path.unlink(missing_ok=True)
    shape = f"static {args.static}" if args.static else "dynamic N,H,W"
    outputs = "maps" if args.maps else "sums"
    if not args.quiet:
        kind = f"{precision}, io {args.io}, {outputs}, {shape}, opset {args.opset}"
        print(f"wrote {out} ({kind}; onnx.checker ok)")
    return 0


def main_tensorrt(args) -> int:
    import torch

    from qairn.engine.backends import BackendError
    from qairn.engine.restorer import resolve_device
    from qairn.export import trt_backend, trt_engine
    from qairn.weights_io import load_model

    if args.max_shape is not None and not args.dynamic:  # a static engine has no larger shapes
        return error("--max-shape is for --dynamic engines")
    if args.output is not None and args.output.exists() and not args.overwrite:
        return error(f"{args.output}: exists (use --overwrite)")
    if (
        args.output is not None and args.output.suffix.lower() != ".engine"
    ):  # as .onnx: M.ENGINE is an engine too
        return error(f"{args.output}: engine files end in .engine")
    check_writable(args.output)
    try:
        trt = trt_backend.import_tensorrt()
    except BackendError as e:
        return error(str(e))
    if not torch.cuda.is_available():
        return error("engines are built on the GPU they run on; no CUDA device found")
    try:
        # As the Restorer resolves it: a GPU that is not there is one line, before minutes of export
        # and verification; a bare "cuda" is the current GPU, by index.
        device = resolve_device(args.device)
    except ValueError as e:
        return error(f"--device: {e}")
    if device.type != "cuda":
        return error(f"--device: engines are built on a CUDA device, not {device}")
    # The cached export is always verified; a given --onnx only when asked (--verify-*): it was checked
    # when it was exported, but perhaps from other weights of the same network.
    inputs = verify_inputs(args) if args.onnx is None or verify_asked(args) else None
    model = load_model(args.weights)
    if args.onnx is not None:
        # The engine is built from --onnx alone: a file of another network would be labelled, and
        # later run, as WEIGHTS' (and pooled with their p).
        from qairn.export.ort_backend import file_config

        theirs = file_config(args.onnx)
        if theirs is not None and theirs != model.config:
            differ = [k for k, v in asdict(theirs).items() if v != getattr(model.config, k)]
            return error(
                f"--onnx {args.onnx} holds another network than {args.weights} "
                f"(its {', '.join(differ)} differ): give the weights it was exported from"
            )
        if inputs is not None and verify(args.onnx, model, inputs, args.quiet):
            return 1
    strongly_typed = True if args.strongly_typed else None
    typing = trt_engine.build_typing(
        args.precision, trt.__version__, hasattr(trt.BuilderFlag, "FP16"), strongly_typed
    )
    onnx = args.onnx
    if onnx is None:
        # Verify the exact file the engine is built from before spending minutes on the build.
        onnx = ox.cached_onnx(
            model, args.cache_dir, outputs="maps", precision=trt_engine.onnx_precision(typing)
        )
        if verify(onnx, model, inputs, args.quiet):
            return 1
    if args.shape is None and not args.dynamic:  # a --static export builds its own shape only
        args.shape = ox.static_input_shape(onnx) or trt_backend.DEFAULT_SHAPE
    # --overwrite: built in the cache folder (the old file's recorded shapes are not taken) and copied
    # over -o only once built, so a refused --onnx or a failed build leaves the old engine usable.
    replace = args.output is not None and args.overwrite and args.output.exists()
    backend = trt_backend.TrtBackend(
        model,
        device,
        args.precision,
        engine=None if replace else args.output,
        onnx=onnx,
        cache_dir=args.cache_dir,
        shape=args.shape,
        dynamic=args.dynamic,
        max_shape=args.max_shape,
        workspace_gb=args.workspace_gb,
        strongly_typed=strongly_typed,
    )
    runner = backend.run if backend.dynamic else backend.run.runner_for(args.shape)
    spec, path = runner.spec, Path(runner.path)
    if replace:
        # Under the lock a loader of -o takes (the build lock, in its cache folder): engine and sidecar
        # are two renames, and a server reading between them saw a new engine with the old sidecar,
        # failed its sha256 and rebuilt over the file.
        with trt_engine.build_lock(args.output, backend.folder):
            path = trt_engine.store(args.output, spec, path.read_bytes())
    elif args.output is not None and path != args.output:
        return error(f"{args.output}: the engine went to {path} instead", 1)
    # A valid engine found in the cache (or at -o) was loaded, not written: say so.
    done = "wrote" if replace or runner.built else "reused cached engine"
    if not args.quiet:
        print(
            f"{done} {path} ({spec.precision}, {spec.typing}, TensorRT {spec.trt_version}, {spec.gpu_name} "
            f"sm{spec.compute_capability}, profile {spec.min_shape}..{spec.max_shape}); sidecar "
            f"{trt_engine.sidecar_path(path).name}, timing cache "
            f"{trt_engine.timing_cache_path(backend.folder, spec)}"
        )
    return 0


def missing_package(verifies: bool) -> str | None:
    """One line naming an export package that is not installed (else met deep in the export, as a
    traceback), None when all are."""
    for name in ox.EXPORT_PACKAGES:
        if name == "onnxruntime" and not verifies:
            continue
        try:
            ox.require(name)
        except ox.ExportError as e:
            return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Before the weights are loaded: `tensorrt --onnx F` verifies (runs onnxruntime) only when asked.
    verifies = args.target == "onnx" or args.onnx is None or verify_asked(args)
    if missing := missing_package(verifies):
        return error(missing)
    try:
        return main_onnx(args) if args.target == "onnx" else main_tensorrt(args)
    except (OSError, ValueError, ox.ExportError, BackendError, EngineError) as e:
        # The user's to fix (a missing file, a file that is no qairn export, options that do not fit):
        # 2, as every qairn command's usage errors. An export that missed its tolerance, or TensorRT
        # failing to build, load or run the engine, is a failure instead: 1.
        failed = isinstance(e, (ox.VerificationError, EngineError, TrtRuntimeError))
        return error(str(e).splitlines()[0] if str(e) else type(e).__name__, 1 if failed else 2)


if __name__ == "__main__":
    sys.exit(main())
