"""Build, cache and validate serialized TensorRT engines.

Which build (see onnx_export.py for the fp32 islands):
  - TensorRT 10 ("fp16-flag"): the fp32 ONNX with BuilderFlag.FP16; the layers the exporter named
    "fp32_island/..." are pinned to fp32 (layer precision + output type, OBEY_PRECISION_CONSTRAINTS).
  - TensorRT 11 ("strong"): the FP16 flag is gone and every network is strongly typed, so the fp16
    ONNX (fp32 islands as explicit Casts) is built as it is. TensorRT 10 takes this path too when
    asked (strongly_typed=True).
  - precision fp32: the fp32 ONNX, TF32 off.

Engine cache: an engine is only valid for the ONNX it came from, the GPU model and compute capability,
the TensorRT version, the optimization profile and the precision. Those fields are the EngineSpec;
its hash names the file, and a JSON sidecar beside the engine holds the spec and the engine's sha256.
An engine whose sidecar is missing, different (stale: other ONNX; foreign: other GPU or TensorRT) or
whose bytes do not hash to the recorded sha256 is rebuilt, never deserialized (a user's engine=
file without a readable sidecar is refused by the backend instead, and so is any stale or foreign one
with rebuild=False, as the command line's --engine runs it); one that passes and still fails
to deserialize is rebuilt once by the backend (get_engine's `unusable`). The timing cache (per GPU,
TensorRT version and build typing, shared by those engines; merged with the file under a lock when
saved, as other processes save theirs) and the build locks live in the cache folder, also for an engine
written elsewhere (`qairn export tensorrt -o PATH`).

Only `build_engine` and `gpu_identity` touch TensorRT/CUDA; everything else is plain Python.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from qairn.export.cache import remove_stale_parts, write_atomic
from qairn.export.onnx_export import INPUT, ISLAND_TAG
from qairn.messages import warn

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    pass


# Bump when build_engine changes what it builds from the same ONNX (the fp32 islands it pins, builder
# flags): the engines cached by the old code are then stale, as GRAPH_VERSION does for the ONNX cache.
BUILD_VERSION = 1


@dataclass(frozen=True)
class EngineSpec:
    onnx_sha256: str  # onnx_export.network_sha256: the file's, and its external data's if any
    gpu_name: str
    compute_capability: str  # "9.0"
    trt_version: str
    min_shape: tuple[int, int, int, int]
    opt_shape: tuple[int, int, int, int]
    max_shape: tuple[int, int, int, int]
    precision: str  # "fp16" | "fp32"
    typing: str  # "fp16-flag" | "strong" | "fp32"
    build_version: int = BUILD_VERSION

    def as_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists, as read back from a sidecar

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()

    @property
    def dynamic(self) -> bool:
        return not (self.min_shape == self.opt_shape == self.max_shape)


def build_typing(
    precision: str, trt_version: str, has_fp16_flag: bool, strongly_typed: bool | None = None
) -> str:
    """How to get `precision` out of this TensorRT: "fp32", "fp16-flag" (TensorRT 10) or "strong"."""
    if precision == "fp32":
        return "fp32"
    if precision != "fp16":
        raise EngineError(f"TensorRT engines are built in fp16 or fp32, not {precision!r}")
    major = int(trt_version.split(".")[0])
    if major >= 11 or not has_fp16_flag:
        if strongly_typed is False:
            raise EngineError(f"TensorRT {trt_version} has no FP16 builder flag: only strongly typed builds")
        return "strong"
    return "strong" if strongly_typed else "fp16-flag"


def onnx_precision(typing: str) -> str:
    """Which ONNX export a build reads: the fp16 graph only for strongly typed fp16 builds."""
    return "fp16" if typing == "strong" else "fp32"


def engine_path(folder: Path, spec: EngineSpec) -> Path:
    return Path(folder) / f"qairn-{spec.precision}-{spec.key()[:24]}.engine"


def sidecar_path(engine: Path) -> Path:
    return engine.with_name(engine.name + ".json")


def timing_cache_path(folder: Path, spec: EngineSpec) -> Path:
    """One timing cache per GPU, TensorRT and build typing. The typing too: a cache keeps each layer's
    winning tactic, and TensorRT documents it as specific to flags that change the layer implementation
    (TF32, on in fp16 builds, off in fp32 ones), so an fp32 build could take an fp16 build's TF32 one."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", spec.gpu_name).strip("-").lower()
    name = f"timing-{gpu}-sm{spec.compute_capability}-trt{spec.trt_version}-{spec.typing}.cache"
    return Path(folder) / name


def load_cached(engine: Path, spec: EngineSpec) -> tuple[bytes | None, str]:
    """The engine bytes if `engine` was built for exactly `spec`, else (None, why not)."""
    engine = Path(engine)
    if not engine.is_file():
        return None, "no engine yet"
    try:
        side = json.loads(sidecar_path(engine).read_text())
    except (OSError, ValueError):
        side = None
    if not isinstance(side, dict) or not isinstance(side.get("spec", {}), dict):  # JSON, but not ours
        return None, f"{engine}: no readable sidecar {sidecar_path(engine).name}"
    recorded = side.get("spec", {})
    if recorded != spec.as_json():
        return None, f"{engine}: built for another {', '.join(changed_fields(recorded, spec.as_json()))}"
    data = engine.read_bytes()
    if hashlib.sha256(data).hexdigest() != side.get("engine_sha256"):
        return None, f"{engine}: contents do not match the sidecar's sha256"
    return data, "cached"


def changed_fields(recorded: dict, spec: dict) -> list[str]:
    """The fields of `spec` (as_json, or some of them) that a sidecar's `recorded` spec differs in:
    what makes its engine stale (onnx_sha256, shapes) or foreign (GPU, TensorRT, build)."""
    return sorted(k for k in spec if recorded.get(k) != spec[k])


def export_command(engine: Path, spec: dict) -> str:
    """The `qairn export tensorrt` command that builds `engine` for `spec` (as_json) here."""
    n, _, h, w = spec["opt_shape"]
    options = [f"--precision {spec['precision']}"] if spec["precision"] != "fp16" else []
    options.append(f"--shape {n},{h},{w}")
    if spec["min_shape"] != spec["max_shape"]:
        n, _, h, w = spec["max_shape"]
        options += ["--dynamic", f"--max-shape {n},{h},{w}"]
    if spec["typing"] == "strong" and int(spec["trt_version"].split(".")[0]) < 11:
        options.append("--strongly-typed")  # TensorRT 11 builds nothing else
    return f"qairn export tensorrt WEIGHTS {' '.join(options)} -o {engine} --overwrite"


def not_rebuilt(engine: Path, why: str, spec: dict) -> EngineError:
    """The refusal of an engine file given to be run as it is (rebuild=False: the command line's
    --engine, an input) that would be rebuilt over: `why` in load_cached's words, and the rebuild."""
    return EngineError(
        f"{why}; an engine given to run is not rebuilt over: rebuild it with {export_command(engine, spec)}"
    )


def store(engine: Path, spec: EngineSpec, data: bytes) -> Path:
    # Engine first, then the sidecar: a crash in between leaves an engine that fails validation.
    write_atomic(engine, data)
    side = {"spec": spec.as_json(), "engine_sha256": hashlib.sha256(data).hexdigest(), "key": spec.key()}
    write_atomic(sidecar_path(engine), json.dumps(side, indent=1, sort_keys=True).encode())
    return engine


def read_spec(engine: Path) -> dict | None:
    """The spec recorded beside `engine`, None without a sidecar or with one whose shapes are not
    three (N,3,H,W) lists: the backend takes its shapes from them."""
    try:
        spec = json.loads(sidecar_path(Path(engine)).read_text())["spec"]
    except (OSError, ValueError, KeyError, TypeError):  # TypeError: JSON that is not an object
        return None
    if not isinstance(spec, dict):
        return None
    shapes = [spec.get(k) for k in ("min_shape", "opt_shape", "max_shape")]
    if not all(isinstance(s, list) and len(s) == 4 and all(type(d) is int for d in s) for s in shapes):
        return None
    return spec


def gpu_identity(device) -> tuple[str, str]:
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


# ---- TensorRT ---------------------------------------------------------------------------------
def trt_logger(trt):
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


_LOGGER = None


def pin_fp32_islands(trt, network) -> int:
    """TensorRT 10 weak typing: keep the exporter's fp32 islands in fp32. The ONNX parser names each
    layer after its ONNX node, so the islands are found by the exporter's name prefix."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if ISLAND_TAG not in layer.name or layer.type in (trt.LayerType.CONSTANT, trt.LayerType.SHAPE):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype == trt.float32:
                layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def build_engine(onnx_path: Path, spec: EngineSpec, workspace_bytes: int, timing_cache: Path | None) -> bytes:
    """Parse the ONNX file, build a serialized engine for `spec`'s profile and precision, and persist
    the timing cache. Raises EngineError with TensorRT's messages when parsing or building fails."""
    import tensorrt as trt

    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    strong = spec.typing == "strong"
    # TensorRT 10 opts in to strong typing with this flag; TensorRT 11 accepts and ignores it (every
    # network is strongly typed there), and a later release may drop it.
    strongly_typed_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = 1 << int(strongly_typed_flag) if strong and strongly_typed_flag is not None else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if spec.typing == "fp16-flag":
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = pin_fp32_islands(trt, network)
        if pinned == 0:
            warn(
                "no fp32-island layers found by name: sigmoid gates and quality sums may run in "
                "fp16; build with strongly_typed=True instead"
            )
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    elif spec.typing == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 convs would lose ~3 digits

    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT, spec.min_shape, spec.opt_shape, spec.max_shape)
    config.add_optimization_profile(profile)

    if not config.set_timing_cache(read_timing_cache(config, timing_cache), ignore_mismatch=False):
        # Its header names another GPU or TensorRT: their timings would mislead this build.
        warn(f"timing cache {timing_cache}: recorded elsewhere: starting a fresh one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build an engine for {onnx_path} (see the TensorRT log above)")
    if timing_cache is not None:
        save_timing_cache(config, timing_cache)
    return bytes(serialized)


def read_timing_cache(config, path: Path | None):
    """The timing cache in `path` for this build, or a fresh one: none yet, or a file TensorRT cannot
    read (cut short, another version's) is warned of, not a failed build."""
    if path is None or not path.is_file():
        return config.create_timing_cache(b"")
    try:
        cache = config.create_timing_cache(path.read_bytes())
    except (OSError, RuntimeError) as e:  # RuntimeError: TensorRT's own, for bytes it cannot parse
        cache, why = None, str(e).splitlines()[0] if str(e) else type(e).__name__
    else:
        why = "TensorRT could not read it (see its log above)"
    if cache is None:
        warn(f"timing cache {path}: unusable ({why}): starting a fresh one")
        cache = config.create_timing_cache(b"")
    return cache


def save_timing_cache(config, path: Path) -> None:
    """Write the build's timing cache to `path`, merged with what the file holds now: another process
    may have saved its own build's timings since this build read it, and replacing the file would
    drop them. Read, merge and replace run under a lock beside the file, one process at a time."""
    cache = config.get_timing_cache()
    with flocked(path.with_name(f".{path.name}.lock")):
        if path.is_file():
            try:
                on_disk = config.create_timing_cache(path.read_bytes())
            except (OSError, RuntimeError):
                on_disk = None  # unreadable: ours replaces it
            if on_disk is not None:
                cache.combine(on_disk, ignore_mismatch=False)  # ours wins where both timed a tactic
        write_atomic(path, bytes(cache.serialize()))


@contextlib.contextmanager
def flocked(lock_file: Path):
    """An exclusive flock on `lock_file` (POSIX; elsewhere no lock), created with its folder."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def build_lock(engine: Path, folder: Path):
    """Held while an engine is looked up and built. Two processes (server workers started together)
    would both build it, and their engine and sidecar writes could interleave into a pair that fails
    validation next time; with the lock the second waits and loads the first one's engine. An flock
    (POSIX; elsewhere no lock) on a lock file in the cache `folder`, named after the engine's path:
    not beside an engine written to a folder of the user's (`-o dir/model.engine`).

    So two writers of one engine path with different cache folders (two QAIRN_CACHE_DIRs, one -o)
    hold different locks. Left so: engine and sidecar are each renamed into place whole, and
    load_cached takes an engine only if its bytes hash to its sidecar's sha256, which is written with
    the spec it was built for; a mixed pair from such a race is rebuilt (minutes), never run."""
    where = hashlib.sha256(str(Path(engine).resolve()).encode()).hexdigest()[:12]
    with flocked(Path(folder) / f".{Path(engine).name}.{where}.lock"):
        yield


def get_engine(
    onnx_path: Path,
    spec: EngineSpec,
    engine: Path,
    workspace_bytes: int,
    folder: Path | None = None,
    unusable: bytes | None = None,
    rebuild: bool = True,
) -> tuple[bytes, bool]:
    """The engine for `spec` at path `engine` and whether it was built now: the cached one if valid
    (False), else a fresh build stored there (True). The build lock and the timing cache live in the
    cache `folder` (default: the engine's own). unusable: cached bytes TensorRT could not deserialize,
    rebuilt even though they match their sidecar (unless another process has replaced them since).
    rebuild=False: an existing `engine` that is not valid for `spec` (or unusable) is refused with
    EngineError, never rebuilt over: a file the user gave to run as it is."""
    folder = Path(folder) if folder is not None else Path(engine).parent
    with build_lock(Path(engine), folder):
        return _get_engine(onnx_path, spec, engine, workspace_bytes, folder, unusable, rebuild)


def _get_engine(
    onnx_path: Path,
    spec: EngineSpec,
    engine: Path,
    workspace_bytes: int,
    folder: Path,
    unusable: bytes | None,
    rebuild: bool = True,
) -> tuple[bytes, bool]:
    data, why = load_cached(engine, spec)
    if data is not None and data != unusable:
        return data, False
    if not rebuild and Path(engine).is_file():  # before any build work
        why = why if data is None else f"{engine}: TensorRT could not deserialize it"
        raise not_rebuilt(engine, why, spec.as_json())
    if Path(engine).is_file() and data is None:  # unusable ones were warned of by the caller
        warn(f"rebuilding TensorRT engine: {why}")
    log.info(
        "building TensorRT engine %s (%s %s, profile %s..%s)",
        engine,
        spec.precision,
        spec.typing,
        spec.min_shape,
        spec.max_shape,
    )
    remove_stale_parts(folder)
    data = build_engine(onnx_path, spec, workspace_bytes, timing_cache_path(folder, spec))
    store(engine, spec, data)
    return data, True
