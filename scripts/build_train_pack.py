"""Build gpu_pack/: everything a bare GPU machine needs to train and evaluate, in <= 40 MiB.

    python scripts/build_train_pack.py [--src ../shared/data/train] [--live1 ../shared/data/live1]

gpu_pack/live1/  the 29 LIVE1 references as lossless WebP (pixel-identical to the PNGs, checked); one under
                 32 px (too small for the quality study's JPEG 2000) is refused
gpu_pack/val/    the training run's held-out images (trainer.split_files), copied byte for byte; those
                 under 32 px (too small for the p sweep's JPEG 2000) are left out, with a note
gpu_pack/train/  random crops (lossless WebP) of the other training images, one crop per image in
                 turn, until the byte budget is spent
Both keep the subfolders of --src (a/x.png and b/x.png are two images).
gpu_pack/MANIFEST.json
The pack is a pure function of its arguments (seeded).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qairn.train.data import list_images  # noqa: E402
from qairn.train.evaluate import JP2K_MIN, too_small_for_jp2k  # noqa: E402
from qairn.train.trainer import split_files  # noqa: E402

DATA = ROOT / ".." / "shared" / "data"


def webp_lossless(bgr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".webp", bgr, [cv2.IMWRITE_WEBP_QUALITY, 101])  # quality > 100: lossless
    if not ok or not np.array_equal(cv2.imdecode(buf, cv2.IMREAD_COLOR), bgr):
        raise RuntimeError("lossless WebP round trip failed")
    return buf.tobytes()


def read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path}: cannot read image")
    return img


def build(src, live1, out, budget_mib=40.0, crop=192, holdout=8, seed=0, log=print) -> dict:
    src, live1, out = Path(src), Path(live1), Path(out)
    here = Path.cwd().resolve()
    if out.resolve() in (here, *here.parents):
        # The pack is built beside --out and renamed over it: '.' has no name to build beside (a
        # ValueError traceback), and an earlier pack replaced there would delete the folder one is in.
        raise SystemExit(
            f"--out {out}: is the current folder (or holds it); name the pack's folder, e.g. gpu_pack"
        )
    # Smaller crops hold no training patch (the trainer's least: --patch 16 + 8 for the grid shift).
    if crop < 24:
        raise SystemExit(f"--crop {crop}: needs at least 24 px (--patch 16 + 8, the trainer's smallest)")
    if holdout < 1:  # an empty val/: gpu_train (its --val-data) then failed on the GPU machine
        raise SystemExit(
            f"--val-holdout {holdout}: gpu_train validates, checks the fp16 export and chooses p on the "
            "pack's val/ images; hold out at least 1"
        )
    for given in (src, live1):
        if given.resolve().is_relative_to(out.resolve()):
            raise SystemExit(f"--out {out}: holds the source images ({given}); write the pack elsewhere")
    if out.exists():
        # Only an earlier pack (its MANIFEST.json says so) or an empty folder is replaced: never a folder
        # that holds anything else (--out . or ~, or a data folder).
        names = {q.name for q in out.iterdir()}
        if names and ("MANIFEST.json" not in names or names - {"MANIFEST.json", "live1", "val", "train"}):
            raise SystemExit(f"{out}: not a training pack (no MANIFEST.json, or other files); not replaced")
    # Built beside it and renamed in when whole: written in place, a build cut short (Ctrl-C) left a pack
    # without its manifest, which gpu_train took and a rebuild refused, the earlier pack gone.
    building = out.with_name(f".{out.name}.building")
    shutil.rmtree(building, ignore_errors=True)  # what a killed build left
    try:
        manifest = fill(src, live1, building, budget_mib, crop, holdout, seed, log)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    building.rename(out)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(
        f"{out}: {manifest['train_crops']} crops from {manifest['train_images']} images, "
        f"{len(manifest['val_files'])} val, {manifest['live1_files']} LIVE1; {total / 2**20:.2f} MiB"
    )
    return manifest


def fill(
    src: Path, live1: Path, out: Path, budget_mib: float, crop: int, holdout: int, seed: int, log
) -> dict:
    """Write the pack into out (a new folder); its manifest."""
    budget = int(budget_mib * 2**20)
    for d in ("live1", "val", "train"):
        (out / d).mkdir(parents=True)
    used = 0
    for f in list_images(live1):
        img = read(f)
        h, w = img.shape[:2]
        if min(h, w) < JP2K_MIN:  # gpu_train refuses the pack then, but on the GPU machine
            raise SystemExit(too_small_for_jp2k(f, w, h, crop=0))
        used += (out / "live1" / f"{f.stem}.webp").write_bytes(webp_lossless(img))
    train_files, val_files = split_files(str(src), holdout)
    # gpu_train's p sweep distorts the held-out images with JPEG 2000, which fails under 32 px after the
    # whole training: such an image is left out (neither held out nor trained), as the trainer leaves
    # out training images too small for a patch.
    small = {f: read(f).shape[:2] for f in val_files}
    small = {f: hw for f, hw in small.items() if min(hw) < JP2K_MIN}
    for f, (h, w) in small.items():
        log(
            f"note: held-out image {f.relative_to(src)} is {w}x{h} px, under the p sweep's {JP2K_MIN} "
            "(JPEG 2000): not used"
        )
    if small and len(small) == len(val_files):
        raise SystemExit(
            f"--val-holdout {holdout}: every held-out image is under {JP2K_MIN} px (the p sweep's least, "
            f"JPEG 2000), e.g. {next(iter(small))}; none left for val/"
        )
    val_files = [f for f in val_files if f not in small]
    for f in val_files:
        # Under their subfolders: flat, a/x.png and b/x.png were one file, the second over the first.
        dest = out / "val" / f.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
        used += f.stat().st_size
    if used >= budget:
        raise SystemExit(f"LIVE1 + validation images alone take {used / 2**20:.1f} MiB > {budget_mib} MiB")
    log(f"live1 + val: {used / 2**20:.1f} MiB; filling {budget_mib} MiB with {crop}x{crop} crops")

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_files))
    images = {}
    n_crops, rounds, full = 0, 0, False
    while not full:
        added = 0
        for i in order:
            f = train_files[i]
            if f not in images:
                images[f] = read(f)
            img = images[f]
            h, w = img.shape[:2]
            if h < crop or w < crop:
                continue
            y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
            data = webp_lossless(np.ascontiguousarray(img[y : y + crop, x : x + crop]))
            if used + len(data) > budget - 64 * 1024:  # keep room for the manifest
                full = True
                break
            dest = out / "train" / f.relative_to(src).parent / f"{f.stem}_r{rounds}_y{y}_x{x}.webp"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            used += len(data)
            n_crops += 1
            added += 1
        rounds += 1
        if added == 0:
            break
    if n_crops == 0:  # a pack without training images: gpu_train would fail on it later
        if full:
            raise SystemExit(
                f"--budget-mib {budget_mib}: no room for one {crop}x{crop} crop after LIVE1 + val"
            )
        raise SystemExit(f"{src}: no training image is at least {crop} px on a side (--crop {crop})")
    manifest = {
        "source_train": str(src.resolve()),
        "source_live1": str(live1.resolve()),
        "budget_mib": budget_mib,
        "crop": crop,
        "seed": seed,
        "holdout": holdout,
        "train_images": len(train_files),
        "train_crops": n_crops,
        "crop_rounds": rounds,
        "val_files": [f.relative_to(src).as_posix() for f in val_files],
        "live1_files": len(list(out.glob("live1/*.webp"))),
        "bytes": used,
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(DATA / "train"))
    ap.add_argument("--live1", default=str(DATA / "live1"))
    ap.add_argument("--out", default=str(ROOT / "gpu_pack"))
    ap.add_argument("--budget-mib", type=float, default=40.0)
    ap.add_argument(
        "--crop",
        type=int,
        default=192,
        help="training crop side (default 192); gpu_train.py --patch P needs P + 8 (104 for its default 96)",
    )
    ap.add_argument("--val-holdout", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    build(a.src, a.live1, a.out, a.budget_mib, a.crop, a.val_holdout, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
