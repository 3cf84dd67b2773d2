"""`qairn eval` and `qairn eval-quality` on a tiny random model and small generated images."""

import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors import safe_open

import qairn
from qairn.cli import main as cli
from qairn.model import QAIRN, preset
from qairn.train import evaluate as ev
from qairn.weights_io import load_model, read_metadata, save_weights


def synth_image(rng, h, w) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([120 + 80 * np.sin(6 * x + c) * np.cos(4 * y - c) for c in range(3)], axis=2)
    img += cv2.GaussianBlur(rng.normal(0, 40, (h, w, 3)), (0, 0), 2.0)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_folder(path: Path, n: int, h: int, w: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(path / f"img{i:02d}.png"), synth_image(rng, h, w))
    return path


def make_weights(path: Path, scramble: bool = True) -> Path:
    torch.manual_seed(0)
    m = QAIRN(preset("tiny"))
    if scramble:  # make the tail and the gates non-trivial (they start at zero)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "tail" in name or ".out." in name:
                    p.normal_(0, 0.05)
    return save_weights(m, path)


def tensors(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("refs"), 2, 48, 64, seed=5)


def test_eval_cli_table_json_plot(refs, tmp_path, capsys):
    w = make_weights(tmp_path / "w.safetensors")
    js, png = tmp_path / "e.json", tmp_path / "e.png"
    rc = cli(
        [
            "eval",
            "--data",
            str(refs),
            "--qf",
            "10",
            "30",
            "--weights",
            str(w),
            "--device",
            "cpu",
            "--json",
            str(js),
            "--plot",
            str(png),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "QAIRN (paper)" in text and "27.25 / 0.803 / 26.90" in text and "FBCNN (paper)" in text
    res = json.loads(js.read_text())
    assert res["n_images"] == 2 and set(res["qfs"]) == {"10", "30"}
    assert len(res["images"]) == 4 and res["cpu_seconds_per_image"] > 0
    # Recompute one row independently: JPEG of the BGR file, restoration with the same weights.
    row = next(r for r in res["images"] if r["image"] == "img01" and r["qf"] == 30)
    bgr = cv2.imread(str(refs / "img01.png"))
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 30])
    jp = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    ref = bgr[..., ::-1]
    out = qairn.Restorer(weights=w, device="cpu", tile=None).restore(np.ascontiguousarray(jp)).image
    assert row["jpeg"]["psnr"] == pytest.approx(qairn.metrics.psnr(ref, jp), abs=1e-9)
    assert row["restored"]["psnr"] == pytest.approx(qairn.metrics.psnr(ref, out), abs=1e-9)
    assert row["restored"]["psnr"] != row["jpeg"]["psnr"]  # the scrambled model does change images
    mean10 = np.mean([r["restored"]["ssim"] for r in res["images"] if r["qf"] == 10])
    assert res["qfs"]["10"]["restored"]["ssim"] == pytest.approx(mean10, abs=1e-12)
    assert png.stat().st_size > 1000


def test_cropped_eval_says_so_beside_the_published_columns(refs, capsys):
    # --crop scores centre crops, but the table read "(2 images)" and "protocol: ... no border crop"
    # beside the published whole-image numbers, with no word of the crop.
    assert cli(["eval", "--data", str(refs), "--qf", "10", "--jpeg-only", "--crop", "32"]) == 0
    text = capsys.readouterr().out
    assert "(2 images, centre crops of at most 32x32)" in text
    assert "NOT the protocol's whole images: --crop 32" in text
    assert cli(["eval", "--data", str(refs), "--qf", "10", "--jpeg-only"]) == 0
    text = capsys.readouterr().out
    assert "(2 images)" in text and "crop" not in text.replace("no border crop", "")


def test_eval_json_is_strict_json_when_an_image_comes_back_identical(tmp_path):
    # A flat picture survives JPEG at QF 100 exactly: its PSNR is infinite, which was written as the bare
    # word Infinity (not JSON: jq and JavaScript refuse the file).
    folder = tmp_path / "flat"
    folder.mkdir()
    cv2.imwrite(str(folder / "gray.png"), np.full((32, 32, 3), 128, np.uint8))
    js = tmp_path / "e.json"
    assert cli(["eval", "--data", str(folder), "--qf", "100", "--jpeg-only", "--json", str(js)]) == 0

    def refuse(word):
        raise ValueError(f"not JSON: {word}")

    res = json.loads(js.read_text(), parse_constant=refuse)
    assert res["images"][0]["jpeg"]["psnr"] is None and "infinite" in res["null_means"]


@pytest.mark.parametrize("cmd", ["eval", "eval-quality"])
@pytest.mark.parametrize("opt", ["--limit", "--crop"])
def test_negative_limit_or_crop_is_refused(refs, capsys, cmd, opt):
    # --limit -1 silently dropped the last image ([:-1]); --crop -5 said "0x0 pixels after --crop".
    assert cli([cmd, "--data", str(refs), "--jpeg-only" if cmd == "eval" else "--no-report", opt, "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"qairn {cmd}: error: {opt} -1: must be 0 (all) or a positive number"


@pytest.mark.parametrize("cmd", ["eval", "eval-quality"])
@pytest.mark.parametrize(
    "opt, says",
    [
        (["--tile", "-5"], "--tile -5: must be 0 (whole images) or a positive number"),
        (["--workers", "0"], "--workers 0: must be 1 or more (processes)"),
        (["--workers", "-2"], "--workers -2: must be 1 or more (processes)"),
    ],
)
def test_negative_tile_or_workers_under_1_are_refused(refs, capsys, monkeypatch, cmd, opt, says):
    # --tile -5 loaded the model, then 'tile must be a positive int, None (whole images) or "auto", not
    # -5', naming no option; --workers 0 and -2 ran as 1 without a word.
    monkeypatch.setattr("qairn.engine.restorer.Restorer", None)  # (called: a TypeError, not exit 2)
    assert cli([cmd, "--data", str(refs), "--jpeg-only" if cmd == "eval" else "--no-report", *opt]) == 2
    assert capsys.readouterr().err.strip() == f"qairn {cmd}: error: {says}"


def test_images_under_the_ssim_window_are_named(tmp_path, capsys):
    make_folder(tmp_path / "d", 1, 40, 40, seed=0)
    cv2.imwrite(str(tmp_path / "d" / "small.png"), np.zeros((9, 30, 3), np.uint8))
    assert cli(["eval", "--data", str(tmp_path / "d"), "--jpeg-only", "--qf", "10"]) == 2
    assert "small.png: 30x9 pixels; SSIM needs at least 11x11" in capsys.readouterr().err
    assert cli(["eval", "--data", str(tmp_path / "d"), "--jpeg-only", "--crop", "8"]) == 2
    assert "img00.png: 8x8 pixels after --crop" in capsys.readouterr().err


def test_eval_refuses_an_image_under_the_ssim_window_before_any_work(tmp_path, capsys, monkeypatch):
    # The size was checked as each image was reached: a small last image was refused after the images
    # before it were compressed, restored and measured at every QF.
    d = make_folder(tmp_path / "d", 1, 40, 40, seed=0)
    cv2.imwrite(str(d / "zsmall.png"), np.zeros((9, 30, 3), np.uint8))
    compressed, jpeg_rgb = [], ev.jpeg_rgb
    monkeypatch.setattr(ev, "jpeg_rgb", lambda rgb, qf: compressed.append(qf) or jpeg_rgb(rgb, qf))
    assert cli(["eval", "--data", str(d), "--jpeg-only", "--qf", "10", "20"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        compressed == []
        and err == f"qairn eval: error: {d / 'zsmall.png'}: 30x9 pixels; SSIM needs at least 11x11"
    )


def test_images_too_small_for_jpeg_2000_are_named(tmp_path, capsys):
    # OpenJPEG cannot encode a side under 32 pixels: the run ended in a traceback,
    # "RuntimeError: cv2.imencode('.jp2') failed", naming neither the file nor the reason.
    w = make_weights(tmp_path / "w.safetensors")
    make_folder(tmp_path / "d", 1, 40, 40, seed=0)
    args = ["eval-quality", "--data", str(tmp_path / "d"), "--weights", str(w), "--device", "cpu"]
    assert cli(args + ["--crop", "24"]) == 2
    assert "img00.png: 24x24 pixels after --crop; the JPEG 2000 distortion" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["report", "sweep"])
def test_an_image_too_small_for_jpeg_2000_is_refused_before_any_work(tmp_path, capsys, where):
    # The size was checked as each image was reached: a small last image was refused after the
    # images before it were distorted, restored and scored (minutes each on a CPU), after the NOTE.
    w = make_weights(tmp_path / "w.safetensors")
    d = make_folder(tmp_path / "d", 1, 40, 40, seed=0)
    cv2.imwrite(str(d / "zsmall.png"), np.zeros((20, 48, 3), np.uint8))
    run = ["--data", str(d)] if where == "report" else ["--no-report", "--sweep-p", "--val-data", str(d)]
    assert cli(["eval-quality", *run, "--weights", str(w), "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == (
        f"qairn eval-quality: error: {d / 'zsmall.png'}: 48x20 pixels; the JPEG 2000 distortion "
        "(OpenJPEG, 5 wavelet levels) needs at least 32x32"
    )


def test_a_folder_given_as_an_output_file_is_refused_before_the_run(refs, tmp_path, capsys):
    # The rename onto a folder failed only at the end, after every image had been restored.
    (tmp_path / "out").mkdir()
    for args in (["eval", "--jpeg-only", "--json"], ["eval-quality", "--plot"]):
        assert cli(args[:-1] + ["--data", str(refs), args[-1], str(tmp_path / "out")]) == 2
        assert f"{tmp_path / 'out'}: is a directory; give a file name" in capsys.readouterr().err


def test_a_report_named_like_one_of_its_images_is_refused_before_the_run(tmp_path, capsys):
    # `qairn eval --data refs --plot refs/img00.png` replaced that reference image with the figure.
    refs = make_folder(tmp_path / "refs", 2, 48, 64, seed=5)
    before = {f.name: f.read_bytes() for f in refs.iterdir()}
    for args in (["eval", "--jpeg-only", "--plot"], ["eval-quality", "--json"]):
        image = refs / "img01.png"
        assert cli(args[:-1] + ["--data", str(refs), "--limit", "1", args[-1], str(image)]) == 2
        assert capsys.readouterr() == (
            "",
            f"qairn {args[0]}: error: {args[-1]} {image}: is one of the images read; write to another file\n",
        )
    assert {f.name: f.read_bytes() for f in refs.iterdir()} == before


def test_an_unwritable_output_folder_is_refused_before_the_run(refs, tmp_path, capsys, monkeypatch):
    # A read-only folder (a user's, not root's: faked here) failed only after the whole run, in Python's
    # words about the temp file: "[Errno 13] Permission denied: '/ro/.r.json.ygu889o9.part'".
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != ro and real_access(path, mode))
    for args in (["eval", "--jpeg-only", "--json"], ["eval-quality", "--plot"]):
        name = ro / ("r.json" if args[0] == "eval" else "r.png")
        assert cli(args[:-1] + ["--data", str(refs), args[-1], str(name)]) == 2
        assert capsys.readouterr() == ("", f"qairn {args[0]}: error: {name}: output folder is not writable\n")
    assert list(ro.iterdir()) == []


def test_identity_model_restores_to_the_jpeg(refs, tmp_path):
    # The tiny preset starts as the identity (global residual, zero tail): restored == JPEG exactly.
    w = make_weights(tmp_path / "id.safetensors", scramble=False)
    r = ev.make_restorer(w, device="cpu")
    s = ev.summarize(ev.eval_restoration(ev.list_images(refs), (10,), r, progress=False), (10,))
    assert s[10]["restored"] == s[10]["jpeg"]


def test_correlations_and_logistic():
    x = np.linspace(-3, 3, 40)
    y = 2.0 / (1 + np.exp(-3 * x)) + 0.1 * x  # a logistic of x: not linear
    c = ev.correlations(x, y)
    assert c["srcc"] == pytest.approx(1.0) and c["kcc"] == pytest.approx(1.0)
    assert c["pcc"] < 0.97 and c["pcc_log"] == pytest.approx(1.0, abs=1e-6)
    # Hand case: one swapped pair among 4 -> Kendall (5 - 1) / 6, Spearman 1 - 6*2/(4*15) = 0.8.
    c = ev.correlations([1, 2, 3, 4], [1, 3, 2, 4])
    assert c["kcc"] == pytest.approx(4 / 6) and c["srcc"] == pytest.approx(0.8)
    assert ev.correlations([1, 2, 3, 4], [4, 3, 2, 1])["srcc"] == pytest.approx(-1.0)
    # A score that falls as y rises: PCClog carries that sign, like PCC, SRCC and KCC beside it.
    c = ev.correlations(-x, y)
    assert c["srcc"] == pytest.approx(-1.0) and c["pcc_log"] == pytest.approx(-1.0, abs=1e-6)
    assert -0.97 < c["pcc"] < 0
    assert math.isnan(ev.correlations([1, 1, 1], [1, 2, 3])["pcc"])


def test_distortions_are_ordered():
    rng = np.random.default_rng(0)
    ref = synth_image(rng, 64, 64)
    for kind, (_, levels, direction) in ev.DISTORTIONS.items():
        s = [qairn.metrics.ssim(ref, ev.distort(ref, kind, lv, seed=1)) for lv in levels]
        assert all(v < 1 for v in s), kind
        # More distortion, lower SSIM (the two lowest JPEG 2000 rates can meet on a small image).
        assert np.all(np.diff(s) * direction >= 0) and (s[-1] - s[0]) * direction > 0.05, (kind, s)
    assert np.array_equal(ev.distort(ref, "noise", 10, seed=3), ev.distort(ref, "noise", 10, seed=3))
    assert ev.minkowski_np(np.array([0.0, 1.0]), 2) == pytest.approx(math.sqrt(0.5))


def test_eval_quality_sweep_writes_p(refs, tmp_path, capsys):
    w = make_weights(tmp_path / "w.safetensors")
    before, tensors_before = read_metadata(w), tensors(w)
    val = make_folder(tmp_path / "val", 2, 40, 48, seed=9)
    js, png = tmp_path / "q.json", tmp_path / "q.png"
    rc = cli(
        [
            "eval-quality",
            "--data",
            str(refs),
            "--sweep-p",
            "--val-data",
            str(val),
            "--write-p",
            str(w),
            "--device",
            "cpu",
            "--json",
            str(js),
            "--plot",
            str(png),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "NOT human opinion scores" in text and "Table II layout" in text and "Table III layout" in text
    res = json.loads(js.read_text())
    sweep = res["p_sweep"]
    assert sweep["images"] == ["img00.png", "img01.png"]
    assert sweep["p"] in ev.P_GRID
    best = max(r["srcc_ssim"] for r in sweep["grid"])
    assert next(r for r in sweep["grid"] if r["p"] == sweep["p"])["srcc_ssim"] == pytest.approx(
        best, abs=1e-6
    )
    # The chosen p is in the file, the tensors are untouched, the sweep is recorded.
    m = load_model(w)
    assert m.config.p == sweep["p"] and res["p"] == sweep["p"]
    assert json.loads(read_metadata(w)["p_sweep"])["p"] == sweep["p"]
    assert read_metadata(w)["training"] == before["training"]
    assert tensors(w).keys() == tensors_before.keys()
    assert all(torch.equal(tensors(w)[k], v) for k, v in tensors_before.items())
    recs = res["records"]
    assert len(recs) == 2 * sum(len(v[1]) for v in ev.DISTORTIONS.values())
    for kind in ev.DISTORTIONS:
        for q in ("Q1", "Q2", "Q3"):
            assert -1 <= res["tables"]["ssim"][kind][q]["srcc"] <= 1
    assert {r["kind"] for r in recs} == set(ev.DISTORTIONS) and all(0 < r["Q2"] < 1 for r in recs)
    assert png.stat().st_size > 1000


def test_p_grid_matches_the_engine_pooling(refs, tmp_path):
    # Q(p) computed from the returned maps equals the engine's own pooled score at the engine's p.
    r = ev.make_restorer(make_weights(tmp_path / "g.safetensors"), device="cpu")
    recs = ev.quality_records(r, ev.list_images(refs)[:1], p_grid=ev.P_GRID, progress=False)
    i = ev.P_GRID.index(r.p)
    for rec in recs[:5]:
        for q in ("Q1", "Q2", "Q3"):
            assert rec["grid"][q][i] == pytest.approx(rec[q], rel=1e-5)


def test_validation_files_follow_the_weights(tmp_path):
    train = make_folder(tmp_path / "train", 5, 40, 40, seed=1)
    w = make_weights(tmp_path / "w.safetensors")
    from qairn.train.trainer import split_files

    assert ev.validation_files(w, str(train), 2, None) == split_files(str(train), 2)[1]
    m = load_model(w)
    save_weights(m, w, training={"val_files": ["img03.png"]})
    assert ev.validation_files(w, str(train), 2, None) == [train / "img03.png"]
    save_weights(m, w, training={"val_files": ["missing.png"]})
    with pytest.raises(FileNotFoundError):
        ev.validation_files(w, str(train), 2, None)
    # A run given --val-data recorded its images under that folder: they were looked for in the training
    # folder, whose own img00.png and img01.png (training images) then chose p.
    val = make_folder(tmp_path / "val", 2, 40, 40, seed=2)
    save_weights(m, w, training={"val_files": ["img00.png", "img01.png"], "args": {"val_data": str(val)}})
    assert ev.validation_files(w, str(train), 2, None) == [val / "img00.png", val / "img01.png"]
    # A run that held nothing out (--val-holdout 0) trained on every image: none of them may choose p.
    save_weights(m, w, training={"val_files": []})
    with pytest.raises(SystemExit, match="held no images out"):
        ev.validation_files(w, str(train), 2, None)


def test_a_sweep_told_to_hold_no_images_out_is_refused(tmp_path, capsys):
    # Weights that do not name their held-out images fall back to --val-holdout: at 0 (or below) the sweep
    # ran on no image at all, printed a grid of nan SRCCs and "Q2 is constant ... p kept", and exited 0
    # (with --write-p, recording that sweep in the weights).
    train = make_folder(tmp_path / "train", 5, 40, 40, seed=1)
    w = make_weights(tmp_path / "w.safetensors")
    for holdout in ("0", "-2"):
        argv = ["eval-quality", "--sweep-p", "--train-data", str(train), "--val-holdout", holdout]
        assert cli([*argv, "--write-p", str(w), "--no-report", "--device", "cpu"]) == 2
        out, err = capsys.readouterr()
        assert f"--val-holdout {holdout}: no held-out image to choose p on" in err and "nan" not in out
    assert "p_sweep" not in read_metadata(w)


def test_logistic_fit_finds_the_better_optimum_and_json_has_no_nan():
    """A single start of the 5-parameter logistic can stop at a poor local optimum (or not converge and
    fall back to |PCC|); several starts keep the best. NaN correlations are written as null."""
    rng = np.random.default_rng(0)
    x = np.linspace(0, 1, 40)
    y = 1 / (1 + np.exp(-40 * (x - 0.8))) + 0.02 * rng.normal(size=x.size)  # a sharp step late on
    fitted = ev.pcc_logistic(x, y)
    assert fitted > abs(np.corrcoef(x, y)[0, 1]) + 0.05 and fitted > 0.97
    assert ev.without_nan({"a": [1.0, float("nan")], "b": {"c": float("nan")}}) == {
        "a": [1.0, None],
        "b": {"c": None},
    }


def test_sweep_refuses_the_report_images(refs, tmp_path, capsys):
    w = make_weights(tmp_path / "w.safetensors")
    assert (
        cli(
            [
                "eval-quality",
                "--data",
                str(refs),
                "--sweep-p",
                "--val-data",
                str(refs),
                "--weights",
                str(w),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.strip() == "qairn eval-quality: error: refusing to choose p on the report's own images"


@pytest.mark.parametrize("extra", [[], ["--sweep-p", "--val-data", "nodir"]])
def test_eval_quality_checks_its_images_before_the_note(tmp_path, capsys, extra):
    """--data nodir printed the long "NOTE: these are distortions generated here..." and only then its
    one-line error (the folder was read after the model was loaded)."""
    w = make_weights(tmp_path / "w.safetensors")
    data = ["--data", str(tmp_path / "nodir")] if not extra else ["--data", str(tmp_path), "--no-report"]
    extra = [str(tmp_path / v) if v == "nodir" else v for v in extra]
    assert cli(["eval-quality", *data, *extra, "--weights", str(w), "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == f"qairn eval-quality: error: {tmp_path / 'nodir'}: no such folder"


def test_the_plot_says_how_many_images_its_means_are_of(tmp_path, monkeypatch):
    """qairn eval --limit 3 --plot drew the 3 images' means beside the papers' 29-image numbers with
    nothing on the figure saying 3 (the table header did)."""
    figures = []
    monkeypatch.setattr(ev, "save_figure", lambda fig, png: figures.append(fig))
    row = {"psnr": 28.0, "ssim": 0.8, "psnrb": 27.5}
    summary = {10: {"jpeg": row, "restored": row}, 20: {"jpeg": row, "restored": row}}
    ev.plot_restoration(summary, tmp_path / "p.png", 3, "live1", crop=64)
    (fig,) = figures
    assert fig._suptitle.get_text() == (
        "live1: means of 3 images, centre crops of at most 64x64; the published rows: the 29 LIVE1 images"
    )
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[:3] == ["JPEG (3 images)", "ours (3 images)", "QAIRN (paper), 29 images"]


def test_sweep_picks_the_best_p_and_breaks_ties_towards_prefer():
    def recs(good_p):
        out = []
        for kind in ev.DISTORTIONS:
            for i in range(6):
                grid = [i if (good_p is None or p == good_p) else -i for p in ev.P_GRID]
                out.append({"kind": kind, "level": i, "ssim": 0.5 + i / 20, "grid": {"Q2": grid}})
        return out

    s = ev.sweep_p(recs(4.0))
    assert s["p"] == 4.0 and next(r for r in s["grid"] if r["p"] == 4.0)["srcc_ssim"] == pytest.approx(1.0)
    assert ev.sweep_p(recs(None), prefer=2.0)["p"] == 2.0  # all equal: keep the preferred p
    assert ev.sweep_p(recs(None), prefer=8.0)["p"] == 8.0


def test_sweep_with_constant_scores_keeps_prefer_and_never_picks_nan():
    # The H200 run's Q2 was constant at every p: every SRCC was NaN, and max() kept the first row (no
    # comparison with NaN is true), so p = 0.25, the grid's first, was written into the weights.
    def recs(q_of):
        return [
            {"kind": k, "level": i, "ssim": 0.5 + i / 20, "grid": {"Q2": [q_of(p, i) for p in ev.P_GRID]}}
            for k in ev.DISTORTIONS
            for i in range(6)
        ]

    s = ev.sweep_p(recs(lambda p, i: 0.7), prefer=8.0)
    assert s["p"] == 8.0 and "nothing to choose p by" in s["note"]
    assert all(r["srcc_ssim"] == 0.0 for r in s["grid"])
    assert ev.sweep_p(recs(lambda p, i: 0.7), prefer=5.0)["p"] == 5.0  # kept, though not on the grid
    # Constant (or NaN) only at the grid's first p: the p that ranks the images wins.
    first = ev.P_GRID[0]
    for dead in (0.7, math.nan):
        s = ev.sweep_p(
            recs(lambda p, i, dead=dead: dead if p == first else (i if p == 4.0 else -i)), prefer=2.0
        )
        assert s["p"] == 4.0 and "note" not in s
        assert s["grid"][0]["srcc_ssim"] == 0.0
    # A type with no records is left out of the mean, as before (not a zero-size ptp error).
    jpeg_only = [r for r in recs(lambda p, i: i if p == 4.0 else -i) if r["kind"] == "jpeg"]
    assert ev.sweep_p(jpeg_only)["grid"][ev.P_GRID.index(4.0)]["srcc_ssim"] == pytest.approx(1.0)


def test_metric_worker_processes_match_inline(refs, tmp_path):
    r = ev.make_restorer(make_weights(tmp_path / "w.safetensors"), device="cpu")
    files = ev.list_images(refs)
    inline = ev.eval_restoration(files, (20,), r, workers=1, progress=False)
    pooled = ev.eval_restoration(files, (20,), r, workers=2, progress=False)
    assert [(x["jpeg"], x["restored"]) for x in inline] == [(x["jpeg"], x["restored"]) for x in pooled]


def test_interrupt_cancels_queued_metric_jobs():
    """Ctrl-C or SIGTERM in eval: the queued metrics jobs are cancelled, not all waited for."""
    import time

    from qairn.train.evaluate import executor

    futures = []
    with pytest.raises(KeyboardInterrupt):
        with executor(2) as ex:
            futures = [ex.submit(time.sleep, 0.5) for _ in range(40)]
            raise KeyboardInterrupt
    deadline = time.monotonic() + 20  # the pool's manager thread cancels them just after the block
    while sum(f.cancelled() for f in futures) < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(f.cancelled() for f in futures) >= 30


def test_summary_means_each_qfs_own_images_and_gains_are_restored_minus_jpeg():
    def row(qf, jpeg, restored):
        return {
            "qf": qf,
            "jpeg": dict.fromkeys(ev.METRICS, jpeg),
            "restored": dict.fromkeys(ev.METRICS, restored),
        }

    rows = [row(10, 1.0, 2.0), row(10, 2.0, 3.0), row(10, 6.0, 10.0), row(20, 100.0, 90.0)]
    s = ev.summarize(rows, qfs=(10, 20))
    assert s[10]["jpeg"] == dict.fromkeys(ev.METRICS, 3.0)  # the mean, not the median (2)
    assert s[10]["gain"] == dict.fromkeys(ev.METRICS, 2.0)
    assert s[20]["restored"] == dict.fromkeys(ev.METRICS, 90.0) and s[20]["gain"]["psnr"] == -10.0
    assert ev.QFS == (10, 20, 30, 40)  # the paper's Table I rows, the --qf default


def test_metrics_per_image_are_psnr_ssim_and_psnr_b(tmp_path):
    from qairn.metrics import psnr, psnr_b, ssim

    ref = synth_image(np.random.default_rng(0), 48, 64)
    jp = ev.jpeg_rgb(ref, 10)
    m = ev.measure(ref, jp)
    assert m == {"psnr": psnr(ref, jp), "ssim": ssim(ref, jp), "psnrb": psnr_b(ref, jp)}
    assert m["psnrb"] < m["psnr"]  # QF 10 blocks: PSNR-B's blocking penalty is not zero here


def test_read_rgb_crops_the_centre(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (20, 36, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), rgb[..., ::-1])
    assert np.array_equal(ev.read_rgb(tmp_path / "a.png", crop=10), rgb[5:15, 13:23])
    assert np.array_equal(ev.read_rgb(tmp_path / "a.png", crop=30), rgb[:, 3:33])  # taller than the image


@pytest.mark.parametrize("loss, dtype", [(0.01, "fp16"), (0.1, "fp32")])
def test_fp16_check_compares_rounded_weights_with_the_model(tmp_path, monkeypatch, loss, dtype):
    # The PSNRs are given: each restorer is its model, scored by whether its weights are fp16-rounded.
    def rounded(m):
        return all(torch.equal(t, t.half().float()) for t in m.state_dict().values() if t.is_floating_point())

    monkeypatch.setattr(ev, "make_restorer", lambda model, device: model)
    monkeypatch.setattr(ev, "restored_psnrs", lambda m, pairs: [30.0 - loss * rounded(m)] * len(pairs))
    model = QAIRN(preset("tiny"))
    assert not rounded(model)
    files = sorted(make_folder(tmp_path, 2, 24, 24, seed=0).glob("*.png"))
    r = ev.fp16_check(model, files, qfs=(10, 40))
    assert r["dtype"] == dtype and r["loss_db"] == pytest.approx(loss) and r["psnr_fp32"] == 30.0
    assert not rounded(model)  # the caller's model is left as it was


def test_jpeg_pairs_compress_each_image_at_each_qf(tmp_path):
    files = sorted(make_folder(tmp_path, 2, 24, 24, seed=0).glob("*.png"))
    pairs = ev.jpeg_pairs(files, (10, 40))
    assert [qf for qf, _, _ in pairs] == [10, 40, 10, 40]
    for qf, ref, jpeg in pairs:
        assert np.array_equal(jpeg, ev.jpeg_rgb(ref, qf))
    assert not np.array_equal(pairs[0][2], pairs[1][2])


def test_noise_is_clipped_not_wrapped():
    # Without the clip, values over 255 wrapped around to dark pixels in uint8.
    out = ev.distort(np.full((32, 32, 3), 250, np.uint8), "noise", 50.0)
    assert (out == 255).mean() > 0.3 and out.min() > 20


@pytest.mark.parametrize("cmd", ["eval", "eval-quality"])
def test_negative_threads_is_refused_in_one_line(refs, capsys, cmd):
    # --threads -1 ended in a traceback: 'RuntimeError: set_num_threads expects a positive integer'.
    assert (
        cli([cmd, "--data", str(refs), "--jpeg-only" if cmd == "eval" else "--no-report", "--threads", "-1"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err == f"qairn {cmd}: error: --threads -1: must be 0 (torch's default) or a positive number"


def test_a_qf_given_twice_is_measured_once(refs, tmp_path, capsys):
    # --qf 10 10 compressed and measured every image twice at QF 10: twice the time, and each image's
    # row twice in the JSON beside n_images.
    js = tmp_path / "e.json"
    assert cli(["eval", "--data", str(refs), "--jpeg-only", "--qf", "10", "20", "10", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert [(r["image"], r["qf"]) for r in res["images"]] == [
        (name, qf) for name in ("img00", "img01") for qf in (10, 20)
    ]


@pytest.mark.parametrize("cmd", [["eval", "--jpeg-only"], ["eval-quality", "--limit", "1", "--crop", "32"]])
def test_json_and_plot_naming_one_file_is_refused(refs, tmp_path, capsys, cmd):
    # --json r.png --plot r.png: the figure was renamed over the report, which was lost, exit 0.
    same = tmp_path / "r.png"
    assert cli([*cmd, "--data", str(refs), "--json", str(same), "--plot", str(same)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"qairn {cmd[0]}: error: --json and --plot name the same file: {same}"
    )
    assert not same.exists()


@pytest.mark.parametrize(
    "cmd", [["eval", "--weights"], ["eval-quality", "--limit", "1", "--crop", "32", "--weights"]]
)
def test_a_json_over_the_weights_is_refused(refs, tmp_path, capsys, cmd):
    # --json w.safetensors beside --weights w.safetensors renamed the report over the weights at the end.
    w = make_weights(tmp_path / "w.safetensors")
    before = w.read_bytes()
    assert cli([*cmd, str(w), "--data", str(refs), "--device", "cpu", "--json", str(w)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"qairn {cmd[0]}: error: --json {w}: is the weights file; write to another file"
    assert w.read_bytes() == before


@pytest.mark.parametrize("command", ["eval", "eval-quality"])
def test_help_names_the_default_data_folder_plainly(capsys, command):
    # The default read '/work/wt/docs/../shared/data/live1', where train and export say
    # '/work/wt/shared/data/...': the same folder, written two ways.
    with pytest.raises(SystemExit) as e:
        cli([command, "-h"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert "/../" not in out.replace("- ", "-")
    assert str(Path(qairn.__file__).resolve().parents[2] / "shared" / "data" / "live1") in out.replace(
        "- ", "-"
    )


def test_quiet_eval_and_eval_quality_print_their_results_alone(refs, tmp_path, capsys, monkeypatch):
    """-q, which video takes, was refused by eval and eval-quality ('unrecognized arguments: -q'). It
    drops the progress bars (stderr plays a terminal here, where they draw at once) and eval-quality's
    'wrote p=...'; the tables are the results and stay, and an error still says its line."""
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    run = ["eval", "--data", str(refs), "--qf", "10", "--jpeg-only", "--crop", "32"]
    assert cli(run) == 0 and "eval:" in capsys.readouterr().err
    assert cli([*run, "-q"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "(2 images, centre crops of at most 32x32)" in out
    assert cli(["eval", "--data", str(tmp_path / "nodir"), "--jpeg-only", "-q"]) == 2
    assert capsys.readouterr() == ("", f"qairn eval: error: {tmp_path / 'nodir'}: no such folder\n")

    w = make_weights(tmp_path / "w.safetensors")
    val = make_folder(tmp_path / "val", 1, 40, 48, seed=9)
    sweep = ["eval-quality", "--no-report", "--sweep-p", "--val-data", str(val), "--write-p", str(w)]
    assert cli([*sweep, "--device", "cpu", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "NOT human opinion scores" in out and "<- chosen" in out, out
    assert "wrote p=" not in out and "p_sweep" in read_metadata(w)


def test_eval_ensemble_restores_as_the_restorer_does_and_says_so(refs, tmp_path):
    """qairn eval --ensemble 8 measures the self-ensemble (README's LIVE1 figures for it), and its JSON
    says it ran one."""
    w = make_weights(tmp_path / "w.safetensors")
    js = tmp_path / "e.json"
    args = ["eval", "--data", str(refs), "--qf", "10", "--weights", str(w), "--device", "cpu", "-q"]
    assert cli([*args, "--ensemble", "8", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["model"]["ensemble"] == 8
    row = next(r for r in res["images"] if r["image"] == "img01")
    bgr = cv2.imread(str(refs / "img01.png"))
    jp = cv2.imdecode(cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 10])[1], cv2.IMREAD_COLOR)[
        ..., ::-1
    ]
    r = qairn.Restorer(weights=w, device="cpu", tile=None, ensemble=8)
    out = r.restore(np.ascontiguousarray(jp)).image
    assert row["restored"]["psnr"] == pytest.approx(qairn.metrics.psnr(bgr[..., ::-1], out), abs=1e-9)


def test_eval_jpeg_clip_measures_what_restore_writes_and_says_so(refs, tmp_path, capsys):
    """qairn eval --jpeg-clip measures the restoration clipped to each JPEG's quantization bins (what
    `qairn restore` writes for a JPEG file); without it, the network's picture (the paper's protocol)."""
    from qairn.engine.jpeg import consistent, read_jpeg

    w = make_weights(tmp_path / "w.safetensors")
    args = ["eval", "--data", str(refs), "--qf", "10", "--weights", str(w), "--device", "cpu", "-q"]
    bgr = cv2.imread(str(refs / "img01.png"))
    buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 10])[1]
    jp = np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])
    network = qairn.Restorer(weights=w, device="cpu", tile=None).restore(jp).image
    clipped = consistent(network, jp, read_jpeg(buf.tobytes()))
    assert not np.array_equal(clipped, network)
    for extra, expect, name in (([], network, "plain.json"), (["--jpeg-clip"], clipped, "clip.json")):
        assert cli([*args, *extra, "--json", str(tmp_path / name)]) == 0
        res = json.loads((tmp_path / name).read_text())
        assert res["jpeg_clip"] == bool(extra)
        row = next(r for r in res["images"] if r["image"] == "img01")
        assert row["restored"]["psnr"] == pytest.approx(qairn.metrics.psnr(bgr[..., ::-1], expect), abs=1e-9)
        said = "clipped to each JPEG's quantization bins" in capsys.readouterr().out
        assert said == bool(extra)


@pytest.mark.parametrize("cmd", [["eval", "--jpeg-only"], ["eval-quality", "--limit", "1", "--crop", "32"]])
def test_a_report_that_cannot_be_written_after_the_run_is_a_failed_run(
    refs, tmp_path, capsys, monkeypatch, cmd
):
    """A --json that failed to write once every image had been measured (a full disk) exited 2, the code
    of a refusal before any work, as "[Errno 28] No space left on device", naming no file. It is a run
    that failed: exit 1, one line naming the file."""
    import errno

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ev, "write_atomic", disk_full)
    w = make_weights(tmp_path / "w.safetensors")
    js = tmp_path / "r.json"
    rc = cli([*cmd, "--data", str(refs), "--weights", str(w), "--device", "cpu", "--json", str(js), "-q"])
    out, err = capsys.readouterr()
    assert rc == 1 and err == f"qairn {cmd[0]}: error: {js}: cannot write (No space left on device)\n"
    assert "Q1" in out or "PSNR" in out  # the run's table was printed: the work had been done
    assert not js.exists()


def test_eval_refuses_jpeg_clip_with_jpeg_only(refs, capsys):
    # --jpeg-only measures the JPEGs alone: a --jpeg-clip beside it was ignored without a word
    with pytest.raises(SystemExit) as e:
        cli(["eval", "--data", str(refs), "--qf", "10", "--jpeg-only", "--jpeg-clip"])
    assert e.value.code == 2
    assert "--jpeg-clip with --jpeg-only: nothing is restored to clip" in capsys.readouterr().err
