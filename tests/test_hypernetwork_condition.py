"""The hypernetwork's condition: pixels (the old model, still loading from old files), identity
embeddings of a frozen face encoder, or both; the ONNX graph of the whole faces+pixels -> weights
path agrees with torch, and the runtime aligns faces itself when the caller gives none."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hypernet.adapters import LiDBSpec
from hypernet.errors import InvalidInputError
from hypernet.hypernetwork import (
    HypernetConfig,
    HypernetInfo,
    HypernetRuntime,
    HyperNetwork,
    export_onnx,
    load_hypernet,
    pack_theta,
    save_hypernet,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NEW_KEYS = ("condition", "identity_tokens", "face_encoder", "identity_dim")


def small_cfg(**kw) -> HypernetConfig:
    base = dict(num_layers=3, a=4, b=5, r=2, encoder_kwargs={"patch_size": 16, "depth": 1, "embed_dim": 32,
                                                              "num_heads": 2},
                image_size=64, dim=32, depth=1, heads=2, iterations=2, head_init_std=0.05)
    base.update(kw)
    return HypernetConfig(**base)


def info_for(cfg: HypernetConfig) -> HypernetInfo:
    return HypernetInfo(cfg, LiDBSpec(a=cfg.a, b=cfg.b, r=cfg.r), [f"unet.l{i}" for i in range(cfg.num_layers)],
                        "f" * 16, 64)


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def embeddings(n: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, 512, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_old_configs_and_files_without_the_new_fields_load_as_the_pixel_model(tmp_path):
    """A file exported before `condition` existed: config JSON without the new keys, pixel-model
    tensor names only. It loads strictly and predicts what it predicted before."""
    torch.manual_seed(0)
    model = HyperNetwork(small_cfg()).eval()
    # The tensors (names and shapes) the exporter wrote before `condition` existed, as pinned from
    # that code: 39 tensors under these prefixes, hash of the sorted (name, shape) list.
    names = sorted((k, tuple(v.shape)) for k, v in model.state_dict().items())
    assert {k.split(".")[0] for k, _ in names} == {"blocks", "encoder", "head_bias", "head_weight", "layer_pos",
                                                 "norm", "proj", "theta_embed"}
    assert len(names) == 39 and hashlib.sha256(repr(names).encode()).hexdigest()[:16] == "c02a644f245bba8c"
    path = save_hypernet(tmp_path / "new.safetensors", model, info_for(small_cfg()))
    import safetensors

    with safetensors.safe_open(str(path), framework="pt") as f:  # rewrite it as an old exporter wrote it
        md = dict(f.metadata())
    old_cfg = {k: v for k, v in json.loads(md["config"]).items() if k not in NEW_KEYS}
    md["config"] = json.dumps(old_cfg)
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata=md)
    loaded, info = load_hypernet(tmp_path / "old.safetensors")
    assert info.config.condition == "pixels"
    with torch.no_grad():
        torch.testing.assert_close(pack_theta(loaded(pixels(2))), pack_theta(model(pixels(2))))
    with pytest.raises(InvalidInputError, match="`condition` must be one of"):
        HypernetConfig(condition="faces")


def test_identity_condition_follows_the_embedding_and_ignores_pixels():
    torch.manual_seed(0)
    model = HyperNetwork(small_cfg(condition="identity")).eval()
    assert model.encoder is None  # no timm trunk to carry
    with torch.no_grad():
        a = pack_theta(model(None, embeddings(2)))
        b = pack_theta(model(pixels(2), embeddings(2)))
        c = pack_theta(model(None, embeddings(2, seed=1)))
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3  # another person, another prediction
    with pytest.raises(InvalidInputError, match="`identity`.*must be given"):
        model(pixels(2))
    with pytest.raises(InvalidInputError, match=r"`identity` must have shape \(N, 512\)"):
        model(None, torch.zeros(2, 128))


def test_both_conditions_see_pixels_and_identity_and_train_end_to_end():
    torch.manual_seed(0)
    model = HyperNetwork(small_cfg(condition="both"))
    out = model(pixels(2), embeddings(2))
    with torch.no_grad():
        other_pix = pack_theta(model(pixels(2, seed=3), embeddings(2)))
        other_id = pack_theta(model(pixels(2), embeddings(2, seed=3)))
    base = pack_theta(out).detach()
    assert (base - other_pix).abs().max() > 1e-4 and (base - other_id).abs().max() > 1e-4
    pack_theta(out).square().sum().backward()
    for p in (model.identity_proj.weight, model.encoder.patch_embed.proj.weight, model.head_weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("condition", ["identity", "both"])
def test_onnx_graph_with_the_face_encoder_matches_torch(tmp_path, face_encoder_file, condition):
    """The exported graph (faces [+ pixels] -> weights, face encoder inside) and the torch runtime
    (face encoder loaded beside the hypernetwork) agree; without faces the runtime aligns them."""
    from hypernet.face_encoder import FaceEncoder

    cfg = small_cfg(condition=condition)
    torch.manual_seed(0)
    model = HyperNetwork(cfg).eval()
    save_hypernet(tmp_path / "hypernet.safetensors", model, info_for(cfg))
    export_onnx(model, info_for(cfg), tmp_path / "hypernet.onnx", face_encoder=FaceEncoder.load(face_encoder_file))
    faces = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(5)) * 2 - 1
    onnx_rt = HypernetRuntime.load(tmp_path, backend="onnx")
    torch_rt = HypernetRuntime.load(tmp_path, backend="torch")
    assert onnx_rt.needs_faces and torch_rt.needs_faces
    a, b = onnx_rt.predict(pixels(3), faces=faces), torch_rt.predict(pixels(3), faces=faces)
    for k in ("A_train", "B_train"):
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    c = onnx_rt.predict(pixels(3), faces=faces.flip(-1))  # the faces matter
    assert (pack_theta(c) - pack_theta(a)).abs().max() > 1e-5
    fallback = onnx_rt.predict(pixels(2))  # no faces: aligned from the crops (centre crop here)
    assert fallback["A_train"].shape == (2, 3, 2, 4)
    from hypernet.face_alignment import pixels_to_images

    imgs = pixels_to_images(pixels(2))
    torch.testing.assert_close(onnx_rt.predict(pixels(2), faces=onnx_rt.faces_for(imgs)), fallback)
    with pytest.raises(InvalidInputError, match=r"`faces` must have shape \(3, 3, 112, 112\)"):
        onnx_rt.predict(pixels(3), faces=faces[:2])
