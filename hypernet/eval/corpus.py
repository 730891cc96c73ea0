"""A labelled face corpus (`file,identity` CSV) and its seeded split into train / held-out identities.

The face world, pretraining and the evaluation all read the same manifest, and the split is
written next to every model trained on it (`split.json`), so evaluation can hold out exactly the
identities no training step saw.
"""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from hypernet.errors import InvalidInputError, ModelNotFoundError

__all__ = ["FaceCorpus", "IdentitySplit", "read_manifest", "split_identities"]


@dataclass(frozen=True)
class FaceCorpus:
    """Photos grouped by identity. `photos[identity]` lists absolute paths in manifest order."""

    manifest: Path
    photos: dict[str, list[Path]]

    @property
    def identities(self) -> list[str]:
        """Identity labels in a stable order (numeric labels numerically, others by text)."""
        return sorted(self.photos, key=lambda s: (0, int(s), "") if s.isdigit() else (1, 0, s))

    def files(self, identities: list[str]) -> list[Path]:
        """Every photo of `identities`, identity by identity."""
        return [p for i in identities for p in self.photos[i]]


def read_manifest(path: str | Path) -> FaceCorpus:
    """Read a `file,identity` CSV; `file` is relative to the CSV's folder (or absolute).

    Raises:
        ModelNotFoundError: the manifest or a listed photo does not exist.
        InvalidInputError: missing columns or no rows.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "identities.csv"
    if not path.is_file():
        raise ModelNotFoundError(f"`corpus` must be a `file,identity` CSV, got {str(path)!r} (no such file)")
    photos: dict[str, list[Path]] = defaultdict(list)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"file", "identity"} <= set(reader.fieldnames):
            raise InvalidInputError(
                f"`corpus` must have the columns file,identity, got {reader.fieldnames} in {str(path)!r}"
            )
        for row in reader:
            p = (path.parent / row["file"]).resolve()
            if not p.is_file():
                raise ModelNotFoundError(f"manifest {str(path)!r} lists {row['file']!r}, which does not exist")
            photos[row["identity"].strip()].append(p)
    if not photos:
        raise InvalidInputError(f"`corpus` must list at least one photo, got none in {str(path)!r}")
    return FaceCorpus(manifest=path.resolve(), photos=dict(photos))


@dataclass(frozen=True)
class IdentitySplit:
    """Which identities trained (`train`) and which are held out for evaluation (`holdout`)."""

    train: list[str]
    holdout: list[str]
    seed: int

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> IdentitySplit:
        """Read a `split.json` written by `save` (e.g. in a face-world directory).

        Raises:
            ModelNotFoundError: no such file.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"`split` must be a split.json file, got {str(path)!r} (no such file)")
        d = json.loads(path.read_text())
        return cls(train=list(d["train"]), holdout=list(d["holdout"]), seed=int(d["seed"]))


def split_identities(corpus: FaceCorpus, n_holdout: int, seed: int = 0) -> IdentitySplit:
    """Hold out `n_holdout` identities, drawn with `seed` among those with >= 3 photos.

    Evaluation needs one input photo and at least two references per held-out identity, so
    identities with fewer photos always train.

    Raises:
        InvalidInputError: `n_holdout` is negative or leaves no training identity, or too few
            identities have 3 photos.
    """
    ids = corpus.identities
    eligible = [i for i in ids if len(corpus.photos[i]) >= 3]
    if n_holdout < 0 or n_holdout >= len(ids):
        raise InvalidInputError(f"`n_holdout` must be in [0, {len(ids) - 1}], got {n_holdout}")
    if n_holdout > len(eligible):
        raise InvalidInputError(
            f"`n_holdout` must be <= {len(eligible)} (identities with >= 3 photos), got {n_holdout}"
        )
    held = set(random.Random(seed).sample(eligible, n_holdout))
    return IdentitySplit(train=[i for i in ids if i not in held], holdout=[i for i in ids if i in held], seed=seed)
