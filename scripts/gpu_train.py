"""Train on a bare GPU machine from gpu_pack/, then evaluate; results go to $OUT (or runs/gpu).

    python scripts/gpu_train.py [--pack gpu_pack] [--out DIR] [--max-seconds 450] [--preset auto]

--preset auto trains the largest QAIRN (widths c,2c,4c,8c with c a multiple of 8, nb blocks per level,
the small preset's global residual) whose fp16 weights fit --max-mb MB; shipped trains the shipped
weights further; any preset name also works (paper, small, small-gated, tiny).
Steps: train (paper recipe, AMP bf16, channels_last) for --max-seconds, export
(fp16 if it loses < 0.02 dB on the held-out images), choose p on the held-out images, evaluate on
LIVE1 (Table I) and, time permitting, the quality study. The command must end inside the device's
10-minute limit, so later steps are skipped when --deadline (seconds since start) comes near.
Files come back from $OUT at 16 MiB each at most: weights larger than that are split in parts
(rejoin with `cat weights.safetensors.part* > weights.safetensors`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qairn.engine.imageio import write_atomic  # noqa: E402
from qairn.model import QAIRN, preset  # noqa: E402
from qairn.train import evaluate as ev  # noqa: E402
from qairn.train.data import list_images  # noqa: E402
from qairn.train.trainer import TrainArgs, resolve_device, train  # noqa: E402
from qairn.weights_io import read_metadata  # noqa: E402

PART = 15 * 2**20  # below the 16 MiB a file from $OUT may have


def pack_crop(pack: Path) -> int | None:
    """The side of the pack's training crops, as its MANIFEST.json records it (None: not recorded)."""
    try:
        return int(json.loads((pack / "MANIFEST.json").read_text())["crop"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def n_params(config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in QAIRN(config).parameters())


def largest_config(max_bytes: float):
    """(parameters, c, nb) of the small preset at widths (c, 2c, 4c, 8c) and nb blocks with the most
    parameters whose fp16 weights take at most max_bytes; None if even c = 8, nb = 1 is larger."""
    best = None
    for nb in range(1, 5):
        for c in range(8, 257, 8):  # the size grows with c: stop at the first one too large
            n = n_params(preset("small", widths=(c, 2 * c, 4 * c, 8 * c), nb=nb))
            if 2 * n > max_bytes:
                break
            if best is None or n > best[0]:
                best = (n, c, nb)
    return best


class Tee:
    """Print, and append to report.txt as we go (a run killed at the time limit still reports)."""

    def __init__(self, path: Path):
        self.path = path
        path.write_text("")

    def __call__(self, *args):
        text = " ".join(str(a) for a in args)
        print(text, flush=True)
        with open(self.path, "a") as f:
            f.write(text + "\n")


def strict_json(obj) -> bytes:
    """JSON that strict parsers (jq, JavaScript) read: json.dumps wrote an infinite PSNR (a LIVE1 image
    its JPEG leaves unchanged) and a NaN correlation (a score constant over a distortion) as the bare
    words Infinity and NaN, which lose the whole file there. They are null, as in qairn eval --json."""
    return json.dumps(ev.without_nan(obj), indent=1, allow_nan=False).encode()


def publish(weights: Path, out: Path) -> list[Path]:
    """Copy the weights into out, in parts of PART bytes when larger (files from $OUT are limited).
    Every new file is written whole (under a hidden name) before any is renamed in, and the earlier
    copy's other files go last: removed first and written in place, a run stopped in between (its time
    limit, a full disk) left parts missing or cut short, which `cat` joins without a word."""
    data = weights.read_bytes()
    if len(data) <= PART:
        chunks = {weights.name: data}
    else:
        chunks = {f"{weights.name}.part{i // PART}": data[i : i + PART] for i in range(0, len(data), PART)}
    try:
        for name, chunk in chunks.items():
            write_atomic(out / f".{name}.new", chunk)
    except BaseException:
        for name in chunks:
            (out / f".{name}.new").unlink(missing_ok=True)
        raise
    for name in chunks:
        os.replace(out / f".{name}.new", out / name)
    for old in out.glob(weights.name + "*"):
        if old.name not in chunks:  # the whole file, or the parts of an earlier, larger copy
            old.unlink()
    return [out / name for name in chunks]


def main(argv=None) -> int:
    t_start = time.time()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", default=str(ROOT / "gpu_pack"))
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu"))
    ap.add_argument("--work", default=None, help="checkpoint, cache, full weights (default: beside --out)")
    ap.add_argument(
        "--preset",
        default="auto",
        help="auto (largest that fits --max-mb), shipped (continue the shipped weights), or a preset name",
    )
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-mb", type=float, default=20.0, help="fp16 weights limit for --preset auto (1e6 B)")
    ap.add_argument("--max-seconds", type=float, default=450.0, help="training time")
    ap.add_argument("--deadline", type=float, default=575.0, help="skip later steps past this (s)")
    ap.add_argument("--steps", type=int, default=500_000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--patch", type=int, default=96)
    ap.add_argument("--lr-halve-every", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--quality-crop", type=int, default=0, help="centre crop for the quality steps (quick runs)"
    )
    a = ap.parse_args(argv)
    # Now, not after the training's minutes: the quality steps (p sweep, LIVE1 study) fail on crops
    # under JPEG 2000's least (a negative crop cut nothing at all).
    if a.quality_crop < 0 or 0 < a.quality_crop < ev.JP2K_MIN:
        raise SystemExit(
            f"--quality-crop {a.quality_crop}: 0 (whole images) or at least {ev.JP2K_MIN} px (the JPEG "
            "2000 distortion's least)"
        )

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = (
        Path(a.work) if a.work else (Path("/tmp/qairn-gpu-work") if os.environ.get("OUT") else out / "work")
    )
    pack = Path(a.pack)
    if not (pack / "train").is_dir():
        raise SystemExit(f"{pack}: no training pack (build it with scripts/build_train_pack.py)")
    # Each training patch is cut from a crop of --patch + 8 (the JPEG grid's shift): a pack of smaller
    # crops (build_train_pack.py --crop 100) has none, which the trainer found only once it had started.
    crop = pack_crop(pack)
    if crop is not None and crop < a.patch + 8:
        raise SystemExit(
            f"{pack}: its training crops are {crop} px, too small for --patch {a.patch} (needs "
            f"{a.patch + 8}: the patch + 8 for the JPEG grid shift); pass --patch {crop - 8} or rebuild "
            f"with --crop {a.patch + 8}"
        )
    try:  # the p sweep and the quality study come after the training: their images are checked now
        ev.check_quality_sizes([*list_images(pack / "val"), *list_images(pack / "live1")], a.quality_crop)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    log = Tee(out / "report.txt")
    dev = resolve_device(a.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    log(f"torch {torch.__version__}, device {dev} ({name}), {os.cpu_count()} CPUs, pack {pack}")
    pool = 1 if dev.type == "cpu" else a.workers  # metric processes beside the GPU

    weights = work / "weights.safetensors"
    targs = TrainArgs(
        data=str(pack / "train"),
        val_data=str(pack / "val"),
        out=str(work),
        steps=a.steps,
        batch=a.batch,
        patch=a.patch,
        lr=a.lr,
        lr_halve_every=a.lr_halve_every,
        seed=a.seed,
        workers=a.workers,
        ckpt_every=2000,
        log_every=50 if dev.type == "cuda" else 1,
        device=str(dev),
        max_seconds=a.max_seconds,
        export=str(weights),
        overwrite=True,  # each run trains afresh (a rerun on a warm machine replaces the last one)
    )
    if a.preset == "auto":
        best = largest_config(a.max_mb * 1e6)
        if best is None:
            raise SystemExit(f"--max-mb {a.max_mb}: even the smallest model (widths 8..64, nb 1) is larger")
        n, c, nb = best
        targs = replace(targs, preset="small", widths=f"{c},{2 * c},{4 * c},{8 * c}", nb=nb)
        log(
            f"model: widths ({c},{2 * c},{4 * c},{8 * c}), nb={nb}: {n / 1e6:.2f} M parameters, "
            f"{2 * n / 1e6:.2f} MB in fp16 (limit {a.max_mb} MB)"
        )
    elif a.preset == "shipped":
        shipped = ROOT / "qairn" / "weights" / "qairn-small.safetensors"
        targs = replace(targs, preset="small", init=str(shipped))
        log(f"model: the shipped weights ({shipped.name}), trained further")
    else:
        targs = replace(targs, preset=a.preset)
    log(f"train: {json.dumps(vars(targs))}")

    train(targs)
    # The trainer turns TF32 on for speed; the evaluation below is the reference fp32 model.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for src, dst in (("log.csv", "train_log.csv"), ("loss.png", "loss.png")):
        if (work / src).exists():
            write_atomic(out / dst, (work / src).read_bytes())
    publish(weights, out)
    meta = read_metadata(weights)
    summary = json.loads(meta["training"])
    log(f"trained {summary['steps']} steps in {summary['seconds']:.0f} s; config {meta['config']}")
    log(f"export: {json.dumps(summary['export'])}")
    results = {"device": name, "config": json.loads(meta["config"]), "train": summary}

    def time_left() -> float:
        return a.deadline - (time.time() - t_start)

    def save_results():
        # rewritten after each stage of a run that may be killed at its limit: temp name, then rename
        write_atomic(out / "results.json", strict_json(results))

    save_results()
    val = list_images(pack / "val")
    if time_left() > 40:
        r = ev.make_restorer(weights, device=dev)
        recs = ev.quality_records(r, val, a.quality_crop, ev.P_GRID, pool, progress=False)
        sweep = ev.sweep_p(recs, prefer=r.p) | {"images": [f.name for f in val], "crop": a.quality_crop}
        ev.write_p(weights, sweep["p"], sweep)
        publish(weights, out)
        log(f"p sweep on {len(val)} held-out training images: p = {sweep['p']:g} ({sweep['criterion']})")
        for row in sweep["grid"]:
            log(f"  p={row['p']:<5g} SRCC vs SSIM {row['srcc_ssim']:.4f}  vs level {row['srcc_level']:.4f}")
        results["p_sweep"] = sweep
        save_results()
    else:
        log("p sweep skipped (time)")

    live1 = list_images(pack / "live1")
    if time_left() > 20:
        r = ev.make_restorer(weights, device=dev)
        rows = ev.eval_restoration(live1, ev.QFS, r, pool, progress=False)
        table = ev.summarize(rows)
        log(ev.table1(table, len(live1), "LIVE1"))
        sec = sum(x["seconds"] for x in rows) / len(rows)
        log(f"{sec:.4f} s per image on {name} (eager fp32, whole images)")
        results["eval"] = {"qfs": {str(k): v for k, v in table.items()}, "seconds_per_image": sec}
        save_results()
        write_atomic(
            out / "eval.json",
            strict_json(
                {
                    "protocol": ev.PROTOCOL,
                    "qfs": results["eval"]["qfs"],
                    "images": rows,
                    "published": ev.PUBLISHED,
                    "seconds_per_image": sec,
                    "device": name,
                    "model": ev.describe(r),
                }
            ),
        )
    else:
        log("LIVE1 evaluation skipped (time)")

    if time_left() > 45:
        r = ev.make_restorer(weights, device=dev)
        recs = ev.quality_records(r, live1, a.quality_crop, None, pool, progress=False)
        tables = ev.quality_tables(recs)
        log(ev.NOT_HUMAN)
        log(
            ev.format_table(
                f"Q against distortion level (LIVE1, p={r.p:g}; Table II layout)", tables["level"]
            )
        )
        log(ev.format_table("Q against SSIM to the reference (Table III layout)", tables["ssim"]))
        results["quality"] = {"note": ev.NOT_HUMAN, "p": r.p, "tables": tables}
        save_results()
    else:
        log("quality study skipped (time)")

    files = sorted(p.name for p in out.iterdir() if p.is_file())
    if any(".part" in f for f in files):
        log("weights are in parts: cat weights.safetensors.part* > weights.safetensors")
    log(f"done in {time.time() - t_start:.0f} s; files in {out}: {files}")
    return 0


if __name__ == "__main__":
    code = main()
    # Leave at once: on the H200 the interpreter's teardown (DataLoader workers, CUDA) outlasted the
    # 33 s left in the time box after "done"; every result is already written and flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
