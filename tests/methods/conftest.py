"""Fixtures for the personalisation-method tests: one shared pipeline; synthetic photos (always)
and the real ones (tests marked `needs_shared`), each preprocessed once."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Every methods test trains tiny models: one torch thread (see tests/conftest.py)."""
    yield


@pytest.fixture(scope="session")
def shared_pipe(tiny_base_dir):
    """One CPU fp32 tiny pipeline for the session. Methods must leave it unchanged (tested)."""
    from hypernet.base import load_pipeline

    return load_pipeline(tiny_base_dir, device="cpu", dtype="fp32")


def write_synthetic_photos(folder: Path, n: int = 4) -> Path:
    """`n` seeded PNG stand-ins of one "person" (a skin-tone ellipse with eyes on a gradient,
    moved and lit a little per photo). No method needs a real face to train, so the methods'
    training tests run on these everywhere; nothing here looks for a face (detector "center")."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        x = np.linspace(60, 200, 96, dtype=np.uint8)[None, :].repeat(96, 0)  # (H, W)
        img = Image.fromarray(np.stack([x, x.T, np.full_like(x, 90 + 20 * i)], -1))
        d = ImageDraw.Draw(img)
        dx, dy = rng.integers(-6, 7, 2)
        d.ellipse((24 + dx, 14 + dy, 72 + dx, 82 + dy), fill=(224 - 8 * i, 172, 140))
        for ex in (38, 58):
            d.ellipse((ex + dx - 3, 40 + dy, ex + dx + 3, 45 + dy), fill=(40, 30, 30))
        img.save(folder / f"photo{i}.png")
    return folder


@pytest.fixture(scope="session")
def synthetic_photos(tmp_path_factory) -> Path:
    return write_synthetic_photos(tmp_path_factory.mktemp("synthetic-photos"))


@pytest.fixture(scope="session")
def synthetic_pixels(synthetic_photos, shared_pipe) -> torch.Tensor:
    """(4, 3, 64, 64): the synthetic photos through the product's photo path (center crop)."""
    from hypernet.methods._common import as_pixels

    return as_pixels(shared_pipe, synthetic_photos, detector="center")


@pytest.fixture(scope="session")
def _real_pixels_cache() -> dict:
    return {}


@pytest.fixture()
def real_pixels(faces_dir: Path, shared_pipe, _real_pixels_cache) -> torch.Tensor:
    """(4, 3, 64, 64): four photos of Caltech identity 0, MTCNN face crops, preprocessed once
    per session (function-scoped so `faces_dir` can check the test is marked needs_shared)."""
    if "pixels" not in _real_pixels_cache:
        from hypernet.methods._common import as_pixels

        with (faces_dir / "identities.csv").open() as f:
            rows = [r for r in csv.DictReader(f) if r["identity"] == "0"]
        _real_pixels_cache["pixels"] = as_pixels(shared_pipe, [faces_dir / r["file"] for r in rows[:4]])
    return _real_pixels_cache["pixels"]
