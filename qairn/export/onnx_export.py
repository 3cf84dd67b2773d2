"""Export QAIRN to ONNX (fp32, or fp16 with fp32 islands) and verify it against eager PyTorch.

Graph contract (what every exported file holds, whatever the flags):
  input     "input"    (N,3,H,W) RGB in [0,1], float32 or float16 (--io); H and W multiples of 16
                       (callers pad, replicate, as QAIRN.forward would: the pad is not in the graph).
  outputs   "restored" (N,3,H,W), dtype of the input.
            sums mode: "qsums" (N,3) float32: sum over pixels of gamma_k ** p * 2**S for k = 1, 2, 3,
                       S = 96 (metadata qairn.qsums_scale_log2; the gate kernel's scale, against fp32
                       underflow at large p), so Q_k = (qsums[:, k-1] / count_k) ** (1/p) / 2**(S/p),
                       count_k = ceil(H/s) * ceil(W/s), s = 1, 2, 4 (`q_from_qsums`). Partial sums
                       (not means) so tiles and batches can be added up before pooling.
            maps mode: "gamma1" (N,1,H,W), "gamma2" (N,1,H/2,W/2), "gamma3" (N,1,H/4,W/4), float32.
  metadata  qairn.* keys: outputs, precision, io, p, config (see `read_metadata`).

Exporter: the TorchScript exporter (`dynamo=False`) is the default. In torch 2.13 `torch.onnx.export`
defaults to the dynamo exporter and warns that the TorchScript one is deprecated, but on this 2-core CPU
the dynamo exporter takes 10-20 s for the tiny model (the TorchScript one 0.6 s), renames the opset
17 request to 18 and converts back, and needs `Dim` arithmetic for the multiple-of-16 sizes. Both
exports match eager to 2e-7 here; `exporter="dynamo"` is kept (and tested) for when the TorchScript
exporter is removed. Whatever `model.gate` is (the Triton backend may install a torch.library op),
the export uses the plain-torch reference gate: ONNX must hold standard ops only, and the reference
defines what the fused op computes.

FP16: the trunk runs in fp16; these stay fp32 (islands), because fp16 is unsafe there:
  - the gate: sigmoid and the blend (DESIGN section 4);
  - the quality sums: scaled by 2**96, they are far past fp16's 65504;
  - the last conv and the residual add (`fp32_tail`, default on): the restored image is the
    output users see, and the 1/255 steps of a uint8 image are only ~4 fp16 ulps near 1.0.
The fp16 graph is exported from the model with those parts in fp32, so the Casts are explicit and
TensorRT 11 (strong typing only) builds exactly that. In the fp32 graph the same nodes are renamed
with the prefix "fp32_island/" so the TensorRT 10 FP16-flag build can pin them to fp32 by name.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import io
import numbers
import os
import threading
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from qairn.engine.backends import BackendError
from qairn.export.cache import cache_dir, model_digest, remove_stale_parts, write_atomic
from qairn.kernels.gate import POOL_SCALE_LOG2, gated_blend_reference, scaled_pow
from qairn.messages import counted, warn
from qairn.model import QAIRN

INPUT = "input"
MAP_OUTPUTS = ("restored", "gamma1", "gamma2", "gamma3")
SUM_OUTPUTS = ("restored", "qsums")
ISLAND_TAG = "fp32_island/"
GRAPH_VERSION = 2  # in the cache key: bump when an exported graph changes (2: qsums scaled by 2**96)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# Max abs error of an ONNX Runtime run against eager fp32 that `check_parity` accepts: images and
# maps are in [0,1]. "qsums" is checked as what it is for, the pooled Q1..Q3: a Minkowski mean moves
# by no more than the largest change of its gammas, so Q takes the gamma bound. (Checked as sums it
# failed the shipped p = 64 weights in fp16: a sum of gamma**64 carries 64x gamma's relative error,
# Q only 1/64 of the sum's.) fp16: restored stays under half a uint8 step (1/255); measured errors
# are in bench/bench_ort.py --parity (small preset, LIVE1, QF 10..40).
TOLERANCE = {
    "fp32": {"restored": 1e-4, "gamma": 1e-4},
    "fp16": {"restored": 2e-3, "gamma": 2e-3},
}


class ExportError(BackendError):
    """An ONNX file that cannot be written, read or used (not installed, not a qairn export). A
    BackendError: behind Restorer(backend="onnxruntime"|"tensorrt") it is the backend that cannot run,
    and `except qairn.BackendError` is what the README tells a caller to catch."""


# The optional packages (qairn[export]) and what each is for: without one, the import deep in an
# export or a backend was a bare ModuleNotFoundError.
EXPORT_PACKAGES = {"onnx": "to export and read ONNX files", "onnxruntime": "to verify the export"}


def require(package: str):
    """The module `package` (onnx, onnxruntime), or an ExportError saying what to install."""
    try:
        return importlib.import_module(package)
    except ImportError:
        why = EXPORT_PACKAGES[package]
        raise ExportError(f"{package} is not installed ({why}): pip install 'qairn[export]'") from None


class VerificationError(ExportError):
    """The export ran but missed the tolerance: a failed check, not a usage error (exit 1, not 2)."""


# torch.onnx.export keeps global state (GLOBALS.in_onnx_export): two exports at once in one process
# fail with an AssertionError. One export at a time; cached_onnx holds it across check and rename, so
# a second thread waits and then finds the file instead of exporting it again.
_EXPORT_LOCK = threading.RLock()


def gated_blend_fp32(logit: torch.Tensor, skip: torch.Tensor, dec: torch.Tensor):
    """The reference gate computed in fp32 inside an fp16 network; gamma stays fp32."""
    out, gamma = gated_blend_reference(logit.float(), skip.float(), dec.float())
    return out.to(skip.dtype), gamma


class Float32Island(nn.Module):
    """Run a submodule in fp32 whatever the dtype around it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.float())


class ExportModel(nn.Module):
    """QAIRN in the graph contract above. A copy: the caller's model is left as it is."""

    def __init__(
        self,
        model: QAIRN,
        outputs: str = "sums",
        precision: str = "fp32",
        io: str = "fp32",
        fp32_tail: bool = True,
    ):
        super().__init__()
        if outputs not in ("sums", "maps"):
            raise ValueError(f"outputs must be 'sums' or 'maps', not {outputs!r}")
        if precision not in DTYPES or io not in DTYPES:
            raise ValueError(f"precision and io must be one of {', '.join(sorted(DTYPES))}")
        net = copy.deepcopy(model).to("cpu", torch.float32).eval()
        from qairn.kernels.fuse import unfuse_convs

        unfuse_convs(net)  # Triton convs swapped in (fused_conv) export as the standard ops they compute
        net.gate = gated_blend_reference
        if precision == "fp16":
            net = net.half()
            net.gate = gated_blend_fp32
            if fp32_tail:
                net.tail = Float32Island(net.tail)
        self.net = net
        self.outputs, self.p = outputs, float(model.config.p)
        self.compute_dtype, self.io_dtype = DTYPES[precision], DTYPES[io]

    def forward(self, x: torch.Tensor):
        y, gammas = self.net(x.to(self.compute_dtype))
        y = y.to(self.io_dtype)
        gammas = [g.float() for g in gammas]
        if self.outputs == "maps":
            return (y, *gammas)
        sums = torch.stack([scaled_pow(g, self.p).flatten(1).sum(1) for g in gammas], dim=1)
        return y, sums


def output_names(outputs: str) -> tuple[str, ...]:
    return MAP_OUTPUTS if outputs == "maps" else SUM_OUTPUTS


def is_whole(value) -> bool:
    """An int (numpy's too), not a float with a fraction to drop nor a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_shape(shape, option: str = "shape") -> tuple[int, int, int]:
    """(N, H, W) as ints, N >= 1 and H, W multiples of 16; `option` names the argument in the error."""
    try:
        values = tuple(shape)
    except TypeError:
        values = ()
    # (512, 512), the batch forgotten: unpacking named no option. Not int() on each value: 512.7
    # became 512 and True a batch of 1, silently.
    if len(values) != 3 or not all(is_whole(v) for v in values):
        raise ValueError(f"{option}={shape!r}: expected (N, H, W), three whole numbers")
    n, h, w = (int(v) for v in values)
    if n < 1 or h < 16 or w < 16 or h % 16 or w % 16:
        raise ValueError(f"static shape N,H,W = {n},{h},{w}: need N >= 1 and H, W multiples of 16")
    return n, h, w


def export_onnx(
    model: QAIRN,
    path: str | Path,
    outputs: str = "sums",
    precision: str = "fp32",
    io: str = "fp32",
    shape: tuple[int, int, int] | None = None,
    opset: int = 17,
    exporter: str = "torchscript",
    fp32_tail: bool = True,
) -> Path:
    """Write `model` as ONNX to `path`. shape=None: dynamic N, H, W; else the static (N, H, W).
    Checked with onnx.checker (full check, with shape inference) before it is written."""
    onnx = require("onnx")

    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', not {exporter!r}")
    if not is_whole(opset):  # 17.5 passed the range check below
        raise ValueError(f"opset={opset!r}: expected a whole number")
    top = max_opset(exporter)
    if not 17 <= opset <= top:
        # Past its newest opset the dynamo exporter fails deep in tracing, with the whole graph in its
        # message; the torchscript one warns "not supported" and writes older nodes under the new number.
        other = max_opset("dynamo")
        hint = (
            f"; exporter='dynamo' writes up to {other}" if exporter == "torchscript" and other > top else ""
        )
        raise ValueError(
            f"opset {opset}: need 17..{top} (the newest torch {torch.__version__}'s {exporter} exporter "
            f"writes{hint})"
        )
    wrapper = ExportModel(model, outputs, precision, io, fp32_tail).eval()
    n, h, w = check_shape(shape) if shape is not None else (1, 64, 64)
    example = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0)).to(DTYPES[io])
    names = output_names(outputs)
    export = _export_torchscript if exporter == "torchscript" else _export_dynamo
    with _EXPORT_LOCK:
        proto = export(wrapper, example, names, dynamic=shape is None, opset=opset)
    if precision == "fp32":
        mark_fp32_islands(proto, tail=fp32_tail)
    meta = {
        "qairn.outputs": outputs,
        "qairn.precision": precision,
        "qairn.io": io,
        "qairn.fp32_tail": str(bool(fp32_tail)).lower(),
        "qairn.p": repr(float(model.config.p)),
        "qairn.qsums_scale_log2": repr(POOL_SCALE_LOG2),
        "qairn.config": model.config.to_json(),
        "qairn.exporter": exporter,
    }
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto, full_check=True)
    return write_atomic(path, proto.SerializeToString())


def max_opset(exporter: str = "torchscript") -> int:
    """The newest opset `exporter` writes (private constants: in torch 2.13 20 for the torchscript
    exporter, 23 for dynamo; those assumed if gone)."""
    from torch.onnx import _constants

    if exporter == "torchscript":
        return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))
    return int(getattr(_constants, "ONNX_MAX_OPSET", 23))


def _export_torchscript(wrapper, example, names, dynamic: bool, opset: int):
    import onnx

    axes = None
    if dynamic:
        axes = {
            INPUT: {0: "N", 2: "H", 3: "W"},
            "restored": {0: "N", 2: "H", 3: "W"},
            "qsums": {0: "N"},
            "gamma1": {0: "N", 2: "H", 3: "W"},
            "gamma2": {0: "N", 2: "H_2", 3: "W_2"},
            "gamma3": {0: "N", 2: "H_4", 3: "W_4"},
        }
        axes = {k: v for k, v in axes.items() if k == INPUT or k in names}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The tracer warns that `if ph or pw` (pad to 16) is frozen: it is, by design (the graph
        # contract says H, W are multiples of 16); and torch >= 2.9 flags the exporter as legacy.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            wrapper,
            (example,),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT],
            output_names=list(names),
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def _export_dynamo(wrapper, example, names, dynamic: bool, opset: int):
    import contextlib

    dynamic_shapes = None
    if dynamic:
        dim = torch.export.Dim
        # H = 16*h: the exporter then knows the pad-to-16 branch is never taken.
        dynamic_shapes = {
            "x": {
                0: dim("N", min=1, max=4096),
                2: 16 * dim("h", min=1, max=4096),
                3: 16 * dim("w", min=1, max=4096),
            }
        }
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT],
            output_names=list(names),
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    return program.model_proto


def load_proto(path: str | Path):
    onnx = require("onnx")
    from google.protobuf.message import DecodeError  # onnx's own dependency, optional like onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except DecodeError as e:  # weights passed as --onnx, a truncated copy: one line, not a traceback
        raise ExportError(f"{path}: not an ONNX file ({e})") from None
    except OSError as e:  # a typo in onnx=, a folder: protobuf's raw FileNotFoundError/IsADirectoryError
        raise ExportError(f"{path}: cannot read ({e.strerror or e})") from None


def external_data_files(proto) -> list[str]:
    """The files (relative to the ONNX file's folder) that hold tensors of `proto` saved as external
    data (onnx.save(..., save_as_external_data=True)), each once, sorted; [] for a single file."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for a in node.attribute:
                yield from [a.t, *a.tensors]
                for g in [a.g, *a.graphs]:
                    yield from tensors(g)

    found = {ExternalDataInfo(t).location for t in tensors(proto.graph) if uses_external_data(t)}
    return sorted(found)


def network_sha256(path: str | Path, proto) -> str:
    """What identifies the network an ONNX file runs: its sha256, or with external data, the sha256
    of that and of each external file's name and bytes (the .onnx alone names its weights' files,
    not what they hold). `proto`: the file loaded without its external data (load_proto)."""
    from qairn.export.cache import sha256_file

    path = Path(path)
    names = external_data_files(proto)
    if not names:
        return sha256_file(path)
    h = hashlib.sha256(sha256_file(path).encode())
    for name in names:
        data = path.parent / name
        if not data.is_file():
            raise ExportError(f"{path}: its external data file {data} is missing")
        h.update(f"|{name}|{sha256_file(data)}".encode())
    return h.hexdigest()


def read_metadata(proto_or_path) -> dict:
    proto = proto_or_path
    if not hasattr(proto, "metadata_props"):
        proto = load_proto(proto_or_path)
    return {p.key: p.value for p in proto.metadata_props}


def check_maps_export(path: str | Path, metadata: dict) -> None:
    """Refuse, in one line naming the file, an ONNX file the Restorer backends cannot run: another
    network's (no qairn metadata) or a qairn export of Q sums (they need the gamma maps)."""
    from qairn.engine.backends import BackendError

    outputs = metadata.get("qairn.outputs")
    if outputs is None:
        raise BackendError(f"{path}: not an ONNX file exported by qairn (no qairn.outputs metadata)")
    if outputs != "maps":
        raise BackendError(f"{path}: the Restorer needs gamma maps; export with `qairn export onnx --maps`")


# ---- fp32 islands in the fp32 graph -------------------------------------------------------------
def fp32_island_nodes(graph, tail: bool = True) -> set[int]:
    """Indices of the nodes that must stay fp32 in an fp16 build (see the module docstring): each gate's
    Sigmoid and blend (Sub, Mul, Add), the nodes only the quality outputs need, and (tail=True) the
    last Conv and what follows it on the way to "restored". Float-valued nodes only."""
    import onnx

    nodes = list(graph.node)
    producer = {t: i for i, node in enumerate(nodes) for t in node.output}
    consumers = defaultdict(list)
    for i, node in enumerate(nodes):
        for t in node.input:
            consumers[t].append(i)
    inferred = onnx.shape_inference.infer_shapes(onnx.helper.make_model(graph)).graph
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    elem_type = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.output]}

    def ancestors(tensors) -> set[int]:
        seen, stack = set(), [producer[t] for t in tensors if t in producer]
        while stack:
            i = stack.pop()
            if i not in seen:
                seen.add(i)
                stack += [producer[t] for t in nodes[i].input if t in producer]
        return seen

    def descendants(i: int) -> set[int]:
        seen, stack = set(), [i]
        while stack:
            j = stack.pop()
            if j not in seen:
                seen.add(j)
                stack += [k for t in nodes[j].output for k in consumers[t]]
        return seen

    island = set()
    for i, node in enumerate(nodes):
        if node.op_type != "Sigmoid":
            continue
        island.add(i)
        gamma = node.output[0]
        for j in consumers[gamma]:
            if nodes[j].op_type != "Mul":
                continue
            island.add(j)
            island |= {
                producer[t] for t in nodes[j].input if t in producer and nodes[producer[t]].op_type == "Sub"
            }
            island |= {k for k in consumers[nodes[j].output[0]] if nodes[k].op_type == "Add"}
    outputs = [o.name for o in graph.output]
    to_image = ancestors(["restored"])
    island |= ancestors([o for o in outputs if o != "restored"]) - to_image
    if tail:
        convs = [i for i in to_image if nodes[i].op_type == "Conv"]
        if convs:
            island |= descendants(max(convs)) & to_image  # nodes are stored in topological order
    return {i for i in island if elem_type.get(nodes[i].output[0], onnx.TensorProto.FLOAT) in float_types}


def mark_fp32_islands(proto, tail: bool = True) -> int:
    nodes = proto.graph.node
    marked = fp32_island_nodes(proto.graph, tail)
    for i in marked:
        name = nodes[i].name or f"{nodes[i].op_type}_{i}"
        nodes[i].name = name if name.startswith(ISLAND_TAG) else ISLAND_TAG + name
    return len(marked)


# ---- cached exports for the backends -------------------------------------------------------------
def cached_onnx(model: QAIRN, cache: str | Path | None = None, **options) -> Path:
    """Export `model` once per (weights, config, options, torch version) into the cache folder."""
    options = {
        "outputs": "maps",
        "precision": "fp32",
        "io": "fp32",
        "shape": None,
        "opset": 17,
        "exporter": "torchscript",
        "fp32_tail": True,
    } | options
    digest = model_digest(model, graph=GRAPH_VERSION, **options)
    path = (
        cache_dir(cache) / "onnx" / f"qairn-{model.config.preset}-{options['precision']}-{digest[:24]}.onnx"
    )
    with _EXPORT_LOCK:
        damaged = path.is_file() and cache_problem(path)
        if damaged:  # qairn's own file, rewritten; else every start failed until the user deleted it
            warn(f"re-exporting the cached ONNX file: {damaged}")
        if damaged or not path.is_file():
            remove_stale_parts(path.parent)
            # Exported and checked under a temp name: a file that fails its check never enters the
            # cache, where the next call (or a TensorRT build) would take it unchecked.
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.part.onnx")
            try:
                export_onnx(model, tmp, **options)
                stats = verify_onnx(tmp, model, [synthetic_image(64, 96)])
                check_parity(stats, options["precision"])
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    return path


def cache_problem(path: Path) -> str | None:
    """Why a cached export cannot be used (a truncated or overwritten file), or None. A file cut at a
    field boundary still parses: its metadata, which comes last, is then missing."""
    try:
        metadata = read_metadata(path)
    except ExportError as e:
        return str(e)
    if "qairn.outputs" not in metadata:
        return f"{path}: not an ONNX file exported by qairn (no qairn.outputs metadata)"
    return None


# ---- verification against eager ----------------------------------------------------------------
def synthetic_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB uint8 test card: smooth gradients, hard edges and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w, yy / h, ((xx // 8 + yy // 8) % 2) * 0.6 + 0.2], axis=2)
    img += rng.normal(0, 0.05, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def jpeg_images(files, qfs=(10, 20, 30, 40), crop: tuple[int, int] | None = None, scale: float = 1.0):
    """Real test inputs: each file (read as BGR by OpenCV), optionally downscaled and centre-cropped,
    JPEG-compressed at each QF with OpenCV's codec (the evaluation protocol), returned as RGB uint8."""
    import cv2

    out = []
    for f in files:
        bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ExportError(f"{f}: not an image OpenCV can read")
        if scale != 1.0:
            bgr = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        if crop is not None:
            bgr = centre_crop(bgr, *crop)
        for qf in qfs:
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(qf)])
            out.append((f"{Path(f).stem}@qf{qf}", cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()))
    return out


def centre_crop(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre height x width of an HxWxC image (all of a side that is shorter)."""
    ch, cw = min(height, img.shape[0]), min(width, img.shape[1])
    y0, x0 = (img.shape[0] - ch) // 2, (img.shape[1] - cw) // 2
    return img[y0 : y0 + ch, x0 : x0 + cw]


def image_batch(img: np.ndarray, shape: tuple | None) -> torch.Tensor:
    """RGB uint8 HxWx3 -> (N,3,H,W) float32, replicate-padded to a multiple of 16, or cropped/padded
    to a static (N, H, W) and repeated over the batch."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255.0
    h, w = x.shape[-2:]
    n, th, tw = shape if shape is not None else (1, -(-h // 16) * 16, -(-w // 16) * 16)
    x = x[..., :th, :tw]
    x = F.pad(x, (0, tw - x.shape[-1], 0, th - x.shape[-2]), mode="replicate")
    return x.expand(n, -1, -1, -1).contiguous()


def static_input_shape(path: str | Path, proto=None) -> tuple[int, int, int] | None:
    """The (N, H, W) of a file exported with shape=(N, H, W) (--static), None for a dynamic one.
    proto: the file already loaded (load_proto), else it is read from `path`."""
    proto = proto if proto is not None else load_proto(path)
    inputs = {i.name: i for i in proto.graph.input}
    dims = inputs[INPUT].type.tensor_type.shape.dim if INPUT in inputs else []
    if len(dims) != 4:  # another network's file: one line, not an IndexError or an unpacking error
        raise ExportError(f"{path}: not an ONNX file exported by qairn (no 4-d input named {INPUT!r})")
    n, _, h, w = (d.dim_value if d.HasField("dim_value") else None for d in dims)
    return (n, h, w) if None not in (n, h, w) else None


def static_shape(session) -> tuple[int, int, int] | None:
    dims = session.get_inputs()[0].shape
    n, _, h, w = dims
    if all(isinstance(d, int) for d in (n, h, w)):
        return n, h, w
    return None


def verify_onnx(path: str | Path, model: QAIRN, images, providers=("CPUExecutionProvider",)) -> dict:
    """Run the exported file with ONNX Runtime on `images` (RGB uint8 arrays, or (name, array) pairs)
    and compare with the same model run eagerly in fp32. Returns the max abs error per output (qsums:
    of the Q1..Q3 they pool to, as "Q"), whether every output was finite, the number of images and
    the provider that ran. An fp16 file on the CPU provider also gets "torch_fp16": see below."""
    ort = require("onnxruntime")

    meta = read_metadata(path)
    # A file qairn did not export (a plain conv's, another network's) has none of its metadata: one
    # line naming the file, not a KeyError('qairn.outputs') traceback.
    missing = [k for k in ("qairn.outputs", "qairn.precision", "qairn.p") if k not in meta]
    if missing:
        raise ExportError(f"{path}: not an ONNX file exported by qairn (no {', '.join(missing)} metadata)")
    if meta["qairn.outputs"] not in ("sums", "maps"):
        raise ExportError(f"{path}: unknown qairn.outputs {meta['qairn.outputs']!r} (expected sums or maps)")
    session = ort.InferenceSession(str(path), providers=list(providers))
    outputs, precision = meta["qairn.outputs"], meta["qairn.precision"]
    reference = ExportModel(model, outputs=outputs, precision="fp32").eval()
    in_dtype = NP_DTYPES[session.get_inputs()[0].type]
    shape = static_shape(session)
    names = [o.name for o in session.get_outputs()]
    p = float(meta["qairn.p"])
    scale = float(meta.get("qairn.qsums_scale_log2", 0.0))
    worst = {("Q" if name == "qsums" else name): 0.0 for name in names}
    finite, count, crops = True, 0, []
    for item in images:
        img = item[1] if isinstance(item, tuple) else item
        if len(crops) < FP16_CROPS:
            crops.append(img)
        x = image_batch(img, shape)
        with torch.inference_mode():
            expected = [t.float().numpy() for t in reference(x)]
        got = session.run(names, {INPUT: x.numpy().astype(in_dtype)})
        finite &= all(bool(np.isfinite(g).all()) for g in got)
        # The file's sums at the file's scale; the eager reference's at this code's.
        for name, err in output_errors(names, expected, got, x, p, scale).items():
            worst[name] = max(worst[name], err)
        count += 1
    provider = session.get_providers()[0]
    stats = {
        "max_abs": worst,
        "finite": finite,
        "images": count,
        "precision": precision,
        "provider": provider,
    }
    if precision == "fp16" and provider == "CPUExecutionProvider":
        # ONNX Runtime's CPU provider has no fp16 kernels for this graph's layers: it casts to fp32
        # around them, so only the graph's own casts round, and its run measures no fp16 arithmetic
        # (measured, shipped weights: gammas 2.4e-7 from eager fp32 on the same fp16-rounded input,
        # where torch fp16 is 3.2e-4 off). The same fp16 network run by torch, which rounds every
        # activation to fp16 as a GPU does, is checked too (0.15 s per crop for the shipped weights,
        # 2.3 s for the paper preset).
        fp16 = ExportModel(model, outputs, "fp16", meta.get("qairn.io", "fp32"), fp32_tail(meta)).eval()
        stats["torch_fp16"] = torch_fp16_errors(reference, fp16, names, crops, p)
    return stats


# verify_onnx's torch fp16 run: the first images' centre crops of this side (seconds on a CPU).
FP16_CROPS, FP16_CROP = 2, 64


def fp32_tail(meta: dict) -> bool:
    return meta.get("qairn.fp32_tail", "true") == "true"


def output_errors(names, expected, got, x: torch.Tensor, p: float, scale_log2: float) -> dict:
    """Max abs error per output of `got` against `expected` (qsums at scale_log2, compared as Q)."""
    errors = {}
    for name, e, g in zip(names, expected, got):
        g = np.asarray(g, np.float32)
        if name == "qsums":
            g, e = q_from_qsums(g, *x.shape[-2:], p, scale_log2), q_from_qsums(e, *x.shape[-2:], p)
            name = "Q"
        errors[name] = float(np.abs(g - e).max())
    return errors


class Fp16ConvsInFp32(torch.overrides.TorchFunctionMode):
    """fp16 convolutions computed as a GPU computes them, fp16 operands and fp32 accumulation rounded
    to fp16, on fp32 kernels: torch's CPU fp16 convolution is a naive loop (a 64x64 crop of the paper
    preset took 67 s, against 0.9 s in fp32). Every other op runs in fp16 as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.conv2d, F.conv_transpose2d) and args[0].dtype == torch.float16:
            up = lambda v: v.float() if isinstance(v, torch.Tensor) else v  # noqa: E731
            return func(*map(up, args), **{k: up(v) for k, v in kwargs.items()}).half()
        return func(*args, **kwargs)


def torch_fp16_errors(reference: nn.Module, fp16: nn.Module, names, images, p: float) -> dict:
    """Max abs errors of `fp16` (an fp16 ExportModel, run by torch, convolutions as Fp16ConvsInFp32
    computes them) against `reference` (fp32) on FP16_CROP-pixel centre crops of `images`, plus how
    many crops ran."""
    worst = {("Q" if name == "qsums" else name): 0.0 for name in names}
    sizes = []  # what ran: an image smaller than the crop runs whole
    for img in images:
        crop = centre_crop(img, FP16_CROP, FP16_CROP)
        sizes.append(crop.shape[:2])
        x = image_batch(crop, None)
        with torch.inference_mode():
            expected = [t.float().numpy() for t in reference(x)]
            with Fp16ConvsInFp32():
                got = [t.float().numpy() for t in fp16(x.to(fp16.io_dtype))]
        for name, err in output_errors(names, expected, got, x, p, POOL_SCALE_LOG2).items():
            worst[name] = max(worst[name], err)
    return {"max_abs": worst, "images": len(images), "sizes": sizes}


def q_from_qsums(qsums, h: int, w: int, p: float, scale_log2: float = POOL_SCALE_LOG2) -> np.ndarray:
    """(N,3) "qsums" of an H x W input -> (N,3) float64 Q1..Q3 (sums of several tiles or frames
    may be added first, with their pixel counts). scale_log2: the file's qairn.qsums_scale_log2."""
    pixels = np.array([-(-h // s) * -(-w // s) for s in (1, 2, 4)], np.float64)
    with np.errstate(divide="ignore"):  # a sum of 0 (every gate 0) pools to Q = 0
        return np.exp2((np.log2(np.maximum(np.asarray(qsums, np.float64), 0) / pixels) - scale_log2) / p)


def check_parity(stats: dict, precision: str) -> None:
    """Raise VerificationError if verify_onnx's stats (or its torch fp16 run) break the tolerance."""
    tol = TOLERANCE[precision]
    if stats["images"] == 0:  # every error is 0 over no images: not a pass
        raise VerificationError(f"{precision} ONNX was verified on no images")
    if not stats["finite"]:
        raise VerificationError(f"{precision} ONNX produced NaN or Inf")
    runs = [(f"{precision} ONNX", stats["max_abs"])]
    if "torch_fp16" in stats:
        runs.append(("fp16 network in torch", stats["torch_fp16"]["max_abs"]))
    for what, errors in runs:
        for name, err in errors.items():
            bound = tol["restored" if name == "restored" else "gamma"]  # gamma1..3 and Q
            if not err <= bound:  # NaN too
                raise VerificationError(f"{what} output {name!r} differs from eager by {err:.3g} > {bound:g}")


def summary(stats: dict, source: str = "") -> str:
    """verify_onnx's stats in one line; `source` ("2 images x 2 QFs (10, 40) from DIR") says what the
    ONNX figures were measured on, in place of the bare count, before the torch fp16 run's figures,
    which take crops of the first images only."""
    errs = lambda errors: ", ".join(f"{k} {v:.2e}" for k, v in errors.items())  # noqa: E731
    measured = source or counted(stats["images"], "image")
    line = (
        f"{stats['precision']} ONNX on {stats.get('provider', 'ONNX Runtime')} vs eager fp32 on "
        f"{measured}: max abs err {errs(stats['max_abs'])}"
    )
    if "torch_fp16" in stats:
        fp16 = stats["torch_fp16"]
        # The crops' real sizes: "2 64x64 crops" was said of images smaller than 64x64 too.
        sizes = sorted({f"{h}x{w}" for h, w in fp16["sizes"]})
        if len(sizes) == 1:
            crops = counted(fp16["images"], f"{sizes[0]} crop")
        else:
            crops = f"{counted(fp16['images'], 'crop')} ({', '.join(sizes)})"
        line += (
            "; the CPU provider runs fp16 layers in fp32 (that is rounding at casts, not fp16 "
            f"arithmetic), so the fp16 network in torch vs eager fp32 on {crops} of them: "
            f"max abs err {errs(fp16['max_abs'])}"
        )
    return line
