"""The public inference API: qairn.Restorer restores JPEG-damaged images and scores their quality."""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import numbers
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypedDict, overload

import numpy as np
import torch
import torch.nn.functional as F

from qairn.engine.backends import (
    BACKENDS,
    PRECISIONS,
    DeviceError,
    UnknownOptionError,
    check_switch,
    make_backend,
)
from qairn.engine.caveats import caveat, flat_frames
from qairn.engine.color import native
from qairn.engine.tiling import ALIGN, TilePlan, aligned_tile, ceil_to, plan_tiles
from qairn.kernels.gate import MAX_POOL_P
from qairn.messages import warn
from qairn.model import QAIRN
from qairn.weights_io import WeightsError, load_model

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
AUTO_TILE = 512  # tile="auto": tiles of this size for images bigger than one batch of them
DEFAULT_OVERLAP = 32
DEFAULT_WEIGHTS = WEIGHTS_DIR / "qairn-small.safetensors"
SCALES = (1, 2, 4)  # gamma1, gamma2, gamma3 resolutions relative to the image
# Held for each CUDA-graph capture, and by our torch.cuda.empty_cache calls: one for the process.
# torch.cuda.empty_cache empties every GPU's cache, and PyTorch's allocator asserts that no capture
# is underway on a GPU whose cache it empties; torch.cuda.graph calls it on entry. So two Restorers
# on two GPUs capturing at once from their threads (or one emptying its cache after running out of
# memory while another captures) would crash. Held only for the capture itself (host work, once per
# shape), not the warm-up before it, where compiling and tuning take their time.
_CAPTURE_LOCK = threading.Lock()
Progress = Callable[[int, int], object]  # progress(done, total), after each batch of tiles


def default_weights() -> Path:
    if not DEFAULT_WEIGHTS.is_file():
        raise WeightsError(
            f"no weights are shipped yet ({DEFAULT_WEIGHTS} is missing): pass weights=PATH "
            "(train some with `qairn train --export PATH`)"
        )
    return DEFAULT_WEIGHTS


def one_thread_after_fork() -> None:
    """Registered (once) by the first Restorer: a process forked from this one runs torch on one
    thread. torch's OpenMP pool does not survive fork: a child of a process that had run a parallel op
    hung forever at its first one (multiprocessing.Pool(), Linux's default fork, map(r.score, images):
    the Restorer rebuilt there never loaded its weights). One thread each is what DataLoader workers
    get too; a 'spawn' context keeps torch's own thread count."""
    torch.set_num_threads(1)


_FORK_HOOK = []  # [True] once one_thread_after_fork is registered in this process


PATH_OPTIONS = ("onnx", "engine", "cache_dir")  # backend options that name files or folders


def absolute(path):
    """A path argument made absolute against this process's folder (None and non-paths as given)."""
    return os.path.abspath(path) if isinstance(path, (str, os.PathLike)) else path


@functools.cache
def weights_sha256(path: str) -> str:
    """The first 16 hex digits of a weights file's SHA-256: it tells apart files that share a name."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def tensors_sha256(state: dict) -> str:
    """weights_sha256 for a network held in memory: its tensors' names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# The square's 8 symmetries as (quarter turns, mirrored first: a transpose), in the order a self-ensemble
# of 2, 4 or 8 takes them. Measured on 6 LIVE1 images at QF 10 (shipped weights): the first 4 gave
# +0.074 dB over the plain pass, all 8 +0.085.
ENSEMBLE_ORDER = ((0, False), (0, True), (2, False), (2, True), (1, False), (3, False), (1, True), (3, True))
ENSEMBLES = (1, 2, 4, 8)


def oriented(x: torch.Tensor, sym: tuple[int, bool], back: bool = False) -> torch.Tensor:
    """x (N,C,H,W) mirrored (transposed) if sym says so, then turned sym[0] quarter turns; back=True
    undoes that."""
    turns, mirrored = sym
    if not back:
        x = x.transpose(2, 3) if mirrored else x
        return torch.rot90(x, turns, (2, 3))
    x = torch.rot90(x, -turns, (2, 3))
    return x.transpose(2, 3) if mirrored else x


def is_int(v) -> bool:
    """An int of any kind (numpy's too), but not a bool: True is an int to Python."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def resolve_device(device: str | torch.device) -> torch.device:
    """ "auto" (CUDA if there is a GPU, else the CPU), or the device named. A CUDA device that is not
    there (cuda:3 with one GPU, or cuda with none) is refused here, in one line naming it and what
    there is, rather than at the first copy to it, deep inside the backend, as an "invalid device
    ordinal" CUDA error. A bare "cuda" becomes the current CUDA device, index and all: the Restorer
    stays on that GPU when later called from a thread where another one is current. An int N is
    cuda:N, as torch.device(N) and .to(N) take it."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # torch.device(0) asks for the accelerator, and fails on a build without one before our "no CUDA
    # device" line can say so. True is not a GPU.
    if is_int(device) and device >= 0:
        device = f"cuda:{int(device)}"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):  # torch's own message lists some twenty device types
        raise DeviceError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise DeviceError(f"device {str(device)!r} requested, but this machine has no CUDA device")
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.index >= count:
        there = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise DeviceError(
            f"device {str(device)!r} requested, but this machine has {count} CUDA "
            f"device{'s' if count > 1 else ''} ({there})"
        )
    return device


def resolve_auto(backend: str, precision: str, device: torch.device) -> tuple[str, str]:
    """backend="auto", precision="auto" -> what runs best here without compiling anything: eager fp32 on
    the CPU (no fast half precision on AVX2); on CUDA fp16, 1.6x eager fp32 with outputs 76.8 dB from
    it (H200, 4K, 2026-11-27), through the Triton gate when triton is installed (quality pooled in the
    blend's pass). torch.compile and engines stay opt-in: they compile for minutes first."""
    from qairn.kernels.gate import HAS_TRITON, load_triton, triton_compiles_for

    # Named here, where "auto" is one of the choices: make_backend's errors listed all but it.
    if precision != "auto" and precision not in PRECISIONS:
        raise UnknownOptionError(
            f"unknown precision {precision!r}; choose one of auto, {', '.join(sorted(PRECISIONS))}"
        )
    if backend != "auto" and backend not in BACKENDS:
        raise UnknownOptionError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")

    # fp16 pays on tensor cores (compute capability 7.0 on); a Pascal GPU runs it at a fraction of
    # its fp32 rate. Triton compiles for 7.0 on too: older GPUs get eager fp32.
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" and triton_compiles_for(device, torch.float16) else "fp32"
    # The gate's kernels in the precision that runs: bf16 needs 8.0, and a Turing GPU asked for bf16
    # got the Triton backend, whose kernels cannot compile there.
    cuda = device.type == "cuda" and triton_compiles_for(device, PRECISIONS[precision])
    if backend == "auto" and cuda and HAS_TRITON:
        # HAS_TRITON says installed, not importable: a broken install, which ran eager while triton was
        # imported with qairn, would fail every restore at the gate's first launch.
        try:
            load_triton()
            backend = "triton"
        except ImportError as e:
            warn(f"backend auto runs eager: {e}")
    if backend == "auto":
        backend = "eager"
    return backend, precision


def check_tiling(tile, overlap) -> tuple[int | str | None, int]:
    """Checked once, not per image: (tile, overlap) as plain ints, or a ValueError saying why not."""
    if not (tile is None or (isinstance(tile, str) and tile == "auto") or (is_int(tile) and tile > 0)):
        raise ValueError(f'tile must be a positive int, None (whole images) or "auto", not {tile!r}')
    if not is_int(overlap) or overlap < 0:
        raise ValueError(f"overlap must be an int >= 0, not {overlap!r}")
    tile, overlap = (tile if tile is None or isinstance(tile, str) else int(tile)), int(overlap)
    largest = AUTO_TILE if tile == "auto" else tile
    runs = None if largest is None else aligned_tile(largest)
    # An overlap as wide as the tile leaves no core to restore.
    if runs is not None and ceil_to(overlap, ALIGN) >= runs:
        raise ValueError(
            f"overlap {overlap} (taken in steps of {ALIGN}: {ceil_to(overlap, ALIGN)}) must be smaller "
            f"than the tile {largest}" + (f" (cut in steps of {ALIGN}: {runs})" if runs != largest else "")
        )
    return tile, overlap


def default_overlap(tile) -> int:
    """The overlap a tile (an int, None or "auto") gets when none is given: DEFAULT_OVERLAP, or where it
    does not fit the tile that runs (16 or 32 pixels), static_overlap's. --tile 32 was refused with
    "overlap 32 ... must be smaller than the tile 32", an overlap the user never gave."""
    if is_int(tile) and tile > 0 and DEFAULT_OVERLAP >= aligned_tile(tile):  # (a bad tile: check_tiling)
        return static_overlap(aligned_tile(tile))
    return DEFAULT_OVERLAP


def static_overlap(tile: int) -> int:
    """The overlap a static file's tile gets when none is given: a quarter of it, in the steps of ALIGN
    that overlaps run in, up to the default 32 (0 for a 16..63 tile). 32 on a 16-pixel file's tiles
    was refused as wider than the tile."""
    return min(DEFAULT_OVERLAP, tile // 4 // ALIGN * ALIGN)


def check_order(order) -> str:
    if order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', not {order!r}")
    return order


def check_bits(bits) -> int | None:
    """bits=: None (the dtype's own depth) or the sample depth of integer frames. Which depths a dtype
    holds (uint8: 8, uint16: 9..16) is checked with the frames."""
    if bits is not None and not (is_int(bits) and 8 <= bits <= 16):
        raise ValueError(f"bits must be an int from 8 to 16 (the sample depth), not {bits!r}")
    return None if bits is None else int(bits)


def remember(cache: dict, key, make, keep: int, lock):
    """cache[key], made by make() on a miss; at most `keep` entries, the oldest dropped first.
    Under the owner's lock: one Restorer may serve several threads, and two that missed at once
    both popped the same oldest entry (KeyError)."""
    with lock:
        if key not in cache:
            if len(cache) >= keep:
                cache.pop(next(iter(cache)))
            cache[key] = make()
        return cache[key]


# restore_yuv's image: the planes (y, u, v), numpy or tensors as given.
Planes = tuple[np.ndarray, np.ndarray, np.ndarray] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Result:
    """What Restorer.restore returns: the restored image (the input's shape and type; restore_yuv's,
    the planes (y, u, v); None where only the quality was asked for, image=False), its quality
    {"Q1","Q2","Q3"} and, with return_maps=True, the gamma maps (full, 1/2 and 1/4 resolution).
    For tensor input the image is on the input's device, the quality and maps on the Restorer's.

    info["caveat"]: why the quality says little of this image, or None: under 16 pixels on a side
    (mostly padding to the gates) or flat (every channel's standard deviation at most 1/255 of full
    scale, alpha aside: a black frame, a lossy codec's a few codes off too, scores Q2 0.76-0.77, above
    every LIVE1 JPEG). A field, not a warning: a transcoder's fade to black would warn per frame.
    Given for numpy input (a list of N for an (N,H,W) batch of planes) and for every restore_stream
    frame; not for tensors to restore() and restore_yuv(), whose quality stays on the device, unsynced
    (qairn.engine.caveats.score_caveat takes a numpy image and its bits, as score() callers may use)."""

    image: np.ndarray | torch.Tensor | Planes | None
    quality: dict  # {"Q1","Q2","Q3"}: floats for arrays, (N,) tensors for tensor input
    maps: list | None = None  # [gamma1, gamma2, gamma3] float32, when asked for
    # restore_yuv, restore_stream's planes: matrix, range, bits; "caveat" (see above)
    info: dict = field(default_factory=dict)


class ScoredBy(TypedDict):
    """Restorer.scored_by(): which model gives the scores (a plain dict at run time)."""

    p: float
    weights: str | None
    weights_sha256: str


def finish(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A restored (padded) batch cut to the h x w image, clamped to [0, 1], contiguous: the network's
    own output is channels_last, and whether a caller got it or a tiled blend's copy (contiguous)
    depended on the image size."""
    return y[..., :h, :w].clamp(0, 1).contiguous()


def out_of_memory(e: BaseException) -> bool:
    """Whether e is, or was raised while handling, a device out-of-memory error. Running out inside a
    CUDA-graph capture raises the OutOfMemoryError in the body, and torch.cuda.graph's exit then ends
    the spoiled capture with an error of its own ("operation not permitted when stream is capturing",
    capture invalidated) that replaces it, with the OutOfMemoryError as its __context__: the tile
    must shrink for that too."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, torch.OutOfMemoryError):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


class FrameGraph:
    """One input shape's whole restore (every tile, the blend, the quality sums) captured once in a
    CUDA graph and replayed per call. Per-tile host work (crops, dozens of launches per tile,
    blending) is paid once at capture, so a stream of same-sized frames is limited by the device
    alone. The first two calls run eagerly on a side stream, as torch.cuda.graphs advises: cuDNN
    picks its algorithms, Triton compiles and the fused convs tune outside the capture."""

    def __init__(self, run, x: torch.Tensor):
        self.input = x.clone()
        self.replay, self.output = self.capture(run, self.input)
        # One static input and output for every caller: a second thread's frame copied in between
        # this one's copy and replay, or replayed before this one's outputs were cloned, swapped them.
        self.lock = threading.Lock()

    @staticmethod
    def capture(run, x: torch.Tensor):
        """(replay, outputs): run(x) warmed up, then captured; replay() reruns it into outputs.

        x is on the model's device, which is made current for all of it: torch.cuda.graph synchronizes
        and captures on the *current* device, and Triton launches go there (a Restorer on cuda:1 of a
        process whose current device is cuda:0). Warm-up and capture run on a side stream of our own
        on that device: torch.cuda.graph's default capture stream is one for the whole process, made
        on whichever device was current at its first use, and shared by captures on other threads.
        capture_error_mode="thread_local": in the default "global" mode, a call that is unsafe during
        a capture (cudaMalloc, a synchronize) made by *any* thread fails in that thread and spoils the
        capture, so the other Restorers of a process (one per GPU, each on its own thread) would break
        it with their ordinary work, and it would break theirs. thread_local checks only this thread,
        which makes no such call inside the capture: the warm-up compiled and tuned first, and
        PyTorch's allocator relaxes the mode for its own cudaMalloc. The capture itself holds
        _CAPTURE_LOCK (why: see there).
        """
        device = x.device
        with torch.cuda.device(device):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    run(x)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with _CAPTURE_LOCK, torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                output = run(x)

        def replay():
            with torch.cuda.device(device):  # on the current stream of the graph's own device
                graph.replay()

        return replay, output

    def __call__(self, x: torch.Tensor):
        # Threads on the device's default stream also queue the device work in this order.
        with self.lock:
            self.input.copy_(x)
            self.replay()
            y, q, maps = self.output  # overwritten by the next replay: the caller gets copies
            return (
                y.clone(),
                {k: v.clone() for k, v in q.items()},
                [m.clone() for m in maps] if maps is not None else None,
            )


class Restorer:
    """Restore images and score them, whole or in tiles, on any backend.

    Restorer(weights=None, device="auto", backend="auto", precision="auto", tile="auto", overlap=None)
    weights: a qairn safetensors file (default: the shipped weights) or model=: an in-memory QAIRN.
    backend/precision "auto": eager fp32 on the CPU; on CUDA fp16, with the Triton gate when triton
    is installed (see resolve_auto).
    tile=None processes whole images; an int, tiles of `tile` pixels (in steps of 16: 100 runs 96)
    overlapping by `overlap`; "auto" (the default), tiles of 512 unless the images are no bigger than
    one full batch of such tiles, which then go whole: no more memory, and no overlap to compute
    twice (a 768x512 image restored in 0.7-0.8 s instead of 1.1 s at tile 512 on this CPU). Under
    "auto", backend="compile" always tiles (512: static shapes), and a static export (an ONNX file or
    engine built for one N,H,W) at its own tile size. overlap=None (the default): 32; 0 for a tile under 48;
    for a static export's own tile, a quarter of it in steps of 16 up to 32 (0 for tiles under 64);
    an overlap given is checked against the tile and refused if it does not fit.
    tile_batch: tiles per backend call (N at least for a batch of N images).
    set_tiling() changes tile and overlap later.
    p: the Minkowski exponent that pools the gamma maps into Q1..Q3 (default: the network's own).
    channel_order: "rgb", or "bgr" (OpenCV's) for every call that does not say otherwise.
    Other keyword arguments go to the backend (e.g. channels_last, fused_conv; onnx= for onnxruntime,
    engine= for tensorrt); a misspelt one is refused with the list the backend takes.
    cuda_graph=True (CUDA; eager, triton, compile): each input shape's whole restore is captured in
    one CUDA graph on its first call and replayed after (FrameGraph); for streams of equal frames.
    With compile, torch.compile's own per-batch CUDA graphs are turned off: the frame graph holds
    the compiled kernels.
    ensemble=2, 4 or 8 (default 1): the picture is the mean of that many passes of the network over the
    image turned and mirrored (a self-ensemble: +0.07 dB on LIVE1 at 8, for 8 times the work); the
    quality and the maps stay those of the plain pass, comparable with runs without it.
    A Restorer pickles (for process pools) as its arguments, rebuilt where it is unpickled: the weights
    file's absolute path (read again there; onnx=, engine= and cache_dir= too), or a model='s weights
    as they were when the Restorer was made; the device, backend, precision, tile and overlap it runs
    with. Caches, CUDA graphs, compiled networks and engines are made again. A closed Restorer does
    not pickle.
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str | torch.device = "auto",
        backend: str = "auto",
        precision: str = "auto",
        tile: int | str | None = "auto",
        overlap: int | None = None,
        p: float | None = None,
        model: QAIRN | None = None,
        tile_batch: int = 4,
        channel_order: str = "rgb",
        cuda_graph: bool = False,
        ensemble: int = 1,
        **backend_options,
    ):
        # Before any loading, as a bad tile is: 3 would have run 3 of the 8 symmetries, unbalanced.
        if not is_int(ensemble) or ensemble not in ENSEMBLES:
            raise ValueError(
                f"ensemble= takes {', '.join(map(str, ENSEMBLES))} (passes per image), not {ensemble!r}"
            )
        self.ensemble = int(ensemble)
        if model is not None and weights is not None:
            raise ValueError("give weights= or model=, not both (model= would win and weights= be ignored)")
        # Checked here, not met later as "'str' object has no attribute 'config'" or as Path()'s error.
        if model is not None and not isinstance(model, QAIRN):
            raise TypeError(
                f"model= takes a QAIRN network (qairn.load_model(path)), not {type(model).__name__}; "
                "give a weights file as weights="
            )
        if weights is not None and not isinstance(weights, (str, os.PathLike)):
            raise TypeError(
                f"weights= takes the path of a qairn .safetensors file, not {type(weights).__name__}"
                + ("; give a network as model=" if isinstance(weights, QAIRN) else "")
            )
        self.device = resolve_device(device)  # first: a GPU that is not there is refused before any loading
        if not _FORK_HOOK and hasattr(os, "register_at_fork"):  # before this process runs torch in parallel
            os.register_at_fork(after_in_child=one_thread_after_fork)
            _FORK_HOOK.append(True)
        # What a pickled Restorer carries (__reduce__); the rest is settled after. An in-memory network
        # travels as its weights, copied now: the caller may go on training it, and the Restorer runs
        # (and hands on) the weights it was given.
        # Files travel as absolute paths: a worker that runs in another folder (or a pickle loaded
        # later elsewhere) read a relative "w.safetensors" or onnx="q.onnx" against its own.
        self._arguments = dict(
            weights=absolute(weights),
            tile_batch=tile_batch,
            channel_order=channel_order,
            cuda_graph=cuda_graph,
            ensemble=self.ensemble,
        ) | {k: absolute(v) if k in PATH_OPTIONS else v for k, v in backend_options.items()}
        self._network = None
        self._network_sha256: str | None = None  # (scored_by's, of self._network's tensors)
        if model is not None:
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self._network = model.config, state
        config = None
        if (
            model is None
            and weights is None
            and backend in ("onnxruntime", "tensorrt")
            and backend_options.get("onnx")
        ):
            # The network that runs is the file's, and its metadata holds its config: the shipped
            # weights (loaded for nothing) would pool its gates with their own p.
            try:
                from qairn.export.ort_backend import file_config
            except ImportError:  # make_backend says what is missing
                file_config = None
            config = file_config(backend_options["onnx"]) if file_config is not None else None
        if config is None:
            if model is None:
                model = load_model(weights if weights is not None else default_weights())
            config = model.config
        self.config = config
        # object: any real number (a Fraction, numpy's float64) is taken; type checkers read a float as no
        # numbers.Real, so the check below raised to them always and every attribute after was untyped.
        given_p: object = config.p if p is None else p
        # True ran as p = 1 and "64" as 64.0; "high" met float()'s own message.
        if isinstance(given_p, bool) or not isinstance(given_p, numbers.Real):
            raise ValueError(f"the Minkowski exponent p must be a positive number, not {given_p!r}")
        self.p = float(given_p)
        if not 0 < self.p < float("inf"):  # p = 0 divided by zero at the first score
            raise ValueError(f"the Minkowski exponent p must be a positive number, not {self.p!r}")
        if self.p > MAX_POOL_P:
            raise ValueError(
                f"the Minkowski exponent p = {self.p:g} is over {MAX_POOL_P:g}: fp32 pooling sums lose every "
                f"gate below {2 ** (-222 / self.p):.2f} (a map of such gates would score Q = 0)"
            )
        asked_precision = precision
        backend, precision = resolve_auto(backend, precision, self.device)
        self.backend_name, self.precision = backend, precision
        overlap_given = overlap is not None
        tile, overlap = check_tiling(tile, overlap if overlap_given else default_overlap(tile))
        # A float (2.5) was kept and failed at the first tiled image, inside range(); 0 became 1 unsaid.
        if not is_int(tile_batch) or tile_batch < 1:
            raise ValueError(f"tile_batch must be an int >= 1 (tiles per batch), not {tile_batch!r}")
        self.tile, self.overlap, self.tile_batch = tile, overlap, int(tile_batch)
        # Per Restorer, not per process: a make() may capture a CUDA graph or compile, and Restorers on
        # other threads (one per GPU) must not wait for it. Reentrant: a frame graph's make() runs the
        # plan, which remembers its device data.
        self._cache_lock = threading.RLock()
        self._plan_cache: dict = {}  # plan shape -> its core boxes and blend ramps on the device
        self._shrunk: dict = {}  # (n, h, w) -> (tile, overlap) that fit after an out-of-memory retry
        self.closed = False
        # The threads inside restore_tensor now (one entry per call): close() waits for them to leave
        # before it frees the backend they run on.
        self._callers: list[int] = []
        self._calls_changed = threading.Condition()
        self.channel_order = check_order(channel_order)
        cuda_graph = check_switch("cuda_graph", cuda_graph)
        if cuda_graph and backend not in ("eager", "triton", "compile"):
            raise ValueError(
                f"cuda_graph=True takes the eager, triton or compile backend, not {backend!r} "
                "(engines run on their own streams)"
            )
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, not {self.device}")
        if cuda_graph and backend == "compile":
            backend_options["cudagraphs"] = False  # the frame graph holds the compiled kernels instead
        self.cuda_graph = cuda_graph
        self._graphs: dict = {}  # (shape, tile plan, maps) -> FrameGraph
        self.backend = make_backend(backend, model, self.device, precision, **backend_options)
        ran_precision = getattr(self.backend, "precision", precision)  # an ONNX file's own precision
        if ran_precision != precision:
            if asked_precision != "auto":
                raise ValueError(
                    f"{self.backend.path} is a {ran_precision} export: it cannot run at precision "
                    f"{asked_precision!r} (give precision='auto' or '{ran_precision}', or export again)"
                )
            self.precision = ran_precision
        # Again, now that a static file's tile is known: an overlap of 48 on a 64-pixel file passed the
        # check above (made against 512) and failed at the first image.
        self.set_tiling(self.tile, self.overlap if overlap_given else None)
        ran = getattr(self.backend, "network_config", None)  # an exported file's own network
        if ran is not None and ran != config:
            differ = [
                f"{k} {v!r} there, {getattr(config, k)!r} given"
                for k, v in asdict(ran).items()
                if v != getattr(config, k)
            ]
            raise ValueError(
                f"{self.backend.path} holds another network than the one given ({'; '.join(differ)}): "
                "give the weights it was exported from, or neither weights= nor model= to use its own"
            )

    def scored_by(self) -> ScoredBy:
        """Which model gives this Restorer's scores: the pooling exponent `p`, the file that runs as
        `weights` (an engine= or onnx= file where given, else the weights file; None for a network given
        as model=) and `weights_sha256`, the first 16 hex digits of that file's SHA-256 (of the
        network's tensors for model=). Scores from other weights or another p do not compare (README);
        restore --json, score --json and the video trace record these beside them."""
        if self._network is not None and self._arguments.get("weights") is None:
            # Hashed once: the tensors are the Restorer's own copy, made when it was (a transcoder's
            # every run asks, and the paper preset's 52 M parameters take a while).
            if self._network_sha256 is None:
                self._network_sha256 = tensors_sha256(self._network[1])
            return {"p": self.p, "weights": None, "weights_sha256": self._network_sha256}
        # an exported file runs its own weights, not the shipped ones
        ran = self._arguments.get("engine") or self._arguments.get("onnx") or self._arguments.get("weights")
        path = str(ran) if ran else str(default_weights())
        return {"p": self.p, "weights": path, "weights_sha256": weights_sha256(path)}

    def __reduce__(self):
        """Pickled as its arguments (a process pool's worker rebuilds it): caches, graphs, compiled
        networks and engines are made again where it arrives. Device, backend, precision, tile and
        overlap are those that run here (auto resolved, set_tiling's)."""
        if self.closed:
            raise TypeError("cannot pickle a closed Restorer")
        settled = dict(
            device=str(self.device),
            backend=self.backend_name,
            precision=self.precision,
            tile=self.tile,
            overlap=self.overlap,
            p=self.p,
        )
        return rebuild_restorer, (type(self), self._arguments | settled, self._network)

    def close(self) -> None:
        """Free the device memory this Restorer holds now: its captured CUDA graphs, the tile plans
        kept on the device, and an engine's or ONNX Runtime session's own memory (their close()).
        A transcoder that switches models should not wait for the garbage collector. Later calls are
        refused; closing twice is harmless. `with Restorer(...) as r:` closes on leaving.
        Calls running in other threads end first: close() waits for them."""
        me = threading.get_ident()
        with self._calls_changed:
            self.closed = True  # no call starts from now on
            # Not for a call of this very thread (close() from a progress callback), which cannot end
            # before this returns: its next backend call is refused instead ("... was closed").
            self._calls_changed.wait_for(lambda: all(t == me for t in self._callers))
        close_backend = getattr(self.backend, "close", None)
        if close_backend is not None:
            close_backend()
        self.drop_caches()  # after the backend: what it let go of goes back to the device too

    def drop_caches(self) -> None:
        """Free what this Restorer keeps on the device for earlier calls (the captured CUDA graphs,
        each with its own memory pool, and the tile plans) and hand it back to the device; the next
        call remakes what it needs. For a Restorer that moves on to other frame sizes for good, or a
        benchmark whose every size's peak memory must be its own. A call running in another thread
        keeps the graph it replays until it returns."""
        with self._cache_lock:  # as remember(): not while a thread fills the cache
            self._graphs.clear()
            self._plan_cache.clear()
        if self.device.type == "cuda":
            with _CAPTURE_LOCK:  # not while another thread captures (see _CAPTURE_LOCK)
                torch.cuda.empty_cache()

    def __enter__(self) -> Restorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- tensors -------------------------------------------------------------------------------
    def restore_tensor(
        self,
        x: torch.Tensor,
        return_maps: bool = False,
        progress: Progress | None = None,
        image: bool = True,
        *,
        in_range: bool = False,
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor], list[torch.Tensor] | None]:
        """x: (N,3,H,W) float in [0,1] on any device. Returns (restored, quality dict of (N,) tensors,
        maps or None), all on the engine's device; return_maps=True: the maps, (N,1,h,w) each (see
        restore). progress(done, total) is called after each batch
        of tiles; a whole image, or a frame under cuda_graph (one replay), is one batch: (1, 1).
        image=False: quality (and maps) only, restored is None: the network's tail, the blend of the
        tiles and the crop are skipped (on the torch backends; the quality is the same numbers).
        in_range=True: x is known to lie in [0, 1] (restore() made it from integers, or has read its
        range), so its range is not read again (a read of every value, on the CPU)."""
        return_maps, image = check_switch("return_maps", return_maps), check_switch("image", image)
        # Checked before the work: a whole image calls it once, at the end, so progress=5 failed with
        # "'int' object is not callable" after the image was restored.
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be a function progress(done, total) or None, not {progress!r}")
        with self._calls_changed:
            if self.closed:  # the eager network would still run, an engine not: one rule for all
                raise RuntimeError("this Restorer was closed")
            self._callers.append(threading.get_ident())
        try:
            return self._restore_tensor(x, return_maps, progress, image, in_range)
        finally:
            with self._calls_changed:
                self._callers.remove(threading.get_ident())
                self._calls_changed.notify_all()

    def _restore_tensor(self, x: torch.Tensor, return_maps: bool, progress, image: bool, in_range: bool):
        # A uint8 tensor was taken as 0..255 floats, nearly all white after the clamp; (3,H,W) failed
        # unpacking its shape. Float ranges are read on the CPU only (check_float_range): before the copy
        # to a GPU Restorer, after the copy of a GPU's tensor to a CPU one.
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(
                f"restore_tensor takes (N,3,H,W) float in [0, 1], not {x.dtype} of shape {tuple(x.shape)} "
                "(restore() takes uint8 and uint16 tensors too)"
            )
        if x.numel() == 0:  # else met deep inside, as a conv's or an expand's size error
            raise ValueError(f"empty image tensor of shape {tuple(x.shape)}")
        if not in_range and x.device.type != "cpu":
            x = x.to(self.device)  # a GPU's tensor for a CPU Restorer: its range is read once it is here
        x = (x if in_range else check_float_range(x, uint8_taken=False)).to(self.device, torch.float32)
        if self.ensemble == 1 or not image:  # (quality only: the plain pass gives it; see _ensemble)
            return self._restore_plain(x, return_maps, progress, image)
        return self._ensemble(x, return_maps, progress)

    def _ensemble(self, x: torch.Tensor, return_maps: bool, progress):
        """Self-ensemble: the restored picture is the mean of the network's restorations of x turned and
        mirrored (the first `ensemble` of the square's 8 symmetries, ENSEMBLE_ORDER), each turned back;
        on LIVE1 it adds 0.07 dB for 8 times the work (README). The quality and maps are the plain
        pass's (the first), so scores compare with those of a Restorer without it."""
        k = self.ensemble

        def passed(i):  # progress over all k passes as one: pass i's tiles come after those of 0..i-1
            if progress is None:
                return None

            def report(done, total):
                progress(i * total + done, k * total)

            return report

        y, q, maps = self._restore_plain(x, return_maps, passed(0), True)
        total = y.to(torch.float32, copy=True)  # (a CUDA graph's output is its buffer, overwritten next)
        for i, sym in enumerate(ENSEMBLE_ORDER[1:k], start=1):
            yi, _, _ = self._restore_plain(oriented(x, sym).contiguous(), False, passed(i), True)
            total += oriented(yi, sym, back=True)
        return total.div_(k), q, maps

    def _restore_plain(self, x: torch.Tensor, return_maps: bool, progress, image: bool):
        n, _, h, w = x.shape
        asked = self.tile, self.overlap  # what an out-of-memory retry settles on holds for these only
        tile, overlap = self.tiling_for(h, w, n)
        plan = plan_tiles(h, w, tile, overlap)
        while True:
            try:
                if self.cuda_graph:  # one graph makes it all: the image is dropped after
                    y, q, maps = self._frame_graph(x, plan, return_maps)(x)
                    result = (y if image else None), q, maps
                else:
                    result = self._run_plan(x, plan, return_maps, progress, image)
                if progress is not None and (self.cuda_graph or plan.count == 1):
                    progress(1, 1)  # one batch: a whole image, or a whole frame's graph replay
                return result
            except Exception as e:
                if not out_of_memory(e):
                    raise
                with self._cache_lock:  # as remember() and close(): not while a thread fills the cache
                    self._graphs.clear()
                current = max(plan.rows.tile, plan.cols.tile)
                if current <= 64:
                    raise
                tile = aligned_tile(current // 2)  # what runs, and what the warning names
                # The overlap shrinks too (to a quarter of the tile at most): the warning says both.
                overlap = min(overlap, tile // 4)
                warn(f"out of device memory at tile {current}: retrying with tile {tile}, overlap {overlap}")
                if self.device.type == "cuda":
                    with _CAPTURE_LOCK:  # not while another thread captures (see _CAPTURE_LOCK)
                        torch.cuda.empty_cache()
                # Remembered for this input shape only: the next frame of a stream goes straight to the
                # tile that fits, and a long-lived Restorer does not tile its small frames for good. Not
                # once set_tiling (another thread) has changed the tiling meanwhile.
                with self._cache_lock:
                    if (self.tile, self.overlap) == asked:
                        self._shrunk[(n, h, w)] = tile, overlap
                plan = plan_tiles(h, w, tile, overlap)

    def _frame_graph(self, x: torch.Tensor, plan: TilePlan, return_maps: bool) -> FrameGraph:
        key = (
            tuple(x.shape),
            plan.rows.tile,
            plan.cols.tile,
            plan.rows.starts,
            plan.cols.starts,
            return_maps,
        )

        def make():
            graph = FrameGraph(lambda t: self._run_plan(t, plan, return_maps), x)
            # Its replays read the plan's device data (cores, ramps) where it was at capture: kept with
            # the graph, as the plan cache may drop it first (freed memory, read by every replay).
            graph.plan_data = self._plan_on_device(plan, x.shape[0])
            return graph

        return remember(
            self._graphs, key, make, keep=2, lock=self._cache_lock
        )  # each graph keeps its own memory pool

    def tiling_for(self, h: int, w: int, n: int = 1) -> tuple[int | None, int]:
        """(tile, overlap) that n images of h x w run at: tile_for's, or the smaller ones an
        out-of-memory retry settled on for this shape."""
        return self._shrunk.get((n, h, w), (self.tile_for(h, w, n), self.overlap))

    def set_tiling(self, tile: int | str | None, overlap: int | None = None) -> None:
        """New tile and overlap for the calls after, forgetting what out-of-memory retries settled on.
        Checked as the constructor checks them, against a static export's own tile under "auto" too;
        a refused call changes nothing. overlap=None: as the constructor's default."""
        given = overlap is not None
        tile, overlap = check_tiling(tile, overlap if given else default_overlap(tile))
        static = getattr(self.backend, "static_tile", None)
        if tile == "auto" and static:
            overlap = check_tiling(static, overlap if given else static_overlap(static))[1]
        with self._cache_lock:  # not between a retry's look at the tiling and its remembering
            self.tile, self.overlap = tile, overlap
            self._shrunk.clear()

    def tile_for(self, h: int, w: int, n: int = 1) -> int | None:
        """The tile size used for n images of h x w (None: whole); resolves tile="auto". Tiles are cut
        in steps of 16: tile=100 runs 96."""
        if self.tile != "auto":
            return None if self.tile is None else aligned_tile(self.tile)
        if getattr(self.backend, "static_tile", None):  # a static export runs its own tile size only
            return self.backend.static_tile
        batch_pixels = self.tile_batch * AUTO_TILE**2  # what one batch of tiles holds anyway
        whole = n * h * w <= batch_pixels and not getattr(self.backend, "fixed_tile", False)
        # A dynamic engine runs sizes up to its profile's largest only (2048 square by default): a
        # 4000x200 image holds fewer pixels than a batch of tiles, but no such engine runs it whole.
        largest = getattr(self.backend, "max_hw", None)
        if largest is not None:
            whole = whole and h <= largest[0] and w <= largest[1]
            return None if whole else min(AUTO_TILE, *largest)
        return None if whole else AUTO_TILE

    def _run_plan(
        self, x: torch.Tensor, plan: TilePlan, return_maps: bool, progress=None, image: bool = True
    ):
        n, _, h, w = x.shape
        hp, wp = plan.rows.length, plan.cols.length
        xp = F.pad(x, (0, wp - w, 0, hp - h), mode="replicate") if (hp, wp) != (h, w) else x
        th, tw = plan.rows.tile, plan.cols.tile
        fused = getattr(self.backend, "forward_pooled", None)
        dev = self._plan_on_device(plan, n)
        if plan.count == 1:
            if fused is not None:
                y, gammas, sums = fused(xp, self.p, dev["cores"], maps=return_maps, image=image)
                q = self._q_from_sums(sums, h, w)
                if not return_maps:
                    return finish(y, h, w) if image else None, q, None
            else:
                y, gammas = self.backend(xp)
            maps = [g[..., : -(-h // s), : -(-w // s)] for g, s in zip(gammas, SCALES)]
            if fused is None:
                q = {f"Q{k + 1}": self._pool(m) for k, m in enumerate(maps)}
            if not return_maps:
                return finish(y, h, w) if image else None, q, None
            # Backends run under inference_mode, so their gammas (and views of them) are inference
            # tensors, which refuse in-place edits and autograd: the caller gets copies, as the tiled
            # path's maps (made here) are ordinary tensors. Contiguous, as those are.
            contiguous = torch.contiguous_format
            maps = [m.clone(memory_format=contiguous) if m.is_inference() else m.contiguous() for m in maps]
            return finish(y, h, w) if image else None, q, maps

        out = torch.zeros(n, 3, hp, wp, device=self.device) if image else None
        sums = torch.zeros(3, n, device=self.device, dtype=torch.float64)
        maps = (
            [torch.zeros(n, 1, -(-hp // s), -(-wp // s), device=self.device) for s in SCALES]
            if return_maps
            else None
        )
        tiles = plan.tiles
        row_w, col_w = dev["row_weights"], dev["col_weights"]
        step = max(1, self.tile_batch // n)
        # Static backends (compiled graphs, engines) get every batch full, the last one padded with
        # repeats of its last tile (outputs dropped): one shape, one graph, for any image size.
        pad = getattr(self.backend, "fixed_tile", False)
        for b in range(0, len(tiles), step):
            group = tiles[b : b + step]
            crops = [xp[:, :, y0 : y0 + th, x0 : x0 + tw] for _, _, y0, x0 in group]
            cores = dev["cores"][b * n : (b + len(group)) * n]
            if pad and len(group) < step:
                crops += [crops[-1]] * (step - len(group))
                cores = torch.cat([cores] + [cores[-n:]] * (step - len(group)))
            batch = torch.cat(crops) if len(crops) > 1 else crops[0]  # one crop: the backend copies it
            if fused is not None:  # quality sums over each tile's core, taken inside the gate
                y, gammas, tile_sums = fused(batch, self.p, cores, maps=maps is not None, image=image)
            else:
                y, gammas = self.backend(batch)
            for t, (i, j, y0, x0) in enumerate(group):
                sl = slice(t * n, (t + 1) * n)
                if image:  # the blend weight is the outer product of the row and column ramps (never stored)
                    out[:, :, y0 : y0 + th, x0 : x0 + tw].addcmul_(
                        y[sl] * row_w[i][:, None], col_w[j][None, :]
                    )
                if fused is not None:
                    sums += tile_sums[:, sl]
                    if maps is None:
                        continue
                for k, (g, s) in enumerate(zip(gammas, SCALES)):
                    c0, c1, d0, d1 = plan.core(i, j, s)
                    core = g[sl, :, c0:c1, d0:d1]
                    if fused is None:
                        sums[k] += core.double().pow(self.p).flatten(1).sum(1)
                    if maps is not None:
                        maps[k][:, :, y0 // s + c0 : y0 // s + c1, x0 // s + d0 : x0 // s + d1] = core
            if progress is not None:
                progress(b + len(group), len(tiles))
        q = self._q_from_sums(sums, h, w)
        if maps is not None:
            maps = [m[..., : -(-h // s), : -(-w // s)].contiguous() for m, s in zip(maps, SCALES)]
        return finish(out, h, w) if image else None, q, maps

    def _plan_on_device(self, plan: TilePlan, n: int) -> dict:
        """The plan's core boxes (one row per tile and image, tile order) and blend ramps, on the
        device. Made once per plan shape and kept (a video's frames share one): copying small host
        tensors per tile would make the host wait for the device at every tile."""
        key = (plan.height, plan.width, plan.rows.tile, plan.cols.tile, plan.count, n, str(self.device))

        def make():
            cores = [plan.core(i, j) for i, j, _, _ in plan.tiles for _ in range(n)]
            return {
                "cores": torch.tensor(cores, dtype=torch.int64).to(self.device),
                "row_weights": torch.from_numpy(np.stack(plan.rows.weights)).float().to(self.device),
                "col_weights": torch.from_numpy(np.stack(plan.cols.weights)).float().to(self.device),
            }

        return remember(
            self._plan_cache, key, make, keep=8, lock=self._cache_lock
        )  # a few sizes in flight at most

    def _q_from_sums(self, sums: torch.Tensor, h: int, w: int) -> dict:
        """(3, N) sums of gamma**p over an h x w image at each gamma scale -> {"Q1","Q2","Q3"}."""
        counts = [-(-h // s) * -(-w // s) for s in SCALES]
        return {f"Q{k + 1}": (sums[k] / c).pow(1.0 / self.p).float() for k, c in enumerate(counts)}

    def _pool(self, gamma: torch.Tensor) -> torch.Tensor:
        return gamma.double().pow(self.p).flatten(1).mean(1).pow(1.0 / self.p).float()

    # ---- arrays and tensors from users -------------------------------------------------------------
    def restore(
        self,
        img: np.ndarray | torch.Tensor,
        return_maps: bool = False,
        channel_order: str | None = None,
        progress: Progress | None = None,
        bits: int | None = None,
    ) -> Result:
        """Restore one image `img` (HxWx3 RGB, HxW or HxWx1 gray, HxWx2 gray + alpha, HxWx4 RGBA; uint8,
        uint16 or float in [0,1]; alpha passed through) or a batch tensor (N,3,H,W) (uint8, uint16 or
        float in [0,1], any device: stays there). Returns a Result: the image, quality {"Q1","Q2","Q3"}.
        return_maps=True: Result.maps, the gate maps gamma1..3 at full, 1/2 and 1/4 resolution, values
        in [0, 1] (high: little to restore), pooled into Q1..Q3: where in the picture quality is lost.
        channel_order: "rgb" or "bgr" (OpenCV's); None: the Restorer's own.
        progress(done, total): called after each batch of tiles, e.g. to drive a progress bar.
        bits: the sample depth of integer images, as restore_stream takes it: bits=10 takes uint16 as
        codes 0..1023 and gives them back so; without it, uint16 spans 0..65535."""
        return self._restore(img, return_maps, channel_order, progress, bits)

    def _restore(self, img, return_maps, channel_order, progress, bits, image: bool = True) -> Result:
        """restore(); image=False leaves Result.image None and skips making it (score)."""
        # None, not any false value: channel_order="" ran as the Restorer's own order, unsaid.
        order = check_order(self.channel_order if channel_order is None else channel_order)
        bits = check_bits(bits)
        if isinstance(img, torch.Tensor):
            if bits is not None:  # uint8 tensors hold 8-bit samples, float ones have no depth
                from qairn.engine.video import _rgb_bits

                _rgb_bits(img.dtype, bits)
            return self._restore_torch(img, return_maps, order, progress, image, bits)
        x, meta = to_tensor(img, order, self.device, bits)  # integers travel; converted on the device
        # score_caveat's rule, on the device (its RGB in [0, 1], alpha aside), read with the quality;
        # not for score() (image=False), which hands out the quality alone.
        flat = flat_frames(*x.unbind(1), full=1.0) if image else None
        # In [0, 1]: made from integers, or its range read by image_array.
        y, q, maps = self.restore_tensor(x, return_maps, progress, image, in_range=True)
        quality = {k: float(v[0]) for k, v in q.items()}
        maps = [m[0, 0].float().cpu().numpy() for m in maps] if maps is not None else None
        info = {"caveat": caveat(*x.shape[-2:], bool(flat))} if image else {}
        return Result(from_tensor(y, meta) if image else None, quality, maps, info)

    def _restore_torch(
        self, t: torch.Tensor, return_maps: bool, order: str, progress=None, image=True, bits=None
    ) -> Result:
        if t.ndim != 4 or t.shape[1] != 3:
            # The layouts decoders give (torchvision's (3,H,W); channels last), and how to pass them.
            hint = ""
            if t.ndim == 3 and t.shape[0] == 3:
                hint = "; one image: give it as t[None]"
            elif t.ndim == 3 and t.shape[2] == 3:
                hint = "; channels last? give t.permute(2, 0, 1)[None]"
            elif t.ndim == 4 and t.shape[3] == 3:
                hint = "; channels last? give t.permute(0, 3, 1, 2)"
            raise ValueError(f"tensor input must be (N,3,H,W), got {tuple(t.shape)}{hint}")
        # A GPU's tensor for a CPU Restorer is copied anyway: first, so that its numbers are read as a CPU
        # tensor's are (float range, uint16 codes against bits=, the 10-bit hint), not skipped as on a GPU.
        src = t.cpu() if self.device.type == "cpu" else t
        x = batch_to_float(src, order, bits)  # its range read there, if float and on the CPU
        in_range = not src.is_floating_point() or src.device.type == "cpu"  # else read by restore_tensor
        y, q, maps = self.restore_tensor(x, return_maps, progress, image, in_range=in_range)
        return Result(batch_from_float(y.to(t.device), t.dtype, order, bits) if image else None, q, maps)

    # For type checkers: floats for a numpy image, (N,) tensors for a batch tensor.
    @overload
    def score(
        self,
        img: np.ndarray,
        channel_order: str | None = None,
        progress: Progress | None = None,
        bits: int | None = None,
    ) -> dict[str, float]: ...

    @overload
    def score(
        self,
        img: torch.Tensor,
        channel_order: str | None = None,
        progress: Progress | None = None,
        bits: int | None = None,
    ) -> dict[str, torch.Tensor]: ...

    def score(
        self,
        img: np.ndarray | torch.Tensor,
        channel_order: str | None = None,
        progress: Progress | None = None,
        bits: int | None = None,
    ) -> dict[str, float] | dict[str, torch.Tensor]:
        """Quality only: {"Q1","Q2","Q3"} (for tensor input, (N,) tensors), the numbers restore(img).quality
        gives, without making the restored image (the network's tail, the tiles' blend, the copy back).
        img, channel_order, progress and bits: as restore() takes them."""
        return self._restore(img, False, channel_order, progress, bits, image=False).quality

    # ---- video: Y'CbCr planes and frame streams (qairn.engine.color, qairn.engine.video) -------------
    def restore_yuv(
        self,
        y: np.ndarray | torch.Tensor,
        u: np.ndarray | torch.Tensor,
        v: np.ndarray | torch.Tensor,
        matrix: str | int = "bt709",
        range: str | int = "limited",
        bits: int | None = None,
        return_maps: bool = False,
        image: bool = True,
    ) -> Result:
        """Restore Y'CbCr planes (4:2:0/4:2:2/4:4:4; numpy or tensors, (H,W) or (N,H,W)); converted on the
        device. Result.image is (y, u, v) in the input's format. JPEG is matrix="bt601", range="full".
        matrix and range: names, or the H.273 codes a PyAV frame gives (matrix=frame.colorspace,
        range=frame.color_range); an unspecified or unsupported code is refused, naming it.
        bits: the sample depth (8 for uint8; uint16 planes need it, e.g. bits=10). return_maps=True:
        Result.maps, as restore() gives them, at the luma plane's size. image=False: quality (and maps)
        only, Result.image None: the network's tail, the tiles' blend and the planes are not made."""
        from qairn.engine.color import restore_yuv

        image = check_switch("image", image)  # before the planes are read and converted
        return restore_yuv(self, y, u, v, matrix, range, check_bits(bits), return_maps, image)

    def restore_stream(self, frames: Iterable, batch: int = 4, **options) -> Iterator[Result]:
        """Yield a Result per frame (RGB images or (y, u, v) tuples), in order, `batch` frames at a time;
        options: matrix, range, bits, channel_order, image=False for quality only (each Result's
        image None) and return_maps=True for each frame's maps, as restore() gives them (see
        qairn.engine.video.restore_stream). Options are checked here, when called, not
        at the first frame the generator is asked for."""
        from qairn.engine.color import check_matrix, check_range
        from qairn.engine.video import restore_stream

        if self.closed:  # here, not at the first frame
            raise RuntimeError("this Restorer was closed")
        # A misspelt option (chanel_order=) was Python's "restore_stream() got an unexpected keyword
        # argument": named here with those it takes, as the Restorer's own options are (check_options).
        own = [k for k in inspect.signature(restore_stream).parameters if k not in ("restorer", "frames")]
        unknown = sorted(set(options) - set(own))
        if unknown:
            raise TypeError(
                f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: restore_stream "
                f"takes {', '.join(own)}"
            )
        # One frame iterates as its rows: an HxWx3 image ran as H gray "frames" of Wx3, unsaid. A stack
        # of frames (N,H,W,3), or of (3,H,W) tensors, is a stream.
        one_array = isinstance(frames, np.ndarray) and (
            frames.ndim == 2 or (frames.ndim == 3 and frames.shape[2] in (1, 2, 3, 4))
        )
        if one_array or (isinstance(frames, torch.Tensor) and frames.ndim <= 3):
            raise TypeError(
                f"restore_stream takes an iterable of frames, not one frame of shape {tuple(frames.shape)}: "
                "give [frame], or call restore(frame)"
            )
        # (y, u, v) as the stream ran as three gray images, unsaid. Told apart by a 4:2:0/4:2:2 plane set's
        # sizes; equal sizes are legal gray frames too (4:4:4 cannot be told from them).
        if is_plane_set(frames):
            shapes = ", ".join(str(tuple(p.shape)) for p in frames)
            raise TypeError(
                f"restore_stream takes an iterable of frames, not one (y, u, v) frame of planes {shapes}: "
                "give [(y, u, v)], or call restore_yuv(y, u, v)"
            )
        # As tile_batch: batch=2.5 or "4" ran as int() made them, 0 as 1, None failed at the first frame.
        if not is_int(batch) or batch < 1:
            raise ValueError(f"batch must be an int >= 1 (frames per batch), not {batch!r}")
        order = options.get("channel_order")
        check_order(self.channel_order if order is None else order)
        check_matrix(options.get("matrix", "bt709"))
        check_range(options.get("range", "limited"))
        if "bits" in options:
            options["bits"] = check_bits(options["bits"])
        for switch in ("image", "return_maps"):  # "no" was taken by its truth: images made
            if switch in options:
                options[switch] = check_switch(switch, options[switch])
        return restore_stream(self, frames, batch, **options)


def rebuild_restorer(cls, arguments: dict, network) -> Restorer:
    """A pickled Restorer, made again from its arguments; network: (config, weights) of one made
    from model=, else None."""
    if network is not None:
        config, state = network
        model = QAIRN(config)
        model.load_state_dict(state)
        arguments = arguments | {"model": model.eval()}
    return cls(**arguments)


def is_plane_set(frames) -> bool:
    """Whether frames is a (y, u, v) tuple (or list) of 2-D planes of a 4:2:0 or 4:2:2 frame: u and v of
    one size, half y's width (and height, for 4:2:0), rounded up."""
    if not isinstance(frames, (tuple, list)) or len(frames) != 3:
        return False
    if not all(isinstance(p, (np.ndarray, torch.Tensor)) and p.ndim == 2 for p in frames):
        return False
    (h, w), u, v = frames[0].shape, tuple(frames[1].shape), tuple(frames[2].shape)
    half = (h + 1) // 2, (w + 1) // 2
    return u == v and u != (h, w) and u in (half, (h, half[1]))


def image_array(img: np.ndarray, order: str = "rgb") -> tuple[np.ndarray, dict]:
    """Check a numpy image; return its HxWx3 RGB pixels as a contiguous array of their own numbers
    (uint8, int32 for uint16, float) and what is needed to convert back."""
    if not isinstance(img, np.ndarray):
        # A file name, or what decoders hand over: a PyAV frame, a Pillow image (numpy reads it as it is).
        hint = ""
        if isinstance(img, (str, os.PathLike)):
            hint = "; read the file first: qairn.engine.imageio.read_image(path)"
        elif hasattr(img, "to_ndarray"):
            hint = (
                "; give frame.to_ndarray(format='rgb24'), or qairn.engine.video.frame_planes(frame) "
                "to restore_yuv"
            )
        elif hasattr(img, "__array_interface__") or hasattr(img, "__array__"):
            hint = "; give np.asarray(img)"
        raise TypeError(f"expected a numpy array or torch tensor, got {type(img).__name__}{hint}")
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 2, 3, 4)):
        # What the two shapes a transcoder is likely to have at hand can be given as instead.
        hint = ""
        if img.ndim == 4:
            hint = "; for a batch of frames, use restore_stream(frames) or an (N,3,H,W) tensor"
        elif img.ndim == 3 and img.shape[0] in (1, 3, 4):
            hint = "; channels first? give HxWxC (img.transpose(1, 2, 0))"
        raise ValueError(f"expected HxW, HxWx1, HxWx2, HxWx3 or HxWx4 image, got shape {img.shape}{hint}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"empty image of shape {img.shape}")
    dtype, img = img.dtype, native(img)  # given back as dtype, big-endian ones too
    if img.dtype == np.uint8:
        scale = 255.0
    elif img.dtype == np.uint16:
        scale = 65535.0
    elif img.dtype in (np.float16, np.float32, np.float64):
        scale = 1.0
        lo, hi = float(np.min(img)), float(np.max(img))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("the float image contains NaN or infinity")
        if lo < -1 / 255 or hi > 1 + 1 / 255:  # more than one 8-bit step out: the wrong scale, not rounding
            raise ValueError(
                f"float images are taken in [0, 1], this one spans [{lo:.4g}, {hi:.4g}] {range_advice(hi)}"
            )
    else:
        raise ValueError(f"unsupported image dtype {img.dtype} (use uint8, uint16 or float in [0,1])")
    alpha = None
    one_channel = img.ndim == 3 and img.shape[2] == 1  # given back as HxWx1, the shape it came in
    if one_channel:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[2] == 2:  # gray + alpha (what read_image gives for LA files)
        img, alpha = img[..., 0], img[..., 1]
    gray = img.ndim == 2
    if gray:
        rgb = np.repeat(img[..., None], 3, axis=2)
    else:
        rgb = img[..., :3]
        if img.shape[2] == 4:
            alpha = img[..., 3]
        if order == "bgr":
            rgb = rgb[..., ::-1]
    # Writeable too: torch.from_numpy warns of "undefined behavior" on a read-only array (np.frombuffer
    # of a decoder's bytes), though nothing writes to it. Copied only when needed, like a strided view.
    arr = np.require(rgb, requirements=["C", "W"])
    if arr.dtype == np.uint16:  # torch's uint16 has few kernels: widen (16-bit input is rare and small)
        arr = arr.astype(np.int32)
    elif arr.dtype == np.float16:  # computed in fp32 like any float input, given back as fp16
        arr = arr.astype(np.float32)
    meta = {"dtype": dtype, "scale": scale, "gray": gray, "one_channel": one_channel}
    return arr, meta | {"alpha": alpha, "order": order}


def check_samples(pixels, dtype, bits: int | None) -> None:
    """Integer RGB pixels (numpy, or a tensor on the CPU: a GPU's are not read, a device sync per call)
    of a frame given as dtype, against its sample depth bits. Given: 16-bit codes given as 10-bit are
    refused, not clamped. Not given: uint16 pixels all under 1024 get a warning, as 10-bit samples (what
    a 10-bit decoder hands over in uint16) taken as 16-bit restore as a nearly black picture."""
    if isinstance(pixels, torch.Tensor) and pixels.device.type != "cpu":
        return
    if bits is not None:
        from qairn.engine.color import check_codes

        check_codes(torch.as_tensor(pixels), bits, "rgb")
    elif dtype == np.uint16 and 0 < int(pixels.max()) < 1024:
        warn(
            "uint16 pixels all under 1024 are taken as 16-bit samples (a nearly black picture): "
            "for 10-bit samples pass bits=10"
        )


def to_float(pixels: torch.Tensor, scale: float) -> torch.Tensor:
    """(N,H,W,3) pixels (any numbers, any device) -> (N,3,H,W) float32 in [0,1] on the same device."""
    x = pixels.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    return x.div_(scale) if scale != 1.0 else x


def to_pixels(y: torch.Tensor, meta: dict) -> torch.Tensor:
    """(N,3,H,W) float in [0,1] -> (N,H,W,C) in the image's own numbers, where y is: rounded and
    clipped integers (uint8, or int32 for 16-bit), gray averaged to C=1, BGR reordered."""
    y = y.float()
    if meta["gray"]:
        y = y.mean(1, keepdim=True)
    elif meta["order"] == "bgr":
        y = y.flip(1)
    scale = meta["scale"]
    if scale != 1.0:
        y = (y * scale).round_().clamp_(0, scale).to(torch.uint8 if scale == 255.0 else torch.int32)
    return y.permute(0, 2, 3, 1).contiguous()


def from_pixels(pixels: np.ndarray, meta: dict) -> np.ndarray:
    """One HxWxC array from to_pixels (on the host) -> the numpy image, like the one given."""
    out = (pixels[..., 0] if meta["gray"] and not meta["one_channel"] else pixels).astype(
        meta["dtype"], copy=False
    )
    if meta["alpha"] is not None:  # RGB + alpha, or gray + alpha
        out = np.concatenate([out if out.ndim == 3 else out[..., None], meta["alpha"][..., None]], axis=2)
    return np.ascontiguousarray(out)


def check_float_range(x: torch.Tensor, uint8_taken: bool = True) -> torch.Tensor:
    """x, refused if it lies on the CPU outside [0, 1] (0..255 floats, NaN) rather than clamped into a
    white picture. On a GPU the check would cost a device-to-host sync per call (and stall
    restore_stream's overlap): skipped. (A GPU's tensor given to a CPU Restorer is checked once it is
    on the CPU: restore_tensor.) uint8_taken=False: the caller (restore_tensor) takes floats only, and
    its advice for 0..255 data names restore() for uint8."""
    # detach: a tensor that requires grad warned "Converting a tensor with requires_grad=True to a
    # scalar" from inside qairn at every call.
    lo, hi = (float(v) for v in torch.aminmax(x.detach())) if x.device.type == "cpu" else (0.0, 1.0)
    if math.isnan(lo) or math.isnan(hi):  # said as "spans [nan, nan]", with advice for 0..255 data
        raise ValueError("float tensors are taken in [0, 1], this one holds NaN")
    if math.isinf(lo) or math.isinf(hi):  # as NaN: no scale makes it fit
        raise ValueError("float tensors are taken in [0, 1], this one holds infinity")
    if not (lo >= -1 / 255 and hi <= 1 + 1 / 255):
        raise ValueError(
            f"float tensors are taken in [0, 1], this one spans [{lo:.4g}, {hi:.4g}] "
            + range_advice(hi, uint8_taken)
        )
    return x


def range_advice(hi: float, uint8_taken: bool = True) -> str:
    """What to do with floats out of [0, 1]: 0..255 data reach far over 1; RGB converted from Y'CbCr
    overshoots a little (out-of-gamut colours), and dividing that by 255 would make it black."""
    if hi > 2:
        return f"(divide 0..255 data by 255, or {'pass uint8' if uint8_taken else 'give uint8 to restore()'})"
    return "(clip a colour conversion's overshoot to [0, 1] first)"


def batch_to_float(t: torch.Tensor, order: str = "rgb", bits: int | None = None) -> torch.Tensor:
    """(N,3,H,W) uint8, uint16 (bits: its sample depth, 16 if None) or float in [0,1], RGB or BGR ->
    float32 RGB in [0,1], where t is."""
    if t.numel() == 0:
        raise ValueError(f"empty image tensor of shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        x = t.float() / 255.0
    elif t.dtype == torch.uint16:
        # torch's uint16 has no max or compare kernels: widened to int32 (lossless), as numpy uint16 is.
        # Its codes are read on the CPU only (on a GPU, a device sync per call), as numpy's are.
        wide = t.to(torch.int32)
        check_samples(wide, np.uint16, bits)
        x = wide.float() / (2.0 ** (bits or 16) - 1)
    elif t.is_floating_point():
        x = check_float_range(t.float())
    else:
        raise ValueError(f"unsupported tensor dtype {t.dtype} (use uint8, uint16 or float in [0,1])")
    return x.flip(1) if order == "bgr" else x


def batch_from_float(
    y: torch.Tensor, dtype: torch.dtype, order: str = "rgb", bits: int | None = None
) -> torch.Tensor:
    """The inverse of batch_to_float: float32 RGB in [0,1] -> dtype (integers rounded) in order."""
    y = y.flip(1) if order == "bgr" else y
    if dtype in (torch.uint8, torch.uint16):
        top = 255.0 if dtype == torch.uint8 else 2.0 ** (bits or 16) - 1
        return (y * top).round().to(dtype)
    return y.to(dtype)


def to_tensor(
    img: np.ndarray, order: str = "rgb", device: torch.device | str | None = None, bits: int | None = None
):
    """numpy image -> (1,3,H,W) float32 in [0,1] (on `device`, else the CPU), plus what is needed to
    convert back. The pixels go to the device as they are (uint8: a quarter of float32's bytes) and are
    converted there: for a 4K frame, numpy's float conversion alone costs more than the network.
    bits: the sample depth of an integer image (10: uint16 codes 0..1023), its dtype's by default."""
    arr, meta = image_array(img, order)
    t = torch.from_numpy(arr)
    if bits is not None:
        from qairn.engine.video import _rgb_bits

        bits = _rgb_bits(meta["dtype"], bits)
        meta["scale"] = 2.0**bits - 1
    check_samples(t, meta["dtype"], bits)
    if device is not None:
        t = t.to(device)
    return to_float(t[None], meta["scale"]), meta


def from_tensor(y: torch.Tensor, meta: dict) -> np.ndarray:
    """(1,3,H,W) float in [0,1] on any device -> numpy image like the one to_tensor took. Rounding to
    integers happens where y is, so a GPU sends back uint8, not float32."""
    return from_pixels(to_pixels(y[:1], meta)[0].cpu().numpy(), meta)
