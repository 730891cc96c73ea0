"""The service personalises with an identity-conditioned hypernetwork (face encoder inside its
ONNX graph; faces aligned by the runtime from the photo's crop) exactly as with the pixel one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def identity_hypernet_dir(tiny_base_dir, tmp_path_factory, face_encoder_file) -> Path:
    from hypernet.adapters import default_spec_for, lidb_layers
    from hypernet.base import load_pipeline
    from hypernet.face_encoder import FaceEncoder
    from hypernet.hypernetwork import HypernetConfig, HypernetInfo, HyperNetwork, export_onnx, save_hypernet
    from hypernet.identity import cached_fingerprint

    pipe = load_pipeline(tiny_base_dir, device="cpu", dtype="fp32")
    spec = default_spec_for(pipe)
    layers = lidb_layers(pipe, spec)
    cfg = HypernetConfig(num_layers=len(layers), a=spec.a, b=spec.b, r=spec.r, dim=32, depth=1, heads=2,
                         iterations=2, head_init_std=0.05, condition="identity")
    torch.manual_seed(0)
    info = HypernetInfo(config=cfg, spec=spec, layers=layers, base_fingerprint=cached_fingerprint(pipe),
                        resolution=pipe.unet.config.sample_size * pipe.vae_scale_factor)
    out = tmp_path_factory.mktemp("id-hypernet")
    model = HyperNetwork(cfg)
    save_hypernet(out / "hypernet.safetensors", model, info)
    export_onnx(model, info, out / "hypernet.onnx", face_encoder=FaceEncoder.load(face_encoder_file))
    return out


def test_personalize_with_an_identity_conditioned_hypernet(tiny_base_dir, identity_hypernet_dir, make_server,
                                                           photo_bytes, client_for):
    from serving.engine import Engine
    from serving.stubs import pb

    server = make_server(engine=Engine(str(tiny_base_dir), str(identity_hypernet_dir), "cpu", "fp32"))
    client = client_for(server)
    ident = client.personalize(photo_bytes, options=client.options(steps=1, seed=1))
    assert ident.method == pb.METHOD_HYPERDREAMBOOTH and ident.artifact_bytes > 0
    assert "hypernetwork" in ident.timings
