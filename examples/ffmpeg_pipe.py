"""Restore video with your own FFmpeg: raw yuv420p frames in on stdin, restored frames out on stdout.

As a filter between two FFmpeg processes (W x H and the frame rate must be those of the input):

    ffmpeg -i in.mp4 -f rawvideo -pix_fmt yuv420p - \\
      | python examples/ffmpeg_pipe.py --size 1280x720 > restored.yuv
    ffmpeg -f rawvideo -pix_fmt yuv420p -s 1280x720 -r 30000/1001 -i - ...   (or pipe straight into it)

Or let this script run both FFmpeg processes (size and rate from ffprobe or PyAV, audio copied):

    python examples/ffmpeg_pipe.py in.mp4 out.mp4 [--crf 18] [--overwrite]

--weights W.safetensors picks other weights than the shipped ones.

Raw frames carry no colour tags: --matrix/--range (default bt709, limited) say how to read them; the
output is tagged with the same. The output is written under a temporary name and renamed when FFmpeg
has finished (the --trace CSV when the last frame is restored), so a failed or interrupted run leaves
no partial file; an existing output (or --trace file) is kept unless --overwrite. `qairn video` does
all of this in-process with PyAV (and keeps timestamps and colour metadata); this is for pipelines
built on FFmpeg.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

import qairn
from qairn.engine.imageio import write_atomic

FFMPEG_COLORSPACE = {"bt601": "smpte170m", "bt709": "bt709", "bt2020": "bt2020nc"}


def read_frames(stream, width: int, height: int):
    """Yield (y, u, v) uint8 planes of raw yuv420p frames read from a binary stream."""
    cw, ch = -(-width // 2), -(-height // 2)
    size = width * height + 2 * cw * ch
    while True:
        buf = stream.read(size)
        if not buf:
            return
        while len(buf) < size:  # pipes may return short reads
            more = stream.read(size - len(buf))
            if not more:
                raise ValueError(f"input ended inside a frame ({len(buf)} of {size} bytes): wrong --size?")
            buf += more
        a = np.frombuffer(buf, np.uint8)
        y = a[: width * height].reshape(height, width)
        u = a[width * height : width * height + cw * ch].reshape(ch, cw)
        v = a[width * height + cw * ch :].reshape(ch, cw)
        yield y, u, v


def filter_raw(
    restorer,
    src,
    dst,
    width: int,
    height: int,
    batch: int = 4,
    matrix: str = "bt709",
    range: str = "limited",
    trace=None,
) -> int:
    """Restore raw yuv420p frames from `src` into `dst` (binary streams); optional CSV trace of Q1..Q3."""
    writer = csv.writer(trace, lineterminator="\n") if trace is not None else None
    if writer:
        writer.writerow(["frame", "Q1", "Q2", "Q3"])
    n = 0
    frames = read_frames(src, width, height)
    for n, res in enumerate(restorer.restore_stream(frames, batch=batch, matrix=matrix, range=range), 1):
        for plane in res.image:
            dst.write(np.ascontiguousarray(plane).tobytes())
        if writer:
            writer.writerow([n - 1, *(f"{res.quality[k]:.6f}" for k in ("Q1", "Q2", "Q3"))])
    dst.flush()
    return n


def upright(width: int, height: int, rotation) -> tuple[int, int]:
    """The size FFmpeg decodes frames to: it turns them upright (autorotate), so a phone video stored
    sideways, shown turned 90 degrees, comes out height x width."""
    return (height, width) if round(abs(float(rotation or 0))) % 180 == 90 else (width, height)


def probe(path: str) -> tuple[int, int, str]:
    """(width, height, frame rate) of the first video stream as FFmpeg decodes it (turned upright), by
    ffprobe or else PyAV."""
    if shutil.which("ffprobe"):
        out = subprocess.run(
            [
                "ffprobe",
                "-v",
                "error",
                "-select_streams",
                "v:0",
                "-show_entries",
                "stream=width,height,avg_frame_rate:stream_side_data=rotation:stream_tags=rotate",
                "-of",
                "json",
                path,
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:  # a file that is not a video: CalledProcessError's traceback hid why
            why = (out.stderr.strip().splitlines() or ["ffprobe failed"])[-1]
            raise SystemExit(why if path in why else f"{path}: {why}")  # ffprobe names the file itself
        streams = json.loads(out.stdout).get("streams") or []
        if not streams:  # an audio-only file: IndexError's traceback
            raise SystemExit(f"{path}: no video stream")
        s = streams[0]
        # the display matrix's rotation (FFmpeg 5 on), else the older 'rotate' tag
        turns = [d["rotation"] for d in s.get("side_data_list", []) if "rotation" in d]
        rotation = turns[0] if turns else s.get("tags", {}).get("rotate")
        return *upright(int(s["width"]), int(s["height"]), rotation), s["avg_frame_rate"]
    import av  # qairn[video]

    try:
        c = av.open(path)
    except av.error.FFmpegError as e:  # a file that is not a video: InvalidDataError's traceback
        raise SystemExit(f"{path}: {e.strerror}") from None
    with c:
        if not c.streams.video:
            raise SystemExit(f"{path}: no video stream")
        v = c.streams.video[0]
        rate = v.average_rate or v.guessed_rate or Fraction(25)
        try:
            first = next(c.decode(v), None)
        except av.error.FFmpegError:  # (a damaged first frame: FFmpeg says so when it decodes)
            first = None
        rotation = getattr(first, "rotation", 0)  # (not in older PyAV)
        size = upright(v.codec_context.width, v.codec_context.height, rotation)
        return *size, f"{rate.numerator}/{rate.denominator}"


def run_ffmpeg(
    restorer,
    src: str,
    dst: str,
    width: int,
    height: int,
    rate: str,
    crf: float = 18,
    codec: str = "libx264",
    batch: int = 4,
    matrix: str = "bt709",
    range: str = "limited",
    ffmpeg: str = "ffmpeg",
) -> int:
    """Decode `src` with one FFmpeg, restore, encode into `dst` with another (audio copied)."""
    dst_path = Path(dst)
    if shutil.which(ffmpeg) is None:  # before the temp file: nothing to clean up
        raise SystemExit(f"{ffmpeg}: not found on PATH (install FFmpeg)")
    fd, tmp = tempfile.mkstemp(
        prefix=f".{dst_path.stem}.", suffix=f".part{dst_path.suffix}", dir=dst_path.parent
    )
    os.close(fd)
    tags = ["-colorspace", FFMPEG_COLORSPACE[matrix], "-color_range", "tv" if range == "limited" else "pc"]
    dec_cmd = [
        ffmpeg,
        "-v",
        "error",
        "-nostdin",
        "-i",
        src,
        "-map",
        "0:v:0",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "yuv420p",
        "-",
    ]
    enc_cmd = [
        ffmpeg,
        "-v",
        "error",
        "-y",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "yuv420p",
        "-s",
        f"{width}x{height}",
        "-r",
        rate,
        *tags,
        "-i",
        "-",
        "-i",
        src,
        "-map",
        "0:v",
        "-map",
        "1:a?",
        "-c:a",
        "copy",
        "-c:v",
        codec,
        *(["-crf", f"{crf:g}"] if codec == "libx264" else []),
        *tags,
        tmp,
    ]
    dec = enc = None
    try:  # started inside: a failed start still removes the temp file and stops the other process
        dec = subprocess.Popen(dec_cmd, stdout=subprocess.PIPE)
        enc = subprocess.Popen(enc_cmd, stdin=subprocess.PIPE)
        try:
            n = filter_raw(restorer, dec.stdout, enc.stdin, width, height, batch, matrix, range)
            enc.stdin.close()
        except BrokenPipeError:  # the encoder quit early (its message is above): a traceback said so
            dec.kill()  # it may be blocked writing frames no one reads any more
            raise RuntimeError(f"ffmpeg failed (decoder stopped, encoder exit {enc.wait()})") from None
        if (dec.wait(), enc.wait()) != (0, 0):  # both: `or` left the encoder's exit None in the message
            raise RuntimeError(
                f"ffmpeg failed (decoder exit {dec.returncode}, encoder exit {enc.returncode})"
            )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600 and FFmpeg wrote into it as it was
        os.replace(tmp, dst)
        return n
    finally:
        for p in (dec, enc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        if os.path.exists(tmp):
            os.unlink(tmp)


def size_arg(text: str) -> tuple[int, int]:
    """--size WxH: two positive whole numbers ('1280x720'), else argparse's one-line refusal."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or 0 in (w := int(m[1]), h := int(m[2])):
        raise argparse.ArgumentTypeError(f"{text!r}: give width x height in pixels, e.g. 1280x720")
    return w, h


def main(argv=None) -> int:
    """The command line. kill or a container stopping (SIGTERM) ends the run as Ctrl-C does: its
    default killed Python outright, leaving the temp .part file and both FFmpeg processes behind."""
    old_term = signal.signal(signal.SIGTERM, interrupt)
    try:
        return run(argv)
    except KeyboardInterrupt:  # the temp file is gone and FFmpeg stopped: one line, not a traceback
        print("ffmpeg_pipe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # filter mode: the FFmpeg reading stdout quit (its message is above)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush would fail again
        print("ffmpeg_pipe: the reader of stdout quit; stopped", file=sys.stderr)
        return 141
    finally:
        signal.signal(signal.SIGTERM, old_term)


def interrupt(signum, frame):
    raise KeyboardInterrupt


def run(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", nargs="?", help="video file (omit to filter raw frames from stdin to stdout)")
    p.add_argument("output", nargs="?", help="video file to write (kept if it exists, unless --overwrite)")
    p.add_argument("--size", type=size_arg, help="WxH of the raw frames (default: probed from INPUT)")
    p.add_argument("--fps", help="frame rate, e.g. 30000/1001 (default: probed from INPUT)")
    p.add_argument("--weights", help="qairn safetensors weights (default: the shipped weights)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--batch", type=int, default=4, help="frames restored together (default: 4)")
    p.add_argument(
        "--matrix",
        default="bt709",
        choices=sorted(FFMPEG_COLORSPACE),
        help="YUV matrix of the frames (default: bt709)",
    )
    p.add_argument(
        "--range",
        default="limited",
        choices=("limited", "full"),
        help="YUV range, limited = 16..235 (default: limited)",
    )
    p.add_argument("--crf", type=float, default=18, help="libx264 quality, lower is better (default: 18)")
    p.add_argument("--trace", help="write a CSV of Q1..Q3 per frame (filter mode)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT or --trace file")
    a = p.parse_args(argv)
    # Mistakes in the command line are said before the model is loaded (seconds), not after.
    if a.input is None and not a.size:
        p.error("--size WxH is needed when filtering stdin")
    if a.input is None and sys.stdout.isatty():  # binary frames: megabytes of garbage on the screen
        p.error("filter mode writes raw frames to stdout: redirect it to a file or pipe it into ffmpeg")
    if a.input is not None and a.output is None:
        p.error("give INPUT and OUTPUT, or neither (filter mode)")
    src = Path(a.input or "")
    # URLs and protocols (rtsp://, concat:a|b, file:x) go to FFmpeg as they are. A pipe (pipe:0, a
    # named pipe, /dev/stdin) cannot: it is read three times (probe, frames, audio), and the encoder
    # took pipe:0 for its own stdin, the raw frames.
    if a.input is not None and (a.input.startswith("pipe:") or src.exists() and not src.is_file()):
        why = "is a directory" if src.is_dir() else "is a pipe, which would be read three times"
        raise SystemExit(f"{a.input}: {why}; give a video file")
    if a.input is not None and not re.match(r"^[a-z0-9+]{2,}:", a.input) and not src.exists():
        raise SystemExit(f"{a.input}: no such file")
    if a.input is not None and a.trace:  # it was ignored: the run ended with no CSV and no word
        p.error("--trace works in filter mode only (no INPUT, OUTPUT); `qairn video` writes a trace")
    if a.input is not None and a.output is not None and Path(a.output).resolve() == Path(a.input).resolve():
        # checked before any work: the finished temp file was renamed over the video being read
        raise SystemExit(f"{a.output}: would replace the input video; give another output name")
    for out in filter(None, (a.output, a.trace)):  # checked before any work, as `qairn restore` does
        if not Path(out).absolute().parent.is_dir():  # mkstemp's (open's) traceback
            raise SystemExit(f"{out}: output folder does not exist")
        if not os.access(Path(out).absolute().parent, os.W_OK | os.X_OK):  # a PermissionError's traceback
            raise SystemExit(f"{out}: output folder is not writable")
        if Path(out).is_dir():  # the final rename failed with a traceback
            raise SystemExit(f"{out}: is a directory; give a file name")
        if Path(out).exists() and not a.overwrite:  # it was replaced without a word
            raise SystemExit(f"{out}: output exists (use --overwrite)")
    try:
        restorer = qairn.Restorer(a.weights, device=a.device)
    except (OSError, ValueError) as e:  # no such weights file, no CUDA here: a traceback said so
        raise SystemExit(str(e).splitlines()[0]) from None
    if a.input is None:
        w, h = a.size
        # The trace is kept in memory and written when the run ends: a wrong --size or Ctrl-C left it cut
        # short (replacing the previous one with --overwrite).
        trace = io.StringIO() if a.trace else None
        try:
            n = filter_raw(
                restorer, sys.stdin.buffer, sys.stdout.buffer, w, h, a.batch, a.matrix, a.range, trace
            )
        except ValueError as e:  # a last frame cut short (a wrong --size): one line, as with INPUT OUTPUT
            raise SystemExit(f"stdin: {e}") from None
        if trace is not None:
            write_atomic(a.trace, trace.getvalue().encode())
        print(f"restored {n} frames", file=sys.stderr)
        return 0
    w, h, rate = probe(a.input)
    if a.size:
        w, h = a.size
    args = (a.fps or rate, a.crf)
    try:  # FFmpeg's own message is above; then one line, not a traceback
        n = run_ffmpeg(
            restorer, a.input, a.output, w, h, *args, batch=a.batch, matrix=a.matrix, range=a.range
        )
    except (RuntimeError, ValueError) as e:  # an FFmpeg exit code, a last frame cut short
        raise SystemExit(f"{a.input}: {e}") from None
    print(f"restored {n} frames into {a.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
