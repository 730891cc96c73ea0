"""Method artifacts as files other tools load (what the service's ExportIdentity sends): a LiDB as
the LoRA it is (exactly its weight delta), a LoRA in kohya keys, a Textual Inversion embedding."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load

from hypernet.errors import InvalidInputError


def test_lidb_exports_as_the_lora_it_is(tiny_pipe):
    from hypernet.adapters import LiDB, default_spec_for, lidb_layers
    from hypernet.adapters.inject import linear_layers
    from hypernet.base import base_fingerprint
    from hypernet.methods.lidb.method import LiDBArtifact

    spec = default_spec_for(tiny_pipe)
    layers = lidb_layers(tiny_pipe, spec)
    g = torch.Generator().manual_seed(0)
    weights = {"A_train": torch.randn(len(layers), spec.r, spec.a, generator=g),   # (L, r, a)
               "B_train": torch.randn(len(layers), spec.b, spec.r, generator=g)}   # (L, b, r)
    art = LiDBArtifact(weights, spec, layers, base_fingerprint(tiny_pipe))
    shapes = {n: (m.in_features, m.out_features) for n, m in linear_layers(tiny_pipe)}
    sd = load(art.export_lora("diffusers", shapes))
    handle = LiDB(tiny_pipe, spec, name="check", layers=layers)
    handle.load_state_dict(weights)
    for name in layers:
        A, B = sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"]  # (r, n_in), (n_out, r)
        expected = handle.layers[name].delta_weight("check")
        torch.testing.assert_close(B @ A, expected, rtol=1e-5, atol=1e-6)
    kohya = load(art.export_lora("kohya", shapes))
    assert len(kohya) == 3 * len(layers) and all(k.startswith("lora_unet_") for k in kohya)
    with pytest.raises(InvalidInputError, match="`fmt`"):
        art.export_lora("ckpt", shapes)
    with pytest.raises(InvalidInputError, match="`shapes`"):
        art.export_lora("diffusers", {})


def test_lora_exports_diffusers_and_kohya_keys():
    from hypernet.methods.lora.method import LoRAArtifact

    down, up = torch.randn(4, 32), torch.randn(32, 4)
    art = LoRAArtifact({"unet.mid.attn1.to_q.lora.down.weight": down,
                        "unet.mid.attn1.to_q.lora.up.weight": up}, {"hdb_token": "ohwx"})
    assert set(load(art.export("diffusers"))) == set(art.tensors)
    kohya = load(art.export("kohya"))
    assert torch.equal(kohya["lora_unet_mid_attn1_to_q.lora_down.weight"], down)
    assert torch.equal(kohya["lora_unet_mid_attn1_to_q.lora_up.weight"], up)
    assert kohya["lora_unet_mid_attn1_to_q.alpha"].item() == 4.0  # alpha = rank: scale 1


def test_textual_inversion_exports_its_embedding_file():
    from hypernet.methods.textual_inversion.method import TIArtifact

    vec = torch.randn(2, 32)
    out = load(TIArtifact("ohwx", vec).export())
    assert list(out) == ["ohwx"] and torch.equal(out["ohwx"], vec)
