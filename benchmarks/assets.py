"""The inputs benchmarks share: the base, the hypernetwork, and real face photos.

Every benchmark uses the same embedded tiny base (`hypernet.defaults.default_base_dir()`) and the
same hypernetwork, so their numbers compare. The hypernetwork is the embedded trained one
(`pretrain.embedded.tiny_hypernet_path`, the build `hdb` uses) when that exists; otherwise (and always in tiny
mode, where training one would blow the test budget) a randomly initialised one of the same
architecture is built, saved and exported with the library's own functions. Its speed is the
same; its predictions are not meaningful, and the result files say which one was used.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness import ROOT, BenchContext

log = logging.getLogger(__name__)

#: `HDB_SHARED_DIR` overrides ../shared (the tests use it to run as a clone without it would).
FACES_DIR = Path(os.environ.get("HDB_SHARED_DIR") or ROOT.parent / "shared") / "data" / "faces" / "caltech"
FACES_MISSING = (
    f"real face photos not available: {FACES_DIR} is absent (../shared not checked out); "
    "the parts that need them were skipped"
)


def base_dir() -> Path:
    from hypernet.defaults import default_base_dir

    return default_base_dir()


def load_pipe(base: Path | None = None, device: str = "cpu"):
    """A fresh fp32 pipeline of the shared base (each benchmark gets its own, untouched)."""
    from hypernet.base import load_pipeline

    return load_pipeline(base or base_dir(), device=device, dtype="fp32")


# ---------------------------------------------------------------------------- hypernetwork
@dataclass
class HypernetSource:
    """Where the hypernetwork came from: `path` holds hypernet.safetensors (+ hypernet.onnx)."""

    path: Path
    trained: bool
    label: str

    def to_json(self) -> dict:
        return {"path": str(self.path), "trained": self.trained, "label": self.label}


def hypernet_source(ctx: BenchContext, pipe) -> HypernetSource:
    """The trained embedded hypernetwork (full mode, when available), else a random-init one."""
    if not ctx.tiny:
        try:
            from hypernet.defaults import DEFAULT_TINY_SEED, cache_dir
            from pretrain.embedded import TINY_HYPERNET_OVERRIDES, tiny_hypernet_path

            path = tiny_hypernet_path(cache_dir(), base_dir(), str(DEFAULT_TINY_SEED))
            from hypernet.hypernetwork import HypernetRuntime

            HypernetRuntime.load(path, backend="torch").check_base(pipe)
            folder = path if path.is_dir() else path.parent
            corpus = next((o for o in TINY_HYPERNET_OVERRIDES if o.startswith("data.corpus=")), "tiny-cpu corpus")
            return HypernetSource(folder, True, f"embedded trained tiny hypernetwork (pretrain tiny-cpu, {corpus})")
        except Exception as e:  # noqa: BLE001 - any failure falls back, and the JSON says why
            log.warning("no usable trained hypernetwork (%s: %s); using a random-init one", type(e).__name__, e)
            reason = f"{type(e).__name__}: {e}"
    else:
        reason = "tiny mode"
    folder = random_hypernet(ctx.work_dir / "hypernet-random", pipe)
    return HypernetSource(folder, False, f"random-init tiny-cpu architecture ({reason})")


def random_hypernet(folder: Path, pipe, seed: int = 0) -> Path:
    """Build (once) a random-init hypernetwork for `pipe`'s base: .safetensors + .onnx."""
    import torch

    from hypernet.adapters import default_spec_for, lidb_layers
    from hypernet.base import base_fingerprint
    from hypernet.hypernetwork import HypernetConfig, HypernetInfo, HyperNetwork, export_onnx, save_hypernet
    from hypernet.hypernetwork.export import ONNX_NAME, SAFETENSORS_NAME
    from hypernet.methods._common import pipe_resolution

    spec = default_spec_for(pipe)
    layers = lidb_layers(pipe, spec)
    fp = base_fingerprint(pipe)
    folder = Path(folder) / fp
    if (folder / ONNX_NAME).is_file() and (folder / SAFETENSORS_NAME).is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HyperNetwork(HypernetConfig(num_layers=len(layers), a=spec.a, b=spec.b, r=spec.r)).eval()
    info = HypernetInfo(model.cfg, spec, layers, fp, pipe_resolution(pipe))
    save_hypernet(folder / SAFETENSORS_NAME, model, info)
    export_onnx(model, info, folder / ONNX_NAME)
    return folder


# ---------------------------------------------------------------------------- photos
@dataclass
class FacePlan:
    """One identity's training photo, its other photos (held out) and other people's photos."""

    identity: str
    train_photo: Path
    same: list[Path]
    other: list[Path]
    other_identities: list[str] = field(default_factory=list)
    how_chosen: str = ""

    def to_json(self) -> dict:
        return {
            "identity": self.identity, "train_photo": self.train_photo.name,
            "same_identity_heldout": [p.name for p in self.same],
            "other_identities": self.other_identities, "other_photos": [p.name for p in self.other],
            "how_chosen": self.how_chosen,
        }


def faces_available() -> bool:
    return (FACES_DIR / "identities.csv").is_file()


def face_plan(n_same: int, n_other: int, hypernet_dir: Path | None = None) -> FacePlan | None:
    """Pick an identity the hypernetwork did not train on (when its split is known), one photo
    to personalise from, `n_same` more of it, and `n_other` photos of other identities.

    Returns None when ../shared is absent.
    """
    if not faces_available():
        return None
    from hypernet.eval.corpus import IdentitySplit, read_manifest, split_identities

    corpus = read_manifest(FACES_DIR / "identities.csv")
    split, how = None, ""
    for cand in ([hypernet_dir / "split.json", hypernet_dir.parent / "split.json"] if hypernet_dir else []):
        if cand.is_file():
            split, how = IdentitySplit.load(cand), f"held out by the hypernetwork's own split ({cand.name})"
            break
    if split is None:
        split = split_identities(corpus, n_holdout=3, seed=0)
        how = "hypernet.eval.corpus.split_identities(n_holdout=3, seed=0) (the hypernetwork's split is unknown)"
    # The held-out identity with the most photos: the most same-identity references.
    ident = max(split.holdout, key=lambda i: (len(corpus.photos[i]), i))
    photos = corpus.photos[ident]
    others = [i for i in corpus.identities if i != ident]
    other_photos: list[Path] = []
    k = 0
    while len(other_photos) < n_other and k < max(len(corpus.photos[i]) for i in others):
        for i in others:  # round-robin: one photo from each other identity before a second one
            if len(other_photos) < n_other and k < len(corpus.photos[i]):
                other_photos.append(corpus.photos[i][k])
        k += 1
    chosen = set(other_photos)
    used = [i for i in others if chosen & set(corpus.photos[i])]
    return FacePlan(ident, photos[0], photos[1 : 1 + n_same], other_photos, used, how)


def synthetic_photo(size: int = 256) -> bytes:
    """A PNG stand-in face (skin-tone ellipse on grey) for runs without ../shared."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (120, 120, 120))
    d = ImageDraw.Draw(img)
    d.ellipse((size * 0.25, size * 0.15, size * 0.75, size * 0.85), fill=(224, 172, 140))
    for x in (0.4, 0.6):
        d.ellipse((size * (x - 0.04), size * 0.4, size * (x + 0.04), size * 0.46), fill=(40, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def photo_bytes(n: int) -> tuple[list[bytes], str]:
    """`n` photos of different people as encoded bytes (real when available) and their source."""
    if faces_available():
        from hypernet.eval.corpus import read_manifest

        corpus = read_manifest(FACES_DIR / "identities.csv")
        ids = corpus.identities
        paths = [corpus.photos[ids[i % len(ids)]][i // len(ids)] for i in range(n)]
        return [p.read_bytes() for p in paths], "caltech faces: " + ", ".join(p.name for p in paths)
    return [synthetic_photo()] * n, "synthetic stand-in photo (../shared absent)"


__all__ = ["FACES_MISSING", "FacePlan", "HypernetSource", "base_dir", "face_plan", "faces_available",
           "hypernet_source", "load_pipe", "photo_bytes", "random_hypernet", "synthetic_photo"]
