"""ONNX export: graph contract, parity with eager on real (LIVE1 JPEG) crops, fp16 islands, CLI."""

import copy
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import live1_files, lively_model, run_in_threads

from qairn.export import onnx_export as ox
from qairn.export.cli import main as export_main
from qairn.model import minkowski


@pytest.fixture(scope="module")
def model():
    return lively_model("tiny", seed=1)


@pytest.fixture(scope="module")
def crops():
    # Real content: 2 LIVE1 images, downscaled and cropped to odd sizes, JPEG at QF 10 and 40.
    return ox.jpeg_images(live1_files()[:2], qfs=(10, 40), crop=(72, 100), scale=0.5)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    return {
        (outputs, precision): ox.export_onnx(
            model, folder / f"{outputs}-{precision}.onnx", outputs=outputs, precision=precision
        )
        for outputs in ("maps", "sums")
        for precision in ("fp32", "fp16")
    }


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def value_types(path) -> dict:
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    return {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.output, *graph.input]}


def test_fp32_maps_match_eager_on_real_images(model, crops, exported):
    path = exported["maps", "fp32"]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 17
    assert [o.name for o in proto.graph.output] == list(ox.MAP_OUTPUTS)
    stats = ox.verify_onnx(path, model, crops)
    assert stats["images"] == 4 and stats["finite"]
    assert max(stats["max_abs"].values()) <= 1e-4, stats
    ox.check_parity(stats, "fp32")


def test_dynamic_batch_and_size(model, exported):
    # Traced at 1x64x64; run at another batch and size, and compare with eager directly.
    x = torch.rand(3, 3, 48, 80, generator=torch.Generator().manual_seed(0))
    got = session(exported["maps", "fp32"]).run(None, {"input": x.numpy()})
    with torch.inference_mode():
        y, gammas = model(x)
    assert [g.shape for g in got] == [(3, 3, 48, 80), (3, 1, 48, 80), (3, 1, 24, 40), (3, 1, 12, 20)]
    for g, e in zip(got, [y, *gammas]):
        np.testing.assert_allclose(g, e.numpy(), atol=1e-4, rtol=0)


def test_partial_sums_pool_to_eager_quality(model, exported):
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    y, qsums = session(exported["sums", "fp32"]).run(None, {"input": x.numpy()})
    with torch.inference_mode():
        _, gammas = model(x)
    p = model.config.p
    assert float(ox.read_metadata(exported["sums", "fp32"])["qairn.qsums_scale_log2"]) == 96
    q = ox.q_from_qsums(qsums, 64, 96, p, 96)
    for k, (g, s) in enumerate(zip(gammas, (1, 2, 4))):
        count = (64 // s) * (96 // s)  # the contract's formula, by hand once
        by_hand = (torch.from_numpy(qsums[:, k]).double() / count) ** (1 / p) / 2 ** (96 / p)
        torch.testing.assert_close(torch.from_numpy(q[:, k]), by_hand)
        torch.testing.assert_close(by_hand.float(), minkowski(g, p), atol=1e-6, rtol=1e-5)


def test_fp16_graph_keeps_islands_fp32(exported):
    FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    path = exported["sums", "fp16"]
    types = value_types(path)
    nodes = onnx.load(str(path)).graph.node
    sigmoids = [n for n in nodes if n.op_type == "Sigmoid"]
    convs = [n for n in nodes if n.op_type in ("Conv", "ConvTranspose")]
    assert len(sigmoids) == 3 and all(types[n.output[0]] == FLOAT for n in sigmoids)
    assert all(types[n.output[0]] == FLOAT for n in nodes if n.op_type in ("Pow", "ReduceSum"))
    assert types["qsums"] == FLOAT and types["restored"] == FLOAT and types["input"] == FLOAT
    conv_types = [types[n.output[0]] for n in convs]
    assert conv_types[-1] == FLOAT  # the tail conv (fp32_tail)
    assert conv_types[:-1].count(FLOAT16) == len(convs) - 1  # the trunk and the gates' encoders


def test_fp16_io_and_fp16_tail(model, tmp_path):
    path = ox.export_onnx(
        model, tmp_path / "m.onnx", outputs="maps", precision="fp16", io="fp16", fp32_tail=False
    )
    types = value_types(path)
    assert types["input"] == types["restored"] == onnx.TensorProto.FLOAT16
    assert types["gamma1"] == onnx.TensorProto.FLOAT
    convs = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    assert types[convs[-1].output[0]] == onnx.TensorProto.FLOAT16
    ox.check_parity(ox.verify_onnx(path, model, [ox.synthetic_image(64, 80)]), "fp16")


def test_fp16_parity_and_finite_at_every_qf(model, exported):
    # The fast version of bench/bench_ort.py --parity: 3 downscaled LIVE1 crops at every QF.
    images = ox.jpeg_images(live1_files()[2:5], qfs=(10, 20, 30, 40), crop=(64, 64), scale=0.25)
    for outputs in ("maps", "sums"):
        stats = ox.verify_onnx(exported[outputs, "fp16"], model, images)
        assert stats["images"] == 12 and stats["finite"]
        ox.check_parity(stats, "fp16")
        # fp16 does change the numbers: the check is not comparing fp32 with itself.
        assert stats["max_abs"]["restored"] > 1e-5


def test_fp32_islands_are_marked_for_tensorrt(exported):
    nodes = onnx.load(str(exported["sums", "fp32"])).graph.node
    marked = [n for n in nodes if n.name.startswith(ox.ISLAND_TAG)]
    by_op = lambda op: [n for n in marked if n.op_type == op]  # noqa: E731
    # Gate: Sigmoid, Sub, Mul per scale; pooling: Log, Mul (by p), Add (the 2**96 scale), Exp, ReduceSum.
    assert len(by_op("Sigmoid")) == 3 and len(by_op("Sub")) == 3 and len(by_op("Mul")) == 6
    assert len(by_op("ReduceSum")) == 3 and len(by_op("Log")) == 3 and len(by_op("Exp")) == 3
    assert len(by_op("Conv")) == 1  # the tail only: the trunk stays fp16
    assert not any(n.name.startswith(ox.ISLAND_TAG) for n in nodes if n.op_type in ("ConvTranspose", "Relu"))
    graph = onnx.load(str(exported["sums", "fp32"])).graph
    without_tail = {graph.node[i].op_type for i in ox.fp32_island_nodes(graph, tail=False)}
    assert "Conv" not in without_tail and "Sigmoid" in without_tail


def test_static_shape(model, tmp_path):
    path = ox.export_onnx(model, tmp_path / "s.onnx", outputs="maps", shape=(2, 64, 96))
    sess = session(path)
    assert ox.static_shape(sess) == (2, 64, 96)
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    got = sess.run(None, {"input": x.numpy()})
    with torch.inference_mode():
        expected = [model(x)[0], *model(x)[1]]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e.numpy(), atol=1e-4, rtol=0)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        sess.run(None, {"input": torch.rand(1, 3, 64, 96).numpy()})
    with pytest.raises(ValueError, match="multiples of 16"):
        ox.export_onnx(model, tmp_path / "bad.onnx", shape=(1, 60, 64))


def test_export_uses_reference_gate_and_leaves_model_alone(model, crops, tmp_path):
    odd = copy.deepcopy(model)

    def wrong_gate(logit, skip, dec):  # stands in for a fused op the exporter cannot see into
        return dec, torch.sigmoid(logit)

    odd.gate = wrong_gate
    path = ox.export_onnx(odd, tmp_path / "g.onnx", outputs="maps")
    assert odd.gate is wrong_gate
    stats = ox.verify_onnx(path, model, crops)  # compared with the reference-gate model
    ox.check_parity(stats, "fp32")


def test_verification_can_fail(model, crops, exported):
    other = lively_model("tiny", seed=2)
    stats = ox.verify_onnx(exported["maps", "fp32"], other, crops)
    with pytest.raises(ox.ExportError, match="differs from eager"):
        ox.check_parity(stats, "fp32")


@pytest.mark.skipif(
    not os.environ.get("QAIRN_TEST_DYNAMO"),
    reason="dynamo exporter takes 15-80 s on this 2-core CPU; set QAIRN_TEST_DYNAMO=1 to run it",
)
def test_dynamo_exporter(model, crops, tmp_path):
    # The fallback for when torch drops the TorchScript exporter.
    path = ox.export_onnx(model, tmp_path / "d.onnx", outputs="sums", exporter="dynamo", opset=18)
    stats = ox.verify_onnx(path, model, crops)
    ox.check_parity(stats, "fp32")


def test_cli_onnx(tiny_weights, tmp_path, capsys):
    image = live1_files()[0]
    out = tmp_path / "m.onnx"
    argv = ["onnx", str(tiny_weights), "-o", str(out), "--fp16", "--maps", "--static", "1,64,64"]
    argv += ["--verify-images", str(image), "--verify-crop", "64", "--verify-qf", "10"]
    assert export_main(argv) == 0
    text = capsys.readouterr().out
    assert (
        f"fp16 ONNX on CPUExecutionProvider vs eager fp32 on 1 image at QF 10 from {image}:" in text
        and "static (1, 64, 64)" in text
    )
    assert ox.read_metadata(out)["qairn.outputs"] == "maps"
    assert export_main(["onnx", str(tiny_weights), "-o", str(out), "--io", "fp16"]) == 2
    assert export_main(["onnx", str(tmp_path / "missing.safetensors"), "-o", str(out)]) == 2


def test_cli_onnx_never_replaces_a_file_by_accident(tiny_weights, tmp_path, capsys, monkeypatch):
    verify = ["--verify-images", str(live1_files()[0]), "--verify-crop", "64", "--verify-qf", "10"]
    picture = tmp_path / "photo.png"
    picture.write_bytes(b"not to be lost")
    assert export_main(["onnx", str(tiny_weights), "-o", str(picture), *verify]) == 2
    assert picture.read_bytes() == b"not to be lost"
    out = tmp_path / "m.onnx"
    assert export_main(["onnx", str(tiny_weights), "-o", str(out), *verify]) == 0
    first = out.read_bytes()
    capsys.readouterr()
    assert export_main(["onnx", str(tiny_weights), "-o", str(out), "--fp16", *verify]) == 2
    assert capsys.readouterr().err.strip() == f"qairn export: error: {out}: exists (use --overwrite)"
    # A graph that fails its check replaces nothing and leaves no file behind.
    monkeypatch.setattr(ox, "check_parity", lambda *a: (_ for _ in ()).throw(ox.ExportError("too far")))
    assert export_main(["onnx", str(tiny_weights), "-o", str(out), "--fp16", "--overwrite", *verify]) == 1
    assert capsys.readouterr().err.strip() == "qairn export: error: verification failed: too far"
    assert out.read_bytes() == first and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "photo.png"]
    monkeypatch.undo()
    assert export_main(["onnx", str(tiny_weights), "-o", str(out), "--fp16", "--overwrite", *verify]) == 0
    assert ox.read_metadata(out)["qairn.precision"] == "fp16"


def test_export_errors_read_as_every_qairn_commands(tiny_weights, tmp_path, capsys, monkeypatch):
    """`qairn export` printed "qairn export: X: ..." and exited 1 for a missing weights file, where every
    other command prints "qairn CMD: error: ..." and exits 2 for a usage or input error. A failed
    verification is no usage error: still 1, in the same form."""
    from qairn import cli as qairn_cli
    from qairn.export import cli as export_cli

    missing, out = tmp_path / "missing.safetensors", tmp_path / "m.onnx"
    assert qairn_cli.main(["export", "onnx", str(missing), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"qairn export: error: {missing}"), err
    # A cached export that missed its tolerance (tensorrt's) reaches main as a VerificationError.
    too_far = lambda args: (_ for _ in ()).throw(ox.VerificationError("output 'Q' differs"))  # noqa: E731
    monkeypatch.setattr(export_cli, "main_onnx", too_far)
    assert export_main(["onnx", str(tiny_weights), "-o", str(out)]) == 1
    assert capsys.readouterr().err.strip() == "qairn export: error: output 'Q' differs"


def test_an_export_that_cannot_be_written_is_a_failed_export(tiny_weights, tmp_path, capsys, monkeypatch):
    """The ONNX file failing to write once the export ran (a full disk) exited 2, the code of a refusal
    before any work, as "[Errno 28] No space left on device", naming no file. It is a failed export:
    exit 1, one line naming the output; nothing is left behind. Refusals (a missing weights file) stay 2."""
    import errno

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ox, "write_atomic", disk_full)
    out = tmp_path / "m.onnx"
    verify = ["--verify-images", str(live1_files()[0]), "--verify-crop", "64", "--verify-qf", "10"]
    assert export_main(["onnx", str(tiny_weights), "-o", str(out), *verify]) == 1
    assert capsys.readouterr().err == f"qairn export: error: {out}: cannot write (No space left on device)\n"
    assert list(tmp_path.iterdir()) == []
    assert export_main(["onnx", str(tmp_path / "missing.safetensors"), "-o", str(out)]) == 2


def test_a_crashed_exports_part_files_are_removed_by_the_next_export(tmp_path):
    """kill -9 during a cached export skips the finally that removes its .part.onnx: the file stayed in
    the cache folder forever. The next export removes part files over an hour old whose writer is gone."""
    folder = tmp_path / "onnx"
    folder.mkdir()
    hour_ago = time.time() - 3700
    dead = folder / ".qairn-tiny-fp32-0123.4194305.part.onnx"  # past pid_max: no such process
    alive = folder / f".qairn-tiny-fp32-4567.{os.getpid()}.part.onnx"  # a live export, slow to start
    fresh = folder / ".qairn-tiny-fp16-89ab.4194305.part.onnx"  # minutes old: perhaps on another host
    engine_part = folder / ".qairn-fp16-cdef.engine.k3j2h1g0.part"  # write_atomic's, no pid
    other = folder / "notes.part"  # not one of ours
    for f in (dead, alive, fresh, engine_part, other):
        f.write_bytes(b"half a graph")
        if f is not fresh:
            os.utime(f, (hour_ago, hour_ago))
    ox.cached_onnx(lively_model(), tmp_path, outputs="maps", precision="fp32")
    assert not dead.exists() and not engine_part.exists()
    assert alive.exists() and fresh.exists() and other.exists()


def test_shipped_weights_pass_the_fp16_check(tmp_path):
    """The shipped weights pool with p = 64: their sums of gamma**64 carry 64x the relative error of
    gamma, and failed a check on the sums; Q, what the sums are for, is checked instead. The Q error
    reported is the one the pooled scores really have."""
    from qairn.engine.restorer import default_weights
    from qairn.weights_io import load_model

    model = load_model(default_weights())
    assert model.config.p == 64
    path = ox.export_onnx(model, tmp_path / "s.onnx", outputs="sums", precision="fp16")
    images = ox.jpeg_images(live1_files()[:2], qfs=(10, 40), crop=(128, 128))
    stats = ox.verify_onnx(path, model, images)
    ox.check_parity(stats, "fp16")
    _, qsums = session(path).run(None, {"input": ox.image_batch(images[0][1], None).numpy()})
    x = ox.image_batch(images[0][1], None)
    with torch.inference_mode():
        expected = ox.ExportModel(model, outputs="sums", precision="fp32")(x)[1].double().numpy()
    q_onnx, q_eager = (ox.q_from_qsums(s, 128, 128, 64) for s in (qsums, expected))
    assert 0 < np.abs(q_onnx - q_eager).max() <= stats["max_abs"]["Q"] <= 2e-3


def test_a_cached_export_that_fails_its_check_is_not_kept(model, tmp_path, monkeypatch):
    """The backends' cache: a graph that fails verification must not be found, unchecked, next time."""
    monkeypatch.setattr(ox, "check_parity", lambda *a: (_ for _ in ()).throw(ox.ExportError("too far")))
    with pytest.raises(ox.ExportError, match="too far"):
        ox.cached_onnx(model, tmp_path, precision="fp16")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    monkeypatch.undo()
    path = ox.cached_onnx(model, tmp_path, precision="fp16")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [path]


def test_cli_verify_images_named_but_missing_is_an_error(tiny_weights, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    (tmp_path / "webp").mkdir()
    assert (
        export_main(["onnx", str(tiny_weights), "-o", str(out), "--verify-images", str(tmp_path / "no")]) == 2
    )
    assert "--verify-images" in capsys.readouterr().err and not out.exists()
    # Other formats count (and a .PNG in capitals).
    import cv2

    crop = cv2.imread(str(live1_files()[0]))[:64, :64]
    assert cv2.imwrite(str(tmp_path / "webp" / "a.webp"), crop)
    argv = [
        "onnx",
        str(tiny_weights),
        "-o",
        str(out),
        "--verify-images",
        str(tmp_path / "webp"),
        "--verify-qf",
        "10",
    ]
    assert export_main(argv) == 0
    assert "1 image at QF 10 from" in capsys.readouterr().out


def test_verify_a_file_from_before_the_qsums_scale(model, crops, tmp_path, monkeypatch):
    """A "sums" file exported before the 2**96 scale (no qairn.qsums_scale_log2, bare gamma**p sums)
    verifies against today's eager model: each side's sums are unscaled with their own scale."""
    with monkeypatch.context() as m:
        m.setattr(ox, "scaled_pow", lambda g, p: g.pow(p))
        path = ox.export_onnx(model, tmp_path / "old.onnx", outputs="sums", precision="fp32")
    proto = onnx.load(str(path))
    kept = [e for e in proto.metadata_props if e.key != "qairn.qsums_scale_log2"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, str(path))
    stats = ox.verify_onnx(path, model, crops[:1])
    assert stats["max_abs"]["Q"] <= 1e-5, stats


def test_an_opset_torch_cannot_export_is_one_line(tiny_weights, tmp_path, capsys):
    """Past torch's newest opset (23 in torch 2.13) the exporter failed deep in tracing with a
    RuntimeError carrying the whole Torch IR graph: a traceback, not one line."""
    out = tmp_path / "m.onnx"
    top = ox.max_opset("dynamo")
    argv = ["onnx", str(tiny_weights), "-o", str(out), "--exporter", "dynamo", "--opset", str(top + 1)]
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"qairn export: error: opset {top + 1}: need 17..{top} (the newest torch {torch.__version__}'s "
        "dynamo exporter writes)"
    ]
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", [(1, 512.7, 512), (True, 64, 64), (1, "64", 64), (1, 64.0, 64)])
def test_a_static_shape_of_non_integers_is_refused(shape):
    """check_shape ran int() on each value: (1, 512.7, 512) silently became (1, 512, 512), and
    True a batch of 1."""
    with pytest.raises(ValueError, match=r"^shape=.*: expected \(N, H, W\), three whole numbers$"):
        ox.check_shape(shape)
    assert ox.check_shape((np.int64(2), 64, 128)) == (2, 64, 128)  # numpy's ints are whole numbers


@pytest.mark.parametrize("opset", [17.5, True, "17"])
def test_an_opset_that_is_no_whole_number_is_refused(model, tmp_path, opset):
    """export_onnx(opset=17.5) passed the 17..20 range check and reached the exporter."""
    with pytest.raises(ValueError, match=r"^opset=.*: expected a whole number$"):
        ox.export_onnx(model, tmp_path / "m.onnx", opset=opset)
    assert not (tmp_path / "m.onnx").exists()


def test_an_opset_past_the_torchscript_exporters_is_refused(model, tmp_path):
    """opset 21..23 passed the 17..23 check (the dynamo exporter's range) with the default torchscript
    exporter, whose newest is 20: torch warned "Exporting to ONNX opset version 21 is not supported"
    and wrote opset-20 nodes into a file that declares 21. Now refused, naming the dynamo exporter."""
    top, newest = ox.max_opset("torchscript"), ox.max_opset("dynamo")
    if newest <= top:
        pytest.skip(f"torch {torch.__version__}: the torchscript exporter writes every opset dynamo does")
    with pytest.raises(ValueError) as e:
        ox.export_onnx(model, tmp_path / "m.onnx", opset=top + 1)
    assert str(e.value) == (
        f"opset {top + 1}: need 17..{top} (the newest torch {torch.__version__}'s torchscript exporter "
        f"writes; exporter='dynamo' writes up to {newest})"
    )
    assert list(tmp_path.iterdir()) == []


def test_two_threads_export_to_the_cache_at_once(model, tmp_path):
    """Two Restorers made at once in one process (backend="onnxruntime" or "tensorrt") both call
    cached_onnx: torch's exporter keeps global state, and the second export failed with
    "AssertionError: GLOBALS.in_onnx_export must be ..."; both shared one temp name too."""
    import threading

    start, results = threading.Barrier(2, timeout=60), []

    def export():
        start.wait()
        try:
            results.append(ox.cached_onnx(model, tmp_path))
        except Exception as e:  # noqa: BLE001 - reported below, with its type
            results.append(f"{type(e).__name__}: {e}")

    run_in_threads(export, export)
    assert len(set(results)) == 1 and isinstance(results[0], os.PathLike), results
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [results[0]]


@pytest.mark.parametrize("qfs", ["", ",", "abc", "0", "10,101"])
def test_cli_verify_qf_that_makes_no_images_is_refused(tiny_weights, tmp_path, capsys, qfs):
    """--verify-qf "" gave no JPEGs: the export was "verified on 0 images: max abs err 0.00e+00" and
    written. Now the list is refused before any work, and a check over no images is never a pass."""
    out = tmp_path / "m.onnx"
    with pytest.raises(SystemExit) as e:
        export_main(["onnx", str(tiny_weights), "-o", str(out), "--verify-qf", qfs])
    assert e.value.code == 2 and "expected JPEG qualities 1..100" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ox.ExportError, match="verified on no images"):
        ox.check_parity({"max_abs": {"restored": 0.0}, "finite": True, "images": 0}, "fp32")


@pytest.mark.parametrize("target", ["onnx", "tensorrt"])
@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_cli_without_onnx_or_onnxruntime_is_one_line(
    tiny_weights, tmp_path, monkeypatch, capsys, target, missing
):
    """qairn export needs onnx to export and onnxruntime to verify: without either it ended in a
    ModuleNotFoundError traceback, after loading the weights (and, without onnxruntime, exporting);
    tensorrt checks them before TensorRT itself, which this machine lacks."""
    from qairn import weights_io

    monkeypatch.setitem(sys.modules, missing, None)  # import fails, as when it is not installed
    monkeypatch.setattr(weights_io, "load_model", lambda path: pytest.fail("weights loaded first"))
    out = tmp_path / ("m.onnx" if target == "onnx" else "m.engine")
    assert export_main([target, str(tiny_weights), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    why = {"onnx": "to export and read ONNX files", "onnxruntime": "to verify the export"}[missing]
    assert err == f"qairn export: error: {missing} is not installed ({why}): pip install 'qairn[export]'\n"
    assert os.listdir(tmp_path) == []
    if target == "tensorrt" and missing == "onnxruntime":  # a given --onnx is verified only when asked
        assert export_main([target, str(tiny_weights), "--onnx", str(tmp_path / "m.onnx")]) == 2
        assert "pip install tensorrt" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, value, says",
    [
        ("--verify-limit", "-1", "the image count must not be negative, got -1"),
        ("--verify-crop", "-5", "the crop side must not be negative, got -5"),
        ("--verify-limit", "two", "expected a number of images (0 = all), got 'two'"),
        ("--verify-crop", "1.5", "expected a crop side in pixels (0 = whole image), got '1.5'"),
    ],
)
def test_cli_negative_verify_counts_are_refused(tiny_weights, tmp_path, capsys, option, value, says):
    # --verify-limit -1 verified on all images and --verify-crop -5 on whole ones, without a word.
    # Parsed as qairn's --tile and --overlap are (tiling.zero_or_more), and said the same way.
    with pytest.raises(SystemExit) as e:
        export_main(["onnx", str(tiny_weights), "-o", str(tmp_path / "m.onnx"), option, value])
    assert e.value.code == 2 and f"argument {option}: {says}" in capsys.readouterr().err


def test_cli_onnx_output_folder_must_exist(tiny_weights, tmp_path, capsys):
    """-o typo/m.onnx created the folder typo/ (the export's writer makes cache folders) and wrote
    the file there; an output folder that is not there is refused, as every other qairn output's."""
    out = tmp_path / "typo" / "m.onnx"
    assert export_main(["onnx", str(tiny_weights), "-o", str(out), "--verify-qf", "10"]) == 2
    assert capsys.readouterr().err.strip() == f"qairn export: error: {out}: output folder does not exist"
    assert not (tmp_path / "typo").exists()
    engine = tmp_path / "typo" / "m.engine"  # checked before TensorRT is imported
    assert export_main(["tensorrt", str(tiny_weights), "-o", str(engine)]) == 2
    assert capsys.readouterr().err.strip() == f"qairn export: error: {engine}: output folder does not exist"


def test_cli_verify_images_are_checked_before_the_export(tiny_weights, tmp_path, monkeypatch, capsys):
    """A --verify-images typo was found only after the model was loaded and exported (tens of seconds
    for the small preset on a CPU, and the cached export's own check before a TensorRT build)."""
    monkeypatch.setattr(ox, "export_onnx", lambda *a, **k: pytest.fail("exported first"))
    argv = [
        "onnx",
        str(tiny_weights),
        "-o",
        str(tmp_path / "m.onnx"),
        "--verify-images",
        str(tmp_path / "no"),
    ]
    assert export_main(argv) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"qairn export: error: --verify-images {tmp_path / 'no'}: no such file, or a folder without images"
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter
def test_verifying_a_foreign_onnx_file_is_one_line(model, tmp_path):
    """An ONNX file qairn did not export (here a plain conv's) raised KeyError('qairn.outputs') from
    verify_onnx, a traceback that named neither the file nor the problem."""
    foreign = tmp_path / "conv.onnx"
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    torch.onnx.export(conv, (torch.rand(1, 3, 16, 16),), str(foreign), dynamo=False, input_names=["input"])
    with pytest.raises(ox.ExportError) as e:
        ox.verify_onnx(foreign, model, [ox.synthetic_image(16, 16)])
    assert str(e.value) == (
        f"{foreign}: not an ONNX file exported by qairn (no qairn.outputs, qairn.precision, qairn.p metadata)"
    )


def test_cli_verify_images_folder_skips_hidden_files(tmp_path):
    """A --verify-images folder copied from a Mac holds ._a.jpg (AppleDouble metadata, not an image)
    beside a.jpg; it sorted first and failed the export: '._a.jpg: not an image OpenCV can read'."""
    import argparse

    import cv2

    from qairn.export.cli import verify_inputs

    assert cv2.imwrite(str(tmp_path / "a.jpg"), cv2.imread(str(live1_files()[0]))[:64, :64])
    (tmp_path / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble, not a JPEG")
    args = argparse.Namespace(verify_images=tmp_path, verify_qf=[10], verify_limit=2, verify_crop=64)
    images, note = verify_inputs(args)
    assert [name for name, _ in images] == ["a@qf10"] and note.startswith("1 image at QF 10 from")


def test_cli_verify_line_says_images_times_qfs(tmp_path):
    """2 images at 2 QFs read "on 4 images: ... (2 images from DIR at QF [10, 40])": 4 was the
    image x QF pairs, and the QFs a Python list. It now says what it measured, once."""
    import argparse

    import cv2

    from qairn.export.cli import verify_inputs

    for name in ("a.jpg", "b.jpg"):
        assert cv2.imwrite(str(tmp_path / name), cv2.imread(str(live1_files()[0]))[:32, :32])
    args = argparse.Namespace(verify_images=tmp_path, verify_qf=[10, 40], verify_limit=2, verify_crop=32)
    images, note = verify_inputs(args)
    assert len(images) == 4 and note == f"2 images x 2 QFs (10, 40) from {tmp_path}"
    stats = {"precision": "fp32", "images": 4, "max_abs": {"Q": 0.0}}
    assert f"vs eager fp32 on 2 images x 2 QFs (10, 40) from {tmp_path}: max abs" in ox.summary(stats, note)


def test_metadata_records_the_export(model, exported):
    # verify_onnx reads p from the file for both sides, so a wrong qairn.p passed parity unnoticed.
    meta = ox.read_metadata(exported["sums", "fp16"])
    assert meta["qairn.p"] == repr(float(model.config.p)) and meta["qairn.config"] == model.config.to_json()
    assert (meta["qairn.outputs"], meta["qairn.precision"], meta["qairn.io"]) == ("sums", "fp16", "fp32")
    assert meta["qairn.fp32_tail"] == "true" and meta["qairn.exporter"] == "torchscript"


def test_the_image_output_has_the_io_dtype_whatever_the_compute_dtype(model):
    x = torch.rand(1, 3, 32, 32)
    for precision, io, tail in [("fp16", "fp32", False), ("fp32", "fp16", True)]:
        y, *gammas = ox.ExportModel(model, "maps", precision, io, fp32_tail=tail)(x.to(ox.DTYPES[io]))
        assert y.dtype == ox.DTYPES[io] and all(g.dtype == torch.float32 for g in gammas)


def test_check_parity_bounds_per_precision_and_output():
    def stats(**errs):
        return {"max_abs": errs, "finite": True, "images": 1}

    ox.check_parity(stats(restored=0.9e-4, gamma1=0.9e-4), "fp32")
    ox.check_parity(stats(restored=1.9e-3, Q=1.9e-3), "fp16")
    for precision, errs in [
        ("fp32", dict(restored=1.1e-4)),
        ("fp32", dict(gamma2=1.1e-4)),
        ("fp16", dict(restored=2.1e-3)),
        ("fp16", dict(Q=2.1e-3)),
    ]:
        with pytest.raises(ox.ExportError, match="differs from eager"):
            ox.check_parity(stats(**errs), precision)


def test_q_from_qsums_counts_the_pixels_of_odd_sized_maps():
    # A 6x10 input has gamma maps of 6x10, 3x5 and 2x3 (ceil): 60, 15 and 6 pixels.
    p, q = 2.0, 0.5
    pixels = np.array([60.0, 15.0, 6.0])
    sums = pixels * q**p * 2.0**ox.POOL_SCALE_LOG2
    np.testing.assert_allclose(ox.q_from_qsums(sums[None], 6, 10, p), [[q, q, q]], rtol=1e-12)


def test_verify_onnx_reports_non_finite_outputs(model, tmp_path):
    broken = copy.deepcopy(model)
    with torch.no_grad():
        next(p for n, p in broken.named_parameters() if n.endswith("bias")).fill_(float("nan"))
    path = ox.export_onnx(broken, tmp_path / "nan.onnx", outputs="maps")
    stats = ox.verify_onnx(path, broken, [ox.synthetic_image(32, 32)])
    assert not stats["finite"]
    with pytest.raises(ox.ExportError, match="NaN or Inf"):
        ox.check_parity(stats, "fp32")


def test_onnx_cache_key_covers_config_weights_options_and_torch(model, monkeypatch):
    # Each part of the key was droppable: no test saw two exports that differ in one part share a name.
    import dataclasses

    from qairn.export.cache import model_digest

    base = model_digest(model, precision="fp32")
    assert model_digest(copy.deepcopy(model), precision="fp32") == base
    nudged = copy.deepcopy(model)
    with torch.no_grad():
        next(nudged.parameters()).view(-1)[0] += 1e-3
    other_p = copy.deepcopy(model)
    other_p.config = dataclasses.replace(model.config, p=model.config.p + 1)
    keys = {
        base,
        model_digest(nudged, precision="fp32"),
        model_digest(other_p, precision="fp32"),
        model_digest(model, precision="fp16"),
    }
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    keys.add(model_digest(model, precision="fp32"))
    assert len(keys) == 5


def test_the_onnx_cache_key_holds_the_graph_version(model, tmp_path, monkeypatch):
    # Without GRAPH_VERSION in the key, a graph change (such as the 2**96 qsums scale) reused old files.
    seen = []
    monkeypatch.setattr(ox, "model_digest", lambda m, **options: seen.append(options) or "ab" * 32)
    path = tmp_path / "onnx" / f"qairn-{model.config.preset}-fp32-{'ab' * 12}.onnx"
    path.parent.mkdir()
    proto = onnx.ModelProto()
    proto.metadata_props.add(key="qairn.outputs", value="maps")
    path.write_bytes(proto.SerializeToString())  # found: nothing is exported
    assert ox.cached_onnx(model, tmp_path) == path
    assert seen[0]["graph"] == ox.GRAPH_VERSION and seen[0]["precision"] == "fp32"


def test_the_fp16_check_says_what_it_measures_and_runs_real_fp16(model, crops, exported):
    """ONNX Runtime's CPU provider runs an fp16 graph's layers in fp32 (casts around every op it has
    no fp16 kernel for): only the graph's own casts round, so the fp16 check measured far less than
    fp16 arithmetic (gammas about half torch fp16's error here, 2.4e-7 against 3.2e-4 for the shipped
    weights) and did not say so. The stats now name the provider, and an fp16 file on the CPU
    provider is also checked as torch runs the same fp16 network, rounding every activation."""
    path = exported["maps", "fp16"]
    x = ox.image_batch(crops[0][1], None)
    got = session(path).run(None, {"input": x.numpy()})
    with torch.inference_mode():
        fp32 = ox.ExportModel(model, outputs="maps")(x)
        fp16 = ox.ExportModel(model, outputs="maps", precision="fp16")(x)
    for g, e, h in zip(got[1:], fp32[1:], fp16[1:]):  # the gammas
        assert np.abs(g - e.numpy()).max() < np.abs(h.float().numpy() - e.numpy()).max()
    stats = ox.verify_onnx(path, model, crops)
    assert stats["provider"] == "CPUExecutionProvider" and stats["torch_fp16"]["images"] == 2
    assert stats["torch_fp16"]["max_abs"].keys() == stats["max_abs"].keys()
    assert stats["torch_fp16"]["max_abs"]["gamma1"] > 1e-6
    line = ox.summary(stats)
    assert "fp16 ONNX on CPUExecutionProvider" in line and "not fp16 arithmetic" in line
    ox.check_parity(stats, "fp16")
    broken = stats | {"torch_fp16": stats["torch_fp16"] | {"max_abs": {"gamma1": 0.01}}}
    with pytest.raises(ox.ExportError, match="fp16 network in torch output 'gamma1' differs from eager"):
        ox.check_parity(broken, "fp16")
    fp32 = ox.verify_onnx(exported["sums", "fp32"], model, crops[:1])
    assert "torch_fp16" not in fp32 and "fp16 arithmetic" not in ox.summary(fp32)


def test_the_fp16_line_names_the_crop_sizes_that_ran(model, exported):
    """The torch fp16 run takes 64x64 centre crops, an image smaller than that whole: the line said
    "2 64x64 crops" of a 1x1 and a 3x5 image."""
    rng = np.random.default_rng(0)
    tiny = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(1, 1), (3, 5)]]
    line = ox.summary(ox.verify_onnx(exported["maps", "fp16"], model, tiny))
    assert "on 2 crops (1x1, 3x5) of them" in line and "64x64" not in line
    line = ox.summary(ox.verify_onnx(exported["maps", "fp16"], model, tiny[:1]))
    assert "on 1 1x1 crop of them" in line


def test_cli_fp16_line_says_where_its_images_came_from_before_the_torch_crops(tiny_weights, tmp_path, capsys):
    """The verify line ended in "(1 images from X at QF [10])" after the torch fp16 figures, which ran
    on crops of the first images only: the note now follows the ONNX figures it describes."""
    image = live1_files()[0]
    argv = [
        "onnx",
        str(tiny_weights),
        "-o",
        str(tmp_path / "m.onnx"),
        "--fp16",
        "--verify-images",
        str(image),
    ]
    assert export_main(argv + ["--verify-crop", "64", "--verify-qf", "10"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    onnx_part, torch_part = line.split("; the CPU provider runs fp16 layers in fp32")
    assert f"vs eager fp32 on 1 image at QF 10 from {image}: max abs err" in onnx_part
    assert "1 64x64 crop of them" in torch_part and "image from" not in torch_part


def test_two_exports_to_one_file_do_not_take_each_others_unverified_file(tiny_weights, tmp_path, monkeypatch):
    """Every `qairn export onnx -o m.onnx` wrote its graph to the same .m.onnx.unverified: a second
    export to m.onnx (a parallel make) overwrote the first one's file before it was verified and
    renamed (so the first could rename the second's graph into place, verified against its own
    weights), then deleted it. Each process now has its own; another's is left alone."""
    out = tmp_path / "m.onnx"
    others = tmp_path / ".m.onnx.unverified"  # another process's in-flight export (old name)
    other = tmp_path / f".m.onnx.{os.getpid() + 1}.unverified"  # another process's (new name)
    for f in (others, other):
        f.write_bytes(b"another export's graph")
    verify = ["--verify-images", str(live1_files()[0]), "--verify-crop", "64", "--verify-qf", "10"]
    assert export_main(["onnx", str(tiny_weights), "-o", str(out), *verify]) == 0
    assert others.read_bytes() == other.read_bytes() == b"another export's graph"
    assert ox.read_metadata(out)["qairn.precision"] == "fp32"


def test_the_torch_fp16_check_runs_its_convolutions_on_fp32_kernels(model, crops):
    """The torch fp16 run used torch's CPU fp16 convolution, a naive loop: 67 s per 64x64 crop for
    the paper preset (0.9 s in fp32), so `qairn export onnx --fp16` of it spent over 2 minutes on two
    crops. Its convolutions now take fp16 operands into fp32 kernels and round the result to fp16,
    as a GPU's fp32 accumulation does: the same error (within 2x here), no fp16 convolution kernel."""
    reference = ox.ExportModel(model, outputs="maps").eval()
    fp16 = ox.ExportModel(model, outputs="maps", precision="fp16").eval()
    images = [img for _, img in crops[:2]]
    from torch.utils._python_dispatch import TorchDispatchMode

    conv_dtypes = set()

    class ConvDtypes(TorchDispatchMode):  # the dtype each aten convolution really computes in
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "conv" in func.name():
                conv_dtypes.add(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with ConvDtypes():
        stats = ox.torch_fp16_errors(reference, fp16, list(ox.MAP_OUTPUTS), images, model.config.p)
    assert conv_dtypes == {torch.float32}
    native = {}
    for img in images:
        x = ox.image_batch(img, None)
        with torch.inference_mode():
            for name, e, h in zip(ox.MAP_OUTPUTS, reference(x), fp16(x)):
                native[name] = max(native.get(name, 0.0), float((e - h.float()).abs().max()))
    for name, err in stats["max_abs"].items():
        assert 0 < err and native[name] / 2 <= err <= 2 * native[name], (name, err, native[name])


def test_verify_summary_of_one_image_says_image():
    """A --verify-images of one file printed 'vs eager fp32 on 1 image:'."""
    from qairn.export.onnx_export import summary

    stats = {"precision": "fp32", "provider": "CPUExecutionProvider", "images": 1, "max_abs": {"Q": 0.0}}
    assert "vs eager fp32 on 1 image: max abs err Q 0.00e+00" in summary(stats)
    assert "on 2 images:" in summary(stats | {"images": 2})


def test_a_damaged_file_in_the_onnx_cache_is_exported_again_once(model, tmp_path):
    """A truncated file in qairn's own ONNX cache failed every start ('not an ONNX file (Error parsing
    message ...)') until the user deleted it. The cache's file is exported again, with a warning; an
    ONNX file the user names still fails in one line."""
    import qairn

    path = ox.cached_onnx(model, tmp_path)
    whole = onnx.load(str(path))
    no_metadata = onnx.load(str(path))
    no_metadata.ClearField("metadata_props")  # cut where the metadata starts: it still parses
    for damaged, says in [
        (path.read_bytes()[: path.stat().st_size // 2], "not an ONNX file (Error parsing message"),
        (no_metadata.SerializeToString(), "not an ONNX file exported by qairn (no qairn.outputs metadata)"),
    ]:
        path.write_bytes(damaged)
        with pytest.warns(UserWarning) as caught:
            assert ox.cached_onnx(model, tmp_path) == path
        assert len(caught) == 1
        assert str(caught[0].message).startswith(f"re-exporting the cached ONNX file: {path}: {says}")
        assert onnx.load(str(path)).metadata_props == whole.metadata_props  # whole again
    user_file = tmp_path / "mine.onnx"
    user_file.write_bytes(damaged[: len(damaged) // 2])
    with pytest.raises(ox.ExportError, match=f"^{user_file}: not an ONNX file \\("):
        qairn.Restorer(model=model, device="cpu", backend="onnxruntime", onnx=user_file)


def test_quiet_export_prints_its_errors_alone(tiny_weights, tmp_path, capsys, monkeypatch):
    """-q, which video takes, was refused by export ('unrecognized arguments: -q'). It drops the
    verification figures of a pass and the closing 'wrote ...'; a failed verification still gives its
    figures and its error line."""
    verify = ["--verify-images", str(live1_files()[0]), "--verify-crop", "64", "--verify-qf", "10"]
    out = tmp_path / "m.onnx"
    assert export_main(["onnx", str(tiny_weights), "-o", str(out), *verify, "-q"]) == 0
    assert capsys.readouterr() == ("", "") and out.is_file()
    monkeypatch.setattr(ox, "check_parity", lambda *a: (_ for _ in ()).throw(ox.ExportError("too far")))
    assert export_main(["onnx", str(tiny_weights), "-o", str(out), "--overwrite", *verify, "--quiet"]) == 1
    said, err = capsys.readouterr()
    assert said.startswith("fp32 ONNX on ") and len(said.splitlines()) == 1, said
    assert err == "qairn export: error: verification failed: too far\n"
