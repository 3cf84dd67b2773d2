import json
import os
import re
import shutil
import struct
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from qairn.cli import main
from qairn.engine.imageio import ImageError, encode_image, read_image
from qairn.engine.jpeg import consistent, read_jpeg


@pytest.fixture
def workdir(tmp_path, live1_image):
    bgr = np.ascontiguousarray(live1_image[:96, :128, ::-1])
    cv2.imwrite(str(tmp_path / "a.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 10])
    cv2.imwrite(str(tmp_path / "b.png"), bgr)
    return tmp_path


def run(capsys, *args):
    rc = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return rc, out, err


def error_lines(err):
    return [ln for ln in err.splitlines() if "qairn: error:" in ln]


def leftovers(folder):
    return [p.name for p in folder.rglob("*") if p.name.endswith(".part") or p.name.startswith(".")]


def test_restore_directory_with_json_and_quality_map(workdir, tiny_weights, capsys):
    out = workdir / "out"
    rc, _, err = run(
        capsys,
        "restore",
        workdir,
        "-o",
        out,
        "--weights",
        tiny_weights,
        "--quality-map",
        "--json",
        workdir / "q.json",
        "--tile",
        64,
        "--overlap",
        16,
    )
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a.quality.png", "b.png", "b.quality.png"]
    restored = cv2.imread(str(out / "a.png"))
    assert restored.shape == (96, 128, 3)
    heat = cv2.imread(str(out / "a.quality.png"))
    assert heat.shape[0] > 96 and heat.shape[1] > 2 * 128  # two panels with colour bars, titles above
    records = json.loads((workdir / "q.json").read_text())
    assert [r["path"].endswith(("a.jpg", "b.png")) for r in records] == [True, True]
    assert all(0 <= r[k] <= 1 for r in records for k in ("Q1", "Q2", "Q3"))
    assert err.strip().splitlines()[-1] == f"qairn: restored 2 of 2 images into {out}"


def test_a_rerun_into_the_same_folder_skips_heat_maps_and_hidden_files(workdir, tiny_weights, capsys):
    # Restoring a folder into itself twice restored its heat maps (a.quality.quality.png), and a macOS
    # ._a.jpg (AppleDouble, not an image) failed the run (exit 1).
    (workdir / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    for _ in range(2):
        images = [p for p in workdir.iterdir() if p.suffix in (".png", ".jpg") and not p.name.startswith(".")]
        inputs = [p for p in images if not p.name.endswith(".quality.png")]
        args = [workdir, "-o", workdir, "--weights", tiny_weights, "--quality-map", "--overwrite"]
        rc, _, err = run(capsys, "restore", *args)
        assert rc == 0, err
        assert f"restored {len(inputs)} of {len(inputs)} images" in err.strip().splitlines()[-1]
    names = sorted(p.name for p in workdir.iterdir())
    assert not [n for n in names if ".quality.quality" in n], names


def test_json_file_paths_are_absolute(workdir, tiny_weights, capsys, monkeypatch):
    # Relative inputs were recorded as given ('a.jpg', 'out/a.png'): meaningless to whoever reads
    # scores/q.json later from another folder.
    monkeypatch.chdir(workdir)
    (workdir / "scores").mkdir()
    args = ("restore", "a.jpg", "-o", "out", "--json", "scores/q.json", "--weights", tiny_weights)
    rc, _, err = run(capsys, *args)
    assert rc == 0, err
    [record] = json.loads((workdir / "scores" / "q.json").read_text())
    assert record["path"] == str(workdir / "a.jpg") and record["output"] == str(workdir / "out" / "a.png")


def test_json_dash_goes_to_stdout(workdir, tiny_weights, capsys, monkeypatch):
    monkeypatch.chdir(workdir)  # `--json -` wrote a file named '-' here and nothing to stdout
    rc, out, err = run(capsys, "restore", "a.jpg", "-o", "out", "--json", "-", "--weights", tiny_weights)
    assert rc == 0, err
    assert not (workdir / "-").exists()
    [record] = json.loads(out)
    assert record["path"] == str(workdir / "a.jpg") and record["output"] == str(workdir / "out" / "a.png")


def test_restore_single_file_and_glob(workdir, tiny_weights, capsys):
    rc, _, err = run(
        capsys, "restore", workdir / "a.jpg", "-o", workdir / "single.webp", "--weights", tiny_weights
    )
    assert rc == 0, err
    assert (workdir / "single.webp").exists()
    last = err.strip().splitlines()[-1]  # the picture's quality, without asking for --json
    assert last.startswith(f"qairn: restored {workdir / 'a.jpg'} -> {workdir / 'single.webp'} (Q1 0.")
    assert ", Q2 0." in last and ", Q3 0." in last
    rc, _, err = run(
        capsys, "restore", str(workdir / "*.jpg"), "-o", workdir / "g/", "--weights", tiny_weights
    )
    assert rc == 0, err
    assert [p.name for p in (workdir / "g").iterdir()] == ["a.png"]


def test_a_dark_16_bit_file_is_not_taken_for_10_bit_samples(workdir, tiny_weights, capsys, recwarn):
    """The Restorer warns that uint16 pixels all under 1024 may be 10-bit samples given without bits=10;
    a 16-bit PNG is 16-bit however dark, so restore and score read it as such, without that warning."""
    dark = np.random.default_rng(0).integers(0, 1000, (24, 24, 3), dtype=np.uint16)
    cv2.imwrite(str(workdir / "dark16.png"), dark)
    for command in (
        ["restore", workdir / "dark16.png", "-o", workdir / "out.png"],
        ["score", workdir / "dark16.png"],
    ):
        rc, _, err = run(capsys, *command, "--weights", tiny_weights)
        assert rc == 0, err
    assert not [w for w in recwarn if "under 1024" in str(w.message)]


def test_same_names_get_distinct_outputs_and_repeats_run_once(workdir, tiny_weights, capsys):
    # Same stem in one folder (a.jpg, a.png), the same name in two folders, and a.jpg named twice
    # (by its path and by a glob): every input gets its own output and none is restored twice.
    bgr = cv2.imread(str(workdir / "b.png"))
    for d in ("x/img", "y/img"):
        (workdir / d).mkdir(parents=True)
        cv2.imwrite(str(workdir / d / "a.png"), bgr)
    cv2.imwrite(str(workdir / "a.png"), bgr)
    inputs = [workdir / "a.jpg", workdir / "a.png", workdir / "x/img/a.png", workdir / "y/img/a.png"]
    rc, _, err = run(
        capsys, "restore", *inputs, str(workdir / "*.jpg"), "-o", workdir / "out", "--weights", tiny_weights
    )
    assert rc == 0, err
    names = sorted(p.name for p in (workdir / "out").iterdir())
    assert names == ["a_jpg.png", "a_png.png", "x_img_a.png", "y_img_a.png"]
    assert err.strip().splitlines()[-1] == f"qairn: restored 4 of 4 images into {workdir / 'out'}"


def test_names_that_differ_only_in_case_get_distinct_outputs(workdir, tiny_weights, capsys):
    # A.jpg and a.png went to out/A.png and out/a.png: one file on macOS and Windows, so the second
    # was refused ('output exists') or, with --overwrite, replaced the first.
    (workdir / "A.jpg").write_bytes((workdir / "a.jpg").read_bytes())
    (workdir / "a.jpg").unlink()
    bgr = cv2.imread(str(workdir / "b.png"))
    cv2.imwrite(str(workdir / "a.png"), bgr)
    (workdir / "c").mkdir()
    cv2.imwrite(str(workdir / "c" / "B.png"), bgr)
    rc, _, err = run(
        capsys, "restore", workdir, workdir / "c", "-o", workdir / "out", "--weights", tiny_weights
    )
    assert rc == 0, err
    names = sorted(p.name for p in (workdir / "out").iterdir())
    assert len({n.casefold() for n in names}) == 4, names
    assert names == ["A_jpg.png", "a_png.png", "b.png", "c_B.png"]


def test_fused_conv_flag_same_picture_and_clear_refusal(workdir, tiny_weights, capsys):
    pytest.importorskip("triton", reason="the fused conv backend needs triton")
    outs = []
    for extra in ([], ["--fused-conv"]):
        out = workdir / f"fused{len(extra)}.png"
        rc, _, err = run(capsys, "restore", workdir / "a.jpg", "-o", out, "--weights", tiny_weights, *extra)
        assert rc == 0, err
        outs.append(cv2.imread(str(out)))
    assert np.array_equal(outs[0], outs[1])  # off CUDA the fused ops run their plain-torch reference
    rc, _, err = run(
        capsys, "restore", workdir / "a.jpg", "-o", workdir / "x.png", "--weights", tiny_weights,
        "--backend", "onnxruntime", "--fused-conv",
    )  # fmt: skip
    assert rc != 0 and "fused_conv runs on the torch backends" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["score", "restore", "video"])
def test_fused_conv_off_cuda_says_the_plain_convs_run(command, tmp_path, monkeypatch, capsys):
    """--fused-conv (its help: CUDA) ran on the CPU without a word, on the plain convs: now one warning,
    before the model loads; no warning where the flag is refused anyway (onnxruntime)."""
    import qairn.engine.restorer as restorer_mod

    def restorer(**options):  # stands in for the model: the run ends here, with an error line
        raise RuntimeError("stand-in Restorer")

    monkeypatch.setattr(restorer_mod, "Restorer", restorer)
    sample = Path(__file__).resolve().parents[1] / "examples" / "sample_q10.jpg"
    out = ["-o", str(tmp_path / "o.png")] if command == "restore" else []
    if command == "video":
        out = [str(tmp_path / "o.mp4")]
    for backend, warned in (("auto", 1), ("eager", 1), ("onnxruntime", 0)):
        args = [command, sample, *out, "--device", "cpu", "--fused-conv", "--backend", backend]
        rc, _, err = run(capsys, *args)
        said = [ln for ln in err.splitlines() if "warning: --fused-conv" in ln]
        assert rc != 0 and "stand-in Restorer" in err, err
        assert len(said) == warned, err
    rc, _, err = run(capsys, command, sample, *out, "--device", "cpu", "--fused-conv")
    assert "--fused-conv: the fused Triton convs run on CUDA only; on cpu the plain convs run" in err, err


def test_one_output_file_taken_is_refused_before_the_model_loads(workdir, capsys, monkeypatch):
    """a.jpg -o o.png with o.png there (or its quality map, or o.png the input) loaded the model first,
    then failed the image: exit 1, 'restored 0 of 1 image'. Known up front: exit 2, the model unloaded."""

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("qairn.engine.restorer.Restorer", loaded)
    (workdir / "o.png").write_bytes(b"kept")
    (workdir / "m.quality.png").write_bytes(b"kept")
    for src, dst, extra, says in (
        ("a.jpg", "o.png", [], "o.png: output exists (use --overwrite)"),
        ("a.jpg", "m.png", ["--quality-map"], "m.quality.png: quality map exists (use --overwrite)"),
        ("b.png", "b.png", [], "b.png: would overwrite an input (use --overwrite)"),
    ):
        rc, _, err = run(capsys, "restore", workdir / src, "-o", workdir / dst, *extra)
        assert rc == 2 and error_lines(err) == [f"qairn: error: {workdir / says}"], err
    assert (workdir / "o.png").read_bytes() == b"kept" and not (workdir / "m.png").exists()


def test_outputs_of_several_inputs_taken_are_refused_before_the_model_loads(workdir, capsys, monkeypatch):
    """a.jpg b.png c.png -o out with out/b.png there (an earlier run's) loaded the model, then failed
    that image after it: the single output's check (above) was made for one input only. All are checked
    up front now: exit 2, one line naming the first taken output, the model unloaded, nothing written."""

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("qairn.engine.restorer.Restorer", loaded)
    out = workdir / "out"
    out.mkdir()
    cv2.imwrite(str(workdir / "c.png"), cv2.imread(str(workdir / "b.png")))
    inputs = [workdir / n for n in ("a.jpg", "b.png", "c.png")]
    (out / "b.png").write_bytes(b"kept")
    rc, _, err = run(capsys, "restore", *inputs, "-o", out)
    assert rc == 2 and error_lines(err) == [f"qairn: error: {out / 'b.png'}: output exists (use --overwrite)"]
    (out / "c.quality.png").write_bytes(b"kept")
    rc, _, err = run(capsys, "restore", *inputs, "-o", out, "--quality-map")
    assert rc == 2 and error_lines(err) == [
        f"qairn: error: {out / 'b.png'}: output exists (use --overwrite); 2 of the 3 outputs are there"
    ], err
    assert sorted(p.name for p in out.iterdir()) == ["b.png", "c.quality.png"]
    assert (out / "b.png").read_bytes() == b"kept"


def test_cuda_graph_flag_refused_in_one_line_with_a_backend_that_cannot_take_it(
    workdir, tiny_weights, capsys
):
    out = workdir / "graph.png"
    args = ["restore", workdir / "a.jpg", "-o", out, "--weights", tiny_weights, "--cuda-graph"]
    rc, _, err = run(capsys, *args, "--backend", "onnxruntime")
    says = "cuda_graph=True takes the eager, triton or compile backend"
    assert rc != 0 and says in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_cuda_graph_flag_off_cuda_warns_and_runs_as_fused_conv_does(workdir, tiny_weights, capsys):
    # --cuda-graph on the CPU was refused (exit 2) while --fused-conv there warned and ran: both only
    # speed up CUDA runs and change no output, so both now warn once and the run goes on without them.
    out = workdir / "graph.png"
    args = ["restore", workdir / "a.jpg", "-o", out, "--weights", tiny_weights, "--device", "cpu"]
    rc, _, err = run(capsys, *args, "--cuda-graph", "--fused-conv")
    warned = [ln for ln in err.splitlines() if "warning:" in ln]
    assert rc == 0 and out.exists(), err
    assert warned == [
        "qairn: warning: --fused-conv: the fused Triton convs run on CUDA only; on cpu the plain convs run",
        "qairn: warning: --cuda-graph: CUDA graphs need a CUDA device; on cpu the run goes on without one",
    ], err


def test_bad_inputs_each_get_one_line_and_others_still_run(workdir, tiny_weights, capsys):
    (workdir / "empty.jpg").write_bytes(b"")
    (workdir / "text.png").write_text("hello, not an image")
    data = (workdir / "a.jpg").read_bytes()
    (workdir / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (workdir / "emptydir").mkdir()
    out = workdir / "out"
    rc, _, err = run(
        capsys,
        "restore",
        workdir / "a.jpg",
        workdir / "empty.jpg",
        workdir / "text.png",
        workdir / "trunc.jpg",
        workdir / "missing.png",
        workdir / "emptydir",
        "-o",
        out,
        "--weights",
        tiny_weights,
    )
    assert rc == 1
    lines = error_lines(err)
    assert len(lines) == 5, err
    assert "Traceback" not in err
    joined = "\n".join(lines)
    assert "empty.jpg: empty file" in joined
    assert "text.png: not an image" in joined
    assert "trunc.jpg: truncated" in joined
    assert "missing.png: no such file" in joined
    assert "emptydir: directory contains no images" in joined
    # The closing line names the inputs that failed again (their lines scroll away in a long run):
    # those never found first, as their lines came.
    names = ", ".join(
        str(workdir / n) for n in ("missing.png", "emptydir", "empty.jpg", "text.png", "trunc.jpg")
    )
    assert err.strip().splitlines()[-1] == f"qairn: restored 1 of 6 images into {out}, 5 failed ({names})"
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]  # the good one ran, nothing partial
    assert leftovers(workdir) == []


def test_unreadable_file_is_not_called_corrupt(workdir, tiny_weights, capsys, monkeypatch):
    # chmod 000 does not stop root, so the PermissionError that open() would raise is made here.
    real_open = Image.open

    def denied(fp, *args, **kwargs):
        name = str(getattr(fp, "name", fp))  # read_image opens the file itself and hands Pillow the object
        if name.endswith("a.jpg"):
            raise PermissionError(13, "Permission denied", name)
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", denied)
    rc, _, err = run(capsys, "restore", workdir / "a.jpg", "-o", workdir / "o.png", "--weights", tiny_weights)
    assert rc == 1 and error_lines(err) == [
        f"qairn: error: {workdir / 'a.jpg'}: cannot read (Permission denied)"
    ]
    assert not (workdir / "o.png").exists()


def test_an_unreadable_folder_is_one_line_and_the_others_still_run(
    workdir, tiny_weights, capsys, monkeypatch
):
    # 'qairn score: error: [Errno 13] Permission denied: ...' ended the run (exit 2), other inputs not
    # scored. chmod does not stop root, so the PermissionError is made here.
    locked = workdir / "locked"
    locked.mkdir()
    real = Path.iterdir

    def iterdir(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    rc, out, err = run(capsys, "score", locked, workdir / "a.jpg", "--weights", tiny_weights)
    assert rc == 1 and "a.jpg" in out
    assert error_lines(err) == [f"qairn: error: {locked}: cannot read the folder (Permission denied)"]


def test_never_overwrites_input_or_existing_output(workdir, tiny_weights, capsys):
    src = workdir / "b.png"
    before = src.read_bytes()
    rc, _, err = run(capsys, "restore", src, "-o", src, "--weights", tiny_weights)
    assert rc == 2 and "would overwrite an input" in err  # before the model loads
    assert src.read_bytes() == before
    rc, _, _ = run(capsys, "restore", src, "-o", workdir / "o.png", "--weights", tiny_weights)
    assert rc == 0
    rc, _, err = run(capsys, "restore", src, "-o", workdir / "o.png", "--weights", tiny_weights)
    assert rc == 2 and "output exists" in err
    rc, _, err = run(capsys, "restore", src, "-o", src, "--weights", tiny_weights, "--overwrite")
    assert rc == 0, err
    assert src.read_bytes() != before


def test_quality_map_never_replaces_an_input_an_output_or_an_old_map(workdir, tiny_weights, capsys):
    # b.png and b.quality.png restored into one folder: b's map would be the other's output.
    cv2.imwrite(str(workdir / "b.quality.png"), cv2.imread(str(workdir / "b.png")))
    out = workdir / "out"
    args = ["--weights", tiny_weights, "--quality-map"]
    rc, _, err = run(capsys, "restore", workdir / "b.png", workdir / "b.quality.png", "-o", out, *args)
    says = "the quality map would replace another input or output; rename it"
    assert rc == 1 and error_lines(err) == [f"qairn: error: {out / 'b.quality.png'}: {says}"]
    assert sorted(p.name for p in out.iterdir()) == ["b.quality.png", "b.quality.quality.png"]
    # An existing map is kept unless --overwrite, like any output.
    rc, _, err = run(capsys, "restore", workdir / "a.jpg", "-o", workdir / "a.png", *args)
    assert rc == 0, err
    (workdir / "a.png").unlink()
    before = (workdir / "a.quality.png").read_bytes()
    rc, _, err = run(capsys, "restore", workdir / "a.jpg", "-o", workdir / "a.png", *args)
    assert rc == 2 and "a.quality.png: quality map exists (use --overwrite)" in err
    assert not (workdir / "a.png").exists() and (workdir / "a.quality.png").read_bytes() == before
    assert run(capsys, "restore", workdir / "a.jpg", "-o", workdir / "a.png", *args, "--overwrite")[0] == 0


def test_unwritable_output(workdir, tiny_weights, capsys):
    blocker = workdir / "afile"
    blocker.write_text("x")
    rc, _, err = run(capsys, "restore", workdir / "a.jpg", "-o", blocker / "x.png", "--weights", tiny_weights)
    # Refused before any work (exit 2), as a missing --json folder is; it was found per image (exit 1).
    assert rc == 2 and len(error_lines(err)) == 1 and "x.png: output folder does not exist" in err
    assert leftovers(workdir) == []
    missing = workdir / "no" / "x.png"
    rc, _, err = run(
        capsys, "restore", workdir / "a.jpg", "-o", missing, "--weights", workdir / "nope.safetensors"
    )
    assert rc == 2 and f"{missing}: output folder does not exist" in err and "nope" not in err


def test_a_read_only_output_or_json_folder_is_refused_before_any_work(
    workdir, tiny_weights, capsys, monkeypatch
):
    # Every image was restored, then failed to write ('cannot write (Permission denied)'), and a
    # read-only --json folder failed only at the end. Tests run as root, which chmod does not stop,
    # so the operating system's answer is stood in for.
    import qairn.engine.cli as engine_cli

    ro = workdir / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != ro and real(path, mode))

    def restorer_made(*args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engine_cli, "make_restorer", restorer_made)
    for args, says in (
        ([workdir / "a.jpg", workdir / "b.png", "-o", ro], f"{ro}: output folder is not writable"),
        ([workdir / "a.jpg", "-o", ro / "o.png"], f"{ro}: output folder is not writable"),
        (
            [workdir / "a.jpg", "-o", workdir / "o", "--json", ro / "q.json"],
            f"{ro / 'q.json'}: output folder is not writable",
        ),
    ):
        rc, _, err = run(capsys, "restore", *args, "--weights", tiny_weights)
        assert rc == 2 and error_lines(err) == [f"qairn: error: {says}"], err
    assert not any(ro.iterdir()) and not (workdir / "o").exists()


def test_output_dash_is_refused_not_made_a_folder(workdir, tiny_weights, capsys, monkeypatch):
    monkeypatch.chdir(workdir)  # `-o -` made a folder named '-' here and wrote '-/a.png' into it
    rc, out, err = run(capsys, "restore", workdir / "a.jpg", "-o", "-", "--weights", tiny_weights)
    assert rc == 2 and out == "" and not (workdir / "-").exists()
    assert error_lines(err) == [
        "qairn: error: -o -: images are not written to standard output; give a file or folder name"
    ]


def test_format_contradicting_the_output_file_is_refused(workdir, tiny_weights, capsys):
    # -o x.png --format .jpg wrote a PNG and said nothing of the --format it ignored.
    args = ("restore", workdir / "a.jpg", "--weights", tiny_weights, "-o")
    rc, _, err = run(capsys, *args, workdir / "x.png", "--format", ".jpg")
    assert rc == 2 and not (workdir / "x.png").exists()
    says = f"--format .jpg contradicts -o {workdir / 'x.png'}; the output file's suffix sets its type"
    assert error_lines(err) == [f"qairn: error: {says}"]
    assert run(capsys, *args, workdir / "x.JPEG", "--format", "jpg")[0] == 0  # the same type, spelt otherwise


def test_refused_run_leaves_no_empty_output_folder(workdir, tiny_weights, capsys):
    out = workdir / "out"
    for args in (
        ["--weights", workdir / "missing.safetensors"],
        ["--weights", tiny_weights, "--format", "xyz"],
    ):
        rc, _, err = run(capsys, "restore", workdir / "a.jpg", workdir / "b.png", "-o", out, *args)
        assert rc == 2 and len(error_lines(err)) == 1 and not out.exists(), err
    # OUT an existing file where a folder is needed: one line that says so, not "[Errno 17] File exists"
    rc, _, err = run(capsys, "restore", workdir / "a.jpg", workdir / "b.png", "-o", workdir / "a.jpg")
    says = "is a file; several inputs, or a name without a suffix, need a folder"
    assert rc == 2 and error_lines(err) == [f"qairn: error: {workdir / 'a.jpg'}: {says}"], err


def test_several_inputs_into_an_output_named_like_an_image_are_refused(workdir, tiny_weights, capsys):
    # `qairn restore *.jpg -o out.png` with a glob matching two files made a folder named out.png.
    inputs = (workdir / "a.jpg", workdir / "b.png")
    for name in ("out.png", "Out.JPG"):
        rc, _, err = run(capsys, "restore", *inputs, "-o", workdir / name, "--weights", tiny_weights)
        says = f"-o {workdir / name} looks like a file but 2 inputs were given: give a folder"
        assert rc == 2 and error_lines(err) == [f"qairn: error: {says}"], err
        assert not (workdir / name).exists()
    # A folder of that name, existing or ending in '/', is still a folder.
    (workdir / "old.png").mkdir()
    for out in (workdir / "old.png", f"{workdir / 'new.png'}/"):
        rc, _, err = run(capsys, "restore", *inputs, "-o", out, "--weights", tiny_weights)
        assert rc == 0 and sorted(p.name for p in Path(out).iterdir()) == ["a.png", "b.png"], err


def test_an_output_named_out_dot_or_dot_png_is_refused(workdir, tiny_weights, capsys, monkeypatch):
    """-o out. and -o .png have no suffix to Python, so one input went into a new folder of that name
    (out./a.png, a hidden .png/a.png). Refused in one line; an existing folder of that name, or one
    written with '/', is still taken, and so are -o . and -o .."""

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("qairn.engine.restorer.Restorer", loaded)
    for name, says in (
        ("out.", "ends in '.': give a file name with its type, such as out.png, or a folder"),
        (".png", "is a hidden name with no stem: give a file name such as out.png, or .png/ for a folder"),
        (".JPG", "is a hidden name with no stem: give a file name such as out.jpg, or .JPG/ for a folder"),
    ):
        rc, _, err = run(capsys, "restore", workdir / "a.jpg", "-o", workdir / name)
        assert rc == 2 and error_lines(err) == [f"qairn: error: -o {workdir / name}: {says}"], err
        assert not (workdir / name).exists()
    from qairn.engine.cli import output_paths

    (workdir / "old.").mkdir()
    inputs = [workdir / "a.jpg"]
    assert output_paths(inputs, str(workdir / "old."), None) == (
        [workdir / "old." / "a.png"],
        workdir / "old.",
    )
    assert output_paths(inputs, f"{workdir / '.png'}/", None)[1] == workdir / ".png"
    assert output_paths(inputs, ".", None) == ([Path("a.png")], Path("."))
    assert output_paths(inputs, "..", None)[1] == Path("..")


def test_failed_write_leaves_no_partial_file(workdir, tiny_weights, capsys, monkeypatch):
    import qairn.engine.imageio as imageio

    def boom(arr, suffix, q=95):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(imageio, "encode_image", boom)
    rc, _, err = run(capsys, "restore", workdir / "a.jpg", "-o", workdir / "o.png", "--weights", tiny_weights)
    assert rc == 1 and "o.png: cannot write (No space left on device)" in err
    assert not (workdir / "o.png").exists() and leftovers(workdir) == []


def test_a_failed_write_names_the_file_and_leaves_the_pair_whole(workdir, tiny_weights, capsys, monkeypatch):
    # The quality map was written after the image: when it failed (disk full), the error named o.png,
    # which had been written, and the run said 'restored 0 of 1' with o.png on disk.
    import qairn.engine.cli as engine_cli
    import qairn.engine.imageio as imageio

    real = engine_cli.write_atomic

    def full(path, data):
        if Path(path).name.endswith(".quality.png"):
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(engine_cli, "write_atomic", full)
    args = ("restore", workdir / "a.jpg", "-o", workdir / "o.png", "--quality-map", "--weights", tiny_weights)
    rc, _, err = run(capsys, *args)
    says = f"qairn: error: {workdir / 'o.quality.png'}: cannot write (No space left on device)"
    assert rc == 1 and error_lines(err) == [says], err
    assert not (workdir / "o.png").exists() and leftovers(workdir) == []
    # And an image that fails to write leaves no map behind.
    monkeypatch.setattr(engine_cli, "write_atomic", real)

    def boom(arr, suffix, q=95):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(imageio, "encode_image", boom)
    rc, _, err = run(capsys, *args)
    assert rc == 1 and "o.png: cannot write (No space left on device)" in err
    assert not (workdir / "o.png").exists() and not (workdir / "o.quality.png").exists()


def test_a_json_that_cannot_be_written_is_not_counted_as_a_failed_image(
    workdir, tiny_weights, capsys, monkeypatch
):
    # Both images written, only q.json failing (a full disk) ended 'restored 2 of 2 images, 1 failed'.
    import qairn.engine.cli as engine_cli

    real = engine_cli.write_atomic

    def full(path, data):
        if Path(path).suffix == ".json":
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(engine_cli, "write_atomic", full)
    out, q = workdir / "out", workdir / "q.json"
    rc, _, err = run(capsys, "restore", workdir, "-o", out, "--json", q, "--weights", tiny_weights)
    assert rc == 1 and error_lines(err) == [f"qairn: error: {q}: cannot write (No space left on device)"]
    assert err.strip().splitlines()[-1] == f"qairn: restored 2 of 2 images into {out}"


def test_ctrl_c_in_a_batch_is_one_line_and_leaves_only_whole_outputs(
    workdir, tiny_weights, capsys, monkeypatch
):
    import qairn.engine.cli as engine_cli

    real = engine_cli.read_image

    def interrupted(path, *args, **kwargs):
        if Path(path).name == "b.png":
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(engine_cli, "read_image", interrupted)
    try:
        rc, _, err = run(capsys, "restore", workdir, "-o", workdir / "out", "--weights", tiny_weights)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C ended `qairn restore` with a traceback")
    assert (
        rc == 130 and err.strip().splitlines()[-1] == "qairn restore: interrupted" and "Traceback" not in err
    )
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["a.png"] and leftovers(workdir) == []


def test_ctrl_c_keeps_the_json_scores_of_the_images_already_written(
    workdir, tiny_weights, capsys, monkeypatch
):
    # Ctrl-C at the second image: a.png was written, but q.json was never saved, losing its scores.
    import qairn.engine.cli as engine_cli

    real = engine_cli.read_image

    def interrupted(path, *args, **kwargs):
        if Path(path).name == "b.png":
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(engine_cli, "read_image", interrupted)
    q = workdir / "q.json"
    rc, _, err = run(
        capsys, "restore", workdir, "-o", workdir / "out", "--json", q, "--weights", tiny_weights
    )
    assert rc == 130 and err.strip().splitlines()[-1] == "qairn restore: interrupted", err
    [record] = json.loads(q.read_text())
    assert record["path"] == str(workdir / "a.jpg") and record["output"] == str(workdir / "out" / "a.png")
    assert 0 <= record["Q1"] <= 1 and leftovers(workdir) == []


def test_sigterm_ends_a_run_like_ctrl_c(workdir, tiny_weights, capsys, monkeypatch):
    """kill (or a container stopping) mid-batch: the same one line, exit 130, no temp files, and
    the process's own SIGTERM handler back afterwards."""
    import os
    import signal

    import qairn.engine.cli as engine_cli

    real = engine_cli.read_image

    def killed(path, *args, **kwargs):
        if Path(path).name == "b.png":
            os.kill(os.getpid(), signal.SIGTERM)
        return real(path, *args, **kwargs)

    def unhandled(signum, frame):  # what runs if the CLI does not take SIGTERM (not pytest's death)
        raise RuntimeError("SIGTERM reached the caller's handler")

    monkeypatch.setattr(engine_cli, "read_image", killed)
    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        rc, _, err = run(capsys, "restore", workdir, "-o", workdir / "out", "--weights", tiny_weights)
        assert signal.getsignal(signal.SIGTERM) is unhandled
    finally:
        signal.signal(signal.SIGTERM, before)
    assert rc == 130 and err.strip().splitlines()[-1] == "qairn restore: interrupted"
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["a.png"] and leftovers(workdir) == []


def test_format_without_dot_and_gif_in_folders(workdir, tiny_weights, capsys):
    Image.open(workdir / "b.png").save(workdir / "c.gif")
    rc, _, err = run(
        capsys, "restore", workdir, "-o", workdir / "out", "--format", "webp", "--weights", tiny_weights
    )
    assert rc == 0, err
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["a.webp", "b.webp", "c.webp"]


def test_jpeg_output_of_a_transparent_image_says_the_alpha_is_dropped(tmp_path, tiny_weights, capsys):
    rgba = np.random.default_rng(0).integers(0, 256, (24, 32, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "t.png")
    for suffix, warned in ((".jpg", True), (".bmp", True), (".png", False)):
        rc, _, err = run(
            capsys, "restore", tmp_path / "t.png", "-o", tmp_path / f"o{suffix}", "--weights", tiny_weights
        )
        says = f"o{suffix}: {suffix} output drops the input's alpha channel; write .png to keep it"
        assert rc == 0 and (says in err) == warned, err
    assert cv2.imread(str(tmp_path / "o.png"), cv2.IMREAD_UNCHANGED).shape == (24, 32, 4)


def test_a_16_bit_input_written_at_8_bits_says_so(tmp_path, tiny_weights, capsys):
    rgb16 = np.random.default_rng(1).integers(0, 65536, (24, 32, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), rgb16)
    for suffix, warned in ((".jpg", True), (".webp", True), (".bmp", True), (".tif", False), (".png", False)):
        rc, _, err = run(
            capsys, "restore", tmp_path / "d.png", "-o", tmp_path / f"o{suffix}", "--weights", tiny_weights
        )
        says = f"o{suffix}: {suffix} output drops the input's 16-bit depth; write .png to keep it"
        assert rc == 0 and (says in err) == warned, err
    assert cv2.imread(str(tmp_path / "o.tif"), cv2.IMREAD_UNCHANGED).dtype == np.uint16


def test_gray_alpha_input_stays_gray_alpha(tmp_path, tiny_weights, capsys):
    """An LA input was read as RGBA and written as colour; it stays gray + alpha, its alpha and its gray
    colour profile kept, and a JPEG output (gray, no alpha) says the alpha is dropped."""
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    gray_icc = srgb[:16] + b"GRAY" + srgb[20:]  # only the header's colour space is looked at
    rng = np.random.default_rng(1)
    la = np.stack([rng.integers(0, 256, (24, 32)), np.arange(24 * 32).reshape(24, 32) % 256], axis=2)
    Image.fromarray(la.astype(np.uint8), "LA").save(tmp_path / "la.png", icc_profile=gray_icc)
    rc, _, err = run(
        capsys, "restore", tmp_path / "la.png", "-o", tmp_path / "o.png", "--weights", tiny_weights
    )
    assert rc == 0 and "warning" not in err, err
    with Image.open(tmp_path / "o.png") as im:
        assert im.mode == "LA" and im.info.get("icc_profile") == gray_icc
        np.testing.assert_array_equal(np.asarray(im)[..., 1], la[..., 1])
    rc, _, err = run(
        capsys, "restore", tmp_path / "la.png", "-o", tmp_path / "o.jpg", "--weights", tiny_weights
    )
    assert rc == 0 and "o.jpg: .jpg output drops the input's alpha channel; write .png to keep it" in err, err
    with Image.open(tmp_path / "o.jpg") as im:
        assert im.mode == "L"


def test_colour_key_transparency_is_kept(tmp_path, tiny_weights, capsys):
    """A gray or RGB PNG with a colour key (tRNS) lost its transparency without a word; its output keeps
    it as an alpha channel, as an RGBA input's does, and a JPEG output says it is dropped."""
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    rgb[:8, :8] = (10, 200, 30)  # the key: a transparent corner
    Image.fromarray(rgb).save(tmp_path / "k.png", transparency=(10, 200, 30))
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png", transparency=10)
    for name, channels in (("k", 4), ("g", 2)):
        src, dst = tmp_path / f"{name}.png", tmp_path / f"o{name}.png"
        rc, _, err = run(capsys, "restore", src, "-o", dst, "--weights", tiny_weights)
        assert rc == 0 and "warning" not in err, err
        out = cv2.imread(str(dst), cv2.IMREAD_UNCHANGED)
        assert out.shape == (24, 32, 4)  # OpenCV reads gray + alpha as BGRA
        key = (rgb == (10, 200, 30)).all(axis=2) if channels == 4 else rgb[..., 0] == 10
        np.testing.assert_array_equal(out[..., 3], np.where(key, 0, 255))
        assert read_image(dst).shape == (24, 32, channels)
    rc, _, err = run(
        capsys, "restore", tmp_path / "k.png", "-o", tmp_path / "o.jpg", "--weights", tiny_weights
    )
    assert rc == 0 and "o.jpg: .jpg output drops the input's alpha channel" in err, err


def test_gray_to_webp_says_it_becomes_rgb(tmp_path, tiny_weights, capsys):
    """WebP has no gray mode: a gray input written as .webp reads back RGB, which was not said. It is now,
    like the other things an output format drops; so is 16-bit gray + alpha written to TIFF as RGBA."""
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(np.stack([gray, gray[::-1]], axis=2), "LA").save(tmp_path / "la.png")
    (tmp_path / "la16.png").write_bytes(
        encode_image(np.stack([gray, gray], axis=2).astype(np.uint16) * 257, ".png")
    )
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    (tmp_path / "o").mkdir()
    for src, dst, says in (
        ("g.png", "g.webp", "g.webp: .webp output has no gray mode: the gray input is written as RGB; "),
        ("la.png", "la.webp", "la.webp: .webp output has no gray mode: the gray input is written as RGBA; "),
        (
            "la16.png",
            "la16.tif",
            "la16.tif: .tif output is written without 16-bit gray + alpha: the gray input "
            "is written as RGBA; ",
        ),
        ("g.png", "g.png", None),
        ("la.png", "la.tif", None),
        ("c.png", "c.webp", None),
    ):
        rc, _, err = run(
            capsys, "restore", tmp_path / src, "-o", tmp_path / "o" / dst, "--weights", tiny_weights
        )
        assert rc == 0, err
        if says:
            assert f"{tmp_path / 'o' / says}write .png to keep it gray" in err, err
        else:
            assert "warning" not in err, err
    assert read_image(tmp_path / "o" / "g.webp").shape == (24, 32, 3)
    assert read_image(tmp_path / "o" / "la16.tif").shape == (24, 32, 4)


def test_pixel_limit_refuses_before_decoding(tmp_path, tiny_weights, capsys):
    # A PNG whose header claims 100000 x 100000 pixels with almost no data: a decompression bomb.
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )
    with pytest.raises(ImageError, match="over the pixel limit"):
        read_image(bomb)
    small = tmp_path / "s.png"
    cv2.imwrite(str(small), np.zeros((40, 50, 3), np.uint8))
    rc, _, err = run(
        capsys, "restore", small, "-o", tmp_path / "o.png", "--weights", tiny_weights, "--max-pixels", 1000
    )
    # not "0 MP is over the pixel limit of 0 MP": small limits keep their digits
    assert rc == 1 and "s.png: 50x40 = 0.002 MP is over the pixel limit of 0.001 MP" in err, err


def test_a_pixel_limit_below_one_is_refused_at_once(workdir, tiny_weights, capsys):
    # --max-pixels 0 or -5 loaded the model, then failed every image: 'over the pixel limit of -5e-06 MP'.
    for command in (["score"], ["restore", "-o", workdir / "out"]):
        for limit in ("0", "-5", "lots"):
            with pytest.raises(SystemExit) as e:  # argparse's refusal
                run(capsys, *command, workdir / "a.jpg", "--max-pixels", limit, "--weights", tiny_weights)
            err = capsys.readouterr().err
            assert e.value.code == 2 and f"argument --max-pixels: '{limit}'" in err, err
    rc, out, err = run(capsys, "score", workdir / "a.jpg", "--max-pixels", "2e8", "--weights", tiny_weights)
    assert rc == 0 and "a.jpg" in out, err


@pytest.mark.parametrize(
    "options, says",
    [
        (["--overlap", "-4"], "argument --overlap: the overlap must not be negative, got -4"),
        (["--overlap", "abc"], "argument --overlap: expected an overlap in pixels (0 or more), got 'abc'"),
        (["--tile", "abc"], "argument --tile: expected auto, 0 or a tile size in pixels, got 'abc'"),
        (["--tile", "8", "--overlap", "32"], "--tile 8 with --overlap 32: overlap 32 (taken in steps"),
        (["--overlap", "600"], "--tile auto with --overlap 600: overlap 600 (taken in steps of 16: 608)"),
        # whole images: the overlap was ignored without a word
        (["--tile", "0", "--overlap", "5"], "--tile 0 with --overlap 5: whole images are not tiled"),
    ],
)
def test_bad_tiling_options_are_refused_before_the_model_loads(workdir, capsys, monkeypatch, options, says):
    # --overlap -4 loaded the model, then said 'overlap must be an int >= 0, not -4', naming no option.
    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("qairn.engine.restorer.Restorer", loaded)
    for command in (["score"], ["restore", "-o", workdir / "out"]):
        with pytest.raises(SystemExit) as e:
            run(capsys, *command, workdir / "a.jpg", *options)
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err, err
    assert not (workdir / "out").exists()


def test_animation_restores_its_first_frame_and_says_so(tmp_path, tiny_weights, capsys):
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.warns(UserWarning, match="anim.gif: 3 frames; only the first"):
        first = read_image(tmp_path / "anim.gif")
    with Image.open(tmp_path / "anim.gif") as im:  # GIF quantises: compare with the file's first frame
        np.testing.assert_array_equal(first, np.asarray(im.convert("RGB")))
    rc, _, err = run(
        capsys, "restore", tmp_path / "anim.gif", "-o", tmp_path / "a.png", "--weights", tiny_weights
    )
    assert rc == 0 and "qairn: warning: " in err and "3 frames; only the first is restored" in err
    assert (tmp_path / "a.png").exists()


def test_colour_profile_is_kept(tmp_path, tiny_weights, capsys):
    """A phone's Display P3 or a camera's Adobe RGB JPEG restored without its ICC profile would be
    shown as sRGB, with other colours: PNG and JPEG outputs carry it over byte for byte."""
    import io

    from PIL import ImageCms

    from qairn.engine.imageio import encode_image, with_icc

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rgb = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "p3.jpg", quality=30, icc_profile=icc)
    Image.fromarray(rgb).save(tmp_path / "plain.jpg", quality=30)
    for name in ("o.png", "o.jpg"):
        assert (
            run(capsys, "restore", tmp_path / "p3.jpg", "-o", tmp_path / name, "--weights", tiny_weights)[0]
            == 0
        )
        with Image.open(tmp_path / name) as im:
            assert im.info.get("icc_profile") == icc, name
    rc, _, err = run(
        capsys, "restore", tmp_path / "p3.jpg", "-o", tmp_path / "o.webp", "--weights", tiny_weights
    )
    assert rc == 0 and "o.webp: .webp output drops the input's colour profile" in err
    assert (
        run(capsys, "restore", tmp_path / "plain.jpg", "-o", tmp_path / "p.png", "--weights", tiny_weights)[0]
        == 0
    )
    assert b"iCCP" not in (tmp_path / "p.png").read_bytes()
    # A CMYK JPEG decodes to RGB: its CMYK profile would misdescribe the output, so it is dropped.
    cmyk_icc = icc[:16] + b"CMYK" + icc[20:]
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", icc_profile=cmyk_icc)
    rc, _, err = run(
        capsys, "restore", tmp_path / "cmyk.jpg", "-o", tmp_path / "c.png", "--weights", tiny_weights
    )
    assert rc == 0 and "cmyk.jpg: its CMYK colour profile does not describe" in err
    assert b"iCCP" not in (tmp_path / "c.png").read_bytes()
    # A profile larger than one JPEG segment is split and reassembled; 16-bit PNG pixels are untouched.
    big = bytes(range(256)) * 300
    for arr, sfx in ((rgb, ".jpg"), (rgb.astype(np.uint16) * 257, ".png")):
        data = with_icc(encode_image(arr, sfx), sfx, big)
        assert Image.open(io.BytesIO(data)).info.get("icc_profile") == big
        back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if sfx == ".png":
            np.testing.assert_array_equal(back[..., ::-1], arr)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(tmp_path, orientation):
    """The 16-bit path turns pixels upright with numpy; it must agree with Pillow's exif_transpose."""
    from qairn.engine.imageio import _apply_orientation

    arr = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(im))
    np.testing.assert_array_equal(_apply_orientation(arr, orientation), expected)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = 255  # a white band on the left
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif, quality=95)
    out = read_image(path)
    assert out.shape == (40, 20, 3)
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # the band is now on top


def test_exif_is_kept_upright(tmp_path, tiny_weights, capsys):
    """A camera photo keeps its record (make, date, GPS) in PNG and JPEG outputs. The pixels were
    turned upright on load, so the orientation tag goes (a viewer would rotate twice) and the EXIF
    pixel size follows the output."""
    from PIL import ExifTags

    im = Image.fromarray((np.random.default_rng(1).random((24, 40, 3)) * 255).astype(np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    exif[0x010F] = "QairnCam"  # Make
    exif.get_ifd(ExifTags.IFD.Exif).update({0x9003: "2026:11:27 10:00:00", 0xA002: 40, 0xA003: 24})
    exif.get_ifd(ExifTags.IFD.GPSInfo)[1] = "N"  # GPSLatitudeRef
    im.save(tmp_path / "cam.jpg", exif=exif, quality=40)
    for name in ("o.jpg", "o.png"):
        rc, _, err = run(
            capsys, "restore", tmp_path / "cam.jpg", "-o", tmp_path / name, "--weights", tiny_weights
        )
        assert rc == 0, err
        with Image.open(tmp_path / name) as out:
            assert out.size == (24, 40), name  # upright pixels
            got = out.getexif()
            assert got.get(0x010F) == "QairnCam" and 0x0112 not in got, name
            sub = got.get_ifd(ExifTags.IFD.Exif)
            assert sub.get(0x9003) == "2026:11:27 10:00:00" and (sub[0xA002], sub[0xA003]) == (24, 40), name
            assert got.get_ifd(ExifTags.IFD.GPSInfo).get(1) == "N", name
            assert ImageOps.exif_transpose(out).size == (24, 40), name  # a viewer shows it as restored
    rc, _, err = run(
        capsys, "restore", tmp_path / "cam.jpg", "-o", tmp_path / "o.webp", "--weights", tiny_weights
    )
    assert rc == 0 and "o.webp: .webp output drops the input's EXIF" in err
    # A TIFF's layout tags (strips, sample format) are not its record: none of them travel, and a TIFF
    # without a record gets no "drops the input's EXIF" warning; its make and model do travel.
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "plain.tif")
    rc, _, err = run(
        capsys, "restore", tmp_path / "plain.tif", "-o", tmp_path / "t.tif", "--weights", tiny_weights
    )
    assert rc == 0 and "EXIF" not in err
    assert (
        run(capsys, "restore", tmp_path / "plain.tif", "-o", tmp_path / "t.png", "--weights", tiny_weights)[0]
        == 0
    )
    assert b"eXIf" not in (tmp_path / "t.png").read_bytes()
    tagged = Image.fromarray(np.zeros((16, 16, 3), np.uint8))
    tiff_exif = tagged.getexif()
    tiff_exif[0x010F] = "QairnCam"
    tagged.save(tmp_path / "cam.tif", exif=tiff_exif)
    assert (
        run(capsys, "restore", tmp_path / "cam.tif", "-o", tmp_path / "c.png", "--weights", tiny_weights)[0]
        == 0
    )
    with Image.open(tmp_path / "c.png") as out:
        assert dict(out.getexif()) == {0x010F: "QairnCam"}
    # The resolution of a TIFF is its record (kept); its strips and sizes are not.
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "dpi.tif", dpi=(300, 300))
    assert (
        run(capsys, "restore", tmp_path / "dpi.tif", "-o", tmp_path / "d.png", "--weights", tiny_weights)[0]
        == 0
    )
    with Image.open(tmp_path / "d.png") as out:
        assert set(out.getexif()) == {0x011A, 0x011B, 0x0128}  # XResolution, YResolution, ResolutionUnit
    # No EXIF in, none out.
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "bare.jpg")
    assert (
        run(capsys, "restore", tmp_path / "bare.jpg", "-o", tmp_path / "b.jpg", "--weights", tiny_weights)[0]
        == 0
    )
    assert b"Exif" not in (tmp_path / "b.jpg").read_bytes()


def test_16bit_png_end_to_end(tmp_path, live1_image, tiny_weights, capsys):
    img16 = live1_image[:48, :64].astype(np.uint16) * 257
    src = tmp_path / "deep.png"
    cv2.imwrite(str(src), img16[..., ::-1])
    assert read_image(src).dtype == np.uint16
    rc, _, err = run(capsys, "restore", src, "-o", tmp_path / "o.png", "--weights", tiny_weights)
    assert rc == 0, err
    out = cv2.imread(str(tmp_path / "o.png"), cv2.IMREAD_UNCHANGED)
    assert out.dtype == np.uint16 and out.shape == (48, 64, 3)


def test_score_table_and_json(workdir, tiny_weights, capsys):
    rc, out, _ = run(capsys, "score", workdir / "a.jpg", workdir / "b.png", "--weights", tiny_weights)
    assert rc == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[-4:] == ["Q1", "Q2", "Q3", "QF"] and len(lines) == 3
    # The last column: the quality the JPEG was saved at, read from its tables ("-": not a JPEG)
    assert [ln.split()[-1] for ln in lines[1:]] == ["10", "-"]
    rc, out, _ = run(
        capsys, "score", workdir / "a.jpg", workdir / "b.png", "--weights", tiny_weights, "--json"
    )
    rows = [json.loads(ln) for ln in out.strip().splitlines()]
    keys = {"path", "Q1", "Q2", "Q3", "jpeg_quality", "jpeg_quality_exact", "p", "weights", "weights_sha256"}
    assert [set(r) for r in rows] == [keys] * 2
    assert [(r["jpeg_quality"], r["jpeg_quality_exact"]) for r in rows] == [(10, True), (None, None)]


def test_score_table_marks_a_quality_from_another_encoders_tables(workdir, tiny_weights, capsys):
    # Pillow's "web_low" tables are no libjpeg quality's: the nearest is given, marked "~"
    Image.open(workdir / "b.png").save(workdir / "c.jpg", qtables="web_low")
    rc, out, _ = run(capsys, "score", workdir / "c.jpg", "--weights", tiny_weights)
    assert rc == 0
    shown = out.strip().splitlines()[1].split()[-1]
    assert re.fullmatch(r"~\d+", shown)
    rc, out, _ = run(capsys, "score", workdir / "c.jpg", "--weights", tiny_weights, "--json")
    row = json.loads(out)  # the ~ as a key of its own
    assert (row["jpeg_quality"], row["jpeg_quality_exact"]) == (int(shown[1:]), False)


def test_restore_clips_a_jpegs_restoration_to_its_quantization_bins(workdir, tiny_weights, capsys):
    # The network's picture is moved back within the bins where the original must lie; --no-jpeg-clip
    # keeps it as it is, and other inputs are not JPEGs to clip to
    import qairn

    r = qairn.Restorer(weights=tiny_weights, device="cpu")
    jpg, png = read_image(workdir / "a.jpg"), read_image(workdir / "b.png")
    network = r.restore(jpg).image
    for name, extra, quality, clipped, expect in [
        ("c.png", [], 10, True, consistent(network, jpg, read_jpeg(workdir / "a.jpg"))),
        ("d.png", ["--no-jpeg-clip"], 10, False, network),
    ]:
        given = [workdir / "a.jpg", "-o", workdir / name, "--weights", tiny_weights, "--json", "-", *extra]
        rc, out, err = run(capsys, "restore", *given)
        assert rc == 0, err
        [record] = json.loads(out)
        assert (record["jpeg_quality"], record["jpeg_clipped"]) == (quality, clipped)
        assert np.array_equal(read_image(workdir / name), expect)
    assert not np.array_equal(read_image(workdir / "c.png"), network)
    rc, out, err = run(
        capsys,
        "restore",
        workdir / "b.png",
        "-o",
        workdir / "e.png",
        "--weights",
        tiny_weights,
        "--json",
        "-",
    )
    [record] = json.loads(out)
    assert (record["jpeg_quality"], record["jpeg_clipped"]) == (None, False)
    assert np.array_equal(read_image(workdir / "e.png"), r.restore(png).image)


def test_restore_warns_of_a_jpeg_saved_at_quality_95_or_more(workdir, tiny_weights, capsys):
    # On LIVE1 such restorations gained nothing even clipped (QF 98: -0.22 dB in the mean): say so
    bgr = cv2.imread(str(workdir / "b.png"))
    for qf in (90, 97):
        cv2.imwrite(str(workdir / f"q{qf}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, qf])
    rc, _, err = run(capsys, "restore", workdir / "q90.jpg", workdir / "q97.jpg", "-o", workdir / "out")
    assert rc == 0
    said = [ln for ln in err.splitlines() if "qairn: warning:" in ln]
    assert len(said) == 1 and "q97.jpg: a JPEG saved at quality 97" in said[0] and "+0.01 dB at 95" in said[0]
    rc, _, err = run(capsys, "restore", workdir / "q97.jpg", "-o", workdir / "raw.png", "--no-jpeg-clip")
    assert rc == 0 and "-2.02 at 98, unclipped" in err


def test_score_and_restore_json_say_which_weights_and_p_gave_the_scores(workdir, tiny_weights, capsys):
    # The rows held only the path and Q1..Q3: a QC log could not tell scores of other weights (or
    # another p) from these, though the README says they do not compare.
    import dataclasses
    import hashlib

    from qairn.weights_io import load_model, save_weights

    other = workdir / "other.safetensors"  # the same network, pooled with another exponent
    model = load_model(tiny_weights)
    model.config = dataclasses.replace(model.config, p=4.0)
    save_weights(model, other, training={"steps": 0, "note": "p 4"})
    rows = []
    for w in (tiny_weights, other):
        rc, out, err = run(capsys, "score", workdir / "a.jpg", "--json", "--weights", w)
        assert rc == 0, err
        rows.append(json.loads(out))
    rc, _, err = run(
        capsys,
        "restore",
        workdir / "a.jpg",
        "-o",
        workdir / "r.png",
        "--json",
        workdir / "r.json",
        "--weights",
        tiny_weights,
    )
    assert rc == 0, err
    [restored] = json.loads((workdir / "r.json").read_text())
    sha = hashlib.sha256(Path(tiny_weights).read_bytes()).hexdigest()[:16]
    assert rows[0]["weights"] == restored["weights"] == str(Path(tiny_weights).resolve())
    assert rows[0]["weights_sha256"] == restored["weights_sha256"] == sha
    assert rows[0]["p"] == restored["p"] == load_model(tiny_weights).config.p
    assert rows[1]["p"] == 4.0 and rows[1]["weights_sha256"] != sha
    assert rows[1]["Q2"] != rows[0]["Q2"]  # the exponent changed the score, and the row says why


def test_score_json_paths_are_absolute_like_restore_json(workdir, tiny_weights, capsys, monkeypatch):
    # score --json kept the path as typed ('a.jpg') while restore --json wrote it absolute.
    monkeypatch.chdir(workdir)
    rc, out, err = run(capsys, "score", "a.jpg", "--json", "--weights", tiny_weights)
    assert rc == 0, err
    [row] = [json.loads(ln) for ln in out.splitlines()]
    rc, out, err = run(capsys, "restore", "a.jpg", "-o", "out", "--json", "-", "--weights", tiny_weights)
    assert rc == 0, err
    [record] = json.loads(out)
    assert row["path"] == record["path"] == str(workdir / "a.jpg")


def test_score_rows_are_not_printed_onto_the_progress_bar(workdir, tiny_weights, monkeypatch):
    # One terminal shows stdout and stderr: each row came at the end of the bar's line, after its
    # last carriage return ('score:  50%|#####  | 1/2 [...]b.png   0.4979 ...'). What a terminal
    # shows of a line is what follows its last \r.
    import io
    import sys

    class Terminal(io.StringIO):  # a log gets no redraws: see test_progress_in_a_log_is_one_line_per_redraw
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    assert (
        main(["score", str(workdir / "a.jpg"), str(workdir / "b.png"), "--weights", str(tiny_weights)]) == 0
    )
    assert "\rscore: 100%" in screen.getvalue()  # the bar is there, redrawn in place
    shown = [line.split("\r")[-1] for line in screen.getvalue().split("\n")]
    rows = [line for line in shown if "0." in line and not line.startswith("score:")]
    assert [r.split()[0] for r in rows] == [str(workdir / "a.jpg"), str(workdir / "b.png")], shown


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_a_pipe_is_refused_as_a_pipe(workdir, tiny_weights, capsys):
    # `cat a.jpg | qairn score /dev/stdin` said 'empty file (0 bytes)': a pipe's size is 0.
    fifo = workdir / "pipe.jpg"
    os.mkfifo(fifo)
    rc, out, err = run(capsys, "score", fifo, workdir / "a.jpg", "--weights", tiny_weights)
    assert rc == 1 and "a.jpg" in out
    assert error_lines(err) == [
        f"qairn: error: {fifo}: not a regular file (a pipe or device); save the image to a file first"
    ]


def test_a_dash_is_refused_as_standard_input(workdir, tiny_weights, capsys, monkeypatch):
    # `cat a.jpg | qairn score -` said "-: no such file or directory", as if a file were missing; `qairn
    # video -` reads a pipe, so a newcomer tries it here too. A file named "-" is still that file.
    monkeypatch.chdir(workdir)
    rc, out, err = run(capsys, "score", "-", "a.jpg", "--weights", tiny_weights)
    assert rc == 1 and "a.jpg" in out
    assert error_lines(err) == [
        "qairn: error: -: images are not read from standard input; save the image to a file and name it"
    ]
    shutil.copy("a.jpg", "-")
    rc, out, err = run(capsys, "score", "-", "--weights", tiny_weights)
    assert rc == 0 and out.splitlines()[1].split()[0] == "-", out


def test_a_folder_of_folders_says_they_are_not_searched(workdir, tiny_weights, capsys):
    # Photos kept in per-day subfolders: "directory contains no images", though it held them.
    (workdir / "photos" / "day1").mkdir(parents=True)
    shutil.copy(workdir / "a.jpg", workdir / "photos" / "day1" / "a.jpg")
    rc, _, err = run(capsys, "score", workdir / "photos", "--weights", tiny_weights)
    glob = workdir / "photos" / "**" / "*.jpg"
    assert rc == 1 and error_lines(err) == [
        f"qairn: error: {workdir / 'photos'}: directory contains no images (its subfolders are not "
        f"searched: name them, or give a glob such as '{glob}')"
    ]
    rc, out, _ = run(capsys, "score", glob, "--weights", tiny_weights)
    assert rc == 0 and "a.jpg" in out


def test_a_folder_scan_takes_jfif_and_jpe_jpegs(workdir, tiny_weights, capsys):
    # Browsers on Windows save JPEGs as .jfif: a folder of them was "directory contains no images",
    # though each one named on the command line was read.
    (workdir / "saved").mkdir()
    shutil.copy(workdir / "a.jpg", workdir / "saved" / "x.jfif")
    shutil.copy(workdir / "a.jpg", workdir / "saved" / "y.JPE")
    rc, out, err = run(capsys, "score", workdir / "saved", "--weights", tiny_weights)
    assert rc == 0 and err == "", err
    assert [line.split()[0] for line in out.splitlines()[1:]] == [
        str(workdir / "saved" / "x.jfif"),
        str(workdir / "saved" / "y.JPE"),
    ]


def test_score_goes_on_past_an_unsupported_file(workdir, tiny_weights, capsys):
    Image.fromarray((np.random.default_rng(0).random((24, 20)) * 1000).astype(np.int32)).save(
        workdir / "i32.tif"
    )
    rc, out, err = run(capsys, "score", workdir / "i32.tif", workdir / "b.png", "--weights", tiny_weights)
    assert rc == 1 and "b.png" in out
    assert error_lines(err) == [
        f"qairn: error: {workdir / 'i32.tif'}: floating-point or signed pixels are not supported; "
        "save as 8 or 16 bit"
    ]


def test_score_ends_with_a_line_naming_the_inputs_that_failed(workdir, tiny_weights, capsys):
    # score said each failure once, among (or, in a long run, far above) the table rows, and ended
    # without the closing line restore gives: 'scored 1 of 3 images, 2 failed (...)' names them again.
    (workdir / "bad.jpg").write_bytes(b"not a jpeg")
    missing, bad = workdir / "missing.jpg", workdir / "bad.jpg"
    rc, out, err = run(capsys, "score", workdir / "a.jpg", missing, bad, "--weights", tiny_weights)
    assert rc == 1 and "a.jpg" in out
    assert err.strip().splitlines()[-1] == f"qairn: scored 1 of 3 images, 2 failed ({missing}, {bad})"
    rc, _, err = run(capsys, "score", missing, "--weights", tiny_weights)  # nothing found at all
    assert rc == 1 and err.strip().splitlines()[-1] == f"qairn: scored 0 of 1 image, 1 failed ({missing})"
    rc, _, err = run(capsys, "score", workdir / "a.jpg", "--weights", tiny_weights)  # all well: the table
    assert rc == 0 and "scored" not in err


def test_json_never_replaces_an_image_and_is_checked_first(workdir, tiny_weights, capsys):
    before = (workdir / "b.png").read_bytes()
    out = workdir / "out"

    def restore_with_json(json_path):
        rc, _, err = run(
            capsys, "restore", workdir / "b.png", "-o", out, "--json", json_path, "--weights", tiny_weights
        )
        return rc, err

    rc, err = restore_with_json(workdir / "b.png")
    assert rc == 2 and "--json would replace an input or output image" in err
    assert (workdir / "b.png").read_bytes() == before
    rc, err = restore_with_json(workdir / "no" / "q.json")
    assert rc == 2 and "q.json: output folder does not exist" in err and not out.exists()
    (workdir / "q.json").write_text("[]")
    rc, err = restore_with_json(workdir / "q.json")
    assert rc == 2 and "q.json: exists (use --overwrite)" in err
    # a folder is refused before the work too, even with --overwrite (it used to fail at the very end)
    rc, _, err = run(capsys, "restore", workdir / "b.png", "-o", out, "--json", workdir, "--overwrite")
    assert rc == 2 and "is a directory; give a file name for --json" in err and not out.exists()
    # the quality map was written, then the scores went over it: out/b.quality.png held the JSON
    out.mkdir()
    args = ("restore", workdir / "b.png", "-o", out, "--quality-map", "--weights", tiny_weights)
    rc, _, err = run(capsys, *args, "--json", out / "b.quality.png")
    assert rc == 2 and "--json would replace an input or output image" in err and not any(out.iterdir())


def test_file_names_with_glob_characters_are_taken_literally(workdir, tiny_weights, capsys):
    src = workdir / "photo [1].png"
    src.write_bytes((workdir / "b.png").read_bytes())
    rc, _, err = run(capsys, "restore", src, "-o", workdir / "o.png", "--weights", tiny_weights)
    assert rc == 0, err
    assert (workdir / "o.png").exists()


def test_sixteen_bit_tiff_and_ppm_keep_their_depth(tmp_path):
    rgb16 = (np.random.default_rng(2).random((12, 10, 3)) * 65535).astype(np.uint16)
    for name in ("t.tif", "p.ppm"):
        cv2.imwrite(str(tmp_path / name), rgb16[..., ::-1])
        got = read_image(tmp_path / name)
        assert got.dtype == np.uint16, name
        np.testing.assert_array_equal(got, rgb16)
    Image.fromarray(np.random.default_rng(3).random((5, 5)).astype(np.float32), mode="F").save(
        tmp_path / "f.tif"
    )
    with pytest.raises(ImageError, match="f.tif: floating-point or signed pixels are not supported"):
        read_image(tmp_path / "f.tif")


def test_bad_weights_one_line(workdir, tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_text("nope")
    rc, _, err = run(capsys, "score", workdir / "a.jpg", "--weights", junk)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "junk.safetensors" in err


@pytest.mark.parametrize(
    "args, says",
    [
        (["eval", "--data", "{tmp}/none", "--qf", "10"], "qairn eval: error: {tmp}/none: no such folder"),
        (["eval", "--data", "{tmp}/empty", "--qf", "10"], "qairn eval: error: {tmp}/empty: no images found"),
        (["eval-quality", "--data", "{tmp}/none"], "qairn eval-quality: error: {tmp}/none: no such folder"),
        (["train", "--data", "{tmp}/none", "--out", "{tmp}/run"], "qairn train: error: {tmp}/none: no such"),
        # Refused before any work: the measurements would otherwise be lost at the end.
        (
            ["eval", "--data", "{tmp}/imgs", "--json", "{tmp}/no/e.json"],
            "{tmp}/no/e.json: output folder does",
        ),
        (["bench", "--plot", "{tmp}/no/b.png"], "qairn bench: error: {tmp}/no/b.png: output folder does not"),
        (
            ["eval", "--data", "{tmp}/imgs", "--weights", "{tmp}/none.safetensors"],
            "none.safetensors: no such",
        ),
        (  # (--tile 32 was refused here too, for an overlap never given: it runs now)
            ["eval", "--data", "{tmp}/imgs", "--tile", "-5"],
            "--tile -5: must be 0 (whole images) or a positive number",  # (was the Restorer's line)
        ),
        (
            ["train", "--data", "{tmp}/imgs", "--out", "{tmp}/run", "--batch", "0"],
            "qairn train: error: --batch 0",
        ),
        (["train", "--data", "{tmp}/imgs", "--out", "{tmp}/run", "--val-holdout", "1"], "has only 1 image,"),
        (["eval", "--data", "{tmp}/imgs", "--qf", "150"], "--qf 150: JPEG quality factors are 1..100"),
        (
            [
                "eval-quality",
                "--weights",
                "{tmp}/a.safetensors",
                "--sweep-p",
                "--write-p",
                "{tmp}/b.safetensors",
            ],
            "p is swept for --weights",
        ),
    ],
)
def test_other_commands_fail_in_one_line(tmp_path, capsys, args, says):
    (tmp_path / "empty").mkdir()
    (tmp_path / "imgs").mkdir()
    cv2.imwrite(str(tmp_path / "imgs" / "a.png"), np.zeros((16, 16, 3), np.uint8))
    rc, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in args])
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("qairn ") and says.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "no").exists() and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_debug_env_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("QAIRN_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        main(["eval", "--data", str(tmp_path / "none")])


def test_debug_env_shows_the_traceback_of_a_bad_file(workdir, tiny_weights, capsys, monkeypatch):
    # The README: bad input gets one line naming the file, and QAIRN_DEBUG=1 adds the traceback.
    (workdir / "t.jpg").write_bytes((workdir / "a.jpg").read_bytes()[:300])
    for command in (["restore", "-o", workdir / "out"], ["score"]):
        rc, _, err = run(capsys, command[0], workdir / "t.jpg", *command[1:], "--weights", tiny_weights)
        assert rc == 1 and "Traceback" not in err and "t.jpg: truncated" in err
        monkeypatch.setenv("QAIRN_DEBUG", "1")
        rc, _, err = run(capsys, command[0], workdir / "t.jpg", *command[1:], "--weights", tiny_weights)
        monkeypatch.delenv("QAIRN_DEBUG")
        assert rc == 1 and "Traceback" in err and "ImageError" in err and "t.jpg: truncated" in err


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2


def quality_map_layout(png: np.ndarray):
    """(rows, [column runs]) of the coloured (viridis) part of a quality map picture: maps and bars
    are coloured, the background white and the text black or grey."""
    rgb = png.astype(int)
    coloured = rgb.max(-1) - rgb.min(-1) > 30
    rows = np.flatnonzero(coloured.any(1))
    mid = coloured[(rows[0] + rows[-1]) // 2]
    edges = np.flatnonzero(np.diff(np.r_[0, mid.astype(int), 0]))
    return rows, list(zip(edges[::2], edges[1::2]))


def test_quality_map_fixed_and_stretched_panels():
    from matplotlib import colormaps

    from qairn.engine.cli import quality_map_png

    gamma = np.tile(np.linspace(0.7, 0.9, 10, dtype=np.float32), (8, 1))  # a narrow band, as trained
    png = cv2.imdecode(np.frombuffer(quality_map_png(gamma, (20, 16)), np.uint8), cv2.IMREAD_COLOR)
    rgb = png[..., ::-1].astype(int)
    rows, runs = quality_map_layout(png)
    zoom = 96 // 16  # a small image is enlarged by a whole factor
    assert len(rows) == 16 * zoom and [b - a for a, b in runs[::2]] == [20 * zoom, 20 * zoom]  # map, bar, x2
    viridis = (colormaps["viridis"]([0.0, 0.7, 0.9, 1.0])[:, :3] * 255).round().astype(int)
    fixed = rgb[rows[0] : rows[-1] + 1, runs[0][0] : runs[0][1]]
    stretched = rgb[rows[0] : rows[-1] + 1, runs[2][0] : runs[2][1]]
    # Lined up with the image: map cell k covers image pixels 2k and 2k+1, i.e. 2 * zoom picture pixels.
    assert (fixed == fixed[:1]).all() and (np.diff(fixed[0], axis=0) != 0).any(1).sum() == 9
    assert all(
        (fixed[0, 2 * zoom * k : 2 * zoom * (k + 1)] == fixed[0, 2 * zoom * k]).all() for k in range(10)
    )
    fixed, stretched = fixed.reshape(-1, 3), stretched.reshape(-1, 3)

    def has(pixels, colour):
        return (np.abs(pixels - colour).sum(1) <= 3).any()

    # Fixed scale: the band's own colours, not the ends of the map; stretched: both ends.
    assert has(fixed, viridis[1]) and has(fixed, viridis[2])
    assert not has(fixed, viridis[0]) and not has(fixed, viridis[3])
    assert has(stretched, viridis[0]) and has(stretched, viridis[3])


def test_quality_map_colours_are_matplotlibs_viridis_exactly():
    # The map is coloured through a uint8 table (matplotlib's float64 RGBA copy took 32 bytes a cell);
    # every cell must get the colour colormaps["viridis"] gives it, bin edges included.
    from matplotlib import colormaps

    from qairn.engine.cli import quality_map_png

    rng = np.random.default_rng(3)
    gamma = rng.random((48, 64), dtype=np.float32)
    gamma[0, :5] = [0.0, 1.0, 0.5, 1 / 256, 255 / 256]  # the ends and bin edges
    png = cv2.imdecode(np.frombuffer(quality_map_png(gamma, (128, 96)), np.uint8), cv2.IMREAD_COLOR)
    rows, runs = quality_map_layout(png)
    fixed = png[rows[0] : rows[-1] + 1, runs[0][0] : runs[0][1], ::-1]
    expected = (colormaps["viridis"](gamma)[..., :3] * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(fixed[::2, ::2], expected)


def test_quality_map_of_a_huge_image_is_drawn_smaller_and_says_so(monkeypatch):
    # Pixel for pixel, a 108 MP image's map took 46 s, 3.9 GB and a 402 MB PNG; over MAX_MAP_PIXELS it
    # is drawn at 1/k size (here the limit is lowered, not the image enlarged).
    import qairn.engine.cli as engine_cli

    texts, put = [], cv2.putText
    monkeypatch.setattr(
        cv2, "putText", lambda img, text, *a, **k: texts.append(text) or put(img, text, *a, **k)
    )
    monkeypatch.setattr(engine_cli, "MAX_MAP_PIXELS", 200 * 200)
    gamma = np.tile(np.linspace(0, 1, 300, dtype=np.float32), (200, 1))
    png = cv2.imdecode(np.frombuffer(engine_cli.quality_map_png(gamma, (600, 400)), np.uint8), 1)
    rows, runs = quality_map_layout(png)
    assert len(rows) == 134 and runs[0][1] - runs[0][0] == 200  # 1/3: ceil(sqrt(6)) = 3
    assert "quality gamma2, 0..1 (1/3 size)" in texts and "quality gamma2, stretched (1/3 size)" in texts
    texts.clear()
    monkeypatch.setattr(engine_cli, "MAX_MAP_PIXELS", 600 * 400)
    png = cv2.imdecode(np.frombuffer(engine_cli.quality_map_png(gamma, (600, 400)), np.uint8), 1)
    rows, runs = quality_map_layout(png)
    assert len(rows) == 400 and runs[0][1] - runs[0][0] == 600  # at the limit: pixel for pixel
    assert "quality gamma2, 0..1" in texts


def test_quality_map_of_a_flat_gamma_is_not_painted_worst():
    from matplotlib import colormaps

    from qairn.engine.cli import quality_map_png

    # gamma 0.8 everywhere: the stretched panel (range 0) was all the darkest colour, the 'worse' end.
    png = cv2.imdecode(np.frombuffer(quality_map_png(np.full((4, 5), 0.8, np.float32), (10, 8)), np.uint8), 1)
    rgb = png[..., ::-1].astype(int)
    rows, runs = quality_map_layout(png)
    stretched = rgb[rows[0] : rows[-1] + 1, runs[2][0] : runs[2][1]].reshape(-1, 3)
    middle = (np.array(colormaps["viridis"](0.5)[:3]) * 255).round().astype(int)
    assert (np.abs(stretched - middle).sum(1) <= 3).all(), stretched[0]


def test_quality_map_labels_are_readable_at_any_size():
    from qairn.engine.cli import quality_map_png

    # A fixed 8-pixel font could not be read on a photo seen whole, and white titles drawn over the
    # map vanished where it was yellow; a 1-pixel image had no room for any label.
    for w, h in ((800, 600), (1, 1), (300, 3)):
        gamma = np.random.default_rng(0).random((-(-h // 2), -(-w // 2)), dtype=np.float32)
        png = cv2.imdecode(np.frombuffer(quality_map_png(gamma, (w, h)), np.uint8), cv2.IMREAD_COLOR)
        rows, _ = quality_map_layout(png)
        dark = (png.astype(int).max(-1) < 80).any(1)  # rows that hold black text
        assert dark[: rows[0]].any(), (w, h)  # the titles: black, above the maps
        assert dark.sum() >= 0.05 * len(rows) and dark.sum() >= 15, (w, h)  # titles and bar labels
        assert len(rows) >= min(96, 4096 // w * h), (w, h)


def test_quality_map_bar_labels_do_not_overlap_on_a_flat_wide_image():
    from qairn.engine.cli import quality_map_png

    # 2560 x 4 cannot be enlarged (4096 pixels wide at most): its bar was 4 pixels tall and the labels
    # 1.000 and 0.000 printed over each other. Below the titles, the label rows form two apart runs.
    for w, h in ((2560, 4), (800, 600), (1, 1)):
        gamma = np.random.default_rng(0).random((-(-h // 2), -(-w // 2)), dtype=np.float32)
        png = cv2.imdecode(np.frombuffer(quality_map_png(gamma, (w, h)), np.uint8), cv2.IMREAD_COLOR)
        rows, _ = quality_map_layout(png)
        dark = (png[rows[0] :].astype(int).max(-1) < 80).any(1).astype(int)
        starts = np.flatnonzero(np.diff(np.r_[0, dark]) == 1)
        assert len(starts) == 2 and dark[-1] == 0, (w, h, len(starts))


def test_quality_map_colour_bars_say_which_end_is_better(monkeypatch):
    # The bars were labelled 1.000 / 0.000 (0.900 / 0.700) only: nothing said that a high gamma is
    # the good end. Each panel's upper label (drawn higher up) must say better, its lower one worse.
    from qairn.engine.cli import quality_map_png

    drawn = []
    real = cv2.putText

    def record(img, text, org, *args, **kwargs):
        drawn.append((text, org[1]))
        return real(img, text, org, *args, **kwargs)

    monkeypatch.setattr(cv2, "putText", record)
    quality_map_png(np.tile(np.linspace(0.7, 0.9, 10, dtype=np.float32), (8, 1)), (20, 16))
    labels = [(t, y) for t, y in drawn if t[0].isdigit()]  # the titles start with a word
    assert [t for t, _ in labels] == ["1.000 better", "0.000 worse", "0.900 better", "0.700 worse"]
    assert labels[0][1] < labels[1][1] and labels[2][1] < labels[3][1]
    assert any("quality" in t for t, _ in drawn if not t[0].isdigit())


def command_parsers(monkeypatch) -> dict:
    """Every `qairn COMMAND`'s argparse parser (export's subcommands each), as --help builds it."""
    import argparse
    import importlib

    from qairn.cli import COMMANDS

    seen = []

    def capture(self, *args, **kwargs):
        seen.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    parsers = {}
    for name, (module, func) in COMMANDS.items():
        seen.clear()
        with pytest.raises(SystemExit):
            getattr(importlib.import_module(module), func)([])
        parsers[name] = seen[0]
        for action in seen[0]._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.update({f"{name} {sub}": p for sub, p in action.choices.items()})
    return parsers


def test_every_option_of_every_command_has_help(monkeypatch, capsys):
    import argparse
    import re

    parsers = command_parsers(monkeypatch)
    assert {"restore", "score", "video", "train", "eval", "eval-quality", "bench", "export onnx"} <= set(
        parsers
    )
    missing = []
    for name, p in parsers.items():
        assert p.format_help()  # renders
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            text = re.sub(r"\(default: [^)]*\)", "", action.help or "").strip()
            # A help that only repeats the default, or trails off, tells the user nothing to act on.
            if not text or text.endswith("..."):
                missing.append(f"qairn {name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "\n".join(missing)


def test_every_option_with_a_default_says_it_in_its_help(monkeypatch):
    # --limit, --workers, --seed, --tile, --precision, --io, --budget-s and --video each had a default
    # the help never gave, so a reader had to guess what leaving it out does.
    import argparse

    flags = (
        argparse._HelpAction,
        argparse._StoreTrueAction,
        argparse._StoreFalseAction,
        argparse._VersionAction,
    )
    silent = []
    for name, p in command_parsers(monkeypatch).items():
        for a in p._actions:
            if isinstance(a, flags) or not a.option_strings or a.default in (None, argparse.SUPPRESS, []):
                continue
            if "default" not in (a.help or ""):
                silent.append(f"qairn {name} {'/'.join(a.option_strings)} (default {a.default!r})")
    assert not silent, "\n".join(silent)


def test_restore_json_help_says_what_the_file_holds(monkeypatch):
    """restore --json holds each image's absolute input and output paths beside Q1..Q3 (write_records);
    its help said only 'per-image Q1..Q3', so a reader could not tell the file names the images."""
    p = command_parsers(monkeypatch)["restore"]
    text = " ".join(next(a.help for a in p._actions if "--json" in a.option_strings).split())
    assert "absolute" in text and "output paths" in text and "Q1..Q3" in text


def test_score_json_help_says_the_paths_are_absolute(monkeypatch):
    """score --json lines hold the absolute path (main_score), as restore --json does; --help did not say."""
    p = command_parsers(monkeypatch)["score"]
    text = " ".join(next(a.help for a in p._actions if "--json" in a.option_strings).split())
    assert "absolute path" in text


def test_json_help_names_what_scored_the_rows(monkeypatch):
    """restore and score --json rows carry p, weights and weights_sha256 since 0ba7013 (scores from other
    weights or another p do not compare); both helps still said 'paths and Q1..Q3' only."""
    for name in ("restore", "score"):
        p = command_parsers(monkeypatch)[name]
        text = " ".join(next(a.help for a in p._actions if "--json" in a.option_strings).split())
        assert "p, weights and weights_sha256" in text, (name, text)


def test_onnx_and_engine_take_a_file_in_the_help(monkeypatch):
    """-h showed `--onnx ONNX` and `--engine ENGINE` (argparse's upper-cased name), as if the value were
    a mode; each takes a file."""
    parsers = command_parsers(monkeypatch)
    for name in ("restore", "score", "video", "export tensorrt"):
        usage = " ".join(parsers[name].format_usage().split())
        assert "[--onnx FILE]" in usage, (name, usage)
        if name != "export tensorrt":
            assert "[--engine FILE]" in usage, (name, usage)


def test_a_closed_pipe_ends_quietly(workdir, tiny_weights):
    """`qairn score ... | head -1`: exit 141 like other tools, no 'Broken pipe' error or traceback."""
    import subprocess
    import sys
    import threading

    files = [str(workdir / "a.jpg")] * 40  # more rows than the pipe takes before the reader leaves
    cmd = [sys.executable, "-m", "qairn.cli", "score", *files, "--weights", str(tiny_weights)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stuck = threading.Timer(120, p.kill)  # a run that hangs fails (exit -9) instead of holding the suite
    stuck.start()
    try:
        p.stdout.readline()
        p.stdout.close()
        err = p.stderr.read().decode()
        assert p.wait() == 141 and "Broken pipe" not in err and "Traceback" not in err, err
    finally:
        stuck.cancel()
        p.kill()
        p.wait()


def test_the_closing_line_names_at_most_five_failed_images():
    from qairn.engine.cli import restore_summary

    records = [{"path": "/a.jpg", "output": "/out/a.png"}]
    line = restore_summary(records, 8, [f"b{i}.jpg" for i in range(7)])
    assert (
        line
        == "qairn: restored 1 of 8 images into /out, 7 failed (b0.jpg, b1.jpg, b2.jpg, b3.jpg, b4.jpg ...)"
    )


def test_the_closing_line_names_inputs_never_found(workdir, tiny_weights, capsys):
    # 'restored 1 of 3 images into out, 2 failed' counted a missing file and a glob matching nothing
    # without naming them, while images that failed later were named.
    out = workdir / "out"
    args = [workdir / "a.jpg", workdir / "missing.jpg", workdir / "none*.png", "-o", out]
    rc, _, err = run(capsys, "restore", *args, "--weights", tiny_weights)
    assert rc == 1
    names = f"{workdir / 'missing.jpg'}, {workdir / 'none*.png'}"
    assert err.strip().splitlines()[-1] == f"qairn: restored 1 of 3 images into {out}, 2 failed ({names})"


def test_progress_in_a_log_is_one_line_per_redraw(workdir, tiny_weights, capsys, monkeypatch):
    # `qairn restore ... 2> log.txt`: tqdm's redraws went back with '\r' (and up with ESC[A for the
    # tile bar), so the log was one enormous line. LOG_EVERY_S = 0 draws every update.
    import qairn.engine.progress as progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0)
    args = [workdir / "a.jpg", workdir / "b.png", "-o", workdir / "out", "--tile", 64, "--overlap", 16]
    rc, _, err = run(capsys, "restore", *args, "--weights", tiny_weights)
    assert rc == 0, err
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert any(ln.startswith("restore:  50%") for ln in lines)
    assert any(ln.startswith("tiles:") for ln in lines)  # 96x128 in 64-pixel tiles: more than one batch
    assert all(ln.strip() for ln in lines)  # no line left from tqdm clearing its own


def test_score_table_columns_line_up_with_wide_file_names(workdir, tiny_weights, capsys):
    # A CJK name takes two terminal columns a character: its row's scores sat 5 columns right of the
    # header's and of a.jpg's (padding counted characters).
    import unicodedata

    wide = workdir / "東京の写真.jpg"
    wide.write_bytes((workdir / "a.jpg").read_bytes())
    rc, out, err = run(capsys, "score", workdir / "a.jpg", wide, "--weights", tiny_weights)
    assert rc == 0, err

    def columns(line):  # where 'Q3' or the row's last score ends, in terminal columns
        return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in line.rstrip())

    assert len({columns(line) for line in out.splitlines()}) == 1, out


@pytest.mark.parametrize(
    "cmd", [["eval", "--jpeg-only", "--data"], ["eval-quality", "--no-report", "--data"], ["bench", "--json"]]
)
def test_a_plot_not_named_png_is_refused_before_any_work(tmp_path, capsys, cmd):
    # --plot r.pdf wrote PNG bytes into r.pdf (save_figure writes PNG whatever the name), after the run.
    plot = tmp_path / "r.pdf"
    rc, _, err = run(capsys, *cmd, tmp_path / "x", "--plot", plot)
    says = f"--plot {plot}: the figure is written as PNG; give a name ending in .png"
    assert rc == 2 and err.strip().splitlines() == [f"qairn {cmd[0]}: error: {says}"]
    assert not plot.exists()


def test_eval_quality_help_describes_eval_quality(monkeypatch):
    # Its description was the module's docstring, which opens on the other command: 'Evaluation.
    # `qairn eval`: JPEG restoration in the layout of the paper's Table I ...'.
    text = " ".join(command_parsers(monkeypatch)["eval-quality"].description.split())
    assert "qairn eval`" not in text and "Table I " not in text
    assert "Tables II and III" in text and "not human opinion scores" in text


def test_an_empty_input_or_output_name_is_refused(workdir, tiny_weights, capsys, monkeypatch):
    # `qairn restore "$IN" -o "$OUT"` with a variable unset: '' is Path('.'), so an empty IN restored
    # every image of the working folder and an empty OUT wrote beside them.
    monkeypatch.chdir(workdir)
    rc, _, err = run(capsys, "restore", "a.jpg", "-o", "", "--weights", tiny_weights)
    assert rc == 2 and error_lines(err) == ["qairn: error: -o '': an empty name; give a file or folder name"]
    rc, _, err = run(capsys, "score", "", "--weights", tiny_weights)
    assert rc == 1 and error_lines(err) == ["qairn: error: '': an empty name, not a file or folder"]
    assert sorted(p.name for p in workdir.iterdir()) == ["a.jpg", "b.png"]


def test_qairn_alone_prints_its_usage_as_an_error(capsys):
    # `qairn` with no command exited 2 with the usage on stdout: `qairn > out.txt` put it in the file
    # and left the terminal blank. An error goes to stderr, as an unknown command's does; -h to stdout.
    rc, out, err = run(capsys)
    assert rc == 2 and out == "" and err.startswith("usage: qairn {restore,score,")
    rc, out, err = run(capsys, "-h")
    assert rc == 0 and err == "" and out.startswith("usage: qairn {restore,score,")


def test_qairn_help_says_what_each_command_does(capsys):
    # `qairn -h` printed the usage line alone: eight command names and not a word of what they do.
    rc, out, _ = run(capsys, "--help")
    lines = out.splitlines()
    assert rc == 0 and "commands:" in lines
    listed = [line.split()[0] for line in lines[lines.index("commands:") + 1 :]]
    assert listed == ["restore", "score", "train", "eval", "eval-quality", "export", "bench", "video"]
    assert "  score         no-reference quality Q1..Q3 of images" in lines


@pytest.mark.parametrize(
    "args",
    [
        ["restore", "{a}", "-o", "{tmp}/o.png", "--json", ""],
        ["eval", "--jpeg-only", "--data", ""],
        ["eval", "--jpeg-only", "--data", "{tmp}", "--json", ""],
        ["eval-quality", "--no-report", "--data", "{tmp}", "--json", ""],
        ["eval-quality", "--data", "{tmp}", "--plot", ""],
    ],
)
def test_an_empty_file_option_is_refused(workdir, tmp_path, capsys, monkeypatch, args):
    # An unset variable ('--json "$OUT"') wrote no JSON and said nothing (exit 0); --data '' took the
    # working folder, Path('.'), and evaluated every image under it.
    monkeypatch.chdir(workdir)
    with pytest.raises(SystemExit) as e:
        main([a.format(a=workdir / "a.jpg", tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().splitlines()[-1].endswith(
        ": an empty name, not a file or folder"
    )


def test_json_in_or_at_the_output_folder_this_run_makes(workdir, tiny_weights, capsys):
    # --json out/q.json with -o out (to be made) was refused: 'output folder does not exist'. --json out
    # with -o out/sub passed the check, restored every image, then failed: 'out: cannot write (Is a
    # directory)', exit 1.
    inputs = (workdir / "a.jpg", workdir / "b.png", "--weights", tiny_weights)
    out = workdir / "out"
    rc, _, err = run(capsys, "restore", *inputs, "-o", out, "--json", out / "q.json")
    assert rc == 0, err
    records = json.loads((out / "q.json").read_text())
    assert [os.path.basename(r["output"]) for r in records] == ["a.png", "b.png"]
    # Every image failed: the folder made was removed before the JSON went into it ('No such file').
    (workdir / "bad.png").write_bytes(b"junk")
    args = ("-o", workdir / "o2/", "--json", workdir / "o2/q.json", "--weights", tiny_weights)
    rc, _, err = run(capsys, "restore", workdir / "bad.png", *args)
    assert rc == 1 and json.loads((workdir / "o2" / "q.json").read_text()) == [], err
    rc, _, err = run(capsys, "restore", *inputs, "-o", workdir / "new" / "sub", "--json", workdir / "new")
    says = f"{workdir / 'new'}: is a directory; give a file name for --json"
    assert rc == 2 and error_lines(err) == [f"qairn: error: {says}"] and not (workdir / "new").exists(), err


@pytest.mark.parametrize(
    "value, says",
    [
        ("inf", "'inf': the pixel limit must be a finite number"),
        ("1e400", "'1e400': the pixel limit must be a finite number"),
        ("0", "'0': the pixel limit must be 1 or more"),
        ("nan", "'nan': the pixel limit must be 1 or more"),
    ],
)
def test_max_pixels_out_of_range_says_why(workdir, capsys, value, says):
    # --max-pixels inf (or 1e400, inf as a float) was refused as 'the pixel limit must be 1 or more'.
    with pytest.raises(SystemExit) as e:
        main(["restore", str(workdir / "a.jpg"), "-o", str(workdir / "o.png"), "--max-pixels", value])
    err = capsys.readouterr().err
    assert (
        e.value.code == 2
        and err.strip().splitlines()[-1] == f"qairn restore: error: argument --max-pixels: {says}"
    )


def test_an_empty_format_is_refused(workdir, tiny_weights, capsys):
    # --format "$FMT" with the variable unset was taken as no --format: PNGs, without a word (exit 0).
    out = workdir / "out"
    with pytest.raises(SystemExit) as e:
        main(
            [
                "restore",
                str(workdir / "a.jpg"),
                "-o",
                str(out),
                "--format",
                "",
                "--weights",
                str(tiny_weights),
            ]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and not out.exists()
    assert (
        err.strip().splitlines()[-1]
        == "qairn restore: error: argument --format: an empty suffix; give one such as .png"
    )


@pytest.mark.parametrize("command", ["eval", "eval-quality", "train"])
def test_data_naming_a_file_says_it_is_not_a_folder(tmp_path, capsys, command):
    # `qairn eval --data a.png` said "a.png: no such folder" of a file that is there.
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((16, 16, 3), np.uint8))
    more = ["--out", tmp_path / "run"] if command == "train" else []
    rc, _, err = run(capsys, command, "--data", image, *more)
    assert rc == 2 and err.strip() == f"qairn {command}: error: {image}: a file, not a folder of images", err


def test_when_no_input_is_found_the_closing_line_and_json_say_so(workdir, capsys):
    # None of the inputs found: no closing line, and --json not written, so the JSON of an earlier run
    # stayed in place and read as this run's. It is now a run where every image failed: the closing
    # line names them, the JSON holds no records, exit 1. No model is loaded, no folder made.
    report = workdir / "r.json"
    report.write_text('[{"path": "an earlier run"}]')
    args = [workdir / "missing.jpg", workdir / "none*.png", "-o", workdir / "out", "--json", report]
    rc, _, err = run(capsys, "restore", *args)
    assert rc == 2 and err.strip().splitlines()[-1] == f"qairn: error: {report}: exists (use --overwrite)"
    assert json.loads(report.read_text()) == [{"path": "an earlier run"}]
    rc, _, err = run(capsys, "restore", *args, "--overwrite", "--weights", workdir / "none.safetensors")
    names = f"{workdir / 'missing.jpg'}, {workdir / 'none*.png'}"
    assert rc == 1 and err.strip().splitlines()[-1] == f"qairn: restored 0 of 2 images, 2 failed ({names})"
    assert json.loads(report.read_text()) == [] and not (workdir / "out").exists()


def test_restore_summary_of_one_input_says_image_not_images():
    """One missing input ended 'restored 0 of 1 images, 1 failed (a.jpg)'."""
    from qairn.engine.cli import restore_summary

    assert restore_summary([], 1, ["a.jpg"]) == "qairn: restored 0 of 1 image, 1 failed (a.jpg)"
    assert restore_summary([], 2, ["a.jpg", "b.jpg"]).startswith("qairn: restored 0 of 2 images, 2 failed")


def test_a_progress_line_in_a_log_holds_no_cursor_moves():
    """The tile bar (position=1) redraws with ESC[A (cursor up) and '\\r': in a log (`2> log.txt`) each
    redraw is a plain line of its own, with no escape codes left in it, and tqdm's blank clearing
    writes are no lines at all."""
    import io

    from qairn.engine.progress import LogLines

    buf = io.StringIO()
    log = LogLines(buf)
    log.write("\x1b[A\rtiles:  50%|#####     | 2/4\r")
    log.write("\r    \r")
    log.write("\n\x1b[A")
    assert buf.getvalue() == "tiles:  50%|#####     | 2/4\n"


def test_a_progress_bar_in_a_log_writes_no_opening_line(monkeypatch):
    """Off a terminal the first line comes after LOG_EVERY_S, as the later ones: a log of many short
    runs (one `qairn restore` per file in a loop) got a '0%' line from each."""
    import io
    import sys

    from qairn.engine.progress import progress_bar

    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    bar = progress_bar(total=3, desc="restore")
    try:
        assert buf.getvalue() == ""
        bar.update(1)
        assert buf.getvalue() == ""
    finally:
        bar.close()


def test_a_run_that_wrote_nothing_leaves_no_output_folder(workdir, tiny_weights, capsys):
    """The output folder (and its missing parents) was made before the images were read: a run whose
    every image failed (a corrupt JPEG) left an empty out/new/ behind. A folder that was there stays."""
    (workdir / "bad.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)))
    out = workdir / "out" / "new"
    rc, _, err = run(capsys, "restore", workdir / "bad.jpg", "-o", f"{out}/", "--weights", tiny_weights)
    assert rc == 1 and "bad.jpg: not an image" in err
    assert not (workdir / "out").exists()
    (workdir / "kept").mkdir()
    rc, _, _ = run(capsys, "restore", workdir / "bad.jpg", "-o", workdir / "kept", "--weights", tiny_weights)
    assert rc == 1 and (workdir / "kept").is_dir()


@pytest.mark.parametrize("command", ["score", "restore", "video"])
def test_no_overlap_option_leaves_the_restorer_its_own_default(command, tmp_path, monkeypatch):
    """The CLIs passed overlap=32 when --overlap was not given, so the Restorer took it as chosen: a
    static export with 16- or 32-pixel tiles, whose default overlap is fitted to its tile, was refused
    ("overlap 32 ... must be smaller than the tile 16"). No --overlap now passes None."""
    import qairn.engine.restorer as restorer_mod

    seen = []

    def restorer(**options):  # stands in for the model: the run ends here, with an error line
        seen.append(options["overlap"])
        raise RuntimeError("stand-in Restorer")

    monkeypatch.setattr(restorer_mod, "Restorer", restorer)
    sample = Path(__file__).resolve().parents[1] / "examples" / "sample_q10.jpg"
    out = ["-o", str(tmp_path / "o.png")] if command == "restore" else []
    if command == "video":
        from qairn.engine.video import main as run

        out = [str(tmp_path / "o.mp4")]
    else:
        import qairn.engine.cli as engine_cli

        run = getattr(engine_cli, f"main_{command}")
    for extra in ([], ["--overlap", "16"]):
        assert run([str(sample), *out, *extra]) != 0
    assert seen == [None, 16]


def test_restore_with_a_tile_of_32_and_no_overlap_runs(workdir, tiny_weights, capsys):
    """--tile 32 was refused as "--tile 32 with --overlap 32: overlap 32 ... must be smaller than the tile
    32", naming an --overlap never given; it runs now, with the overlap a 32-pixel tile fits (0)."""
    out = workdir / "o.png"
    rc, _, err = run(
        capsys, "restore", workdir / "a.jpg", "-o", out, "--tile", "32", "--weights", tiny_weights
    )
    assert rc == 0 and error_lines(err) == [] and out.exists()
    with pytest.raises(SystemExit):  # an --overlap given is still checked, by argparse
        main(
            [
                "restore",
                str(workdir / "a.jpg"),
                "-o",
                str(workdir / "p.png"),
                "--tile",
                "32",
                "--overlap",
                "32",
            ]
        )
    assert "--tile 32 with --overlap 32: overlap 32" in capsys.readouterr().err


def test_overwrite_never_replaces_another_input(workdir, tiny_weights, capsys, monkeypatch):
    """a.jpg and z/a.png -o z are named a.png and z_a.png: a.jpg's output is the input z/a.png. With
    --overwrite it replaced z/a.png before z/a.png was read, so z_a.png restored a.jpg a second time
    and the RGBA original was lost, with 'restored 2 of 2 images'. --overwrite replaces an input with
    its own restoration only; this one is refused in one line."""
    monkeypatch.chdir(workdir)
    (workdir / "z").mkdir()
    cv2.imwrite("z/a.png", np.full((8, 8, 4), 200, np.uint8))
    original = (workdir / "z" / "a.png").read_bytes()
    rc, _, err = run(
        capsys, "restore", "a.jpg", "z/a.png", "-o", "z", "--overwrite", "--weights", tiny_weights
    )
    assert rc == 1 and error_lines(err) == [
        "qairn: error: z/a.png: is another input; a.jpg's output would replace it (give another -o)"
    ]
    assert (workdir / "z" / "a.png").read_bytes() == original
    assert read_image(workdir / "z" / "z_a.png").shape == (8, 8, 4)


def test_an_image_under_the_network_stride_is_scored_with_a_warning(workdir, tiny_weights, capsys):
    """A 7x5 image is mostly the replicate padding up to the network's 16 x 16: with the shipped weights
    a 1x1 image scored Q1 0.45, Q2 0.53, Q3 0.60 whatever its colour, a row like any other. score and
    restore now say so, naming the file; a 16 x 16 image is scored without a word of it."""
    bgr = cv2.imread(str(workdir / "b.png"))
    cv2.imwrite(str(workdir / "tiny.png"), bgr[:5, :7])
    cv2.imwrite(str(workdir / "s16.png"), bgr[:16, :16])
    says = "7x5 pixels, under the network's 16 on a side: its Q1..Q3 mostly measure the padding"
    rc, out, err = run(capsys, "score", workdir / "tiny.png", workdir / "s16.png", "--weights", tiny_weights)
    assert rc == 0 and "tiny.png" in out and "s16.png" in out
    assert [ln for ln in err.splitlines() if "warning" in ln] == [
        f"qairn: warning: {workdir / 'tiny.png'}: {says}"
    ], err
    rc, _, err = run(
        capsys, "restore", workdir / "tiny.png", "-o", workdir / "o.png", "--weights", tiny_weights
    )
    assert rc == 0 and f"qairn: warning: {workdir / 'tiny.png'}: {says}" in err, err


def test_a_flat_image_is_scored_with_a_warning(workdir, tiny_weights, capsys):
    """An image of one colour holds nothing to judge, yet scored like any other: with the shipped weights
    a flat black 64x64 scored Q2 0.768, above every LIVE1 JPEG tried, and white 0.643. score and restore
    now say so, naming the file; a flat alpha channel over varied colours is no flat image."""
    flat = np.zeros((24, 32, 4), np.uint8)
    flat[..., 3] = np.arange(32, dtype=np.uint8)  # the colour is flat, the alpha is not
    cv2.imwrite(str(workdir / "flat.png"), flat)
    rgba = np.concatenate([cv2.imread(str(workdir / "b.png")), np.full((96, 128, 1), 255, np.uint8)], axis=2)
    cv2.imwrite(str(workdir / "opaque.png"), rgba)
    says = (
        "flat (every channel's standard deviation at most 1/255 of full scale): it holds nothing to judge,"
        " its Q1..Q3 say nothing of it"
    )
    rc, out, err = run(
        capsys, "score", workdir / "flat.png", workdir / "opaque.png", "--weights", tiny_weights
    )
    assert rc == 0 and "flat.png" in out and "opaque.png" in out
    assert [ln for ln in err.splitlines() if "warning" in ln] == [
        f"qairn: warning: {workdir / 'flat.png'}: {says}"
    ], err
    rc, _, err = run(
        capsys, "restore", workdir / "flat.png", "-o", workdir / "o.png", "--weights", tiny_weights
    )
    assert rc == 0 and f"qairn: warning: {workdir / 'flat.png'}: {says}" in err, err


def test_quality_map_text_of_a_tall_image_leaves_the_maps_most_of_the_width():
    from qairn.engine.cli import quality_map_png

    # The font followed the picture's height alone: a 400 x 3000 scroll capture got labels 4.3 times
    # the size of a 768 x 512 photo's, and its two maps filled a quarter of the picture's width, the
    # rest white space around the bar labels (40 x 2000: 4%). The font follows the height up to twice
    # the width (a 512 x 768 portrait's maps: 66% of the width, as before).
    for w, h in ((400, 3000), (768, 512)):
        gamma = np.random.default_rng(0).random((-(-h // 2), -(-w // 2)), dtype=np.float32)
        png = cv2.imdecode(np.frombuffer(quality_map_png(gamma, (w, h)), np.uint8), cv2.IMREAD_COLOR)
        assert 2 * w / png.shape[1] >= 0.55, (w, h, png.shape)


def test_score_json_and_restore_json_give_one_image_the_same_numbers(workdir, tiny_weights, capsys):
    """score --json rounded Q1..Q3 to 6 decimals (as the video trace does) and restore --json wrote the
    float32 in full: a QC script joining the two on the path saw 0.895367 against 0.8953672647476196."""
    rc, out, err = run(capsys, "score", workdir / "a.jpg", "--json", "--weights", tiny_weights)
    assert rc == 0, err
    [row] = [json.loads(ln) for ln in out.splitlines()]
    rc, out, err = run(
        capsys,
        "restore",
        workdir / "a.jpg",
        "-o",
        workdir / "o.png",
        "--json",
        "-",
        "--weights",
        tiny_weights,
    )
    assert rc == 0, err
    [record] = json.loads(out)
    assert {q: record[q] for q in ("Q1", "Q2", "Q3")} == {q: row[q] for q in ("Q1", "Q2", "Q3")}


def test_python_dash_m_qairn_runs_the_command_line():
    # `python -m qairn` failed ("No module named qairn.__main__"): the command was reachable only
    # through the console script, which an environment's PATH may not hold.
    import subprocess
    import sys

    run_m = [sys.executable, "-m", "qairn"]
    helped = subprocess.run([*run_m, "-h"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: qairn {restore,score,"), helped.stderr
    bad = subprocess.run([*run_m, "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown command 'nope'" in bad.stderr


@pytest.mark.parametrize(
    "typed, hint",
    [
        ("resotre", "unknown command 'resotre' (did you mean restore?)"),
        ("scores", "unknown command 'scores' (did you mean score?)"),
        # The image given first, as `qairn a.jpg -o out.png`: it is a file, not a command.
        (
            "a.jpg",
            "unknown command 'a.jpg' (a file: the command comes first, e.g. qairn restore a.jpg -o OUT)",
        ),
        ("nope", "unknown command 'nope'"),
    ],
)
def test_an_unknown_command_says_what_was_meant(workdir, capsys, monkeypatch, typed, hint):
    monkeypatch.chdir(workdir)
    rc, out, err = run(capsys, typed, "-o", "out.png")
    assert rc == 2 and out == "" and err.splitlines()[0] == f"qairn: {hint}", err
    assert not (workdir / "out.png").exists()


# ---- --onnx and --engine: running a file the user exported ---------------------------------------
@pytest.fixture(scope="module")
def tiny_onnx(tiny_weights, tmp_path_factory):
    """tiny_weights exported as `qairn export onnx --maps` writes it (unverified: about a second)."""
    from qairn.export import onnx_export as ox
    from qairn.weights_io import load_model

    folder = tmp_path_factory.mktemp("onnx")
    return ox.export_onnx(load_model(tiny_weights), folder / "tiny.onnx", outputs="maps")


def test_score_and_restore_run_a_given_onnx_file_as_the_library_does(workdir, tiny_onnx, capsys):
    """`--backend onnxruntime` ran qairn's own cached export of the weights (the shipped ones without
    --weights): a file exported and checked for deployment could not be run from the command line
    ('unrecognized arguments: --onnx'). It runs now as Restorer(backend="onnxruntime", onnx=F) runs it,
    and the --json rows name that file, not the shipped weights that did not run."""
    import hashlib

    import qairn
    from qairn.engine.cli import json_quality

    img = read_image(workdir / "a.jpg")
    r = qairn.Restorer(device="cpu", backend="onnxruntime", onnx=tiny_onnx)
    # restore's picture of a JPEG: the network's, clipped to the file's quantization bins
    jpeg = read_jpeg(workdir / "a.jpg")
    expect_q, expect_image = json_quality(r.score(img)), consistent(r.restore(img).image, img, jpeg)
    file = {
        "p": r.p,
        "weights": os.path.abspath(tiny_onnx),
        "weights_sha256": hashlib.sha256(Path(tiny_onnx).read_bytes()).hexdigest()[:16],
    }
    given = ["--backend", "onnxruntime", "--onnx", tiny_onnx]
    rc, out, err = run(capsys, "score", workdir / "a.jpg", *given, "--json")
    assert rc == 0, err
    row = json.loads(out)
    assert {k: row[k] for k in expect_q} == expect_q
    assert {k: row[k] for k in file} == file
    rc, out, err = run(capsys, "restore", workdir / "a.jpg", "-o", workdir / "r.png", *given, "--json", "-")
    assert rc == 0, err
    [record] = json.loads(out)
    assert {k: record[k] for k in expect_q} == expect_q
    assert {k: record[k] for k in file} == file
    assert np.array_equal(read_image(workdir / "r.png"), expect_image)


def model_not_loaded(*args, **kwargs):
    raise AssertionError("the model was loaded")


@pytest.mark.parametrize("command", ["score", "restore", "video"])
def test_export_files_that_cannot_run_are_one_line_before_the_model_loads(
    command, workdir, tiny_weights, tiny_onnx, capsys, monkeypatch
):
    """--onnx and --engine as the Restorer takes them: --onnx with onnxruntime or tensorrt, --engine with
    tensorrt; a file that is not there (an --engine path the Restorer would build an engine at, for
    minutes) or a folder; --weights beside an --onnx file, whose own network and weights would run
    (the Restorer only checks that the two are the same network). Each is refused in one line, exit 2,
    before the model loads."""
    monkeypatch.setattr("qairn.engine.restorer.Restorer", model_not_loaded)
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.9.0"))  # none here
    engine = workdir / "q.engine"
    engine.write_bytes(b"engine")
    (workdir / "folder.onnx").mkdir()
    where = {"score": [], "restore": ["-o", workdir / "o.png"], "video": [workdir / "o.mp4"]}[command]
    src = workdir / ("in.mp4" if command == "video" else "a.jpg")
    ort, trt = ["--backend", "onnxruntime"], ["--backend", "tensorrt"]
    typo, folder, new = workdir / "typo.onnx", workdir / "folder.onnx", workdir / "new.engine"
    for extra, says in (
        (["--onnx", tiny_onnx], "--onnx runs with --backend onnxruntime or tensorrt, not auto"),
        (["--backend", "eager", "--onnx", tiny_onnx], "--onnx runs with --backend onnxruntime or tensorrt, "
         "not eager"),
        ([*ort, "--engine", engine], "--engine runs with --backend tensorrt, not onnxruntime"),
        ([*ort, "--onnx", typo], f"--onnx {typo}: no such file"),
        ([*trt, "--onnx", folder], f"--onnx {folder}: is a directory"),
        ([*trt, "--engine", new], f"--engine {new}: no such file (build one: qairn export tensorrt WEIGHTS "
         f"-o {new})"),
        (
            [*ort, "--onnx", tiny_onnx, "--weights", tiny_weights],
            f"--weights with --onnx {tiny_onnx}: the file's own network and weights run, not {tiny_weights}; "
            "drop --weights",
        ),
    ):  # fmt: skip
        rc, out, err = run(capsys, command, src, *where, *extra)
        assert (rc, out, err) == (2, "", f"qairn: error: {says}\n")
    assert sorted(p.name for p in workdir.iterdir()) == ["a.jpg", "b.png", "folder.onnx", "q.engine"]


def test_tensorrt_files_go_to_the_restorer_and_the_rows_name_the_engine(
    workdir, tiny_onnx, capsys, monkeypatch
):
    """No TensorRT or GPU here: a stand-in Restorer records what the command line gives it. --engine and
    --onnx reach it as engine= and onnx=, exactly as given; the row names the engine, the file that ran.
    --engine comes with rebuild=False: the Restorer rebuilt a stale or foreign engine= file in place,
    over the user's input; it is refused now (test_export_trt's given_to_run tests)."""
    import hashlib

    made = []

    from qairn.engine.restorer import Restorer

    class Stand:
        p = 4.0
        _network = None
        scored_by = Restorer.scored_by  # the row's p, weights and weights_sha256, as the Restorer says them

        def __init__(self, **options):
            made.append(options)
            self._arguments = options

        def score(self, img, **kwargs):
            return {"Q1": 0.25, "Q2": 0.5, "Q3": 0.75}

    monkeypatch.setattr("qairn.engine.restorer.Restorer", Stand)
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.9.0"))  # none here
    engine = workdir / "q.engine"
    engine.write_bytes(b"engine")
    given = ["--device", "cuda", "--backend", "tensorrt", "--engine", engine]
    rc, out, err = run(capsys, "score", workdir / "a.jpg", *given, "--onnx", tiny_onnx, "--json")
    assert rc == 0, err
    row = json.loads(out)
    assert (row["weights"], row["p"]) == (os.path.abspath(engine), 4.0)
    assert row["weights_sha256"] == hashlib.sha256(b"engine").hexdigest()[:16]
    common = dict(device="cuda", backend="tensorrt", precision="auto", tile="auto", overlap=None)
    ran = dict(cuda_graph=False, ensemble=1, onnx=str(tiny_onnx), engine=str(engine), rebuild=False)
    assert made == [dict(weights=None, **common, **ran)]
    # An engine alone is checked against (and built from) the weights' export: --weights goes with it.
    made.clear()
    rc, out, err = run(capsys, "score", workdir / "a.jpg", *given, "--weights", workdir / "w.safetensors")
    assert rc == 0, err
    assert made == [
        dict(
            weights=str(workdir / "w.safetensors"),
            **common,
            cuda_graph=False,
            ensemble=1,
            engine=str(engine),
            rebuild=False,
        )
    ]


def test_an_engine_given_without_its_sidecar_is_told_how_to_go_on_from_the_command_line(
    workdir, tiny_weights, capsys, monkeypatch
):
    """`qairn score --engine F` with F built by trtexec (no sidecar) was told to "pass another engine=
    path for qairn to build there": the library's keyword, and advice the command line refuses (--engine
    F: no such file). It is now told to replace F with an engine qairn builds. (A stand-in
    TensorRT and GPU: the refusal comes before any export or build.)"""
    import torch

    from qairn.export import trt_backend, trt_engine

    fake = SimpleNamespace(__version__="10.9.0", BuilderFlag=SimpleNamespace(FP16=1))
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_backend, "cached_onnx", model_not_loaded)  # (the export: not reached)
    monkeypatch.setattr(trt_engine, "gpu_identity", lambda device: ("Fake GPU", "9.0"))
    for name, value in dict(is_available=True, device_count=1, current_device=0).items():
        monkeypatch.setattr(torch.cuda, name, lambda *a, value=value: value)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    engine = workdir / "trtexec.engine"
    engine.write_bytes(b"trtexec's engine")
    given = ["--device", "cuda", "--backend", "tensorrt", "--engine", engine, "--weights", tiny_weights]
    rc, out, err = run(capsys, "score", workdir / "a.jpg", *given)
    says = (
        f"{engine}: no readable sidecar trtexec.engine.json, so not an engine qairn can validate (trtexec's?)"
        f"; an engine given to run needs one: replace it with qairn export tensorrt WEIGHTS -o {engine} "
        "--overwrite"
    )
    assert (rc, out, err) == (2, "", f"qairn: error: {says}\n")
    assert engine.read_bytes() == b"trtexec's engine"


def test_one_image_of_several_into_an_output_file_names_that_file(workdir, tiny_weights, capsys):
    """a.jpg missing.png -o z.png: the one input found goes to z.png, but the closing line said
    'restored 1 of 2 images into <folder>', as if z.png were not what was written."""
    out = workdir / "z.png"
    rc, _, err = run(
        capsys, "restore", workdir / "a.jpg", workdir / "missing.png", "-o", out, "--weights", tiny_weights
    )
    assert rc == 1 and out.is_file()
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"qairn: restored 1 of 2 images: {workdir / 'a.jpg'} -> {out} (Q1 "), last
    assert last.endswith(f", 1 failed ({workdir / 'missing.png'})"), last


def test_quiet_restore_and_score_print_their_errors_alone(workdir, tiny_weights, capsys, monkeypatch):
    """Transcoders call restore and score once per file and want only errors on stderr, but -q, which
    video takes, was refused ('unrecognized arguments: -q'). It drops the progress bars (stderr played a
    terminal here, where they draw at once) and the closing line; an error line, a warning and score's
    table still print."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    model = ["--weights", tiny_weights, "--device", "cpu", "--tile", "32", "--overlap", "0"]
    a, b, missing = workdir / "a.jpg", workdir / "b.png", workdir / "missing.png"
    rc, out, err = run(capsys, "restore", a, b, "-o", workdir / "out", *model)
    assert rc == 0 and "restore:" in err and "tiles:" in err and "qairn: restored 2 of 2" in err, err
    rc, out, err = run(capsys, "restore", a, b, "-o", workdir / "q", *model, "-q")
    assert (rc, out, err) == (0, "", "") and (workdir / "q" / "b.png").is_file()
    rc, out, err = run(capsys, "restore", a, missing, "-o", workdir / "z.png", *model, "--quiet")
    assert rc == 1 and out == "" and err == f"qairn: error: {missing}: no such file or directory\n"
    cv2.imwrite(str(workdir / "flat.png"), np.full((32, 32, 3), 128, np.uint8))
    rc, out, err = run(capsys, "restore", workdir / "flat.png", "-o", workdir / "f.png", *model, "-q")
    assert rc == 0 and err.startswith("qairn: warning: ") and len(err.splitlines()) == 1, err

    rc, out, err = run(capsys, "score", a, b, *model, "-q")
    assert rc == 0 and err == "" and len(out.splitlines()) == 3 and out.startswith("path"), out
    rc, out, err = run(capsys, "score", a, missing, *model, "--json", "-q")
    assert rc == 1 and json.loads(out)["path"] == str(a), out
    assert err == f"qairn: error: {missing}: no such file or directory\n"


def test_restore_ensemble_changes_the_picture_not_the_scores(workdir, tiny_weights, capsys):
    """--ensemble 8 averages 8 turned and mirrored passes: another picture, the plain pass's scores."""
    rows = []
    for k in (1, 8):
        out, js = workdir / f"e{k}.png", workdir / f"e{k}.json"
        rc, _, err = run(
            capsys,
            "restore",
            workdir / "a.jpg",
            "-o",
            out,
            "--json",
            js,
            "--weights",
            tiny_weights,
            "--ensemble",
            k,
        )
        assert rc == 0, err
        rows.append(json.loads(js.read_text())[0])
    assert [rows[1][q] for q in ("Q1", "Q2", "Q3")] == [rows[0][q] for q in ("Q1", "Q2", "Q3")]
    assert not np.array_equal(cv2.imread(str(workdir / "e1.png")), cv2.imread(str(workdir / "e8.png")))
    with pytest.raises(SystemExit) as e:
        run(capsys, "restore", workdir / "a.jpg", "-o", workdir / "e3.png", "--ensemble", 3)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--ensemble: invalid choice: 3 (choose from 1, 2, 4, 8)" in err, err
