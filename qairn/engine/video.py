"""Video: restore decoded frames at stream speed (`restore_stream`), and `qairn video IN OUT`.

restore_stream batches frames of one shape, converts them on the device and yields results in order.
On CUDA it copies each batch in from pinned memory on one stream and the results out on another,
so the copies of neighbouring batches overlap the compute, and the caller decodes and encodes batch
k+1 while the device works on batch k.

`qairn video` decodes with PyAV (the FFmpeg libraries in its wheel; no ffmpeg binary is needed),
restores each frame in its own Y'CbCr format (matrix and range from the stream's colour tags),
encodes with the codec and quality asked for (default H.264 via libx264, CRF 18), keeps the frame
timestamps, time base, frame rate, colour tags (HDR10 light levels with x264/x265/SVT-AV1; HDR10+ and
Dolby Vision dynamic metadata are dropped, with a warning), rotation, pixel aspect ratio and field
order, copies the audio and subtitle streams (text subtitles are converted to the container's own
SRT, mov_text or WebVTT where it cannot hold them as they are), cover pictures and attachments (fonts)
where the container holds them, and writes a per-frame quality trace
(OUT.quality.csv: frame, pts, time, Q1, Q2, Q3, caveat, p, weights, weights_sha256) and a plot of Q2
(OUT.quality.png).
A damaged input (frames the decoder flags, packets it refuses, a file cut short or unreadable past some
point) is restored as far as it decodes, with a warning; --strict makes that an error.
Every file is written under a temporary name and renamed when complete: an error or Ctrl-C leaves no
partial output behind.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import io
import itertools
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import numpy as np
import torch

from qairn.engine.caveats import caveat, flat_frames
from qairn.engine.color import (
    MATRIX_CODES,
    ColorError,
    check_matrix,
    check_range,
    checked_planes,
    guessed_matrix,
    native,
    plane_bits,
    restore_planes,
)
from qairn.engine.imageio import current_umask, path_arg, write_atomic
from qairn.engine.progress import add_quiet, progress_bar
from qairn.engine.tiling import overlap_arg, tile_arg
from qairn.messages import counted

if TYPE_CHECKING:  # (PyAV is optional, and the restorer module imports this one)
    import av

    from qairn.engine.restorer import Restorer, ScoredBy


class VideoError(RuntimeError):
    """A problem with a video file or its encoding; the message names the file and the problem."""


class EncoderOptionError(VideoError, ValueError):
    """An encoder setting (--preset, --crf, --codec-option) the encoder refuses: a bad argument, as
    VideoOptions' own checks say with a ValueError."""


# ---- streaming -------------------------------------------------------------------------------------
@dataclass
class _Job:
    kind: str  # "yuv" or "rgb"
    count: int
    outputs: list  # batched outputs (tensors), on the host when the input was numpy; [] for quality only
    quality: torch.Tensor  # (4, N): Q1, Q2, Q3 and 1 where the frame is flat (caveats.flat_frames)
    event: object = None  # CUDA event to wait on before reading outputs
    meta: list = field(default_factory=list)  # per-frame: numpy dtype (yuv) or to_tensor meta (rgb)
    numpy: bool = True
    maps: list | None = None  # return_maps: [gamma1..3], (N,1,h,w) each; on the host for numpy frames
    info: dict = field(default_factory=dict)  # yuv: the matrix, range and bits, as restore_yuv says them
    depth: int | None = None  # RGB tensor frames: bits= (uint16 codes), given back so
    size: tuple = (0, 0)  # the frames' (h, w), for their caveat


def _key(item):
    if isinstance(item, (tuple, list)):
        if len(item) != 3:
            raise ValueError(f"a Y'CbCr frame is a (y, u, v) tuple, got {counted(len(item), 'plane')}")
        odd = [type(p).__name__ for p in item if not isinstance(p, (np.ndarray, torch.Tensor))]
        if odd:  # tuple(frame.planes) met "'VideoPlane' object has no attribute 'shape'"
            hint = "; give qairn.engine.video.frame_planes(frame)" if odd[0] == "VideoPlane" else ""
            raise TypeError(f"a Y'CbCr frame's planes are numpy arrays or tensors, not {odd[0]}{hint}")
        return (
            "yuv",
            *((type(p), tuple(p.shape), str(p.dtype), str(getattr(p, "device", ""))) for p in item),
        )
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return ("rgb", type(item), tuple(item.shape), str(item.dtype), str(getattr(item, "device", "")))
    # A PyAV frame is what decode() yields: say the calls that turn one into a frame taken here.
    hint = (
        "; give frame.to_ndarray(format='rgb24'), or qairn.engine.video.frame_planes(frame)"
        if hasattr(item, "to_ndarray")
        else ""
    )
    raise TypeError(f"stream items are RGB images or (y, u, v) plane tuples, not {type(item).__name__}{hint}")


def _name_frame(e: Exception, index: int) -> None:
    """Prefix e's message with the index of the frame of the stream it is about (e is re-raised)."""
    if e.args and isinstance(e.args[0], str):
        e.args = (f"frame {index}: {e.args[0]}", *e.args[1:])


def _groups(frames, batch: int):
    """(index of the first frame, frames): consecutive frames of one kind and shape, `batch` at most."""
    group, key, start = [], None, 0
    it = iter(frames)
    for index in itertools.count():
        try:
            item = next(it)
        except StopIteration:
            break
        except Exception:  # a source that fails mid-stream: the frames already read are still restored
            if group:
                yield start, group
            raise
        try:
            k = _key(item)  # an item that is no frame fails the stream as a failing source does
        except Exception as e:
            _name_frame(e, index)
            if group:
                yield start, group
            raise
        if group and k != key:
            yield start, group
            group = []
        if not group:
            start = index
        group.append(item)
        key = k
        if len(group) == batch:  # launched before the next frame is read, which may reuse this one's buffer
            yield start, group
            group = []
    if group:
        yield start, group


def _jobs(restorer, frames, batch: int, *options):
    """A launched job per group of frames. A bad frame (a float frame out of [0, 1], codes out of
    range) fails its whole group, which lost the good frames read before it: such a group is launched
    again frame by frame, so those are restored and handed out before the error, which names the frame."""
    for start, group in _groups(frames, batch):
        try:
            job = _launch(restorer, group, *options)
        except (ValueError, TypeError) as e:
            if len(group) == 1:
                _name_frame(e, start)
                raise
            job = None
        if job is not None:
            yield job
            continue
        for index, item in enumerate(group, start):
            try:
                job = _launch(restorer, [item], *options)
            except (ValueError, TypeError) as e:
                _name_frame(e, index)
                raise
            yield job


def _to_device(t: torch.Tensor, device: torch.device, copy_stream) -> torch.Tensor:
    """Host tensor -> device. On CUDA: from pinned memory on the copy stream, ordered before compute."""
    if copy_stream is None or t.device.type == "cuda":
        return t.to(device)
    t = t.pin_memory()
    with torch.cuda.stream(copy_stream):
        d = t.to(device, non_blocking=True)
    torch.cuda.current_stream(device).wait_stream(copy_stream)
    d.record_stream(torch.cuda.current_stream(device))
    return d


def _to_host(ts: list, copy_stream):
    """Device tensors -> pinned host tensors, copied on the copy stream once compute is done."""
    if copy_stream is None:
        return [t.cpu() for t in ts], None
    copy_stream.wait_stream(torch.cuda.current_stream(copy_stream.device))
    with torch.cuda.stream(copy_stream):
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in ts]
        for h, t in zip(host, ts):
            h.copy_(t, non_blocking=True)
            t.record_stream(copy_stream)
        event = torch.cuda.Event()
        event.record(copy_stream)
    return host, event


def _launch(restorer, group, matrix, crange, bits, channel_order, streams, image, return_maps) -> _Job:
    from qairn.engine.restorer import batch_to_float, check_samples, image_array, to_float, to_pixels

    copy_in, copy_out = streams or (None, None)
    first = group[0]
    if isinstance(first, (tuple, list)):
        is_np = isinstance(first[0], np.ndarray)
        if any(p.ndim != 2 for p in first):
            raise ValueError(
                f"Y'CbCr frames are (y, u, v) tuples of 2-D planes, got shapes {[p.shape for p in first]}"
            )
        depth = plane_bits(native(first[0]).dtype if is_np else first[0].dtype, bits)
        planes = []
        for i in range(3):
            if is_np:  # given back in the frames' own dtype (meta), byte order included
                p = torch.from_numpy(native(np.stack([f[i] for f in group])))
                p = p.to(torch.int32) if p.dtype == torch.uint16 else p
            else:
                p = torch.stack([f[i] for f in group])
            planes.append(p)
        # A GPU's planes for a CPU Restorer are read on the CPU, as restore_yuv reads them (their codes).
        planes = checked_planes(planes, restorer.device, depth)
        planes = [_to_device(p, restorer.device, copy_in) for p in planes]
        # On the device, handed out with the quality: no sync of its own.
        flat = flat_frames(*planes, full=2.0**depth - 1)
        out, q, maps = restore_planes(restorer, *planes, matrix, crange, depth, return_maps, image)
        job = _Job(
            "yuv",
            len(group),
            list(out) if image else [],
            torch.stack([q["Q1"], q["Q2"], q["Q3"], flat.to(q["Q1"].dtype)]),
            meta=[first[0].dtype] * len(group),
            numpy=is_np,
            maps=maps,
            info={"matrix": matrix, "range": crange, "bits": depth},
            size=tuple(first[0].shape),
        )
        on_host = is_np or first[0].device.type == "cpu"
        home = None if is_np else first[0].device
    else:
        is_np = isinstance(first, np.ndarray)
        depth = None if bits is None else _rgb_bits(first.dtype, bits)
        if is_np:  # one shape and dtype per group (_key): the frames' own numbers go to the device
            pairs = [image_array(f, channel_order) for f in group]
            # Alpha is given back as it came: a copy, as on CUDA a batch is handed out only after the
            # next one is launched, and the source may have reused its buffer by then.
            meta = [m if m["alpha"] is None else m | {"alpha": m["alpha"].copy()} for _, m in pairs]
            pixels = torch.from_numpy(np.stack([a for a, _ in pairs]))
            check_samples(pixels, first.dtype, depth)
            if depth is not None:  # 10-bit RGB in uint16 (gbrp10 unpacked): codes 0..1023, given back so
                meta = [m | {"scale": 2.0**depth - 1} for m in meta]
            pixels = _to_device(pixels, restorer.device, copy_in)
            x = to_float(pixels, meta[0]["scale"])
        else:
            if first.ndim != 3 or first.shape[0] != 3:
                raise ValueError(f"RGB tensor frames must be (3,H,W), got {tuple(first.shape)}")
            stack = torch.stack(list(group))
            # A GPU's frames for a CPU Restorer are read on the CPU, as restore() reads them (uint16 codes).
            x = batch_to_float(stack.cpu() if restorer.device.type == "cpu" else stack, channel_order, depth)
            meta = [first.dtype] * len(group)
        x = x if is_np else _to_device(x, restorer.device, copy_in)
        flat = flat_frames(*x.unbind(1), full=1.0)  # RGB in [0, 1], alpha aside; on the device, as above
        y, q, maps = restorer.restore_tensor(x, return_maps, image=image)
        # numpy frames come back as their own integers, converted on the device (a quarter of the
        # float32 bytes over the bus for uint8, and no float work on the host).
        y = to_pixels(y, meta[0]) if is_np and image else y
        outputs = [y] if image else []
        quality = torch.stack([q["Q1"], q["Q2"], q["Q3"], flat.to(q["Q1"].dtype)])
        size = tuple(first.shape[:2] if is_np else first.shape[-2:])
        job = _Job(
            "rgb", len(group), outputs, quality, meta=meta, numpy=is_np, maps=maps, depth=depth, size=size
        )
        on_host = is_np or first.device.type == "cpu"
        home = None if is_np else first.device
    if on_host:
        # The maps of numpy frames come back as arrays, as restore() gives them; those of tensor frames
        # stay on the Restorer's device, as restore() leaves them.
        maps = job.maps if is_np and job.maps is not None else []
        host, job.event = _to_host([*job.outputs, *maps, job.quality], copy_out)
        job.outputs, job.quality = host[: len(job.outputs)], host[-1]
        job.maps = host[len(job.outputs) : -1] if maps else job.maps
    elif home != restorer.device:
        # A GPU's frames through a CPU Restorer (or another GPU's) go back where they came from, as
        # restore() and restore_yuv() give them back: they came back on the Restorer's device.
        job.outputs = [o.to(home) for o in job.outputs]
    return job


def _rgb_bits(dtype, bits: int) -> int:
    """bits= for RGB frames, as for Y'CbCr planes: the sample depth of integer frames (8 for uint8,
    9..16 for uint16). Float frames are in [0, 1] and have none."""
    name = str(dtype).replace("torch.", "")
    if "float" in name:
        raise ColorError(f"bits={bits} is the sample depth of integer frames; {name} frames are in [0, 1]")
    return plane_bits(dtype.newbyteorder("=") if isinstance(dtype, np.dtype) else dtype, bits, "frames")


def _finish(job: _Job, channel_order):
    from qairn.engine.restorer import Result, batch_from_float, from_pixels

    if job.event is not None:
        job.event.synchronize()
    q = job.quality.float().cpu().numpy()
    for i in range(job.count):
        quality = {f"Q{k + 1}": float(q[k, i]) for k in range(3)}
        info = dict(job.info) | {"caveat": caveat(*job.size, bool(q[3, i]))}  # each Result its own
        # As restore() and restore_yuv() give them for one frame: (h,w) float32 arrays for numpy frames,
        # (1,h,w) tensors on the Restorer's device for tensor frames (restore_yuv's for (H,W) planes).
        maps = None
        if job.maps is not None:
            maps = [m[i, 0].float().numpy() if job.numpy else m[i].clone() for m in job.maps]
        if not job.outputs:  # image=False
            yield Result(None, quality, maps, info)
        elif job.kind == "yuv":
            if job.numpy:
                planes = tuple(o[i].numpy().astype(job.meta[i]) for o in job.outputs)
            else:
                planes = tuple(o[i].clone() for o in job.outputs)
            yield Result(planes, quality, maps, info)
        elif job.numpy:
            yield Result(from_pixels(job.outputs[0][i].numpy(), job.meta[i]), quality, maps, info)
        else:
            image = batch_from_float(job.outputs[0][i : i + 1], job.meta[i], channel_order, job.depth)[0]
            image = image.clone()
            yield Result(image, quality, maps, info)


def restore_stream(
    restorer,
    frames,
    batch: int = 4,
    matrix: str = "bt709",
    range: str = "limited",
    bits: int | None = None,
    channel_order: str | None = None,
    image: bool = True,
    return_maps: bool = False,
):
    """Restore an iterable of frames, yielding one Result per frame, in order.

    A frame is an RGB image (numpy HxWx3 as for Restorer.restore, or a (3,H,W) tensor) or a (y, u, v)
    tuple of Y'CbCr planes (as for Restorer.restore_yuv, with matrix/range/bits for the whole stream).
    bits= is the sample depth of integer frames, RGB ones too: bits=10 takes uint16 RGB frames as codes
    0..1023 and gives them back so; without it, RGB frames span their dtype (uint16: 0..65535).
    Consecutive frames of one shape are restored `batch` at a time. Results hold numpy arrays for numpy
    frames, tensors on the frame's device for tensor frames; quality values are floats.
    image=False: quality only (each Result's image is None), as Restorer.restore_tensor(image=False).
    return_maps=True: each Result's maps, as restore() (RGB) and restore_yuv() (planes) give them for one
    frame: (h,w) float32 arrays for numpy frames, (1,h,w) tensors on the Restorer's device for tensors.
    A batch's frames are held until it is launched: a source that decodes every frame into one buffer
    must yield copies, or pass batch=1 (each frame is then launched, its pixels copied, before the
    next one is read).
    """
    from qairn.engine.restorer import check_order

    matrix, crange = check_matrix(matrix), check_range(range)
    # Anything but "bgr" was taken as RGB: "BGR" (OpenCV's spelling) restored swapped channels unsaid.
    order = check_order(channel_order or restorer.channel_order)
    cuda = restorer.device.type == "cuda"
    streams = (torch.cuda.Stream(restorer.device), torch.cuda.Stream(restorer.device)) if cuda else None
    pending = None
    try:
        options = matrix, crange, bits, order, streams, image, return_maps
        for job in _jobs(restorer, frames, max(1, int(batch)), *options):
            if not cuda:
                yield from _finish(job, order)
                continue
            if pending is not None:  # the device works on `job` while batch k-1 is handed out
                yield from _finish(pending, order)
            pending = job
    except Exception:
        if pending is not None:  # restored before the source failed: handed out, then the error
            job, pending = pending, None
            yield from _finish(job, order)
        raise
    if pending is not None:
        yield from _finish(pending, order)


# ---- PyAV frames <-> planes --------------------------------------------------------------------------
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # http://, rtsp://, file://, ...
PLANAR_YUV = re.compile(r"^yuvj?4(20|22|44)p(\d+le)?$")
COLORSPACES = MATRIX_CODES  # AVColorSpace -> matrix
MATRIX_NAMES = {  # (for notes)
    4: "fcc",
    7: "smpte240m",
    8: "ycgco",
    10: "bt2020c (constant luminance)",
    11: "smpte2085",
    14: "ictcp",
}
# BT.2020 constant luminance has no 3x3 matrix (its Y' is taken from linear light): the non-constant one
# is the nearest.
NEAREST_MATRICES = {10: "bt2020"}
AV_COLORSPACE = {"bt601": 5, "bt709": 1, "bt2020": 9}
AV_RANGE = {"limited": 1, "full": 2}
SWS_COLORSPACE = {"bt601": "ITU601", "bt709": "ITU709", "bt2020": "BT2020"}
CRF_CODECS = {"libx264", "libx264rgb", "libx265", "libvpx", "libvpx-vp9", "libsvtav1", "libaom-av1"}
# The top of the CRF scale where the encoder's option does not say it: x264 took --crf 60 as 51 unsaid,
# x265 refused it as "Cannot open libx265 encoder". (VP8, VP9 and SVT-AV1 refuse over 63 themselves.)
CRF_MAX = {"libx264": 51, "libx264rgb": 51, "libx265": 51}
# Encoders with no CRF but a fixed quantiser (--crf 18: q 3), which otherwise aim at 200 kb/s.
QSCALE_CODECS = {
    "mpeg4",
    "mpeg2video",
    "mpeg1video",
    "mjpeg",
    "msmpeg4",
    "msmpeg4v2",
    "wmv1",
    "wmv2",
    "h263p",
    "flv",
}
DEFAULT_CODECS = ("libx264", "libopenh264", "mpeg4")  # first one this PyAV build can encode
CONSTANT_RATE_FORMATS = {"yuv4mpegpipe", "avi"}  # containers whose time base is the frame rate
# Containers that store no presentation times: each packet has its decode-order time, which the decoder
# hands on to the frame shown last (an H.264 AVI's frames came out at pts 1, 4, 3, 5, 2).
DECODE_ORDER_FORMATS = {"avi"}
# Containers that hold one codec only, or (WebM and IVF: VP8, VP9, AV1; Ogg: Theora) no H.264: their
# default codec, where this PyAV build has it.
SUFFIX_CODECS = {
    ".y4m": "rawvideo",
    ".gif": "gif",
    ".webm": "libvpx-vp9",
    ".ivf": "libvpx-vp9",
    ".ogv": "libtheora",
}
# index (moov) first: plays while it downloads (3GP and 3G2 are MP4s, for phones)
FASTSTART_SUFFIXES = {".mp4", ".mov", ".m4v", ".3gp", ".3g2"}
SUBTITLE_FORMATS = {"matroska", "webm", "mp4", "mov", "ipod", "3gp", "3g2"}  # keep (some) subtitles as such
# Text subtitles a container refuses (MP4's mov_text in Matroska, SRT in MP4, either in WebM) are decoded
# and written again in its own format.
TEXT_SUBTITLE_ENCODERS = {
    "matroska": "subrip",
    "webm": "webvtt",
    **dict.fromkeys(("mp4", "mov", "ipod", "3gp", "3g2"), "mov_text"),
}
SILENT_SUFFIXES = {
    ".y4m",
    ".gif",
    ".ivf",
}  # containers without audio: a source's audio is dropped, with a note
# Pixel formats to fall back on when an encoder takes neither the source's nor the work format.
FALLBACK_FORMATS = ("yuv444p", "rgb24", "bgr24", "rgb8", "bgr8", "gray")  # swscale cannot write pal8
PALETTE_FORMATS = {"rgb8", "bgr8", "pal8", "rgb4_byte", "bgr4_byte"}
STREAM_TAGS = {"language", "title", "timecode"}  # copied to each output stream from its source
MUXER_TAGS = {"encoder", "major_brand", "minor_version", "compatible_brands", "duration"}  # not copied
IDENTITY_MATRIX = (1 << 16, 0, 0, 0, 1 << 16, 0, 0, 0, 1 << 30)  # FFmpeg's display matrix, 16.16/2.30
# muxers storing a display matrix (ipod: .m4v)
ROTATING_FORMATS = {"mov", "mp4", "ipod", "3gp", "3g2", "matroska", "webm"}
# muxers that store the pixel aspect ratio PyAV gives them (ipod: .m4v; 3gp, 3g2: MP4s for phones)
SAR_FORMATS = {"mp4", "mov", "ipod", "3gp", "3g2"}
# ... and the encoders that store it in their own headers (kept by any container)
SAR_CODECS = {"libx264", "libx264rgb", "libx265", "mpeg4", "mpeg2video"}
TOP_FIELD_FIRST = {2: True, 3: False, 4: False, 5: True}  # AVFieldOrder TT, BB, TB, BT: shown top first?
FIELD_FORMATS = {"matroska", "mov", "mp4", "yuv4mpegpipe"}  # muxers that store the field order
PROGRESSIVE_CODECS = {"mpeg1video", "mpeg2video", "mpeg4", "libopenh264"}  # say so in their own headers
HDR_PARAMS = {"libx264": "x264-params", "libx265": "x265-params", "libsvtav1": "svtav1-params"}
ATTACHED_PIC = 0x400  # AV_DISPOSITION_ATTACHED_PIC
COVER_FORMATS = {"mp4"}  # muxers that store a cover picture ('covr'; MOV writes none, M4V takes no JPEG)
COVER_CODECS = {"mjpeg": ("jpg", "image/jpeg"), "png": ("png", "image/png"), "bmp": ("bmp", "image/bmp")}
ATTACHMENT_FORMATS = {"matroska"}  # muxers that store attachments (cover pictures, subtitle fonts)
# Per-frame HDR metadata (scene by scene tone mapping) that no encoder here is given: dropped, with a note.
DYNAMIC_HDR = {
    "DYNAMIC_HDR_PLUS": "HDR10+",
    "DOVI_RPU_BUFFER": "Dolby Vision",
    "DOVI_METADATA": "Dolby Vision",
    "DYNAMIC_HDR_VIVID": "HDR Vivid",
}


def work_format(fmt) -> str:
    """The planar Y'CbCr format frames are restored in: the frame's own when it is one, else the
    closest one (same subsampling, 8/10/12/16 bits; RGB and other layouts become 4:4:4, and so do
    4:1:1 (DV), 4:4:0 and 4:1:0, which restore_planes does not take)."""
    if PLANAR_YUV.match(fmt.name):
        return fmt.name
    bits = max(c.bits for c in fmt.components)
    depth = "" if bits <= 8 else "10le" if bits <= 10 else "12le" if bits <= 12 else "16le"
    sub = {(2, 2): "420", (2, 1): "422"}.get(chroma_factors(fmt.name), "444")
    return f"yuv{sub}p{depth}"


def chroma_factors(name: str) -> tuple[int, int]:
    """How many luma samples one chroma sample spans (across, down): (2, 2) for 4:2:0, (4, 1) for 4:1:1,
    (1, 1) for 4:4:4, RGB and gray."""
    import av

    f = av.VideoFormat(name, 64, 64)
    if f.is_rgb or len(f.components) < 3:
        return 1, 1
    c = f.components[1]
    return 64 // c.width, 64 // c.height


def format_bits(name: str) -> int:
    m = re.search(r"p(\d+)le$", name)
    return int(m.group(1)) if m else 8


def frame_planes(frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Planes of a planar Y'CbCr PyAV frame (yuv420p, yuv422p10le, ...) as numpy (y, u, v): uint8, or
    uint16 codes for more than 8 bits (then pass bits=format_bits(frame.format.name) to restore_yuv)."""
    dtype = np.uint16 if format_bits(frame.format.name) > 8 else np.uint8
    out = []
    for p in frame.planes[:3]:
        a = np.frombuffer(p, dtype).reshape(p.height, p.line_size // np.dtype(dtype).itemsize)
        out.append(a[:, : p.width].copy())
    return tuple(out)


def planes_frame(planes, fmt: str):
    import av

    y = planes[0]
    frame = av.VideoFrame(y.shape[1], y.shape[0], fmt)
    for p, data in zip(frame.planes, planes):
        a = np.frombuffer(p, data.dtype).reshape(p.height, p.line_size // data.itemsize)
        a[:, : p.width] = data
    return frame


def display_matrix(frame) -> tuple | None:
    """The frame's display matrix (how a player rotates or flips it: phone video is stored sideways
    with a 90 degree one), as FFmpeg's 9 integers, or None when it is shown as stored."""
    data = side_data(frame, "DISPLAYMATRIX")
    if data is None:
        return None
    m = tuple(int(v) for v in np.frombuffer(data, np.int32)[:9])
    return None if m == IDENTITY_MATRIX else m


def side_kind(sd) -> str:
    return str(getattr(sd.type, "name", sd.type)).upper().split(".")[-1]  # "DISPLAYMATRIX" (or "Type.KIND")


def side_data(frame, kind: str) -> bytes | None:
    for sd in frame.side_data:
        if side_kind(sd) == kind:
            return bytes(sd)
    return None


def hdr_params(frame, codec: str) -> tuple[dict, str]:
    """The frame's HDR10 mastering display (primaries, white point, luminance) and content light level as
    encoder options ({"x265-params": "master-display=...:max-cll=..."}), and a note when the encoder
    cannot take them. Without them HDR10 players and TVs guess how bright the picture was graded."""
    mdcv, cll = side_data(frame, "MASTERING_DISPLAY_METADATA"), side_data(frame, "CONTENT_LIGHT_LEVEL")
    params = []
    if mdcv is not None:
        # AVMasteringDisplayMetadata: 10 AVRationals (R, G, B, white x/y; min, max luminance), two flags
        v = np.frombuffer(mdcv, np.int32)
        q = [Fraction(int(n), int(d)) if d else Fraction(0) for n, d in v[:20].reshape(10, 2)]
        if v[20] and v[21]:  # has primaries, has luminance
            # x264/x265 count xy in 1/50000 and cd/m2 in 1/10000 (SMPTE ST 2086); SVT-AV1 takes floats
            units = (None, None) if codec == "libsvtav1" else (50000, 10000)

            def two(pair, unit):
                return ",".join(f"{float(x):g}" if unit is None else str(round(x * unit)) for x in pair)

            # in the order G, B, R, white point, luminance max, min
            xy = [q[2:4], q[4:6], q[0:2], q[6:8]]
            text = "".join(f"{k}({two(c, units[0])})" for k, c in zip(("G", "B", "R", "WP"), xy))
            name = "master-display" if codec == "libx265" else "mastering-display"
            params.append(f"{name}={text}L({two((q[9], q[8]), units[1])})")
    if cll is not None:
        max_cll, max_fall = (int(x) for x in np.frombuffer(cll, np.uint32)[:2])
        name = {"libx265": "max-cll", "libsvtav1": "content-light"}.get(codec, "cll")
        params.append(f"{name}={max_cll},{max_fall}")
    if not params:
        return {}, ""
    key = HDR_PARAMS.get(codec)
    if key is None:
        return {}, f"{codec} cannot take the HDR10 mastering display and light levels: dropped (use libx265)"
    return {key: ":".join(params)}, ""


def is_cover(stream) -> bool:
    """A cover picture (MP4 'covr', a Matroska image attachment): FFmpeg lists it as a video stream of
    one frame, in some files before the video. (PyAV 12 shows no dispositions: none is a cover there.)"""
    return bool(int(getattr(stream, "disposition", 0)) & ATTACHED_PIC)


def _writes_rotation(stream) -> bool:
    return hasattr(stream, "set_display_matrix")  # PyAV 18 on (qairn[video] takes PyAV 12 on)


def frame_color(frame, matrix: str | None, crange: str | None) -> tuple[str, str, str]:
    """(matrix, range, note): the frame's tags, the options where given, else a guess (said in note)."""
    note = ""
    if matrix is None:
        tag = int(frame.colorspace)
        matrix = COLORSPACES.get(tag)
        if matrix is None:
            matrix = NEAREST_MATRICES.get(tag) or guessed_matrix(frame.height)
            name = MATRIX_NAMES.get(tag, f"code {tag}")
            if frame.format.is_rgb or frame.format.name.startswith(("gray", "ya", "pal")):
                pass  # no matrix to read: RGB, gray and palette frames are converted into this one
            elif tag in (0, 2):  # RGB (on Y'CbCr frames), unspecified
                note = f"no colour matrix tag: assuming {matrix} for {frame.height} lines"
            else:  # tagged, with a matrix qairn cannot convert
                note = f"colour matrix {name} is not supported: restored as {matrix}, tagged {name}"
    if crange is None:
        # Untagged gray is full range, as swscale takes it (its gray codes are 0..255 whatever the tag):
        # restored as limited, an H.264 of it was tagged limited and played with crushed blacks and whites.
        tag, name = int(frame.color_range), frame.format.name
        gray = tag == 0 and name.startswith(("gray", "ya"))
        crange = "full" if tag == 2 or name.startswith("yuvj") or gray else "limited"
    return check_matrix(matrix), check_range(crange), note


# ---- transcoding ---------------------------------------------------------------------------------------
def expected_frames(inp, vstream, rate) -> int | None:
    """How many frames the progress bar expects: the header's count, else duration x rate (Matroska,
    WebM and Y4M keep no count), else None (the bar counts without a total)."""
    if vstream.frames:
        return vstream.frames
    if vstream.duration and vstream.time_base:
        seconds = float(vstream.duration * vstream.time_base)
    elif inp.duration:
        seconds = inp.duration / 1_000_000  # FFmpeg's AV_TIME_BASE
    else:
        return None
    return max(1, round(seconds * float(rate)))


@dataclass
class VideoOptions:
    codec: str | None = None  # None: libx264, else the first of DEFAULT_CODECS this PyAV can encode
    crf: float = 18.0
    preset: str | None = None  # None: the encoder's own (x264, x265: medium); refused where it has none
    bitrate: int | None = None  # bits/s; overrides crf
    pix_fmt: str | None = None  # None: the source's format when the encoder takes it
    codec_options: dict = field(default_factory=dict)
    audio: bool = True
    batch: int = 4
    score_only: bool = False
    quality_csv: str | Path | None = None  # None: OUT.quality.csv (IN.quality.csv with score_only)
    write_quality: bool = True
    plot: bool = True
    matrix: str | None = None  # None: from the stream's tags
    range: str | None = None
    progress: bool = False
    strict: bool = (
        False  # damaged input (decoder-flagged frames, a cut or refused packet, fewer frames than counted)
    )
    overwrite: bool = True  # replace existing outputs (the CLI asks for --overwrite, as restore does)
    # Motion JPEG (webcams, IP cameras, AVI captures): each frame restored within its JPEG's
    # quantization bins, as `qairn restore` does for a JPEG file (qairn.engine.jpeg)
    jpeg_clip: bool = True

    def __post_init__(self):
        # As --crf: nan ended in a bare "cannot convert float NaN to integer" for MPEG-4, -30 was q 2.
        if not 0 <= self.crf < float("inf"):
            raise ValueError(f"crf is a number, 0 or more (default 18), got {self.crf}")
        # 0 fell back to the CRF without a word (as --bitrate 0 did), and -5 reached the encoder.
        if self.bitrate is not None and not self.bitrate >= 1:
            raise ValueError(
                f"bitrate is bits per second, 1 or more (e.g. 2000000), got {self.bitrate}; "
                "None for constant quality (crf)"
            )


def default_codec() -> str:
    import av

    for name in DEFAULT_CODECS:
        try:
            av.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001  (PyAV raises several error types for a missing encoder)
            continue
    raise VideoError(f"this PyAV build has none of the encoders {', '.join(DEFAULT_CODECS)}; pass --codec")


def output_codec(path: Path, opts: VideoOptions) -> str:
    """The encoder for an output named `path`: --codec, else the container's own (.ivf and .ogv refused
    libx264, the default, only after the model had loaded), else default_codec()."""
    import av

    own = SUFFIX_CODECS.get(path.suffix.lower())
    if opts.codec or own is None:
        return opts.codec or default_codec()
    try:
        av.Codec(own, "w")
    except Exception:  # noqa: BLE001  (PyAV raises several error types for a missing encoder)
        raise VideoError(
            f"{path}: {path.suffix} is written with {own}, which this PyAV build cannot encode; "
            "use .mkv, or another --codec"
        ) from None
    return own


def _temp_path(path: Path) -> Path:
    """A hidden temp name beside `path`, keeping its extension so FFmpeg picks the same container."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".part{path.suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _publish(tmp: Path, path: Path) -> None:
    """Give a finished temp file the permissions a new file would get (mkstemp makes 0600), rename it."""
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)


def _check_writable(path: Path, what: str, overwrite: bool = True) -> None:
    if not overwrite and path.is_file():
        raise VideoError(f"{path}: the {what} exists (use --overwrite)")
    if path.is_dir():
        raise VideoError(f"{path}: is a directory; give a file name for the {what}")
    parent = path.parent
    if not parent.is_dir():
        raise VideoError(f"{path}: cannot write the {what}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise VideoError(f"{path}: cannot write the {what}: directory {parent} is not writable")


def _av_path(path: Path) -> str:
    """The name FFmpeg opens `path` by, as a file: it takes what comes before a colon for a protocol
    ("take1:final.mkv", and "./take1:final.mkv", which Path shortens to that, were "Protocol not
    found"); an absolute path starts with "/", which no protocol's name holds."""
    return os.path.abspath(path)


def _open_input(src: Path):
    import av

    if not src.exists():
        raise VideoError(f"{src}: no such file")
    if src.is_dir():
        raise VideoError(f"{src}: is a directory, not a video")
    if src.is_file() and src.stat().st_size == 0:  # a pipe (/dev/stdin) has no size to check
        raise VideoError(f"{src}: empty file (0 bytes)")
    piped = not src.is_file()
    if piped:
        _logging_noted()  # (a pipe's opening is logged: set back after)
    try:
        # A pipe's MP4 with its index (moov) last has been read to its end to find the index; the demuxer
        # then fails to go back to the first frames ("partial file") as it reads a few while opening.
        with _ffmpeg_reasons() if piped else nullcontext([]) as logs:
            inp = av.open(_av_path(src))
    except av.FFmpegError as e:
        raise VideoError(
            f"{src}: not a readable video (corrupt, truncated or unknown format: {_msg(e)})"
        ) from None
    finally:
        if piped:
            _logging_back()
    if not inp.streams.video:
        inp.close()
        raise VideoError(f"{src}: has no video stream")
    # An audio file's picture alone (it was refused only once the model had loaded).
    if all(is_cover(s) for s in inp.streams.video):
        inp.close()
        raise VideoError(f"{src}: has only a cover picture, no video")
    if piped and "mov" in inp.format.name.split(",") and any("partial file" in str(m) for *_, m in logs):
        inp.close()
        raise VideoError(
            f"{src}: a piped MP4 or MOV needs its index (moov) before its frames, and this one has it after "
            "them; give the file's name instead of a pipe, or remux it with +faststart"
        )
    return inp


def _tag_seconds(metadata) -> float | None:
    """A Matroska stream's DURATION tag ("HH:MM:SS.nnnnnnnnn") in seconds, or None."""
    text = (metadata or {}).get("DURATION") or (metadata or {}).get("duration")
    try:
        h, m, sec = str(text).split(":")
        return int(h) * 3600 + int(m) * 60 + float(sec)
    except (TypeError, ValueError):
        return None


def _msg(e: Exception) -> str:
    import av

    s = (e.strerror if isinstance(e, av.FFmpegError) else None) or str(e)
    log = getattr(e, "log", None) if isinstance(e, av.FFmpegError) else None  # under _ffmpeg_reasons
    if log and str(log[2]).strip():
        s = f"{s}: {str(log[2]).strip()}"
    return s.splitlines()[0] if s else type(e).__name__


AV_LOG_QUIET = -8  # FFmpeg's level below PANIC: its own callback prints nothing


class _Logging:
    """PyAV's logging and FFmpeg's log level are the process's, shared by runs in several threads at
    once (a transcoder's worker pool): the first run to start notes them, the last to end sets them
    back, and PyAV's stays on while any run is inside _ffmpeg_reasons. Each run noted and set back its
    own: one that started while another had PyAV's on noted it on, and where it ended last it left it
    on (ERROR) and FFmpeg's own log muted, for good (and _probe's skip_repeated off)."""

    lock = threading.Lock()
    runs = 0  # runs between _logging_noted and _logging_back
    levels = (None, None)  # PyAV's level and FFmpeg's (_libav_level) before the first of them
    skip_repeated = True  # PyAV's, before the first of them
    reasons = 0  # runs inside _ffmpeg_reasons


def _logging_noted() -> None:
    """Note PyAV's and FFmpeg's log levels for _logging_back, unless a run in another thread has."""
    import av.logging

    with _Logging.lock:
        if _Logging.runs == 0:
            _Logging.levels = av.logging.get_level(), _libav_level()
            _Logging.skip_repeated = av.logging.get_skip_repeated()
        _Logging.runs += 1


@contextmanager
def _ffmpeg_reasons():
    """Keep FFmpeg's own reason for an error in it ("Invalid argument: Unsupported audio codec. Must be
    one of mp1, mp2, ..."): PyAV keeps the last error line only while its logging is on. On for this
    thread (the lines are captured, not printed) while the output is set up, and no longer: decoder
    threads logging damaged frames would print to stderr, and a decoder freed while its threads wait in
    PyAV's callback for the lock the freeing thread holds hangs.
    Where PyAV's logging was off, it is left muted (FFmpeg's own callback, silenced) rather than off:
    set_level(None) while a decoder thread is inside PyAV's callback, past its level check, made that
    thread compare its level with None ("TypeError: '<=' not supported", a traceback on stderr).
    _logging_back turns it off once the decoder is closed."""
    import av.logging

    with _Logging.lock:
        off = _Logging.levels[0] is None  # (as the first run found it)
        if off and _Logging.reasons == 0:
            av.logging.set_level(av.logging.ERROR)
        _Logging.reasons += 1
    try:
        with av.logging.Capture(local=True) as logs:
            yield logs  # (level, name, message) of each line
    finally:
        with _Logging.lock:
            _Logging.reasons -= 1
            if off and _Logging.reasons == 0:
                av.logging.set_libav_level(AV_LOG_QUIET)
                av.logging.restore_default_callback()


def _logging_back() -> None:
    """PyAV's logging as the first run found it (_logging_noted), once the last run has ended (its
    decoder closed). FFmpeg's level was unknown where _libav_level gave None: FFmpeg's default, INFO."""
    import av.logging

    with _Logging.lock:
        _Logging.runs -= 1
        if _Logging.runs:
            return
        av.logging.set_skip_repeated(_Logging.skip_repeated)
        old, old_libav = _Logging.levels
        if old is None and av.logging.get_level() is not None:
            av.logging.set_level(None)
            av.logging.set_libav_level(av.logging.INFO if old_libav is None else old_libav)


def _park_decoder(vstream) -> None:
    """Let the decoder's frame threads finish the packets they hold, and drop the rest, with the GIL
    released (PyAV's flush_buffers). A run that stops early (a refusal after the first frame, an error,
    Ctrl-C) left them decoding; the decoder is freed with the GIL held, whenever its last reference goes
    (an exception's traceback the caller keeps, the garbage collector), and freeing waits for those
    threads: one logging an error through PyAV's callback (on while PyAV's logging is, or inside
    _ffmpeg_reasons) waits for the GIL in turn, and the process hung (1 run in 2 of test_video.py; every
    time in a loop with av.logging.set_level(ERROR)). Parked threads have nothing to log as they exit."""
    cc = None if vstream is None else vstream.codec_context
    if cc is not None and cc.is_decoder:
        cc.flush_buffers()  # (does nothing where the decoder never opened)


def _libav_level() -> int | None:
    """FFmpeg's own log level, which _ffmpeg_reasons mutes: PyAV sets it but cannot read it, so it is read
    through PyAV's own logging module (its symbols include those of the libavutil it was linked with; OpenCV
    loads another one); None where that cannot be done."""
    import ctypes

    import av.logging

    try:
        return int(ctypes.CDLL(av.logging.__file__).av_log_get_level())
    except (OSError, AttributeError):
        return None


def _decode(inp, vstream, copied, pending_audio: deque, counts: dict):
    """Decoded video frames; the packets of the copied streams (audio, subtitles) are queued in
    pending_audio as they are demuxed.
    counts["packets"]: video packets demuxed, which is what a header's frame count counts (an edit
    list's pre-roll frames are demuxed and decoded, but not shown).
    counts["lost"]: the times (s, or None) of packets the decoder refused or gave no frame for, which
    are skipped, and counts["lost_reason"] the first error.
    counts["unreadable"]: (time in s, reason) where the demuxer failed mid-file (a damaged container):
    the frames before it are decoded and yielded, and the rest of the file is not read."""
    import av

    copy_ids = {s.index for s in copied}
    reorder = inp.format.name in DECODE_ORDER_FORMATS
    if "jpeg" in counts:
        from qairn.engine.jpeg import read_jpeg
    # The packet times no frame has taken yet. A frame-threaded decoder reports a damaged packet at a
    # later one (0.24 s for 0.16 s): the earliest time left is the one lost.
    times: list = []
    lost = counts.setdefault("lost", [])
    flagged = set()  # times of the packets the demuxer flagged (said by counts["damaged"] already)
    read_to = 0.0  # the end of the last video packet demuxed, in s

    def shown(frames):
        for frame in frames:
            if reorder:  # frames come out in display order: each takes the earliest time left
                frame.pts = heapq.heappop(times) if times else None
            elif frame.pts is None:
                if times:
                    heapq.heappop(times)
            else:  # it takes its own time, and those before it (pre-roll an edit list hides)
                while times and times[0] <= frame.pts:
                    heapq.heappop(times)
            yield frame

    packets = inp.demux(vstream, *copied)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.FFmpegError as e:
            # A damaged container mid-file (a Y4M frame header overwritten): the run ended there with
            # an error and no output at all. The frames read so far are restored, with a warning.
            counts["unreadable"] = (read_to, _msg(e))
            try:  # the decoder's delayed frames (frame threads, B-frames): the file's end is not coming
                yield from shown(vstream.codec_context.decode(None))
            except av.FFmpegError:
                pass
            break
        if packet.stream.index in copy_ids:
            if packet.dts is not None or (packet.size and is_cover(packet.stream)):  # a cover has no time
                pending_audio.append(packet)
            continue
        if packet.size:
            counts["packets"] = counts.get("packets", 0) + 1
            if "jpeg" in counts and packet.pts is not None:  # Motion JPEG: each packet is a JPEG file
                counts["jpeg"][packet.pts] = read_jpeg(bytes(packet))
            # Cut short by the end of the file (or flagged by the demuxer): a frame-threaded decoder
            # drops it without an error, so this flag is the one sign of the damage.
            if packet.is_corrupt and "damaged" not in counts:
                counts["damaged"] = counts["packets"] - 1
            if packet.is_corrupt and packet.pts is not None:
                flagged.add(packet.pts)
            if packet.pts is not None and not getattr(packet, "is_discard", False):  # (not shown)
                heapq.heappush(times, packet.pts)
            when = packet.pts if packet.pts is not None else packet.dts
            if when is not None:
                read_to = max(read_to, float((when + (packet.duration or 0)) * vstream.time_base))
        try:
            frames = packet.decode()
        except av.FFmpegError as e:  # a damaged packet: skipped, as the decoder skips the ones it flags
            pts = heapq.heappop(times) if times else None
            if pts not in flagged:
                lost.append(None if pts is None else float(pts * vstream.time_base))
                counts.setdefault("lost_reason", _msg(e))
            continue
        yield from shown(frames)
    # Frame threads drop a damaged last packet with no error (a damaged one elsewhere gives one at
    # a later packet): its time is left when the decoder is drained.
    left = [float(pts * vstream.time_base) for pts in sorted(times) if pts not in flagged]
    if left:
        lost += left
        counts.setdefault("lost_reason", "no frame came out of it")


def _copy_pictures(out, inp, pending: deque, amap: dict, dst: Path) -> list[str]:
    """Copy the source's cover pictures (their packets are demuxed first, so they are in `pending`) and
    attachments (fonts for subtitles), where the container holds them; returns notes on what is dropped."""
    import av

    dropped, notes = [], []
    packets = {p.stream.index: p for p in pending if is_cover(p.stream)}
    for s in [s for s in inp.streams.video if is_cover(s)]:
        name = s.codec_context.name
        if s.index not in packets or name not in COVER_CODECS or not s.codec_context.width:
            notes.append(f"a {name} cover picture that cannot be read or copied: dropped")
        elif out.format.name in COVER_FORMATS:
            amap[s.index] = out.add_stream_from_template(s)  # its packet is muxed as the audio is
        elif out.format.name in ATTACHMENT_FORMATS and hasattr(out, "add_attachment"):  # (newer PyAV)
            ext, mimetype = COVER_CODECS[name]
            filename = s.metadata.get("filename") or f"cover.{ext}"
            out.add_attachment(filename, s.metadata.get("mimetype") or mimetype, bytes(packets[s.index]))
        else:
            dropped.append("the cover picture")
    for s in getattr(inp.streams, "attachments", ()):  # (PyAV 13 on; data, add_attachment later)
        try:
            if out.format.name not in ATTACHMENT_FORMATS:
                raise ValueError
            out.add_attachment(s.name, s.mimetype, bytes(s.data))
        except (av.FFmpegError, ValueError, TypeError, AttributeError):
            dropped.append(f"attachment {s.name}")
    return notes + ([f"{dst.suffix} cannot hold {', '.join(dropped)}: dropped"] if dropped else [])


def default_pix_fmt(src_fmt: str, work_fmt: str, supported: set, y4m: bool) -> str:
    """The pixel format frames of src_fmt (restored in work_fmt) are encoded in without --pix-fmt, by an
    encoder taking `supported` (empty: any): the source's, else the work format, else the encoder's
    own planar Y'CbCr formats that lose nothing (ProRes takes only 10-bit 4:2:2 and 4:4:4, DNxHD
    4:2:2), the smallest first, else yuv420p."""
    bits = format_bits(work_fmt)
    sub = PLANAR_YUV.match(work_fmt).group(1)  # "20", "22" or "44" (of 4:2:0, 4:2:2, 4:4:4)
    keep = sorted(
        (format_bits(f), m.group(1), f)
        for f, m in ((f, PLANAR_YUV.match(f)) for f in supported)
        if m and not f.startswith("yuvj") and format_bits(f) >= bits and m.group(1) >= sub
    )
    candidates = (
        ([] if y4m else [src_fmt])
        + [work_fmt]
        + [f for *_, f in keep]
        + (["yuv420p10le"] if bits > 8 else [])
        + ["yuv420p"]
    )
    # An encoder that takes none of those (gif: palettes only) gets the first of its own formats
    # that swscale can write, in FALLBACK_FORMATS' order of fidelity.
    candidates += [f for f in FALLBACK_FORMATS if f in supported]
    return next((f for f in candidates if not supported or f in supported), "yuv420p")


def _cannot_encode(dst: Path, codec: str, width: int, height: int, pix_fmt: str, reason: str) -> VideoError:
    """The encoder's refusal to open at this size and format; an odd size in a chroma-subsampled format
    is named as the likely cause (otherwise it lies elsewhere: the encoder's own reason follows, e.g.
    a --crf outside its range)."""
    odd = ""
    if chroma_factors(pix_fmt) != (1, 1) and (width % 2 or height % 2):
        odd = " (4:2:0 and 4:2:2 need even sizes: try --pix-fmt yuv444p)"
    return VideoError(f"{dst}: {codec} cannot encode {width}x{height} {pix_fmt}{odd} ({reason})")


def _open_output(
    tmp: Path, first, vstream, astreams, opts: VideoOptions, work_fmt: str, color, dst: Path, pending: deque
):
    import av

    # Y4M holds only raw planar Y'CbCr frames; FFmpeg writes its 9- to 16-bit kinds only when allowed.
    # GIF holds only its own codec (256-colour palettes).
    y4m = tmp.suffix.lower() == ".y4m"
    codec = output_codec(tmp, opts)
    faststart = tmp.suffix.lower() in FASTSTART_SUFFIXES
    options = {"movflags": "+faststart"} if faststart else {"strict": "-1"} if y4m else {}
    try:
        out = av.open(_av_path(tmp), "w", options=options)
    except (av.FFmpegError, ValueError) as e:
        raise VideoError(f"{dst}: cannot write this container ({_msg(e)}); use .mp4, .mkv or .mov") from None
    try:
        rate = vstream.average_rate or vstream.guessed_rate or Fraction(25)
        vs = out.add_stream(codec, rate=rate)
    except (av.FFmpegError, ValueError) as e:
        out.close()
        raise VideoError(f"{dst}: cannot encode with {codec!r} ({_msg(e)})") from None
    supported = {f.name for f in (vs.codec_context.codec.video_formats or [])}
    bits = format_bits(work_fmt)
    pix_fmt, notes = opts.pix_fmt, []
    if pix_fmt is None:
        src_fmt = first.format.name
        pix_fmt = default_pix_fmt(src_fmt, work_fmt, supported, y4m)
        # MJPEG refuses limited-range Y'CbCr ("Non full-range YUV is non-standard"): an MJPEG .avi of any
        # ordinary source failed. Its full-range twin (yuvj) keeps the levels; swscale converts.
        twin = f"yuvj{pix_fmt[3:]}"  # (yuv420p: yuvj420p)
        if vs.codec_context.name == "mjpeg" and color[1] == "limited" and twin in supported:
            pix_fmt = twin
        depth = max(c.bits for c in av.VideoFormat(pix_fmt).components)  # gray10le, p010le: 10
        if pix_fmt in PALETTE_FORMATS:
            notes.append(
                f"{codec} holds 256 colours at most: writing {pix_fmt} (a fixed palette; .mp4 keeps all)"
            )
        elif depth < bits:
            notes.append(f"{codec} cannot encode {src_fmt}: writing {depth}-bit {pix_fmt}")
        # Kept as the source's depth and chroma (an RGB source's: 4:4:4), but browsers and phones play
        # 8-bit 4:2:0 H.264 only (not High 10, 4:2:2 or 4:4:4). (Gray is left unsaid.)
        player_format = depth == 8 and chroma_factors(pix_fmt) == (2, 2)
        gray = len(av.VideoFormat(pix_fmt).components) < 3
        if codec == "libx264" and tmp.suffix.lower() in FASTSTART_SUFFIXES and not (player_format or gray):
            notes.append(
                f"{codec} in {dst.suffix} writes {pix_fmt}, which many players (browsers, phones) cannot "
                "play: they take 8-bit 4:2:0 (--pix-fmt yuv420p)"
            )
    elif supported and pix_fmt not in supported:
        out.close()
        raise VideoError(
            f"{dst}: {codec} cannot encode pixel format {pix_fmt} (it takes {', '.join(sorted(supported))})"
        )
    try:  # swscale cannot write every format an encoder takes (pal8): say so before any work
        _reformat(first, pix_fmt, *color)
    except (av.FFmpegError, ValueError) as e:
        out.close()
        usable = [f for f in FALLBACK_FORMATS if f in supported]
        hint = f"; try --pix-fmt {usable[0]}" if usable else ""
        raise VideoError(
            f"{dst}: cannot convert frames to pixel format {pix_fmt} ({_msg(e)}){hint}"
        ) from None
    cc = vs.codec_context
    vs.width, vs.height, vs.pix_fmt = first.width, first.height, pix_fmt
    if cc.name in ("libx265", "hevc_nvenc") and out.format.name in ("mov", "mp4"):
        cc.codec_tag = "hvc1"  # FFmpeg's default hev1 does not play in QuickTime, Safari or on iOS
    # The frames are encoded as stored: without the source's display matrix a phone video (stored
    # sideways, shown upright) would play sideways.
    rotation = display_matrix(first)
    if rotation is not None:
        degrees = getattr(first, "rotation", None)
        turn = f"{degrees:g} degrees" if degrees else "turned or flipped"
        if out.format.name not in ROTATING_FORMATS:
            notes.append(
                f"{dst.suffix} keeps no rotation: the picture is written as stored, not {turn} as the "
                "source is shown (use .mp4, .mkv or .mov)"
            )
        elif not _writes_rotation(vs):
            notes.append(
                f"this PyAV cannot write rotation: the picture is written as stored, not {turn} as the "
                "source is shown (pip install -U av)"
            )
        else:
            vs.set_display_matrix(rotation)
    # Y4M and AVI read the frame rate from the stream's time base: there it must be 1/rate (the frames
    # are then stamped by index); elsewhere the source's time base keeps its timestamps exact.
    src_tb = vstream.time_base or Fraction(1, 1000)
    out_tb = Fraction(1) / Fraction(rate) if out.format.name in CONSTANT_RATE_FORMATS else src_tb
    vs.time_base = out_tb
    cc.time_base = out_tb
    # Anamorphic video (DVD, DV, HDV: pixels wider or narrower than tall) plays squashed without its pixel
    # aspect ratio. MP4, MOV and 3GP store the encoder's; Matroska, WebM, Y4M and AVI store the muxer
    # stream's, which PyAV cannot set, so there only codecs with it in their bitstream keep it.
    sar = vstream.sample_aspect_ratio or vstream.codec_context.sample_aspect_ratio
    if sar:
        cc.sample_aspect_ratio = sar
    if sar and sar != 1 and out.format.name not in SAR_FORMATS and cc.name not in SAR_CODECS:
        shown = round(first.width * sar)
        notes.append(
            f"{codec} in {dst.suffix} keeps no pixel aspect ratio: the source's {sar.numerator}:"
            f"{sar.denominator} pixels will play square ({first.width}x{first.height}, not shown as "
            f"{shown}x{first.height}); use .mp4, or libx264"
        )
    matrix, crange = color
    # The source's tag where it names the matrix used (bt601 has two codes) or one qairn has no
    # conversion for (the planes stay in it: the output was tagged bt601 and played in wrong colours);
    # otherwise, an RGB source (tag 0), an unspecified one or a --matrix override, the matrix used.
    tag = int(first.colorspace)
    same = COLORSPACES.get(tag) == matrix
    other = tag not in COLORSPACES and tag not in (0, 2) and opts.matrix is None and not first.format.is_rgb
    cc.colorspace = tag if same or other else AV_COLORSPACE[matrix]
    cc.color_range = AV_RANGE[crange]
    cc.color_primaries, cc.color_trc = int(first.color_primaries), int(first.color_trc)
    if opts.bitrate:
        cc.bit_rate = int(opts.bitrate)
    quality = _quality_options(codec, opts)
    if "qmax" in quality:  # (a fixed qscale needs a quality on each frame, which PyAV cannot set)
        cc.qscale = True
    options = {**quality, **_preset_option(opts), **opts.codec_options}  # the user's own win
    params, note = hdr_params(first, codec)
    notes += [note] if note else []
    if codec == "libx265":  # else it writes some 25 lines of its settings to stderr on every run
        params["x265-params"] = ":".join(x for x in ("log-level=error", params.get("x265-params")) if x)
    # Interlaced video (TV, DV, DVD) holds two fields taken 1/50 or 1/60 s apart in each frame: played
    # as progressive, moving edges show combs. The field order goes to the container; x264 codes the
    # fields as such.
    field = getattr(vstream.codec_context, "field_order", 0)  # (not in older PyAV)
    if field in TOP_FIELD_FIRST:
        cc.field_order = field
        top = "top" if TOP_FIELD_FIRST[field] else "bottom"
        if codec in ("libx264", "libx264rgb") and first.height % 4 == 0:  # (x264 takes no odd field heights)
            params["x264-params"] = ":".join(x for x in (params.get("x264-params"), f"{top[0]}ff=1") if x)
            kept = "coded interlaced"
        elif out.format.name in FIELD_FORMATS and codec not in PROGRESSIVE_CODECS:
            kept = "flagged interlaced"
        else:
            kept = f"flagged progressive by {codec} in {dst.suffix} (use libx264, or deinterlace first)"
        notes.append(
            f"interlaced ({top} field first): restored as whole frames, both fields together, and {kept}"
        )
    for k, v in params.items():  # before the user's own x264-params, which win
        options[k] = ":".join(x for x in (v, options.get(k)) if x)
    cc.options = {k: str(v) for k, v in options.items() if v is not None}
    try:
        amap, dropped = _add_copied_streams(out, astreams, dst)
    except VideoError:
        out.close()
        raise
    # The source's tags: copied audio tracks came out as 'und', unnamed, with no default track.
    for k, v in vstream.container.metadata.items():
        if k.lower() not in MUXER_TAGS:  # title, creation time, ...
            out.metadata[k] = v
    if dropped:
        notes.append(
            f"{dst.suffix} cannot hold {', '.join(dropped)} subtitles: "
            f"{counted(len(dropped), 'stream')} dropped"
        )
    notes += _copy_pictures(out, vstream.container, pending, amap, dst)
    copied = [s for s in vstream.container.streams if s.index in amap]
    for s, o in [(vstream, vs)] + [(s, amap[s.index]) for s in copied]:
        o.metadata.update({k: v for k, v in s.metadata.items() if k.lower() in STREAM_TAGS})
        if hasattr(s, "disposition"):  # (PyAV 13 on)
            o.disposition = s.disposition  # default, forced, hearing impaired, ...
    # MPEG-1/2 take only their standard frame rates as time base, MPEG-4 part 2 none finer than 1/65535
    # (a transport stream's 1/90000): those get one tick per frame, as Y4M and AVI do.
    # (x265 printed its reasons for refusing, an odd size, on stderr, twice, above the line that says so)
    with _stderr_muted(codec):
        for tb in dict.fromkeys([out_tb, Fraction(1) / Fraction(rate)]):
            vs.time_base = cc.time_base = out_tb = tb
            try:
                cc.open()
                error = None
                break
            except av.FFmpegError as e:
                error = e
    if error is not None:
        out.close()
        raise _cannot_encode(dst, codec, first.width, first.height, pix_fmt, _msg(error)) from None
    # FFmpeg hands back the options the encoder did not take: a mistyped --codec-option was ignored unsaid.
    unused = [k for k in opts.codec_options if k in (cc.options or {})]
    # (check_encoder_options says so first where the encoder opens on a small frame: not a GPU one
    # without its GPU)
    if "preset" in (cc.options or {}) and "preset" not in opts.codec_options:
        out.close()
        raise EncoderOptionError(f"--preset {opts.preset}: {codec} has no presets")
    if unused:
        out.close()
        k = unused[0]
        raise VideoError(f"{dst}: {codec} has no option {k!r} (--codec-option {k}={opts.codec_options[k]})")
    try:  # the muxer checks its streams as it writes the header: now, not after the first batch
        out.start_encoding()
    except av.FFmpegError as e:
        what = " and ".join(f"{s.codec_context.name} {s.type}" for s in out.streams)
        out.close()
        hint = "; use .mkv, or --no-audio" if any(s.type == "audio" for s in astreams) else "; use .mkv"
        raise VideoError(f"{dst}: this container cannot hold {what} ({_msg(e)}){hint}") from None
    return out, vs, amap, codec, pix_fmt, notes, out_tb


def _add_copied_streams(out, astreams, dst: Path) -> tuple[dict, list]:
    """Add the copied audio and subtitle streams to `out`: the output, or check_container's probe, so
    that both decide alike. Returns ({source index: output stream}, the codecs of the subtitle streams
    dropped); audio the container refuses is a VideoError."""
    import av

    amap, dropped = {}, []
    for s in astreams:
        try:
            # (MPEG-TS would take text subtitles, as data no player reads.)
            if s.type == "subtitle" and out.format.name not in SUBTITLE_FORMATS:
                raise ValueError
            amap[s.index] = out.add_stream_from_template(s)
        except (av.FFmpegError, ValueError) as e:
            if s.type == "subtitle":  # MP4 takes only mov_text, WebM WebVTT: not worth failing over
                try:
                    amap[s.index] = _text_subtitle_stream(out, s)
                except (av.FFmpegError, ValueError):
                    dropped.append(s.codec_context.name)
                continue
            raise VideoError(
                f"{dst}: cannot copy audio ({s.codec_context.name}) into this container "
                f"({_msg(e)}); use .mkv, or --no-audio"
            ) from None
    return amap, dropped


def _quality_options(codec: str, opts: VideoOptions) -> dict:
    """The encoder options --crf becomes: none with --bitrate, or the user's own b=... (the encoder's own
    rate control); a value None is not set."""
    if opts.bitrate or "b" in opts.codec_options:
        return {}
    if codec in CRF_CODECS:
        # VP9 takes b=0 for constant quality; VP8 ignores its CRF unless b caps it (then 200 kb/s)
        return {"crf": f"{opts.crf:g}", "b": {"libvpx-vp9": "0", "libvpx": "100M"}.get(codec)}
    if codec in QSCALE_CODECS:  # at their default 200 kb/s a 640x360 video came out at 25 dB
        q = str(max(2, round(opts.crf / 6)))  # (pinned range: the quantiser)
        return {"qmin": q, "qmax": q}
    return {}


def _preset_option(opts: VideoOptions) -> dict:
    # (--codec-option preset=... wins, as the user's own options do: --preset is then not checked)
    return {"preset": opts.preset} if opts.preset and "preset" not in opts.codec_options else {}


def _text_subtitle_stream(out, s):
    """An output stream writing the text subtitles of s in the container's own text format (mov_text into
    Matroska: SRT, styles kept as <b>, <i>, <font color>; SRT into MP4: mov_text; either into WebM:
    WebVTT); ValueError where there is none or s is bitmaps.
    The source's decoder is opened here: its ASS header (styles) is what the encoder starts from."""
    encoder = TEXT_SUBTITLE_ENCODERS.get(out.format.name)
    if encoder is None or not s.codec_context.codec.text_sub:
        raise ValueError(f"no conversion of {s.codec_context.name} subtitles into {out.format.name}")
    s.codec_context.open(strict=False)  # (open already where check_container's probe opened it)
    o = out.add_stream(encoder)
    o.time_base = o.codec_context.time_base = s.time_base or Fraction(1, 1000)
    o.codec_context.subtitle_header = s.codec_context.subtitle_header
    o.codec_context.open()
    return o


def _converted_subtitles(packet, stream, lost_cues: list) -> list:
    """A text subtitle packet decoded and encoded again by `stream` (_text_subtitle_stream), at the packet's
    own times; none for an empty cue (mov_text marks a gap with one), nor for one the decoder refuses,
    which is added to lost_cues as (time in s, reason)."""
    import av
    from av.subtitles.subtitle import SubtitleSet

    pts = packet.pts if packet.pts is not None else packet.dts
    try:  # a damaged cue ended the whole run
        cues = packet.stream.codec_context.decode2(packet) if packet.size else None
    except av.FFmpegError as e:
        lost_cues.append((float(pts * packet.time_base), _msg(e)))
        return []
    packets = []
    for cue in cues or ():
        p = stream.codec_context.encode_subtitle(
            SubtitleSet.create(cue.ass, 0, int(packet.duration or 0), pts)
        )
        p.pts = p.dts = pts
        p.duration, p.time_base, p.stream = packet.duration, packet.time_base, stream
        packets.append(p)
    return packets


def _plot_path(csv_path: Path) -> Path:
    return csv_path.with_suffix(".png") if csv_path.suffix == ".csv" else Path(f"{csv_path}.png")


def _write_quality(
    rows: list, csv_path: Path, plot: bool, title: str, scored_by: dict | None = None
) -> list[Path]:
    files = _quality_files(rows, csv_path, plot, title, scored_by)
    for path, data in files:
        write_atomic(path, data)
    return [path for path, _ in files]


def _judged(rows: list) -> list:
    """The trace's rows a clip's mean Q is taken over: those without a caveat. A black frame's high Q says
    nothing of it, and a fade raised the mean; a clip of such frames only is averaged whole."""
    return [r for r in rows if not r[6]] or rows


def _quality_files(
    rows: list, csv_path: Path, plot: bool, title: str, scored_by: dict | None = None
) -> list[tuple[Path, bytes]]:
    """The trace (CSV) and its plot (PNG) as (path, bytes), rendered but not written. scored_by
    (Restorer.scored_by) fills the columns p, weights and weights_sha256 of every row: a trace outlives
    the run, and scores from other weights or another p do not compare."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    # New columns go last: readers of the first columns by position, and DictReader ones, read the trace
    # as before (caveat came after Q3, then which model scored it).
    w.writerow(["frame", "pts", "time", "Q1", "Q2", "Q3", "caveat", "p", "weights", "weights_sha256"])
    model = scored_by or {}
    scorer = [model.get("p", ""), model.get("weights") or "", model.get("weights_sha256", "")]
    for r in rows:
        pts, times, quality = "" if r[1] is None else r[1], f"{r[2]:.6f}", (f"{q:.6f}" for q in r[3:6])
        w.writerow([r[0], pts, times, *quality, r[6] or "", *scorer])
    files = [(csv_path, buf.getvalue().encode())]
    if plot:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 3), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        t, q2 = [r[2] for r in rows], [r[4] for r in rows]
        # One frame: a line through one point draws nothing, so the point is marked.
        ax.plot(t, q2, lw=1, marker="o" if len(rows) == 1 else None)
        # A black frame's high Q says nothing of it (Result.info["caveat"]): marked, not taken for a good one.
        marked = [(r[2], r[4]) for r in rows if r[6]]
        if marked:
            label = f"{counted(len(marked), 'frame')} with a caveat (flat, or under 16 px)"
            ax.plot(*zip(*marked), ls="none", marker="x", color="0.5", label=label)
            ax.legend(fontsize=8)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("Q2")
        judged = _judged(rows)
        left_out = (
            f" ({counted(len(marked), 'frame')} with a caveat left out)" if len(judged) < len(rows) else ""
        )
        ax.set_title(f"{title}: mean Q2 {np.mean([r[4] for r in judged]):.3f}{left_out}", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png")
        files.append((_plot_path(csv_path), png.getvalue()))
    return files


def check_encoder(name: str) -> None:
    """--codec names a video encoder of this PyAV build. An unknown one was refused only after the model
    had loaded ("cannot encode with 'nosuch' (nosuch)"); an audio or subtitle one ended in a traceback."""
    import av

    try:
        kind = av.Codec(name, "w").type
    except ValueError:  # (UnknownCodecError)
        raise VideoError(f"--codec {name}: this PyAV build has no such encoder") from None
    if kind != "video":
        raise VideoError(
            f"--codec {name}: is {'an' if kind[0] in 'aeiou' else 'a'} {kind} encoder, not a video one"
        )


PROBE_SIZE = (128, 96)  # SQCIF: H.263 takes only a few sizes, this one among them


# Encoders that print to fd 2 themselves, not through FFmpeg's log (which av.logging.Capture takes):
# "x264 [error]: invalid preset 'fastest'", x265's and SVT-AV1's banners and settings.
SELF_PRINTING_ENCODERS = {"libx264", "libx264rgb", "libx265", "libsvtav1"}


class _Muted:
    """fd 2 while _stderr_muted has it, in any thread: it is the process's, so two runs probing at once (a
    transcoder's worker threads) share one muting. Each saved it and put it back, and the second saved the
    first's /dev/null: the last to end left fd 2 there for good."""

    lock = threading.Lock()
    count = 0  # the threads inside _stderr_muted now
    saved = None  # the real fd 2 (a duplicate) while count > 0; None where there was no fd 2 to mute


@contextmanager
def _stderr_muted(codec: str):
    """fd 2 to /dev/null while `codec` is probed, where it prints there itself (SELF_PRINTING_ENCODERS),
    around the one-line error said. fd 2 is the whole process's: another thread's output meanwhile is
    lost, so the others (FFmpeg's own encoders, libvpx: their lines are captured) are not muted."""
    if codec not in SELF_PRINTING_ENCODERS:
        yield
        return
    sys.stderr.flush()
    with _Muted.lock:
        if _Muted.count == 0:
            try:
                _Muted.saved = os.dup(2)
            except OSError:  # no fd 2 to mute
                _Muted.saved = None
            if _Muted.saved is not None:
                with open(os.devnull, "w") as null:
                    os.dup2(null.fileno(), 2)
        _Muted.count += 1
    try:
        yield
    finally:
        with _Muted.lock:
            _Muted.count -= 1
            if _Muted.count == 0 and _Muted.saved is not None:
                os.dup2(_Muted.saved, 2)
                os.close(_Muted.saved)
                _Muted.saved = None


def _probe(codec: str, options: dict) -> tuple[str | None, set]:
    """Open `codec` on a small frame with `options`, in each pixel format it takes until one opens (an
    option may hold for some only: profile=high10). Returns (None, the options it does not have) once
    one opens, else (its first complaint, set())."""
    import av
    import av.logging

    formats = [f.name for f in (av.Codec(codec, "w").video_formats or [])] or ["yuv420p"]
    formats.sort(key=lambda f: f != "yuv420p")
    reason = None
    _logging_noted()
    # (PyAV drops a line that repeats the one before: the second probe of a run would hear no reason)
    av.logging.set_skip_repeated(False)
    try:
        for fmt in formats:
            cc = av.CodecContext.create(codec, "w")
            cc.width, cc.height = PROBE_SIZE
            cc.pix_fmt, cc.time_base = fmt, Fraction(1, 25)
            cc.options = {k: str(v) for k, v in options.items() if v is not None}
            error = None
            with _stderr_muted(codec), _ffmpeg_reasons() as logs:
                try:
                    cc.open()
                    unused = set(cc.options or {})
                except (av.FFmpegError, ValueError) as e:
                    error = e
                cc = None  # freed while stderr is muted: x265 says "encoded 0 frames" as it closes
            if error is None:
                return None, unused
            own = [line for level, name, line in logs if level <= av.logging.ERROR and name == codec]
            reason = reason or (own[0].strip() if own else _msg(error))
    finally:
        _logging_back()  # (skip_repeated too)
    return reason, set()


def check_encoder_options(codec: str, opts: VideoOptions, dst) -> None:
    """The encoder settings, checked by opening the encoder on a small frame before the model loads: a
    bad --preset was refused after it, as "o.mp4: libx264 cannot encode 64x48 yuv420p (... Error setting
    preset/tune fastest/(null).)", and x264 printed its own error line twice. Each setting is tried
    alone, so the one named is the one refused; an encoder that does not open here at all (one for a
    GPU not present) is left to the real run to explain."""
    user = opts.codec_options
    crf = _quality_options(codec, opts).get("crf")
    name = f"--crf {opts.crf:g}" if "crf" not in user else f"--codec-option crf={user['crf']}"
    try:
        crf = float(user.get("crf", crf))
    except (TypeError, ValueError):  # (none, or one the probe below names)
        crf = None
    if crf is not None and crf > CRF_MAX.get(codec, float("inf")):
        raise EncoderOptionError(f"{name}: {codec} takes 0 to {CRF_MAX[codec]} (51: the smallest, worst)")
    if _probe(codec, {})[0] is not None:
        return
    quality = {k: v for k, v in _quality_options(codec, opts).items() if k not in user and v is not None}
    settings = [
        (f"--preset {opts.preset}", _preset_option(opts)),
        (f"--crf {opts.crf:g}", quality),
        *((f"--codec-option {k}={v}", {k: v}) for k, v in user.items()),
    ]
    for name, options in settings:
        if not options:
            continue
        reason, unused = _probe(codec, options)
        if reason is not None:
            raise EncoderOptionError(f"{name}: {codec} refuses it ({reason})")
        if "preset" in unused and "preset" not in user:  # (was passed to x264 and x265 only, else ignored)
            raise EncoderOptionError(f"{name}: {codec} has no presets")
        if unused & set(user):  # FFmpeg hands back the options the encoder does not have
            k = next(iter(unused & set(user)))
            raise EncoderOptionError(f"{dst}: {codec} has no option {k!r} (--codec-option {k}={user[k]})")


def check_container(
    dst: Path, codec: str, src: Path | None = None, audio: bool = True, inp=None, pix_fmt: str | None = None
) -> None:
    """The container dst's name asks for can be written and takes `codec`: o.xyz ("cannot write this
    container") and o.png ("'image2' format does not support 'libx264' codec") were refused only after
    the model had loaded. A hidden file beside dst is opened, as the output will be, and removed.
    src (None: not looked at): its streams, read from their headers, must fit too (see
    _check_streams_fit); read from inp, src opened already (a pipe, read once only), else opened here.
    pix_fmt: --pix-fmt, or None: the one _open_output takes by default."""
    import av
    import av.logging

    probe = _temp_path(dst)
    out = vs = None
    _logging_noted()  # set back once the probe and input are closed
    try:
        # x265 prints its settings as it opens and "encoded 0 frames" as it is freed, which is when the
        # probe's last reference goes: muted until then (below, on an error too).
        with _stderr_muted(codec):
            try:
                try:
                    out = av.open(_av_path(probe), "w")
                except (av.FFmpegError, ValueError) as e:
                    raise VideoError(
                        f"{dst}: cannot write this container ({_msg(e)}); use .mp4, .mkv or .mov"
                    ) from None
                try:
                    vs = out.add_stream(codec, rate=25)
                except (av.FFmpegError, ValueError) as e:
                    raise VideoError(f"{dst}: cannot encode with {codec!r} ({_msg(e)})") from None
                if src is not None:
                    _check_streams_fit(src, inp, out, vs, dst, audio, pix_fmt)
            except VideoError as e:  # (its traceback's frames, and its context's, hold the probe: dropped)
                e.__context__ = None
                raise e.with_traceback(None) from None
            finally:
                if out is not None:
                    try:
                        out.close()
                    except av.FFmpegError:  # a trailer without frames (GIF refuses one): no matter here
                        pass
                out = vs = None
    finally:

        def remove_probe():
            probe.unlink(missing_ok=True)

        _every_step(remove_probe, _logging_back)  # (a Ctrl-C as it is removed)


def _check_streams_fit(src: Path, inp, out, vs, dst: Path, audio: bool, pix_fmt: str | None) -> None:
    """The input's streams against the output container `out` (a probe with the video stream vs), from
    the input's headers: AAC audio into .webm or .mpg was refused only once the model had loaded and the
    first frame decoded, and a 6-frame video into o.png failed after the whole restore, as "cannot write
    (Invalid argument)". Decided as _open_output decides; what the headers do not say is left to it.
    inp: src opened already (left open), or None: opened here, and closed. pix_fmt: --pix-fmt, or None."""
    import av

    opened = _open_input(src) if inp is None else inp
    try:
        videos = [s for s in opened.streams.video if not is_cover(s)]  # (one at least: _open_input)
        rate = videos[0].average_rate or videos[0].guessed_rate or Fraction(25)
        frames = expected_frames(opened, videos[0], rate)
        if out.format.name == "image2" and frames is not None and frames > 1:
            raise VideoError(
                f"{dst}: holds one picture, but {src} has {counted(frames, 'frame')}; "
                "write a video container (.mp4, .mkv)"
            )
        _check_odd_size(videos[0], vs.codec_context.name, pix_fmt, dst)
        # The streams transcode copies, added as _open_output adds them (subtitles converted or dropped,
        # a cover picture where the container keeps one): subtitles and covers were left out, so a
        # subtitle stream the muxer refuses failed only once the model had loaded.
        astreams = list(opened.streams.audio) if audio and dst.suffix.lower() not in SILENT_SUFFIXES else []
        astreams += list(opened.streams.subtitles)
        _add_copied_streams(out, astreams, dst)
        for s in opened.streams.video:
            if is_cover(s) and out.format.name in COVER_FORMATS and s.codec_context.name in COVER_CODECS:
                out.add_stream_from_template(s)
        # The muxer checks its streams as it writes the header (MPEG-PS refuses AAC there, Ogg H.264),
        # which needs the video encoder open: on a small frame, where it opens here at all.
        if not _open_probe_encoder(vs):
            return
        with _ffmpeg_reasons():
            try:
                out.start_encoding()
            except av.FFmpegError as e:
                what = " and ".join(f"{s.codec_context.name} {s.type}" for s in out.streams)
                hint = (
                    "; use .mkv, or --no-audio" if any(s.type == "audio" for s in astreams) else "; use .mkv"
                )
                raise VideoError(f"{dst}: this container cannot hold {what} ({_msg(e)}){hint}") from None
    finally:
        if inp is None:
            opened.close()


def _check_odd_size(vstream, codec: str, pix_fmt: str | None, dst: Path) -> None:
    """A source of odd width or height, in a chroma-subsampled format its encoder refuses at that size
    (x264 and x265 4:2:0 at 65x49), from the stream's header: it was refused only once the model had
    loaded and the first frame decoded. The encoder is opened at the size and at the even size above it,
    with the pixel format _open_output would take: only a refusal of the odd size alone is said here
    (an encoder that does not open here at all is left to the run)."""
    import av

    header = vstream.codec_context
    width, height = header.width, header.height
    if header.format is None or not (width % 2 or height % 2):  # (a pipe's MP4 may say no format)
        return
    supported = {f.name for f in (av.Codec(codec, "w").video_formats or [])}
    y4m = dst.suffix.lower() == ".y4m"
    pix_fmt = pix_fmt or default_pix_fmt(header.format.name, work_format(header.format), supported, y4m)
    if supported and pix_fmt not in supported:  # (check_pix_fmt says so)
        return
    try:
        if chroma_factors(pix_fmt) == (1, 1):
            return
    except ValueError:  # not a pixel format at all (--pix-fmt nosuch): said by _open_output
        return
    refused = _open_refusal(codec, pix_fmt, width, height)
    if refused is not None and _open_refusal(codec, pix_fmt, width + width % 2, height + height % 2) is None:
        raise _cannot_encode(dst, codec, width, height, pix_fmt, refused)


def _open_refusal(codec: str, pix_fmt: str, width: int, height: int) -> str | None:
    """Why a new `codec` encoder does not open at this size and pixel format, or None if it does."""
    import av

    cc = av.CodecContext.create(codec, "w")
    cc.width, cc.height, cc.pix_fmt, cc.time_base = width, height, pix_fmt, Fraction(1, 25)
    try:
        with _ffmpeg_reasons():  # (the reason in the run's words: _open_output opens under it too)
            cc.open()
    except (av.FFmpegError, ValueError) as e:
        return _msg(e)
    finally:
        cc = None  # freed now, while the caller mutes stderr (x265 speaks as it is freed)
    return None


def _open_probe_encoder(vs) -> bool:
    """Open the probe's video encoder on a PROBE_SIZE frame (yuv420p, else its first pixel format);
    False where it does not open here (a GPU encoder without its GPU)."""
    import av

    cc = vs.codec_context
    formats = [f.name for f in (cc.codec.video_formats or [])] or ["yuv420p"]
    cc.width, cc.height = PROBE_SIZE
    cc.pix_fmt = "yuv420p" if "yuv420p" in formats else formats[0]
    cc.time_base = Fraction(1, 25)
    try:
        cc.open()
    except (av.FFmpegError, ValueError):
        return False
    return True


def check_pix_fmt(codec: str, pix_fmt: str | None, dst: Path) -> None:
    """--pix-fmt names a format the encoder takes: one it does not (or no format at all) was refused only
    after the model had loaded and the first frame decoded, in the line _open_output still says."""
    import av

    supported = {f.name for f in (av.Codec(codec, "w").video_formats or [])}
    if pix_fmt is not None and supported and pix_fmt not in supported:
        raise VideoError(
            f"{dst}: {codec} cannot encode pixel format {pix_fmt} (it takes {', '.join(sorted(supported))})"
        )


def check_paths(src, dst, opts: VideoOptions, inp=None) -> tuple[Path, Path | None, Path | None]:
    """The checks of the file names alone (URLs, a missing or taken output, a trace over a video) and of
    the encoder's name, done before the model is loaded: a mistyped command fails at once. Returns
    (src, dst, csv_path).
    inp: src opened already (_open_input), whose streams are checked against the output container; without
    it a file is opened for that, and a pipe (which can be read once only) is not looked at."""
    # A URL taken as a path lost its '//' ("http:/host/a.mp4: no such file"): refused, as a URL, first.
    for name, verb in ((src, "reads"), (dst, "writes")):
        if name is not None and URL.match(str(name)):
            raise VideoError(f"{name}: is a URL; qairn video {verb} local files only")
    # "-", the usual name for standard input, was taken as a file ("-: no such file", once the model
    # had loaded): it is read as /dev/stdin, a pipe (a container that needs no seeking: .mkv, .ts, .y4m).
    src = Path("/dev/stdin") if str(src) == "-" else Path(src)
    if src == Path("/dev/stdin") and os.isatty(0):  # (it waited for a video typed in, silently)
        raise VideoError(
            f"{src}: standard input is a terminal; pipe a video into it (... | qairn video - OUT)"
        )
    dst = Path(dst) if dst is not None else None
    if opts.codec is not None and not opts.score_only:
        check_encoder(opts.codec)
    if not opts.score_only:
        if dst is None:
            raise VideoError("no output file given (use --score-only to write only the quality trace)")
        if str(dst) == "-":  # (it was "-: cannot write this container": the output is renamed into place)
            raise VideoError(
                "-: qairn video cannot write to standard output; give an output file (out.mkv), or see "
                "examples/ffmpeg_pipe.py for raw frames on standard output"
            )
        # The input first: "exists (use --overwrite)" only led to this refusal on the next try.
        if src.exists() and dst.exists() and src.resolve() == dst.resolve():
            raise VideoError(f"{dst}: is the input file; write to another file")
        _check_writable(dst, "output video", opts.overwrite)
        codec = output_codec(dst, opts)
        check_container(
            dst, codec, src if inp is not None or src.is_file() else None, opts.audio, inp, opts.pix_fmt
        )
        check_encoder_options(codec, opts, dst)
        check_pix_fmt(codec, opts.pix_fmt, dst)
    csv_path = None
    if opts.write_quality:
        if str(opts.quality_csv) == "-":  # (it wrote files named - and -.png into the working directory)
            raise VideoError(
                "-: qairn video cannot write the quality trace to standard output; "
                "give --quality-csv a file name"
            )
        beside = src if opts.score_only or dst is None else dst  # --score-only writes no OUT to sit beside
        if beside == src and opts.quality_csv is None:
            # (a pipe's trace went beside it: /dev/stdin.quality.csv, written into /dev as root; so did
            # that of a file redirected in, which /dev/stdin names as a file)
            if src == Path("/dev/stdin"):
                raise VideoError(
                    f"{src}: is standard input, so the trace has no place beside it; give --quality-csv"
                )
            if src.exists() and not src.is_file():
                raise VideoError(
                    f"{src}: is not a file, so the trace has no place beside it; give --quality-csv"
                )
        csv_path = Path(opts.quality_csv or f"{beside}.quality.csv")
        # The trace and plot are written last: one named like the input or the output video
        # (--quality-csv OUT) would replace it, even without --overwrite, as OUT did not exist yet.
        # Said before "exists (use --overwrite)", which only led to this refusal on the next try.
        taken = {src.resolve(): "input video"}
        if not opts.score_only:
            taken[dst.resolve()] = "output video"
        for path in [csv_path] + ([_plot_path(csv_path)] if opts.plot else []):
            if path.resolve() in taken:
                raise VideoError(f"{path}: the quality trace would replace the {taken[path.resolve()]}")
        _check_writable(csv_path, "quality trace", opts.overwrite)
        if opts.plot:
            _check_writable(_plot_path(csv_path), "quality plot", opts.overwrite)
    return src, dst, csv_path


class TranscodeSummary(TypedDict):
    """What transcode() returns (a plain dict at run time)."""

    frames: int
    seconds: float
    fps: float
    matrix: str  # the Y'CbCr matrix and range the frames were read with
    range: str
    bits: int
    written: list[Path]  # the video (none with score_only), the quality trace and its plot
    notes: list[str]  # what was dropped or changed, and damage found in the input
    codec: str | None  # None with score_only
    pix_fmt: str | None
    caveats: int  # frames whose Q says little (flat, or tiny)
    scored_by: ScoredBy  # Restorer.scored_by()
    mean_quality: dict[str, float]  # Q1, Q2, Q3 over the frames without a caveat
    jpeg_clipped: int  # Motion JPEG frames restored within their JPEG's quantization bins


def transcode(
    restorer: Restorer,
    src: str | Path,
    dst: str | Path | None = None,
    opts: VideoOptions | None = None,
    *,
    inp=None,
) -> TranscodeSummary:
    """Restore every frame of `src` into `dst` (or only score it, opts.score_only). Returns a summary.
    inp: src already opened (_open_input), as the CLI opens it before the model loads (a pipe can be read
    once only); it is closed here."""
    try:
        return _transcode(restorer, src, dst, opts, inp)
    except BaseException as e:
        # A caller that keeps the exception (a transcoder logging it later) kept, through the frames of
        # its traceback, the run's decoder and encoder, and their threads: 7 a run, and 6 MB. This
        # module's frames let their locals go (the traceback still says where it failed); the
        # restorer's and the caller's keep theirs.
        _clear_own_frames(e)
        raise


def _clear_own_frames(error: BaseException) -> None:
    """Clear the locals of this module's frames in the traceback of `error` and of the exceptions it
    was raised from or during (an FFmpegError under a VideoError holds the same frames)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_globals is globals():
                try:
                    tb.tb_frame.clear()
                except RuntimeError:  # (still running: transcode's own, which holds nothing)
                    pass
            tb = tb.tb_next
        error = error.__cause__ or error.__context__


def _transcode(restorer, src, dst, opts: VideoOptions | None, inp) -> TranscodeSummary:
    import av

    opts = opts or VideoOptions()
    src, dst, csv_path = check_paths(src, dst, opts, inp)
    inp = _open_input(src) if inp is None else inp
    out = tmp = vstream = frames = None
    _logging_noted()  # PyAV's and FFmpeg's log levels, set back by _logging_back once the input is closed
    try:
        videos = [s for s in inp.streams.video if not is_cover(s)]  # (one at least: _open_input)
        vstream = videos[0]  # not the cover, listed first in some MP4 files
        vstream.thread_type = "AUTO"
        astreams = list(inp.streams.audio) if opts.audio and not opts.score_only else []
        audio_note = video_note = ""
        if len(videos) > 1 and not opts.score_only:  # (a second angle, a picture-in-picture signer)
            video_note = (
                f"{counted(len(videos) - 1, 'more video stream')} dropped: only the first is restored"
            )
        # Data streams (KLV drone metadata, GoPro telemetry) are not copied; a MOV timecode track is
        # kept as the video's timecode tag, from which the muxer writes it again.
        data = [] if opts.score_only else [s for s in inp.streams.data if "timecode" not in s.metadata]
        data_note = f"{counted(len(data), 'data stream')} dropped (telemetry, KLV metadata)" if data else ""
        if astreams and dst.suffix.lower() in SILENT_SUFFIXES:
            audio_note = f"{dst.suffix} holds no audio: {counted(len(astreams), 'audio stream')} dropped"
            astreams = []
        # Subtitles are copied as the audio is (the video's timestamps are kept, so they stay in time).
        astreams += [] if opts.score_only else list(inp.streams.subtitles)
        # (a deque: taken from the front, and long where the audio runs ahead of the video)
        pending_audio: deque = deque()
        lost_cues: list = []  # (time, reason) of the subtitle cues that could not be converted
        pgs_sets: dict = {}  # (see _mux_audio)
        # counts["jpeg"]: a Motion JPEG packet's tables by its time, filled as packets are demuxed
        clipping = opts.jpeg_clip and not opts.score_only and vstream.codec_context.name == "mjpeg"
        counts: dict = {"jpeg": {}} if clipping else {}
        covers = [] if opts.score_only else [s for s in inp.streams.video if is_cover(s)]
        frames = _decode(inp, vstream, astreams + covers, pending_audio, counts)
        first = next(frames, None)
        if (
            first is None
            and "unreadable" in counts
            and not src.is_file()
            and "mov" in inp.format.name.split(",")
        ):
            # (an intact MP4 written the usual way, its index last: its frames are behind a pipe's reader)
            raise VideoError(
                f"{src}: a piped MP4 or MOV needs its index (moov) before its frames, and no frame could be "
                f"read ({counts['unreadable'][1]}); give the file's name instead of a pipe, or remux it with "
                "+faststart"
            )
        if first is None and "unreadable" in counts:
            raise VideoError(
                f"{src}: corrupt or truncated video: no frame could be read ({counts['unreadable'][1]})"
            )
        if first is None and counts["lost"]:  # (it is not empty: "has no frames" said it was)
            raise VideoError(f"{src}: no frame could be decoded: {_lost_packets(counts)}")
        if first is None:
            raise VideoError(f"{src}: the video stream has no frames")
        work_fmt = work_format(first.format)
        bits = format_bits(work_fmt)
        matrix, crange, note = frame_color(first, opts.matrix, opts.range)
        rate = vstream.average_rate or vstream.guessed_rate or Fraction(25)
        tb = vstream.time_base or Fraction(1, 1000)
        out_notes = []
        if not opts.score_only:
            tmp = _temp_path(dst)
            with _ffmpeg_reasons():
                out, vs, amap, codec, pix_fmt, out_notes, out_tb = _open_output(
                    tmp, first, vstream, astreams, opts, work_fmt, (matrix, crange), dst, pending_audio
                )
        from qairn.engine.jpeg import consistent_planes, planes_fit  # (scipy: not before parsing)

        meta: deque = deque()
        clips: deque = deque()  # per frame: (decoded planes, its JPEG's tables) to clip to, or None
        clipped = [0]  # frames clipped
        corrupt, resized = [], []  # resized: the first frame of another size than the first
        dynamic = set()  # "HDR10+", "Dolby Vision": per-frame metadata the output does not get
        last_duration = [0.0]  # of the newest frame decoded: a slideshow's last frame may last seconds

        def planes():
            for i, frame in enumerate(_chain(first, frames)):
                if frame.is_corrupt:
                    corrupt.append(i)
                if (frame.width, frame.height) != (first.width, first.height) and not resized:
                    resized.append(f"frame {i} is {frame.width}x{frame.height}")
                dynamic.update(DYNAMIC_HDR[k] for k in map(side_kind, frame.side_data) if k in DYNAMIC_HDR)
                pts = frame.pts
                t = float(pts * tb) if pts is not None else i / float(rate)
                meta.append((i, pts, t, frame.duration))
                last_duration[0] = float(frame.duration * tb) if frame.duration else 0.0
                jpeg = None
                if "jpeg" in counts and out is not None:
                    jpeg = counts["jpeg"].pop(pts, None)
                    if len(counts["jpeg"]) > 64:  # times no frame took (a frame the decoder refused)
                        for k in [k for k in counts["jpeg"] if pts is None or k < pts]:
                            del counts["jpeg"][k]
                if frame.format.name != work_fmt:
                    frame = _reformat(frame, work_fmt, matrix, crange)
                    jpeg = None  # (its planes are no longer the JPEG's own)
                decoded = frame_planes(frame)
                clips.append((decoded, jpeg) if jpeg is not None else None)
                yield decoded

        timing = _Durations()
        rows, first_tick, moved = [], 0, 0.0  # moved: the most a frame is moved by one tick per frame
        last_pts, unordered = None, []  # unordered: (index, time) of frames dropped for their time
        start = time.perf_counter()
        bar = progress_bar(
            total=expected_frames(inp, vstream, rate),
            unit="frame",
            desc=src.name,
            disable=not opts.progress,
            leave=False,
            dynamic_ncols=True,
        )
        try:
            # --score-only: the quality alone (the network's tail, tile blend and crop skipped)
            stream = restorer.restore_stream(
                planes(), batch=opts.batch, matrix=matrix, range=crange, bits=bits, image=out is not None
            )
            for res in stream:
                i, pts, t, duration = meta.popleft()
                q = res.quality
                rows.append((i, pts, t, q["Q1"], q["Q2"], q["Q3"], res.info["caveat"]))
                clip = clips.popleft()
                if out is not None:
                    image = res.image
                    if clip is not None and planes_fit(image, *clip):
                        image = consistent_planes(image, *clip)
                        clipped[0] += 1
                    frame = planes_frame(image, work_fmt)
                    frame.colorspace, frame.color_range = AV_COLORSPACE[matrix], AV_RANGE[crange]
                    # A stream that changes size (an HLS recording switching bitrates, a TV capture
                    # at an ad break) is restored at each frame's size and scaled to the encoder's.
                    size = (first.width, first.height)
                    if pix_fmt != work_fmt or (frame.width, frame.height) != size:
                        frame = _reformat(frame, pix_fmt, matrix, crange, size)
                    frame.pts, frame.time_base = pts, tb
                    if out_tb != tb:  # Y4M, AVI, MPEG-1/2: one tick per frame (a variable-rate source keeps
                        # every frame). The AVI muxer starts each stream at 0; others keep the copied audio's
                        # times, so the video starts where the source's did.
                        if i == 0 and out.format.name not in CONSTANT_RATE_FORMATS:
                            first_tick = round(t / out_tb)
                        frame.pts, frame.time_base = first_tick + i, out_tb
                        moved = max(moved, abs(t - rows[0][2] - i * float(out_tb)))
                    elif pts is None:
                        frame.pts = round(t / tb)
                    # A time at or before the previous frame's (a damaged variable-rate source): MP4 and MOV
                    # refused it ("cannot write (Invalid argument)"), a player shows one of the two. Dropped,
                    # as ffmpeg drops it.
                    if last_pts is not None and frame.pts <= last_pts:
                        unordered.append((i, t))
                    else:
                        if out_tb == tb and pts is not None:
                            timing.add(pts, duration)
                        last_pts = frame.pts
                        _mux(out, timing.timed(vs.encode(frame)), dst)
                    _mux_audio(out, pending_audio, amap, dst, lost_cues, pgs_sets)
                bar.update(1)
            # The header's count is a guess (an MP4's edit list hides pre-roll frames it counts: 5/8):
            # the bar ends at the frames decoded, redrawn where it was shown at all.
            if bar.total != bar.n:
                bar.total = bar.n
                if getattr(bar, "last_print_n", 0):  # (a disabled bar has none)
                    bar.refresh()
        finally:
            bar.close()
        elapsed = time.perf_counter() - start
        if out is not None:  # the encoder's last frames, and the rest of the audio and subtitles
            _mux(out, timing.timed(vs.encode(None), out.format.name), dst)
            _mux_audio(out, pending_audio, amap, dst, lost_cues, pgs_sets)
        notes = [f"{src}: {n}" for n in (note, *out_notes, audio_note, video_note, data_note) if n]
        if moved and moved > float(out_tb) / 2:  # (nothing moves with --score-only)
            notes.append(
                f"{src}: the frame times vary, and {codec} in {dst.suffix} takes one frame every "
                f"1/{float(1 / out_tb):g} s: frames are moved by up to {moved:.3f} s"
            )
        if unordered:
            i, t = unordered[0]
            notes.append(
                f"{src}: {counted(len(unordered), 'frame')} at or before the previous frame's time dropped "
                f"(first: frame {i} at {t:.3f} s); the quality trace keeps them"
            )
        if resized and out is not None:
            notes.append(
                f"{src}: the frame size changes ({resized[0]}): frames of other sizes are scaled to "
                f"{first.width}x{first.height}, the size of the first"
            )
        if dynamic and out is not None:
            notes.append(
                f"{src}: {' and '.join(sorted(dynamic))} dynamic metadata (scene by scene tone mapping) "
                "cannot be written: dropped; players tone-map the output from its static HDR tags only"
            )
        if corrupt:
            notes.append(
                f"{src}: the decoder flagged {counted(len(corrupt), 'damaged frame')}, first {corrupt[0]}"
            )
        # Packets are compared, so that an edit list's hidden pre-roll is not taken for truncation; the
        # note says the frames decoded (an MP4's index lists packets cut off too: 4 counted, 3 decoded).
        unreadable = counts.get("unreadable")
        short = vstream.frames and counts.get("packets", 0) < vstream.frames
        if unreadable:  # a demux error mid-file: this says where the frames end (not also "truncated?")
            notes.append(
                f"{src}: cannot be read past {unreadable[0]:.3f} s, after {counted(len(rows), 'frame')} "
                f"({unreadable[1]})"
            )
        elif short:
            notes.append(
                f"{src}: the header says {counted(vstream.frames, 'frame')}, {len(rows)} decoded (truncated?)"
            )
        elif not vstream.frames and rows:
            # Matroska, WebM and Y4M keep no frame count: compare where the frames end with how long
            # the header says the video lasts: the stream's duration or its Matroska DURATION tag, else
            # the file's, only when the video is its one stream (audio or subtitles may run on).
            start = float((vstream.start_time or 0) * tb)
            lasts = float(vstream.duration * tb) if vstream.duration else None
            tag = _tag_seconds(vstream.metadata)  # where the stream ends, counted from 0 like the file's
            if lasts is None and tag is not None:
                lasts = tag - start
            if lasts is None and inp.duration and len(inp.streams) == 1:
                lasts = inp.duration / 1e6 - start
            ends = rows[-1][2] - start + max(1 / float(rate), last_duration[0])
            if lasts is not None and ends < lasts - 1.5 / float(rate):
                short = True
                notes.append(
                    f"{src}: the header says {lasts:.3f} s, the frames end at {ends:.3f} s (truncated?)"
                )
        damaged = counts.get("damaged")
        if damaged is not None and not short:  # (a short file's note says it already)
            notes.append(
                f"{src}: corrupt or truncated video near frame {damaged} (a packet cut short or damaged)"
            )
        lost = counts["lost"]
        if lost:
            notes.append(f"{src}: {_lost_packets(counts)}")
        if lost_cues:
            t, reason = lost_cues[0]
            notes.append(
                f"{src}: skipped {counted(len(lost_cues), 'subtitle cue')} that could not be read "
                f"(first at {t:.3f} s: {reason})"
            )
        if opts.strict and (corrupt or short or damaged is not None or lost or lost_cues or unreadable):
            raise VideoError(f"{notes[-1]} (--strict)")
        # The trace is drawn before the video is published (a long one takes seconds): Ctrl-C or an error
        # there left the video written under "interrupted; no output written".
        scorer = restorer.scored_by()
        trace = [] if csv_path is None else _quality_files(rows, csv_path, opts.plot, src.name, scorer)
        if out is not None:
            out.close()
            out = None
            _publish(tmp, dst)
            tmp = None
        written = [dst] if dst is not None and not opts.score_only else []
        for path, data in trace:
            write_atomic(path, data)
            written.append(path)
        return {
            "frames": len(rows),
            "seconds": elapsed,
            "fps": len(rows) / max(elapsed, 1e-9),
            "matrix": matrix,
            "range": crange,
            "bits": bits,
            "written": written,
            "notes": notes,
            "codec": None if opts.score_only else codec,
            "pix_fmt": None if opts.score_only else pix_fmt,
            "caveats": sum(1 for r in rows if r[6]),  # frames whose Q says little (flat, or tiny)
            "jpeg_clipped": clipped[0],
            "scored_by": scorer,  # p, weights, weights_sha256 (Restorer.scored_by)
            "mean_quality": {  # over the frames without a caveat (_judged)
                k: float(np.mean([r[j] for r in _judged(rows)])) for j, k in ((3, "Q1"), (4, "Q2"), (5, "Q3"))
            },
        }
    except av.FFmpegError as e:
        raise VideoError(f"{dst or src}: {_msg(e)}") from None
    finally:

        def close_out():
            try:
                out.close()
            except Exception:  # noqa: BLE001  (closing a half-written container may fail; it is deleted)
                pass

        def remove_tmp():
            tmp.unlink(missing_ok=True)

        _every_step(
            close_out if out is not None else None,
            remove_tmp if tmp is not None else None,
            lambda: _park_decoder(vstream),
            inp.close,
            _logging_back,
            # (held by planes(), which the restorer's frames in a traceback hold)
            frames.close if frames is not None else None,
        )


def _every_step(*steps) -> None:
    """Run each step (None: none) in order, whatever the ones before raised; what was raised goes on
    after (the last, the others as its context). A cleanup's steps: a second Ctrl-C (or SIGTERM)
    during one skipped the rest, leaving the decoder busy (see _park_decoder) and PyAV's logging on
    for good."""
    with ExitStack() as stack:
        for step in reversed(steps):  # (an ExitStack runs its callbacks last in, first out)
            if step is not None:
                stack.callback(step)


def _lost_packets(counts: dict) -> str:
    """What _decode's counts say of the packets the decoder refused (or gave no frame for)."""
    lost = counts["lost"]
    where = "" if lost[0] is None else f" at {lost[0]:.3f} s"
    return (
        f"skipped {counted(len(lost), 'video packet')} the decoder could not decode "
        f"(first{where}: {counts['lost_reason']})"
    )


class _Durations:
    """Give encoded packets their frames' durations. The encoders leave them 0 and the muxer then gives
    the last frame 1/rate: a GIF's or slideshow's last picture, shown for seconds, was cut short (a 0.9 s
    GIF came out 0.62 s long). Durations are by presentation time (pts); MP4 and MOV end a track at its
    last packet in decode order, which with B-frames is not the last shown, so that one gets what is
    left to the end of the last frame shown.
    It also repairs dts from an unset delay: libx265 given fewer frames than its B-frame delay (a 1- or
    2-frame clip) stamps them, in some runs, dts -94611116461776 for pts 0, which the MP4 muxer refuses.
    An encoder's real delay lies within the frames it was given before its first packet."""

    def __init__(self):
        self.durations, self.start, self.last, self.first_dts = {}, None, None, None
        self.dts_shift = None  # added to every dts: 0, or what moves unset ones to start at the first frame

    def add(self, pts: int, duration: int | None) -> None:
        """A frame sent to the encoder at pts, shown for duration (its time base; 0 or None: unknown)."""
        self.start = pts if self.start is None else min(self.start, pts)
        self.last = (pts, duration) if self.last is None or pts >= self.last[0] else self.last
        if duration:
            self.durations[pts] = duration

    def timed(self, packets, flushing_format: str | None = None) -> list:
        for p in packets:
            if p.dts is not None and self.start is not None:
                if self.dts_shift is None:
                    unset = p.dts < self.start - (self.last[0] - self.start) or (
                        p.pts is not None and p.dts > p.pts
                    )
                    self.dts_shift = self.start - p.dts if unset else 0
                p.dts += self.dts_shift
            self.first_dts = p.dts if self.first_dts is None else self.first_dts
            p.duration = self.durations.pop(p.pts, None) or p.duration
        if (
            packets
            and flushing_format in ("mov", "mp4")
            and self.last
            and self.last[1]
            and packets[-1].dts is not None
        ):
            end = self.last[0] + self.last[1]
            packets[-1].duration = max(1, end - self.start - (packets[-1].dts - self.first_dts))
        return packets


def _reformat(frame, fmt: str, matrix: str, crange: str, size: tuple | None = None):
    """Convert pixel formats with swscale, keeping the matrix and range (RGB sources take them on);
    scale to size (width, height) where given."""
    cs, cr = SWS_COLORSPACE[matrix], "JPEG" if crange == "full" else "MPEG"
    src = {} if frame.format.is_rgb else {"src_colorspace": cs, "src_color_range": cr}
    # 4:1:1, 4:4:0 and 4:1:0 are restored as 4:4:4: copying each chroma sample out and taking one back
    # is exact (swscale's default filters blurred the chroma of an unchanged picture by up to 25 codes).
    odd = {chroma_factors(frame.format.name), chroma_factors(fmt)} - {(1, 1), (2, 1), (2, 2)}
    width, height = size or (None, None)
    return frame.reformat(
        width,
        height,
        format=fmt,
        dst_colorspace=cs,
        dst_color_range=cr,
        interpolation="POINT" if odd else None,
        **src,
    )


def _chain(first, rest):
    yield first
    yield from rest


def _mux(out, packets, dst: Path) -> None:
    import av

    try:
        out.mux(packets)
    except av.FFmpegError as e:
        raise VideoError(f"{dst}: cannot write ({_msg(e)})") from None


def _mux_audio(out, pending: deque, amap: dict, dst: Path, lost_cues: list, pgs_sets: dict) -> None:
    """Mux the queued packets of the copied streams, oldest first; lost_cues: see _converted_subtitles;
    pgs_sets: {source index: whether a PGS display set is open} (see _pgs_whole)."""
    while pending:
        packet = pending.popleft()  # (list.pop(0) took 5.3 s for 200k queued packets: quadratic)
        if packet.stream.index not in amap:  # a subtitle stream the container could not take
            continue
        stream = amap[packet.stream.index]
        codec = packet.stream.codec_context.codec
        if stream.codec_context.codec.id != codec.id:  # text subtitles, converted
            _mux(out, _converted_subtitles(packet, stream, lost_cues), dst)
        elif codec.canonical_name == "hdmv_pgs_subtitle" and packet.size:
            whole, pgs_sets[packet.stream.index] = _pgs_whole(
                bytes(packet), pgs_sets.get(packet.stream.index, False)
            )
            if whole:
                packet.stream = stream
                _mux(out, packet, dst)
            else:  # (not muxed: the filter's state is as it was)
                pts = packet.pts if packet.pts is not None else packet.dts
                lost_cues.append(
                    (float(pts * packet.time_base), "a PGS display set without its presentation segment")
                )
        else:
            packet.stream = stream
            _mux(out, packet, dst)


PGS_PRESENTATION, PGS_END = 0x16, 0x80  # the segment types that open and close a display set


def _pgs_whole(data: bytes, open_set: bool) -> tuple[bool, bool]:
    """Read a PGS subtitle packet as FFmpeg's pgs_frame_merge filter does, which the Matroska muxer runs:
    it joins segments into display sets and writes each out with the stream and time of the packet holding
    its presentation segment; a set without one got neither, and went into the video track at 0 s.
    open_set: a set with its presentation segment was left open by the packets before (no end segment).
    Returns (every set this packet closes or leaves open has its presentation segment: it may be muxed,
    open_set after it)."""
    i, n, found = 0, len(data), open_set
    while i < n:
        closed = False
        while i + 3 <= n:
            kind, length = data[i], int.from_bytes(data[i + 1 : i + 3], "big") + 3
            if i + length > n or (kind == PGS_PRESENTATION and (found or length < 11)):
                break
            found, i = found or kind == PGS_PRESENTATION, i + length
            if kind == PGS_END:
                closed = True
                break
        if not closed and i != n:  # a segment cut short, or a second presentation: the rest goes out as is
            closed, i = True, n
        if not found:
            return False, open_set
        found = not closed
    return True, found


# ---- command line ---------------------------------------------------------------------------------------
def _parse_kv(s: str) -> tuple[str, str]:
    k, eq, v = s.partition("=")
    if not eq or not k:  # (=5 was refused later, as "libx264 has no option ''")
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    return k, v


def _whole_number(text: str) -> int | None:
    return int(text) if text.strip().lstrip("+-").isdigit() else None


def _one_or_more(text: str, expected: str) -> int:
    value = _whole_number(text)
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"{expected}, got {text}")
    return value


def _batch_arg(text: str) -> int:
    """--batch, checked before the model loads (restore_stream refused 0 after, naming no option)."""
    return _one_or_more(text, "needs at least 1 frame")


def _crf_arg(text: str) -> float:
    """--crf: a finite number, 0 or more (the top depends on the encoder: 51 for x264, 63 for VP9, checked
    by check_encoder_options). -3 and nan reached the encoder, which refused them after the model loaded."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number, 0 or more, got {text}")
    return value


def _bitrate_arg(text: str) -> int:
    """--bitrate, bits per second: 0 fell back to --crf without a word, and -5 reached the encoder."""
    return _one_or_more(text, "expected bits per second, 1 or more (e.g. 2000000)")


def _value_arg(text: str) -> str:
    """--codec, --preset, --pix-fmt: '' (an unset shell variable) was taken as not given (--preset) or
    refused naming a blank (--codec , --pix-fmt)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty value; give one or leave it out")
    return text


def build_parser() -> argparse.ArgumentParser:
    from qairn.engine.cli import export_file_args  # restore's and score's --onnx and --engine

    p = argparse.ArgumentParser(
        prog="qairn video",
        description=__doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "input",
        type=path_arg,
        help="video file (anything FFmpeg reads; a local file, not a URL); - or /dev/stdin: a pipe",
    )
    p.add_argument(
        "output",
        nargs="?",
        type=path_arg,
        help="output video file (.mp4, .mkv, .mov, ...; not standard output, -); "
        "none with --score-only (ignored, with a warning)",
    )
    m = p.add_argument_group("model")
    m.add_argument("--weights", help="qairn weights (default: the shipped weights)")
    m.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    m.add_argument(
        "--backend",
        default="auto",
        help="auto (default: eager on CPU, triton on CUDA), eager, compile, triton, onnxruntime, tensorrt",
    )
    m.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "fp16", "bf16"),
        help="auto (default): fp32 on CPU, fp16 on CUDA",
    )
    export_file_args(m)
    m.add_argument(
        "--tile", type=tile_arg, default="auto", help="tile size in pixels, 0: whole frames, auto (default)"
    )
    m.add_argument(
        "--overlap",
        type=overlap_arg,
        help="tile overlap in pixels (default 32; 0 for a tile under 48; a static export's own tile: a "
        "quarter of it in steps of 16, up to 32)",
    )
    m.add_argument("--batch", type=_batch_arg, default=4, help="frames per batch (default 4)")
    from qairn.engine.cli import ensemble_arg

    ensemble_arg(m)
    m.add_argument(
        "--fused-conv",
        action="store_true",
        help="thin convs on the fused Triton kernels (CUDA; elsewhere the plain convs, with a warning)",
    )
    m.add_argument(
        "--cuda-graph",
        action="store_true",
        help="one CUDA graph per batch shape, captured once, replayed (CUDA; eager/triton/compile; "
        "elsewhere none, with a warning)",
    )
    e = p.add_argument_group("encoding")
    e.add_argument(
        "--codec",
        type=_value_arg,
        help=f"video encoder (default: the first of {', '.join(DEFAULT_CODECS)} available; "
        ".y4m: rawvideo, .gif: gif, .webm and .ivf: libvpx-vp9, .ogv: libtheora)",
    )
    e.add_argument(
        "--crf",
        type=_crf_arg,
        help="constant quality (default 18; not with --bitrate): CRF for x264/x265 (0-51), VP8/VP9/AV1 "
        "(0-63), a fixed quantiser crf/6 for MPEG-1/2/4 and MJPEG",
    )
    e.add_argument(
        "--preset",
        type=_value_arg,
        help="the encoder's speed preset (x264/x265: ultrafast .. placebo, default medium; SVT-AV1: 0-13)",
    )
    e.add_argument("--bitrate", type=_bitrate_arg, help="target bits per second (instead of --crf)")
    e.add_argument(
        "--pix-fmt",
        type=_value_arg,
        help="output pixel format (default: the source's, when the encoder takes it)",
    )
    e.add_argument(
        "--codec-option",
        type=_parse_kv,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other encoder option (repeatable)",
    )
    e.add_argument("--no-audio", action="store_true", help="drop the audio instead of copying it")
    c = p.add_argument_group("colour (default: from the stream's tags)")
    c.add_argument(
        "--matrix",
        choices=("bt601", "bt709", "bt2020"),
        help="Y'CbCr matrix of the frames (untagged: bt709 from 720 lines, else bt601)",
    )
    c.add_argument(
        "--range",
        choices=("limited", "full"),
        help="limited (16-235) or full (0-255) levels (untagged: limited; yuvj and gray formats full)",
    )
    q = p.add_argument_group("quality trace")
    q.add_argument("--score-only", action="store_true", help="write the quality trace, no video")
    q.add_argument(
        "--quality-csv",
        type=path_arg,
        help="CSV path (default OUT.quality.csv, or IN.quality.csv with --score-only)",
    )
    q.add_argument("--no-quality", action="store_true", help="write no quality trace")
    p.add_argument(
        "--no-jpeg-clip",
        action="store_true",
        help="Motion JPEG input: write the network's frames as they are; by default each is clipped to its "
        "JPEG's quantization bins, as `qairn restore` does to a JPEG file",
    )
    q.add_argument("--no-plot", action="store_true", help="no PNG plot of Q2 beside the CSV")
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail (writing nothing) when the input is damaged: frames the decoder flags, packets the "
        "demuxer flags as cut short or damaged, a file the demuxer cannot read past some point (the frames "
        "before it are kept), packets the decoder refuses (skipped), subtitle cues that "
        "cannot be read for conversion (skipped), or fewer frames (or, where it keeps no count, less "
        "time) than the header says; by default these are warnings",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output video and trace")
    add_quiet(p)
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Before the model loads, as restore and score do; said as they say theirs (fatal: exit 2, a usage
    # error; error: a failed run's line; warning).
    from qairn.engine.cli import SetupError, backend_problem, check_tile_options, error, fatal, warning

    check_tile_options(parser, args)
    problem = backend_problem(args)
    if problem:
        return fatal(problem)
    if args.crf is not None and args.bitrate is not None:  # the bitrate won, and the --crf went unsaid
        parser.error("--crf and --bitrate: give one (--crf a constant quality, --bitrate a rate)")
    opts = VideoOptions(
        codec=args.codec,
        crf=VideoOptions.crf if args.crf is None else args.crf,
        preset=args.preset,
        bitrate=args.bitrate,
        pix_fmt=args.pix_fmt,
        codec_options=dict(args.codec_option),
        audio=not args.no_audio,
        batch=args.batch,
        score_only=args.score_only,
        quality_csv=args.quality_csv,
        write_quality=not args.no_quality,
        jpeg_clip=not args.no_jpeg_clip,
        plot=not args.no_plot,
        matrix=args.matrix,
        range=args.range,
        progress=not args.quiet,
        strict=args.strict,
        overwrite=args.overwrite,
    )
    if args.score_only and args.no_quality:
        return fatal("--score-only with --no-quality has nothing to write")
    if args.quality_csv is not None and args.no_quality:  # (it was ignored without a word)
        return fatal("--quality-csv with --no-quality: no trace is written")
    if args.score_only and args.output is not None:  # (taken for the video, or the trace's place)
        trace = args.quality_csv or f"{args.input}.quality.csv"
        warning(f"--score-only writes no video: {args.output} is ignored (the trace: {trace})")
    # SVT-AV1 printed some 20 lines of banner and settings on every run (x265 is given log-level=error).
    # It reads its level from the environment once, as the process first opens it: errors only, unless
    # the user set one.
    os.environ.setdefault("SVT_LOG", "1")
    try:
        import av  # noqa: F401
    except ImportError:  # 2, as every qairn command's missing optional package: the user's to install
        return fatal("`qairn video` needs PyAV: pip install 'qairn[video]'")
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    opened = None
    try:
        from qairn.engine.cli import make_restorer  # the same model options as restore and score

        try:
            # Before the model loads (transcode checks again).
            src, dst, _ = check_paths(args.input, args.output, opts)
            # The input is opened before the model loads and the run reads that: a pipe (which can be read
            # once only, so no check had looked at it) that is empty or carries no video, and a missing
            # file, failed only after the model had loaded.
            opened = _open_input(src)
            if not src.is_file():  # a pipe's streams against the output container (AAC into .mpg), from it
                check_paths(src, dst, opts, opened)
        except (VideoError, ValueError, RuntimeError, OSError) as e:
            # Refused before the model loads and before a frame is decoded, nothing written: 2, as restore's
            # refusals (it was 1, the code of a run that failed halfway).
            return fatal(_msg(e))
        restorer = make_restorer(args)
        summary = transcode(restorer, args.input, args.output, opts, inp=opened)
    except KeyboardInterrupt:
        print("qairn: interrupted; no output written", file=sys.stderr)
        return 130
    except SetupError as e:  # 2, as restore's: bad weights, device, backend
        return fatal(str(e))
    except (VideoError, ValueError, RuntimeError, OSError) as e:
        error(_msg(e))  # (with QAIRN_DEBUG=1 its traceback, as for images)
        return 1
    finally:
        if opened is not None:  # (closed by transcode where it ran; closing again does nothing)
            opened.close()
        if main_thread:
            signal.signal(signal.SIGTERM, old)
    for n in summary["notes"]:
        warning(n)
    if not args.quiet:
        mq, caveats = summary["mean_quality"], summary["caveats"]
        said = f"{counted(caveats, 'frame')} with a caveat left out"
        if caveats == summary["frames"]:
            said = "every frame has a caveat"
        said = f" ({said}: its Q says little, see the trace's caveat column)"
        print(
            f"qairn: {counted(summary['frames'], 'frame')} at {summary['fps']:.2f} fps "
            f"({summary['matrix']}, {summary['range']} range, {summary['bits']}-bit); mean Q1/Q2/Q3 "
            f"{mq['Q1']:.3f}/{mq['Q2']:.3f}/{mq['Q3']:.3f}{said if caveats else ''}; "
            f"wrote {', '.join(map(str, summary['written']))}",
            file=sys.stderr,
        )
    return 0
