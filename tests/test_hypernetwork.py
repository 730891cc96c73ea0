"""The hypernetwork: its output is the packed LiDB format, it exports (safetensors, ONNX) and the
runtime serves both backends with the same answers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from hypernet.adapters import LiDB, LiDBSpec, default_spec_for, lidb_layers
from hypernet.errors import IncompatibleAdapterError, InvalidInputError, ModelNotFoundError
from hypernet.hypernetwork import (
    HypernetConfig,
    HypernetInfo,
    HypernetRuntime,
    HyperNetwork,
    export_onnx,
    load_hypernet,
    pack_theta,
    read_info,
    save_hypernet,
    unpack_theta,
)


def small_cfg(**kw) -> HypernetConfig:
    """A few-thousand-parameter model: ViT-tiny cut to 1 block of width 32, 16 patch tokens."""
    base = dict(num_layers=3, a=4, b=5, r=2, encoder_kwargs={"patch_size": 16, "depth": 1, "embed_dim": 32,
                                                              "num_heads": 2},
                image_size=64, dim=32, depth=1, heads=2, iterations=2)
    base.update(kw)
    return HypernetConfig(**base)


def info_for(cfg: HypernetConfig, resolution: int = 64, fingerprint: str = "f" * 16) -> HypernetInfo:
    spec = LiDBSpec(a=cfg.a, b=cfg.b, r=cfg.r)
    return HypernetInfo(cfg, spec, [f"unet.l{i}" for i in range(cfg.num_layers)], fingerprint, resolution)


def pixels(n: int, res: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_output_shapes_are_the_packed_lidb_format():
    cfg = small_cfg()
    out = HyperNetwork(cfg)(pixels(3))
    assert set(out) == {"A_train", "B_train"}
    assert out["A_train"].shape == (3, 3, 2, 4)  # (N, L, r, a)
    assert out["B_train"].shape == (3, 3, 5, 2)  # (N, L, b, r)
    assert torch.equal(pack_theta(unpack_theta(pack_theta(out), cfg)), pack_theta(out))


def test_prediction_drives_lidb_per_sample_and_is_differentiable(tiny_pipe):
    spec = default_spec_for(tiny_pipe)
    layers = lidb_layers(tiny_pipe, spec)
    cfg = small_cfg(num_layers=len(layers), a=spec.a, b=spec.b, r=spec.r, head_init_std=0.05)
    torch.manual_seed(0)
    model = HyperNetwork(cfg)
    pred = model(pixels(2))
    lidb = LiDB(tiny_pipe, spec, name="pred", layers=layers)
    lidb.use(pred)  # per-sample (N, L, ...) weights accepted as-is
    lat = torch.randn(2, 4, 8, 8)
    emb = torch.randn(2, 77, tiny_pipe.text_encoder.config.hidden_size)
    out = tiny_pipe.unet(lat, torch.tensor([10, 500]), encoder_hidden_states=emb).sample
    out.square().mean().backward()
    grads = [p.grad for p in (model.head_weight, model.encoder.patch_embed.proj.weight)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    lidb.use(None)
    lidb.load_state_dict({k: v[0].detach() for k, v in pred.items()})  # one identity: (L, ...)
    assert torch.equal(lidb.state_dict()["B_train"], pred["B_train"][0].detach())


def test_heads_start_near_zero_and_zero_std_predicts_no_adapter():
    torch.manual_seed(0)
    near = HyperNetwork(small_cfg(head_init_std=1e-3))(pixels(2))
    assert 0 < pack_theta(near).abs().max() < 0.05
    zero = HyperNetwork(small_cfg(head_init_std=0.0))(pixels(2))
    assert pack_theta(zero).abs().max() == 0


def test_refinement_adds_one_decoder_update_per_iteration():
    torch.manual_seed(0)
    model = HyperNetwork(small_cfg(iterations=3, head_init_std=0.1)).eval()
    x = pixels(2)
    with torch.no_grad():
        f = model.encode(x)
        theta = torch.zeros(2, 3, model.cfg.params_per_layer)
        steps = []
        for _ in range(3):
            theta = theta + model.refine(f, theta)
            steps.append(theta.clone())
        got = pack_theta(model(x))
    torch.testing.assert_close(got, steps[-1])
    assert not torch.allclose(steps[0], steps[-1])  # later iterations change the estimate


def test_make_constant_predicts_the_given_weights_for_any_photo():
    from hypernet.hypernetwork.model import make_constant

    torch.manual_seed(0)
    cfg = small_cfg(iterations=3, head_init_std=0.1)
    g = torch.Generator().manual_seed(1)
    w = {"A_train": torch.randn(3, 2, 4, generator=g), "B_train": torch.randn(3, 5, 2, generator=g)}
    model = HyperNetwork(cfg).eval()
    with torch.no_grad():
        before = model(pixels(2))
        out = make_constant(model, w)(pixels(2, seed=3))
    assert not torch.allclose(before["A_train"][0], before["A_train"][1])  # a trained net depends on the photo
    for k, v in w.items():
        torch.testing.assert_close(out[k], v.expand_as(out[k]))
    with pytest.raises(InvalidInputError, match="`weights` must have shapes"):
        make_constant(model, {"A_train": w["A_train"], "B_train": w["B_train"][:, :4]})


def test_encoder_weights_come_from_a_local_file_only(tmp_path):
    torch.manual_seed(0)
    donor = HyperNetwork(small_cfg()).encoder
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    torch.manual_seed(1)
    model = HyperNetwork(small_cfg(encoder_weights=str(path)))
    for k, v in donor.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
    with pytest.raises(ModelNotFoundError, match="encoder_weights"):
        HyperNetwork(small_cfg(encoder_weights=str(tmp_path / "missing.safetensors")))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"blocks.0.nonsense": torch.zeros(1)}, str(wrong))
    with pytest.raises(InvalidInputError, match="must match the encoder"):
        HyperNetwork(small_cfg(encoder_weights=str(wrong)))
    with pytest.raises(InvalidInputError, match="timm model name"):
        HyperNetwork(small_cfg(encoder="no_such_vit_xyz"))


def test_freeze_encoder():
    model = HyperNetwork(small_cfg(freeze_encoder=True))
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert model.head_weight.requires_grad


@pytest.mark.parametrize("bad", [dict(dim=30, heads=4), dict(iterations=0), dict(head_init_std=-1.0),
                                 dict(encoder_kwargs=[1])])
def test_config_rejects_bad_values(bad):
    with pytest.raises(InvalidInputError, match="must"):
        small_cfg(**bad)


def test_config_json_round_trip_and_unknown_keys():
    cfg = small_cfg()
    assert HypernetConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(InvalidInputError, match="unknown"):
        HypernetConfig.from_json('{"dim": 32, "bogus": 1}')


def test_safetensors_round_trip_carries_config_and_base(tmp_path):
    torch.manual_seed(0)
    cfg = small_cfg(head_init_std=0.1)
    model = HyperNetwork(cfg).eval()
    info = info_for(cfg)
    save_hypernet(tmp_path / "h.safetensors", model, info)
    loaded, got = load_hypernet(tmp_path / "h.safetensors")
    assert (got.config, got.spec, got.layers, got.base_fingerprint, got.resolution) == (
        cfg, info.spec, info.layers, info.base_fingerprint, 64)
    x = pixels(2)
    with torch.no_grad():
        torch.testing.assert_close(pack_theta(loaded(x)), pack_theta(model(x)), rtol=0, atol=0)
    with pytest.raises(InvalidInputError, match="geometry"):
        save_hypernet(tmp_path / "bad.safetensors", model,
                      HypernetInfo(cfg, LiDBSpec(a=9, b=5, r=2), info.layers, "x", 64))
    (tmp_path / "lora.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(InvalidInputError, match="hdb.hypernet"):
        read_info(tmp_path / "lora.safetensors")


def test_prediction_scale_travels_in_both_files_and_defaults_to_one(tmp_path):
    """The calibrated scale is part of what a hypernetwork file says about itself: written by
    `save_hypernet` and `export_onnx`, read back by `read_info`; older files without it read as 1."""
    import json

    cfg = small_cfg()
    model = HyperNetwork(cfg).eval()
    info = info_for(cfg)
    info.prediction_scale = 2.5
    save_hypernet(tmp_path / "h.safetensors", model, info)
    export_onnx(model, info, tmp_path / "h.onnx")
    assert read_info(tmp_path / "h.safetensors").prediction_scale == 2.5
    assert read_info(tmp_path / "h.onnx").prediction_scale == 2.5

    meta = info_for(cfg).to_metadata()
    del meta["prediction_scale"]  # a file written before the key existed
    from safetensors.torch import save as st_save

    (tmp_path / "old.safetensors").write_bytes(st_save({"x": torch.zeros(1)}, metadata=meta))
    assert read_info(tmp_path / "old.safetensors").prediction_scale == 1.0
    for bad in ("nan", "-1", "x"):
        raw = bytearray((tmp_path / "h.safetensors").read_bytes())
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        header["__metadata__"]["prediction_scale"] = bad
        body = json.dumps(header).encode()
        (tmp_path / "bad.safetensors").write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n:])
        with pytest.raises(InvalidInputError, match="prediction_scale"):
            read_info(tmp_path / "bad.safetensors")
    info.prediction_scale = 101
    with pytest.raises(InvalidInputError, match="`prediction_scale` must be"):
        save_hypernet(tmp_path / "too_big.safetensors", model, info)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small trained-looking model exported to a folder with both files."""
    out = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    cfg = small_cfg(head_init_std=0.1)
    model = HyperNetwork(cfg).eval()
    info = info_for(cfg)
    save_hypernet(out / "hypernet.safetensors", model, info)
    export_onnx(model, info, out / "hypernet.onnx")
    return out, model


def test_onnx_matches_torch_for_any_batch(exported):
    out, model = exported
    rt = HypernetRuntime.load(out, backend="auto", device="cpu")
    assert rt.backend == "onnx"
    for n in (1, 2, 5):  # exported at batch 2; the batch dimension is dynamic
        x = pixels(n, seed=n)
        got = rt.predict(x)
        with torch.no_grad():
            ref = model(x)
        for k in ("A_train", "B_train"):
            assert got[k].shape == ref[k].shape
            assert (got[k] - ref[k]).abs().max() < 1e-4


def test_runtime_backends_agree_and_describe_the_base(exported):
    out, _ = exported
    onnx_rt = HypernetRuntime.load(out / "hypernet.onnx", backend="onnx", device="cpu")
    torch_rt = HypernetRuntime.load(out / "hypernet.safetensors", backend="torch", device="cpu")
    x = pixels(3)
    a, b = onnx_rt.predict(x), torch_rt.predict(x)
    for k in ("A_train", "B_train"):
        assert a[k].shape == b[k].shape and (a[k] - b[k]).abs().max() < 1e-4, k
    for rt in (onnx_rt, torch_rt):
        assert (rt.spec, rt.layers, rt.base_fingerprint, rt.resolution) == (
            LiDBSpec(a=4, b=5, r=2), [f"unet.l{i}" for i in range(3)], "f" * 16, 64)
    if not torch.cuda.is_available():
        assert onnx_rt._session.get_providers() == ["CPUExecutionProvider"]


def test_runtime_encode_decode_split_on_either_backend(exported, tmp_path):
    """Several photos combine in embedding space through encode/decode; an ONNX runtime runs the split
    on the torch weights beside it, and says so when there are none."""
    out, model = exported
    x = pixels(3, seed=7)
    with torch.no_grad():
        want = model.decode(model.encode(x).mean(0, keepdim=True))
    for backend in ("onnx", "torch"):
        rt = HypernetRuntime.load(out, backend=backend, device="cpu")
        tokens = rt.encode(x)  # (3, T, d)
        assert tokens.shape[0] == 3 and tokens.shape[-1] == model.cfg.dim
        got = rt.decode(tokens.mean(0, keepdim=True))
        assert all(torch.equal(got[k], want[k]) for k in want), backend
    with pytest.raises(InvalidInputError, match=r"`tokens` must have shape \(N, T, 32\)"):
        rt.decode(torch.zeros(1, 4, 7))
    for f in out.glob("hypernet.onnx*"):  # the graph (and any external data), not the safetensors
        (tmp_path / f.name).write_bytes(f.read_bytes())
    only = HypernetRuntime.load(tmp_path / "hypernet.onnx", device="cpu")
    with pytest.raises(ModelNotFoundError, match="torch weights"):
        only.encode(x)


def test_runtime_rejects_bad_input_and_paths(exported, tmp_path):
    out, _ = exported
    rt = HypernetRuntime.load(out, device="cpu")
    with pytest.raises(InvalidInputError, match=r"\(N, 3, 64, 64\)"):
        rt.predict(torch.zeros(1, 3, 32, 32))
    with pytest.raises(InvalidInputError, match="finite"):
        rt.predict(torch.full((1, 3, 64, 64), float("nan")))
    with pytest.raises(InvalidInputError, match="backend"):
        HypernetRuntime.load(out, backend="tensorrt")
    with pytest.raises(ModelNotFoundError):
        HypernetRuntime.load(tmp_path / "nothing")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "hypernet.safetensors").write_bytes((out / "hypernet.safetensors").read_bytes())
    with pytest.raises(ModelNotFoundError, match="onnx"):
        HypernetRuntime.load(tmp_path / "only", backend="onnx")


def test_runtime_falls_back_to_torch_when_the_onnx_file_is_broken(exported, tmp_path):
    out, _ = exported
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "hypernet.safetensors").write_bytes((out / "hypernet.safetensors").read_bytes())
    (broken / "hypernet.onnx").write_bytes((out / "hypernet.onnx").read_bytes()[:500])  # truncated copy
    rt = HypernetRuntime.load(broken, device="cpu")  # auto: the weights are there, so torch serves
    assert rt.backend == "torch"
    good = HypernetRuntime.load(out / "hypernet.safetensors", backend="torch", device="cpu")
    x = pixels(2)
    assert torch.equal(rt.predict(x)["A_train"], good.predict(x)["A_train"])
    with pytest.raises(InvalidInputError, match="onnxruntime can load"):  # asked for ONNX: say so
        HypernetRuntime.load(broken, backend="onnx", device="cpu")


def test_runtime_checks_the_base(tiny_pipe, tmp_path):
    from hypernet.base import base_fingerprint

    spec = default_spec_for(tiny_pipe)
    layers = lidb_layers(tiny_pipe, spec)
    cfg = small_cfg(num_layers=len(layers), a=spec.a, b=spec.b, r=spec.r)
    model = HyperNetwork(cfg)
    save_hypernet(tmp_path / "ok.safetensors", model, HypernetInfo(cfg, spec, layers, base_fingerprint(tiny_pipe), 64))
    HypernetRuntime.load(tmp_path / "ok.safetensors", device="cpu").check_base(tiny_pipe)
    save_hypernet(tmp_path / "other.safetensors", model, HypernetInfo(cfg, spec, layers, "0" * 16, 64))
    with pytest.raises(IncompatibleAdapterError, match="fingerprint"):
        HypernetRuntime.load(tmp_path / "other.safetensors", device="cpu").check_base(tiny_pipe)
