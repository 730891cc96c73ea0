"""The service honours the calibrated `prediction_scale` a hypernetwork file carries: a
HYPERDREAMBOOTH identity made over gRPC from a file exported at scale 4 holds 4x the delta_W of
the same file at scale 1 (read back through ExportIdentity, as a client would)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load


def _scaled_copy(src_dir, out_dir, scale: float):
    from hypernet.hypernetwork.export import load_hypernet, save_hypernet

    model, info = load_hypernet(src_dir / "hypernet.safetensors")
    info.prediction_scale = scale
    save_hypernet(out_dir / "hypernet.safetensors", model, info)
    return out_dir


def _deltas(data: bytes) -> dict[str, torch.Tensor]:
    """diffusers LoRA file -> {layer: up @ down}."""
    tensors = st_load(data)
    out = {}
    for k, down in tensors.items():
        if ".lora_A." in k:
            up = tensors[k.replace(".lora_A.", ".lora_B.")]
            out[k.split(".lora_A.")[0]] = up.float() @ down.float()
    return out


@pytest.fixture(scope="module")
def servers(tiny_base_dir, tiny_hypernet_dir, make_server_on, tmp_path_factory):
    scaled = _scaled_copy(tiny_hypernet_dir, tmp_path_factory.mktemp("hypernet-x4"), 4.0)
    return {s: make_server_on(tiny_base_dir, d)() for s, d in ((1.0, tiny_hypernet_dir), (4.0, scaled))}


def test_identity_over_grpc_uses_the_hypernetworks_calibrated_scale(servers, client_for, photo_bytes):
    deltas = {}
    for scale, bg in servers.items():
        c = client_for(bg)
        ident = c.personalize(photo_bytes, options=c.options(steps=0, seed=0))
        deltas[scale] = _deltas(c.export_identity(ident.id, "diffusers").data)
    assert deltas[1.0] and deltas[1.0].keys() == deltas[4.0].keys()
    assert any(d.abs().max() > 0 for d in deltas[1.0].values())
    for name, d in deltas[1.0].items():
        torch.testing.assert_close(deltas[4.0][name], 4.0 * d, rtol=1e-4, atol=1e-6)
