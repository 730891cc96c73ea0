"""An identity-conditioned hypernetwork sees, at inference, faces aligned on the full-resolution
photos: the faces pretraining's embedding cache aligned (pretrain/face_embeddings.py), not faces
aligned again from the small R x R crop the pixel encoder gets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hypernet.face_alignment import align_faces, pixels_to_images
from hypernet.personalize import personalize

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(300)]


@pytest.fixture()
def identity_runtime(tiny_pipe, tmp_path, face_encoder_file):
    from hypernet.adapters import default_spec_for, lidb_layers
    from hypernet.hypernetwork import HypernetConfig, HypernetInfo, HypernetRuntime, HyperNetwork, save_hypernet
    from hypernet.identity import cached_fingerprint

    spec = default_spec_for(tiny_pipe)
    layers = lidb_layers(tiny_pipe, spec)
    cfg = HypernetConfig(num_layers=len(layers), a=spec.a, b=spec.b, r=spec.r, dim=32, depth=1, heads=2,
                         iterations=2, head_init_std=0.05, condition="identity")
    torch.manual_seed(0)
    info = HypernetInfo(config=cfg, spec=spec, layers=layers, base_fingerprint=cached_fingerprint(tiny_pipe),
                        resolution=tiny_pipe.unet.config.sample_size * tiny_pipe.vae_scale_factor)
    save_hypernet(tmp_path / "hypernet.safetensors", HyperNetwork(cfg), info)
    rt = HypernetRuntime.load(tmp_path, backend="torch")
    assert rt.needs_faces and rt.resolution < 112  # the crop is smaller than an aligned face
    return rt


def _photo(seed: int) -> Image.Image:
    """Fine detail at 240x200: aligning it at full resolution or from a 64 px crop differs."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (200, 240, 3), dtype=np.uint8))


def _record(rt, name: str, seen: list) -> None:
    inner = getattr(rt, name)

    def spy(pixels, faces=None):
        seen.append((pixels.clone(), faces))
        return inner(pixels, faces=faces)

    setattr(rt, name, spy)


@pytest.mark.parametrize("combine,entry", [("weights", "predict"), ("embedding", "encode")])
def test_identity_hypernet_gets_faces_aligned_on_the_full_resolution_photos(tiny_pipe, identity_runtime,
                                                                            combine, entry):
    photos = [_photo(1), _photo(2)]
    seen: list = []
    _record(identity_runtime, entry, seen)
    personalize(tiny_pipe, photos, hypernet=identity_runtime, steps=0, combine=combine, detector="center")
    assert len(seen) == 1
    pixels, faces = seen[0]
    assert faces is not None, "the runtime was left to align faces from the crops"
    full_res = align_faces(photos)  # (2, 3, 112, 112): what pretraining's embedding cache saw
    torch.testing.assert_close(faces, full_res)
    from_crops = align_faces(pixels_to_images(pixels))
    assert (faces - from_crops).abs().mean() > 0.05  # the crop would not pass this test
