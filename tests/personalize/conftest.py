"""Identities with random (non-zero) weights on the tiny base, for tests that need no training."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from hypernet.adapters import default_spec_for, lidb_layers
from hypernet.identity import Identity, cached_fingerprint, layer_shapes


def random_identity(pipe, seed: int, rank: int = 2, scale: float = 0.3) -> Identity:
    spec = default_spec_for(pipe)
    layers = lidb_layers(pipe, spec)
    shapes = layer_shapes(pipe, layers)
    g = torch.Generator().manual_seed(seed)
    L = len(layers)
    lidb = {"A_train": torch.randn(L, spec.r, spec.a, generator=g) * scale,
            "B_train": torch.randn(L, spec.b, spec.r, generator=g) * scale}
    relaxed = {}
    for i, (n_in, n_out) in enumerate(shapes):
        relaxed[f"{i}.A"] = torch.randn(rank, n_in, generator=g) * scale
        relaxed[f"{i}.B"] = torch.randn(n_out, rank, generator=g) * scale
    return Identity(spec=spec, layers=layers, shapes=shapes, base_fingerprint=cached_fingerprint(pipe),
                    lidb=lidb, relaxed=relaxed, timings={"hypernetwork": 0.01})


@pytest.fixture()
def make_identity():
    return random_identity


def random_hypernet(pipe, path, head_init_std: float = 0.05):
    """An untrained hypernetwork for the tiny base, saved as an export folder's safetensors."""
    from hypernet.hypernetwork.config import HypernetConfig
    from hypernet.hypernetwork.export import HypernetInfo, save_hypernet
    from hypernet.hypernetwork.model import HyperNetwork

    spec = default_spec_for(pipe)
    layers = lidb_layers(pipe, spec)
    cfg = HypernetConfig(num_layers=len(layers), a=spec.a, b=spec.b, r=spec.r, dim=32, depth=1, heads=2,
                         iterations=2, head_init_std=head_init_std, encoder_kwargs={"patch_size": 16, "depth": 1})
    torch.manual_seed(0)
    model = HyperNetwork(cfg)
    info = HypernetInfo(config=cfg, spec=spec, layers=layers, base_fingerprint=cached_fingerprint(pipe),
                        resolution=pipe.unet.config.sample_size * pipe.vae_scale_factor)
    path.mkdir(parents=True, exist_ok=True)
    save_hypernet(path / "hypernet.safetensors", model, info)
    return path


@pytest.fixture()
def tiny_hypernet(tiny_pipe, tmp_path):
    return random_hypernet(tiny_pipe, tmp_path / "hypernet")


def random_photo_bytes(seed: int = 0) -> bytes:
    """A 90x80 JPEG of uniform noise: a valid photo with no face (the tiny base needs none)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (90, 80, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture()
def photo_bytes():
    return random_photo_bytes
