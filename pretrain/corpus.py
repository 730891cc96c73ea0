"""Reading a face corpus: which photos exist and whose they are, before any pixel is decoded.

Three layouts, chosen from what the path is:
- a folder with one sub-folder per identity (every non-hidden file inside is a candidate photo);
- a CSV or JSONL manifest with `file` and `identity` (paths relative to the manifest);
- `skimage:lfw_subset`: the real 25x25 faces bundled in scikit-image's wheel (first 100 of 200),
  one identity per image - a corpus every machine can install.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from hypernet.errors import InvalidInputError
from pretrain.config import LFW, PROJECT_ROOT, DataConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PhotoRef:
    """One candidate photo: a file path, or `skimage:lfw_subset#i` for an in-wheel image."""

    identity: str
    source: str

    def load(self) -> Path | Image.Image:
        """The file's path (decoded and validated by the caller) or an RGB image (lfw)."""
        if self.source.startswith(LFW + "#"):
            return lfw_image(int(self.source.rsplit("#", 1)[1]))
        return Path(self.source)


def resolve_corpus(candidates: list[str]) -> str:
    """The first candidate that exists (relative paths: cwd, then the project root).

    Raises:
        InvalidInputError: none exists.
    """
    for c in candidates:
        if c == LFW:
            return c
        for base in (Path.cwd(), PROJECT_ROOT):
            p = (base / c).resolve()
            if p.exists():
                return str(p)
    raise InvalidInputError(f"`data.corpus` must name an existing corpus, got none of {candidates}")


def read_corpus(corpus: str, cfg: DataConfig) -> list[PhotoRef]:
    """All candidate photos of `corpus`, sorted by (identity, source), capped per identity by `cfg`.

    Every identity is kept: `cfg.max_identities` picks what stage 1 fits (`select_identities`).
    """
    if corpus == LFW:
        refs = [PhotoRef(f"lfw-{i:03d}", f"{LFW}#{i}") for i in range(cfg.lfw_count)]
    else:
        p = Path(corpus)
        if p.is_dir():
            refs = _read_folder(p)
        elif p.suffix.lower() == ".csv":
            refs = _read_csv(p)
        elif p.suffix.lower() in (".jsonl", ".ndjson"):
            refs = _read_jsonl(p)
        else:
            raise InvalidInputError(f"`data.corpus` must be a folder, .csv or .jsonl, got {corpus!r}")
    by_id: dict[str, list[str]] = {}
    for r in refs:
        by_id.setdefault(r.identity, []).append(r.source)
    out = []
    for ident in sorted(by_id):
        for src in sorted(by_id[ident])[: cfg.max_images_per_identity]:
            out.append(PhotoRef(ident, src))
    if not out:
        raise InvalidInputError(f"`data.corpus` must contain at least one photo, got none in {corpus!r}")
    return out


def split_identities(identities: list[str], cfg: DataConfig) -> tuple[list[str], list[str]]:
    """Seeded split by identity (never by photo: a held-out face must be unseen) -> (train, val)."""
    ids = sorted(set(identities))
    n_val = max(cfg.min_val_identities, round(len(ids) * cfg.val_fraction))
    if n_val >= len(ids):
        raise InvalidInputError(
            f"corpus must have more identities than the {n_val} held out, got {len(ids)}"
        )
    shuffled = ids[:]
    random.Random(cfg.split_seed).shuffle(shuffled)
    val = sorted(shuffled[:n_val])
    return sorted(set(ids) - set(val)), val


def select_identities(identities: list[str], n: int | None, seed: int) -> list[str]:
    """`n` of `identities` (all when None), ordered by a seeded hash of each name.

    A hash order rather than the sorted names: the first 1,000 of LFW's sorted names all start
    with A-C, and a part of a merged corpus (`lfw:`, `caltech:`) would come whole or not at all.
    Each name's rank depends only on (seed, name), so the choice is nested (n = 2,000 keeps the
    first 1,000) and the same on every machine and rank.
    """
    def rank(ident: str) -> bytes:
        return hashlib.sha256(f"{seed}:{ident}".encode()).digest()

    return sorted(set(identities), key=rank)[:n]


def identity_slug(identity: str) -> str:
    """A file-name-safe, collision-free name for an identity."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in identity)[:40]
    return f"{safe}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def lfw_image(i: int) -> Image.Image:
    """Image `i` of scikit-image's LFW subset as 8-bit RGB (stored as float grey in [0, 1])."""
    from skimage.data import lfw_subset

    arr = _lfw_cache.get("faces")
    if arr is None:
        arr = _lfw_cache["faces"] = lfw_subset()  # (200, 25, 25) float64
    grey = np.clip(arr[i] * 255.0 + 0.5, 0, 255).astype(np.uint8)  # (25, 25)
    return Image.fromarray(grey, mode="L").convert("RGB")


_lfw_cache: dict[str, np.ndarray] = {}


def _read_folder(root: Path) -> list[PhotoRef]:
    refs = []
    for d in sorted(x for x in root.iterdir() if x.is_dir() and not x.name.startswith(".")):
        for f in sorted(x for x in d.iterdir() if x.is_file() and not x.name.startswith(".")):
            refs.append(PhotoRef(d.name, str(f)))
    if not refs:
        raise InvalidInputError(f"`data.corpus` folder must have one sub-folder per identity, got none in {root}")
    return refs


def _row(rec: dict, where: str, base: Path) -> PhotoRef:
    f, ident = rec.get("file"), rec.get("identity")
    if not f or ident is None or str(ident) == "":
        raise InvalidInputError(f"{where} must have non-empty `file` and `identity`, got {rec!r}")
    return PhotoRef(str(ident), str((base / str(f)).resolve()))


def _read_csv(path: Path) -> list[PhotoRef]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"file", "identity"} <= set(reader.fieldnames):
            raise InvalidInputError(f"{path} must have a header with `file,identity`, got {reader.fieldnames}")
        return [_row(rec, f"{path}:{i + 2}", path.parent) for i, rec in enumerate(reader)]


def _read_jsonl(path: Path) -> list[PhotoRef]:
    refs = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{path}:{i + 1} must be a JSON object, got {line[:60]!r}") from e
        refs.append(_row(rec, f"{path}:{i + 1}", path.parent))
    return refs


__all__ = ["PhotoRef", "identity_slug", "lfw_image", "read_corpus", "resolve_corpus", "select_identities",
           "split_identities"]
