"""Training data: pristine images decoded once, random patches JPEG-compressed in workers.

Every batch is a pure function of (seed, batch index), so a run is deterministic and resumes
exactly where it stopped, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_EXTS = {".png", ".webp", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".ppm"}


def list_images(folder: str | Path) -> list[Path]:
    if Path(folder).is_file():  # the folder's own error ("no such folder") misled: the file is there
        raise NotADirectoryError(f"{folder}: a file, not a folder of images")
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")

    # Files only: a folder may be named like an image ("set5.png/"); its images are found inside it.
    # Hidden ones are not images of the set (macOS's ._a.png, a .thumbnails/ folder) and are skipped.
    def hidden(p):
        return any(part.startswith(".") for part in p.relative_to(folder).parts)

    files = sorted(
        p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file() and not hidden(p)
    )
    if not files:
        raise FileNotFoundError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_EXTS))})")
    return files


def load_cached(files: list[Path], cache_dir: str | Path | None = None) -> list[np.ndarray]:
    """Decode every image once (BGR uint8); keep a .npz cache keyed by the file list."""
    # Path, size and modification time: an image edited in place keeps its size (any BMP or PPM of
    # the same shape does), and two folders may hold files of the same name.
    stats = ((p, p.stat()) for p in files)
    key = hashlib.sha1("\n".join(f"{p}:{st.st_size}:{st.st_mtime_ns}" for p, st in stats).encode())
    key = key.hexdigest()[:12]
    cache = Path(cache_dir) / f"train-{key}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        try:
            with np.load(cache) as z:
                return [z[f"a{i}"] for i in range(len(files))]
        except Exception:  # torn by a crash (zipfile, numpy, EOF errors): it is only a cache, made anew
            pass
    images = []
    for p in files:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"{p}: cannot decode training image")
        images.append(img)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp.npz")  # DDP ranks may race here
        try:
            np.savez(tmp, **{f"a{i}": a for i, a in enumerate(images)})
            tmp.replace(cache)
        except BaseException:  # a full disk: no partial copy of the training set left behind
            tmp.unlink(missing_ok=True)
            raise
        # Caches of other file lists (--data edited, given another way) are never read again and each
        # held the whole decoded set. Whole caches only: another DDP rank's temp file is in the making.
        for old in cache.parent.glob("train-*.npz"):
            if old != cache and re.fullmatch(r"train-[0-9a-f]{12}\.npz", old.name):
                old.unlink(missing_ok=True)
    return images


def jpeg(bgr: np.ndarray, qf: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(qf)])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


class JPEGPatches(Dataset):
    """Item i is a whole batch: (jpeg, clean) float tensors (B,3,P,P) RGB in [0,1], plus the QFs."""

    def __init__(
        self,
        images: list[np.ndarray],
        batch: int = 16,
        patch: int = 96,
        qf_range: tuple[int, int] = (5, 95),
        shift_prob: float = 0.5,
        seed: int = 0,
        length: int = 10**9,
        shared: bool = False,
    ):
        """images: decoded BGR uint8 arrays. They are moved into one tensor and the list is emptied,
        so that the pixels are held once (the training set is 255 MB decoded). shared: make that
        tensor in shared memory, where DataLoader workers need it; moved there later, it would be
        copied once more."""
        kept = [im for im in images if min(im.shape[:2]) >= patch + 8]
        if not kept:
            raise ValueError(f"no training image is at least {patch + 8} px on its short side")
        self.shapes = [im.shape for im in kept]
        self.offsets = np.cumsum([0] + [im.size for im in kept])
        # All pixels in one torch tensor: DataLoader workers (spawned) then receive it through shared
        # memory instead of a pickled copy of the whole training set each.
        n = int(self.offsets[-1])
        if shared:  # made there directly: share_memory_() would fill all of it first, with a copy
            self.pixels = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n))
        else:
            self.pixels = torch.empty(n, dtype=torch.uint8)
        if isinstance(images, list):  # each image is then freed once copied: its last reference is in `kept`
            images.clear()
        for k in range(len(kept)):
            self.pixels[self.offsets[k] : self.offsets[k + 1]] = torch.from_numpy(kept[k].reshape(-1))
            kept[k] = None
        # Sample images in proportion to their area so every pixel is equally likely.
        areas = np.array([sh[0] * sh[1] for sh in self.shapes], dtype=np.float64)
        self.prob = areas / areas.sum()
        self.batch, self.patch, self.qf_range = batch, patch, qf_range
        self.shift_prob, self.seed, self.length = shift_prob, seed, length

    def __len__(self) -> int:
        return self.length

    def sample(self, rng: np.random.Generator):
        p = self.patch
        k = rng.choice(len(self.shapes), p=self.prob)
        img = self.pixels[self.offsets[k] : self.offsets[k + 1]].numpy().reshape(self.shapes[k])
        # Crop p+8 so the JPEG grid can be shifted by 0..7 relative to the patch (FBCNN).
        h, w = img.shape[:2]
        y, x = rng.integers(0, h - p - 8 + 1), rng.integers(0, w - p - 8 + 1)
        crop = img[y : y + p + 8, x : x + p + 8]
        k = int(rng.integers(0, 8))  # rotation by 90 k degrees, with flip for k >= 4
        crop = np.rot90(crop, k % 4)
        if k >= 4:
            crop = crop[:, ::-1]
        crop = np.ascontiguousarray(crop)
        qf = int(rng.integers(self.qf_range[0], self.qf_range[1] + 1))
        comp = jpeg(crop, qf)
        if rng.random() < self.shift_prob:
            dy, dx = rng.integers(0, 8, size=2)
        else:
            dy = dx = 0
        sl = (slice(dy, dy + p), slice(dx, dx + p))
        return comp[sl], crop[sl], qf

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, int(i)])
        comps, cleans, qfs = zip(*(self.sample(rng) for _ in range(self.batch)), strict=False)

        def to_t(a):  # BGR uint8 HWC -> RGB float CHW
            t = torch.from_numpy(np.stack(a)[..., ::-1].copy()).permute(0, 3, 1, 2)
            return t.float().div_(255.0)

        return to_t(comps), to_t(cleans), torch.tensor(qfs)


def worker_init(_):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
