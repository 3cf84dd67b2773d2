"""Save and load QAIRN weights as safetensors whose metadata says which architecture they need."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from qairn.messages import counted
from qairn.model import QAIRN, QAIRNConfig

FORMAT = "qairn"
FORMAT_VERSION = "1"


class WeightsError(ValueError):
    """A weights file that is missing, unreadable or not a qairn file."""


def save_weights(
    model: QAIRN, path: str | Path, training: dict | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write model weights + config (+ training summary) to a safetensors file, atomically."""
    path = Path(path)
    # NaN and infinity are not JSON: json.dumps wrote bare NaN, which strict readers refuse.
    for where, value in (("config", asdict(model.config)), ("training", training or {})):
        bad = non_finite(value, where)
        if bad:
            raise ValueError(
                f"{path}: {bad} is not a finite number; the weights' metadata (JSON) has no NaN or infinity"
            )
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": "QAIRN",
        "config": model.config.to_json(),
        "training": json.dumps(training or {}, sort_keys=True, allow_nan=False),
    }
    write_weights(path, tensors, meta)
    return path


def non_finite(value, where: str) -> str | None:
    """The first NaN or infinity in value (nested dicts and lists), as 'where.key[i] = nan', or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} = {value}"
    if isinstance(value, dict):
        named = [(f"{where}.{k}", v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        named = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    else:
        named = []
    return next((bad for name, v in named if (bad := non_finite(v, name))), None)


def write_weights(path: Path, tensors: dict, meta: dict) -> None:
    """One safetensors file, atomically and with the usual permissions (safetensors' own writer
    leaves files only their owner can read)."""
    from qairn.engine.imageio import write_atomic

    write_atomic(path, safetensors_bytes(tensors, metadata=meta))


def weights_path(path: str | Path) -> Path:
    if str(path) == "":  # Path("") is ".", which was refused as "a folder" by a name never given
        raise WeightsError("weights path is empty: give a .safetensors file, or None for the shipped weights")
    return Path(path)


def read_metadata(path: str | Path) -> dict:
    path = weights_path(path)
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder; give the .safetensors file")
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types across versions
        raise WeightsError(f"{path}: not a safetensors file ({e})") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise WeightsError(f"{path}: not a qairn weights file (no qairn config in its metadata)")
    # Older files may lack these two; a file that names another architecture or a later format is
    # not one this version can rebuild, even when its tensor names happen to fit.
    if meta.get("arch", "QAIRN") != "QAIRN":
        raise WeightsError(f"{path}: holds a {meta['arch']!r} network, not QAIRN")
    if meta.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise WeightsError(
            f"{path}: qairn weights format {meta['format_version']!r}; this qairn reads {FORMAT_VERSION!r}"
        )
    return meta


def load_model(path: str | Path, device: str | torch.device = "cpu") -> QAIRN:
    """Rebuild the architecture the file asks for and load its weights (as float32), on `device` as
    Restorer(device=...) takes it ("auto" too)."""
    # Checked first and said as the Restorer says it: torch's own errors ("gpu": a list of twenty
    # device types; "cuda" without one: an AssertionError) came after the whole file was read.
    from qairn.engine.restorer import resolve_device  # (it imports this module)

    device = None if device is None else resolve_device(device)
    path = weights_path(path)
    meta = read_metadata(path)
    try:
        config = QAIRNConfig.from_json(meta["config"])
        p = config.p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < math.inf:
            raise ValueError(f"Minkowski p must be a positive number, not {p!r}")
        # These change no tensor shape, so the shape check below cannot catch them: "false" (a string)
        # would switch the global residual on.
        for name in ("residual", "identity_init"):
            if not isinstance(getattr(config, name), bool):
                raise ValueError(f"{name} must be true or false, not {getattr(config, name)!r}")
        # Built on the meta device first: shapes only, so a garbled config (widths of 100000, say)
        # is refused below instead of allocating gigabytes. A config that cannot build (three
        # widths, say) is the file's fault too.
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in QAIRN(config).state_dict().items()}
    # rqa_div 0: ZeroDivisionError; a negative width: torch's RuntimeError (negative dimension)
    except (ValueError, TypeError, KeyError, ArithmeticError, RuntimeError) as e:
        raise WeightsError(f"{path}: unreadable qairn config ({e})") from None
    with safe_open(str(path), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    missing, unexpected = shapes.keys() - found.keys(), found.keys() - shapes.keys()
    if missing or unexpected:
        raise WeightsError(
            f"{path}: weights do not match the config (missing {len(missing)}, unexpected {len(unexpected)})"
        )
    if found != shapes:  # a tensor of another size than the config builds
        raise WeightsError(f"{path}: weights do not match the config (tensor sizes differ)")
    state = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            state[k] = f.get_tensor(k).float()
    # A diverged training exports NaN weights: they would restore every picture black, scored NaN.
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(
            f"{path}: weights hold NaN or infinity ({counted(len(bad), 'tensor')}, e.g. {bad[0]})"
        )
    model = QAIRN(config)
    model.load_state_dict(state)
    try:
        model.training_summary = json.loads(meta.get("training", "{}") or "{}")
    except ValueError:
        raise WeightsError(f"{path}: unreadable training record in the metadata") from None
    return model.to(device).eval()
