import json
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import lively_model
from safetensors.torch import save_file

import qairn
from qairn.model import PRESETS, QAIRN, QAIRNConfig, minkowski, preset
from qairn.weights_io import WeightsError, load_model, read_metadata, save_weights


@pytest.mark.parametrize("h,w", [(16, 16), (17, 9), (33, 47), (1, 1), (96, 96), (20, 40)])
def test_forward_shapes_and_gamma_scales(h, w):
    m = lively_model()
    y, (g1, g2, g3) = m(torch.rand(2, 3, h, w))
    assert y.shape == (2, 3, h, w)
    assert g1.shape == (2, 1, h, w)
    assert g2.shape == (2, 1, -(-h // 2), -(-w // 2))
    assert g3.shape == (2, 1, -(-h // 4), -(-w // 4))
    for g in (g1, g2, g3):
        assert 0 <= g.min() and g.max() <= 1


@pytest.mark.parametrize("h,w,p", [(33, 47, 4.0), (16, 16, 1.0), (5, 70, 32.0)])
def test_pooled_forward_scores_the_gammas_it_returns(h, w, p):
    """forward(pool_p=...) takes its sums inside the gates, over each scale's padded map cut to the image
    (scale_cores): they must pool to the Minkowski mean of the cropped gammas it returns, with the same
    picture and gammas as the plain call, and image=False must give the same gammas and sums alone."""
    from qairn.kernels.gate import minkowski_from_sums

    m = lively_model()
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y, gammas = m(x)
        y_p, gammas_p, pooled = m(x, pool_p=p)
        none, gammas_q, pooled_q = m(x, pool_p=p, image=False)
    assert none is None and torch.equal(y, y_p)
    for g, g_p, g_q, (s, n), (s_q, n_q) in zip(gammas, gammas_p, gammas_q, pooled, pooled_q):
        assert torch.equal(g, g_p) and torch.equal(g, g_q)
        assert n.flatten().tolist() == [g[0].numel()] * 2 and torch.equal(n, n_q)
        q = minkowski_from_sums(s.flatten(), n.flatten(), p)
        assert torch.allclose(q, minkowski(g, p), rtol=1e-5), (q, minkowski(g, p))
        assert torch.allclose(s, s_q)


def test_padding_is_replicate_and_cropped():
    # An image already a multiple of 16 must give the same top-left result as its padded self.
    m = lively_model()
    x = torch.rand(1, 3, 32, 32)
    y_full, _ = m(x)
    y_crop, _ = m(x[..., :30, :29])
    xp = torch.nn.functional.pad(x[..., :30, :29], (0, 3, 0, 2), mode="replicate")
    y_pad, _ = m(xp)
    torch.testing.assert_close(y_crop, y_pad[..., :30, :29])
    assert not torch.allclose(y_crop, y_full[..., :30, :29])  # the padding content does matter


def test_gate_blend_equation():
    m = lively_model()
    skip, dec = torch.rand(1, 8, 8, 8), torch.rand(1, 8, 8, 8)
    logit = torch.randn(1, 1, 8, 8)
    out, gamma = m.gate(logit, skip, dec)
    torch.testing.assert_close(gamma, torch.sigmoid(logit))
    torch.testing.assert_close(out, gamma * skip + (1 - gamma) * dec)


def test_skips_merge_as_designed():
    """DESIGN section 1, watched through forward hooks on a random model: the 1/8 merge adds the encoder's
    features to the body's output; each RQAttention takes (skip = encoder, dec = decoder), its autoencoder
    adds its encoder features back on the way up, and the merge is gamma * skip + (1 - gamma) * dec with
    gamma = sigmoid(logit), returned as gamma1 (full scale), gamma2, gamma3 (1/4)."""
    m = lively_model()
    seen = {}

    def keep(name):
        def hook(module, args, out):
            seen[name] = (args[0], out)

        return hook

    for name in ("head", "down1", "down2", "body", "up3", "up2", "up1", "tail"):
        getattr(m, name).register_forward_hook(keep(name))
    for k in (1, 2, 3):
        for part in ("inp", "down1", "up2", "up1", "out"):
            getattr(getattr(m, f"rqa{k}"), part).register_forward_hook(keep(f"rqa{k}.{part}"))
    x = torch.rand(1, 3, 32, 48)  # a multiple of 16: no padding, no crop
    with torch.no_grad():
        _, gammas = m(x)
    body_in, body_out = seen["body"]
    torch.testing.assert_close(seen["up3"][0], body_out + body_in)
    # (skip, decoder, merged): the encoder output, the decoder output, and what the next layer is fed.
    merges = {
        3: (seen["down2"][1], seen["up3"][1], seen["up2"][0]),
        2: (seen["down1"][1], seen["up2"][1], seen["up1"][0]),
        1: (seen["head"][1], seen["up1"][1], seen["tail"][0]),
    }
    for k, (skip, dec, merged) in merges.items():
        rqa = {part: seen[f"rqa{k}.{part}"] for part in ("inp", "down1", "up2", "up1", "out")}
        torch.testing.assert_close(rqa["inp"][0], torch.cat([skip, dec], dim=1))
        torch.testing.assert_close(rqa["up1"][0], F.relu(rqa["up2"][1]) + F.relu(rqa["down1"][1]))
        torch.testing.assert_close(rqa["out"][0], F.relu(rqa["up1"][1]) + F.relu(rqa["inp"][1]))
        gamma = torch.sigmoid(rqa["out"][1])
        torch.testing.assert_close(gammas[k - 1], gamma)
        torch.testing.assert_close(merged, gamma * skip + (1 - gamma) * dec)
        # The checks above can tell: gamma is not 1/2 everywhere (a blend swapped to gamma * dec +
        # (1 - gamma) * skip would pass then), and skip and dec differ.
        assert (gamma - 0.5).abs().max() > 0.005 and (skip - dec).abs().mean() > 0.01


def test_presets():
    paper = QAIRN(PRESETS["paper"])
    assert paper.config.widths == (64, 128, 256, 512) and paper.config.nb == 4
    small = QAIRN(PRESETS["small"])
    n_small = sum(p.numel() for p in small.parameters())
    assert 2 * n_small < 20e6, "small preset fp16 weights must fit the 20 MB repo budget"
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


def test_paper_preset_is_the_design_architecture():
    """DESIGN.md section 1 layer by layer: head 3 -> c0; per encoder level nb ResBlocks then a 2x2
    stride-2 conv; 2*nb ResBlocks at c3 (FBCNN's encoder and decoder bodies); per decoder level a 2x2
    stride-2 transposed conv then nb ResBlocks; tail c0 -> 3; RQAttention on the 1/4, 1/2 and full
    scale merges, each from the concatenated skip and decoder maps to one logit, two strided convs
    down and two transposed convs up."""
    from qairn.model import ResBlock

    with torch.device("meta"):
        m = QAIRN(PRESETS["paper"])
    c, nb = (64, 128, 256, 512), 4

    def conv(layer):
        return type(layer).__name__, layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride

    def res_blocks(seq, width):
        blocks = [b for b in seq if isinstance(b, ResBlock)]
        assert all(b.conv1.in_channels == b.conv2.out_channels == width for b in blocks)
        return len(blocks)

    assert conv(m.head)[1:3] == (3, c[0]) and conv(m.tail)[1:3] == (c[0], 3)
    for i, (down, up) in enumerate(((m.down1, m.up1), (m.down2, m.up2), (m.down3, m.up3))):
        assert res_blocks(down, c[i]) == nb and res_blocks(up, c[i]) == nb
        assert conv(down[-1]) == ("Conv2d", c[i], c[i + 1], (2, 2), (2, 2))
        assert conv(up[0]) == ("ConvTranspose2d", c[i + 1], c[i], (2, 2), (2, 2))
    assert res_blocks(m.body, c[3]) == 2 * nb
    for rqa, width in ((m.rqa1, c[0]), (m.rqa2, c[1]), (m.rqa3, c[2])):
        hidden = max(16, width // 4)
        assert conv(rqa.inp)[1:3] == (2 * width, hidden) and conv(rqa.out)[1:3] == (hidden, 1)
        assert rqa.down1.stride == rqa.down2.stride == rqa.up1.stride == rqa.up2.stride == (2, 2)


def test_minkowski():
    g = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    assert minkowski(g, 1.0).item() == pytest.approx(0.5)
    assert minkowski(g, 2.0).item() == pytest.approx(0.5**0.5)
    assert minkowski(torch.full((1, 5), 0.3), 3.0).item() == pytest.approx(0.3)


def test_config_json_roundtrip():
    c = preset("small", p=3.5)
    assert QAIRNConfig.from_json(c.to_json()) == c
    with pytest.raises(ValueError, match="unknown config keys"):
        QAIRNConfig.from_json(json.dumps({**json.loads(c.to_json()), "bogus": 1}))


def test_save_load_rebuilds_architecture(tmp_path):
    m = lively_model("tiny", p=4.0)
    path = save_weights(m, tmp_path / "w.safetensors", training={"steps": 12})
    meta = read_metadata(path)
    assert meta["format"] == "qairn" and json.loads(meta["training"])["steps"] == 12
    m2 = qairn.load_model(path)
    assert m2.config == m.config and m2.config.p == 4.0
    assert not any(module.training for module in m2.modules())  # loaded for inference (eval mode)
    x = torch.rand(1, 3, 24, 40)
    torch.testing.assert_close(m(x)[0], m2(x)[0])


@pytest.mark.parametrize(
    "training, p, says",
    [
        ({"export": {"loss_db": float("nan")}}, 4.0, "training.export.loss_db = nan is not a finite number"),
        ({"curve": [1.0, float("-inf")]}, 4.0, r"training.curve\[1\] = -inf is not a finite number"),
        ({"steps": 12}, float("inf"), "config.p = inf is not a finite number"),
    ],
)
def test_save_refuses_non_finite_metadata(tmp_path, training, p, says):
    # json.dumps wrote {"export": {"loss_db": NaN}} into the metadata: not JSON, which strict readers refuse.
    m = lively_model("tiny")
    m.config = preset("tiny", p=p)
    path = tmp_path / "w.safetensors"
    with pytest.raises(ValueError, match=f"w.safetensors: {says}; the weights' metadata"):
        save_weights(m, path, training=training)
    assert not path.exists()


def test_save_fp16_loads_as_fp32(tmp_path):
    m = lively_model()
    path = save_weights(m, tmp_path / "w16.safetensors", dtype=torch.float16)
    m2 = load_model(path)
    assert all(p.dtype == torch.float32 for p in m2.parameters())
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(m(x)[0], m2(x)[0], atol=2e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_save_writes_the_dtype_asked_for(tmp_path, dtype):
    """The file holds dtype= itself: the round trip above passed with the dtype dropped (an fp32 file)
    or replaced (fp16 for bf16), which only the stored tensors show."""
    from safetensors import safe_open

    m = lively_model()
    path = save_weights(m, tmp_path / "w.safetensors", dtype=dtype)
    with safe_open(str(path), framework="pt") as f:
        stored = {f.get_tensor(k).dtype for k in f.keys()}
    assert stored == {dtype}
    m2 = load_model(path)
    for name, p in m.state_dict().items():
        torch.testing.assert_close(m2.state_dict()[name], p.to(dtype).float(), atol=0, rtol=0)


def test_load_refuses_foreign_files(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsError, match="no such weights file"):
        load_model(missing)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_model(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="not a qairn weights file"):
        load_model(foreign)
    # A qairn header whose tensors do not fit the config.
    bad = tmp_path / "bad.safetensors"
    save_file(
        {"w": torch.zeros(2)}, str(bad), metadata={"format": "qairn", "config": preset("tiny").to_json()}
    )
    with pytest.raises(WeightsError, match="do not match"):
        load_model(bad)
    # Right names, wrong sizes; a config that cannot build; an unreadable training record.
    state = {k: v[:1] if v.ndim else v for k, v in QAIRN(preset("tiny")).state_dict().items()}
    save_file(state, str(bad), metadata={"format": "qairn", "config": preset("tiny").to_json()})
    with pytest.raises(
        WeightsError, match=r"bad.safetensors: weights do not match the config \(tensor sizes"
    ):
        load_model(bad)
    three = preset("tiny").to_json().replace('"widths": [8, 16, 16, 32]', '"widths": [8, 16, 16]')
    assert three != preset("tiny").to_json()
    save_file({"w": torch.zeros(2)}, str(bad), metadata={"format": "qairn", "config": three})
    with pytest.raises(WeightsError, match="bad.safetensors: unreadable qairn config"):
        load_model(bad)
    good = QAIRN(preset("tiny")).state_dict()
    meta = {"format": "qairn", "config": preset("tiny").to_json(), "training": "{not json"}
    save_file({k: v.contiguous() for k, v in good.items()}, str(bad), metadata=meta)
    with pytest.raises(WeightsError, match="bad.safetensors: unreadable training record"):
        load_model(bad)


def test_load_refuses_other_archs_formats_bad_p_huge_configs_and_nan(tmp_path):
    good = {k: v.contiguous() for k, v in lively_model().state_dict().items()}
    config = json.loads(preset("tiny").to_json())
    base = {"format": "qairn", "config": json.dumps(config)}
    cases = [
        (good, {"arch": "SwinIR"}, "holds a 'SwinIR' network"),
        (good, {"format_version": "2"}, "qairn weights format '2'"),
        (good, {"config": json.dumps(config | {"p": 0})}, "p must be a positive number, not 0"),
        (good, {"config": json.dumps(config | {"p": "x"})}, "p must be a positive number"),
        # Refused from the header, before 100000-wide convs (3.6 TB) are allocated.
        (good, {"config": json.dumps(config | {"widths": [100000] * 4})}, "tensor sizes differ"),
        (good | {"head.bias": torch.full_like(good["head.bias"], float("nan"))}, {}, "NaN or infinity"),
        # A RuntimeError traceback ("Trying to create tensor with negative dimension -8").
        (good, {"config": json.dumps(config | {"widths": [-8, 16, 16, 32]})}, "unreadable qairn config"),
    ]
    bad = tmp_path / "bad.safetensors"
    for tensors, meta, says in cases:
        save_file(tensors, str(bad), metadata=base | meta)
        with pytest.raises(WeightsError, match=re.escape("bad.safetensors: ") + ".*" + re.escape(says)):
            load_model(bad)
    save_file(good, str(bad), metadata=base | {"arch": "QAIRN", "format_version": "1"})
    assert load_model(bad).config == preset("tiny")


def test_identity_init_starts_near_the_input_with_gamma1_open():
    torch.manual_seed(0)
    m = QAIRN(preset("small-gated")).eval()
    assert not m.config.residual
    x = torch.rand(1, 3, 48, 64)
    y, (g1, g2, g3) = m(x)
    assert torch.allclose(g1, torch.full_like(g1, torch.sigmoid(torch.tensor(3.0)).item()))
    # out = gamma1 * x + (1 - gamma1) * tail(dec): within 5% of the decoder's contribution.
    plain = QAIRN(preset("small-gated", identity_init=False)).eval()
    assert (y - x).abs().mean() < 0.1 * (plain(x)[0] - x).abs().mean()


def test_identity_init_with_the_global_residual_starts_at_the_input():
    # Both identities were applied: out started at about 1.95 x the input.
    m = QAIRN(preset("small", identity_init=True)).eval()
    x = torch.rand(1, 3, 48, 64)
    y, (g1, _, _) = m(x)
    torch.testing.assert_close(y, x)
    assert torch.allclose(g1, torch.full_like(g1, torch.sigmoid(torch.tensor(3.0)).item()))


def test_every_public_name_has_its_own_docstring():
    # help(qairn.QAIRN) showed torch.nn.Module's text, help(qairn.Result) only its generated signature.
    import qairn

    for name in qairn.__all__:
        obj = getattr(qairn, name)
        if not callable(obj):
            continue
        doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
        assert doc and not doc.startswith(f"{obj.__name__}("), name


@pytest.mark.parametrize(
    "device, says",
    [
        ("gpu", "unknown device 'gpu': use cpu, cuda, cuda:N or auto"),
        ("cuda:7", "device 'cuda:7' requested, but this machine has "),
    ],
)
def test_load_model_refuses_a_device_as_the_restorer_does(tmp_path, device, says):
    """load_model(path, device="gpu") met torch's list of some twenty device types, and "cuda" on a
    machine without one an AssertionError ("Torch not compiled with CUDA enabled"), after the whole
    file was read; Restorer(device=...) says it in one line first."""
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    path = save_weights(lively_model(), tmp_path / "w.safetensors")
    with pytest.raises(ValueError) as e:
        load_model(path, device=device)
    assert str(e.value).startswith(says)
    assert next(load_model(path, device=torch.device("cpu")).parameters()).device.type == "cpu"
