"""Where exported ONNX files, TensorRT engines and timing caches live, and how they are named.

The cache folder is, in order: the `cache_dir` passed in, $QAIRN_CACHE_DIR, the package's own
`qairn/.cache` (git-ignored), or the user cache dir (platformdirs) when the package dir is read-only
(a system-wide install). Every file is written to a temporary name and renamed, so a crash or a
second process never leaves a half-written engine behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

import torch

from qairn.engine import imageio

PACKAGE_CACHE = Path(__file__).resolve().parents[1] / ".cache"
# Temp files of writes in progress: cached_onnx's ".STEM.PID.part.onnx", write_atomic's ".NAME.XXXXXXXX.part".
PART_FILE = re.compile(r"^\..+\.(?:(?P<pid>\d+)\.part\.onnx|\w{8}\.part)$")
STALE_PART_S = 3600


def writable_dir(path: Path) -> bool:
    # os.access lies for root and for read-only mounts: really try to create a file.
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def cache_dir(explicit: str | Path | None = None) -> Path:
    """The folder for exported models and engines (created if needed)."""
    if explicit is not None or os.environ.get("QAIRN_CACHE_DIR"):
        path = Path(explicit if explicit is not None else os.environ["QAIRN_CACHE_DIR"]).expanduser()
        if not writable_dir(path):
            raise OSError(f"cache folder {path} is not writable")
        return path
    if writable_dir(PACKAGE_CACHE):
        return PACKAGE_CACHE
    import platformdirs

    path = Path(platformdirs.user_cache_dir("qairn"))
    if not writable_dir(path):
        raise OSError(f"neither {PACKAGE_CACHE} nor {path} is writable: pass cache_dir=")
    return path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_digest(model: torch.nn.Module, **options) -> str:
    """sha256 of a QAIRN's config, weights and the export options: the ONNX cache key."""
    h = hashlib.sha256()
    h.update(model.config.to_json().encode())
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    h.update(torch.__version__.encode())  # another exporter may write another graph
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_atomic(path: str | Path, data: bytes) -> Path:
    """imageio.write_atomic, creating the folder first (cache folders appear on first use)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.write_atomic(path, data)
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process, alive
        return True
    return True


def remove_stale_parts(folder: Path) -> None:
    """Remove the temp files of writes killed midway (kill -9 skips the cleanup that removes them),
    which stayed in the cache folder forever: those over an hour old (a write in progress keeps its
    file's mtime fresh) and, when the name carries a pid, whose process is gone. On a cache shared
    between hosts the pid may be another host's: the age alone keeps a live write's file."""
    stale = time.time() - STALE_PART_S
    for f in Path(folder).glob(".*.part*"):
        match = PART_FILE.match(f.name)
        try:
            if match and f.stat().st_mtime < stale and not (match["pid"] and pid_alive(int(match["pid"]))):
                f.unlink()
        except OSError:  # removed by another process first, or not ours to remove
            pass
