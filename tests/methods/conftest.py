"""Fixtures for the personalisation-method tests: one shared pipeline, real photos encoded once."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine OpenMP's
    spin-waiting makes them ~10x slower (measured: 850 ms vs 67 ms CPU per training step)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
