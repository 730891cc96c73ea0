"""Fixtures for the personalisation-method tests: one shared pipeline, real photos encoded once."""

from __future__ import annotations

import csv
from pathlib import Path

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


@pytest.fixture(scope="session")
def identity_photos(faces_dir: Path) -> list[Path]:
    """Four photos of identity 0 of the Caltech faces."""
    with (faces_dir / "identities.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["identity"] == "0"]
    return [faces_dir / r["file"] for r in rows[:4]]


@pytest.fixture(scope="session")
def identity_pixels(identity_photos, shared_pipe) -> torch.Tensor:
    """(4, 3, 64, 64) preprocessed once (MTCNN face crops), reused by every method test."""
    from hypernet.methods._common import as_pixels

    return as_pixels(shared_pipe, identity_photos)
