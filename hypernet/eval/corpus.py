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

__all__ = [
    "FaceCorpus",
    "IdentitySplit",
    "interleave_parts",
    "merge_corpora",
    "part_of",
    "read_manifest",
    "split_corpora",
    "split_identities",
    "write_manifest",
]


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
    """Read a `file,identity` CSV; `file` is relative to the CSV's folder or its `images/` (or absolute).

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
            if not p.is_file():  # LFW's layout: `file` relative to images/ beside the CSV
                p = (path.parent / "images" / row["file"]).resolve()
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


def merge_corpora(parts: dict[str, FaceCorpus], max_photos: int | None = None) -> FaceCorpus:
    """One corpus of several, each label prefixed with its part's name (`lfw:AJ_Cook`, `caltech:3`),
    so identities of different sources never collide.

    Args:
        parts: part name -> corpus; names must be non-empty and free of ':'.
        max_photos: keep at most this many photos per identity (manifest order), so one
            over-photographed person (LFW holds 530 photos of one man) cannot dominate training.

    Raises:
        InvalidInputError: a bad part name or `max_photos` < 1.
    """
    if max_photos is not None and max_photos < 1:
        raise InvalidInputError(f"`max_photos` must be >= 1 or None, got {max_photos}")
    photos: dict[str, list[Path]] = {}
    for name, corpus in parts.items():
        if not name or ":" in name:
            raise InvalidInputError(f"corpus part names must be non-empty without ':', got {name!r}")
        for ident in corpus.identities:
            photos[f"{name}:{ident}"] = corpus.photos[ident][:max_photos]
    if not photos:
        raise InvalidInputError("`parts` must hold at least one corpus, got none")
    first = next(iter(parts.values()))
    return FaceCorpus(manifest=first.manifest, photos=photos)


def write_manifest(corpus: FaceCorpus, path: str | Path) -> Path:
    """Write `corpus` as a `file,identity` CSV with absolute paths (readable by `read_manifest`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "identity"])
        w.writerows([str(p), i] for i in corpus.identities for p in corpus.photos[i])
    tmp.replace(path)
    return path


def split_corpora(parts: dict[str, FaceCorpus], holdout: dict[str, tuple[int, int]], seed: int = 0) -> IdentitySplit:
    """The split of `merge_corpora(parts)`: per part, hold out `n` identities among those with at
    least `min_photos` photos, drawn with `seed` exactly as `split_identities` draws them.

    A part split alone with the same seed holds out the same people (Caltech's 7 held-out people of
    the first face world stay held out in every later corpus that includes Caltech).

    Args:
        holdout: part name -> (n, min_photos); parts not named hold out nobody.

    Raises:
        InvalidInputError: an unknown part, `min_photos` < 3, or too few eligible identities.
    """
    unknown = sorted(set(holdout) - set(parts))
    if unknown:
        raise InvalidInputError(f"`holdout` must name parts of the corpus {sorted(parts)}, got {unknown}")
    train: list[str] = []
    held: list[str] = []
    for name, corpus in parts.items():
        n, min_photos = holdout.get(name, (0, 3))
        if min_photos < 3:
            raise InvalidInputError(f"`min_photos` must be >= 3 (one input + two references), got {min_photos}")
        ids = corpus.identities
        eligible = [i for i in ids if len(corpus.photos[i]) >= min_photos]
        if n > len(eligible) or n < 0:
            raise InvalidInputError(
                f"holdout of part {name!r} must be in [0, {len(eligible)}] (identities with >= "
                f"{min_photos} photos), got {n}"
            )
        chosen = set(random.Random(seed).sample(eligible, n))
        train += [f"{name}:{i}" for i in ids if i not in chosen]
        held += [f"{name}:{i}" for i in ids if i in chosen]
    return IdentitySplit(train=train, holdout=held, seed=seed)


def part_of(identity: str) -> str:
    """The corpus part of a merged label (`lfw:Tom_Hanks` -> `lfw`); "" for an unprefixed one."""
    return identity.split(":", 1)[0] if ":" in identity else ""


def interleave_parts(identities: list[str]) -> list[str]:
    """Round-robin over parts (in order of first appearance), keeping each part's order: the first N
    of the result then hold people of every part."""
    by: dict[str, list[str]] = {}
    for i in identities:
        by.setdefault(part_of(i), []).append(i)
    queues = list(by.values())
    return [q[k] for k in range(max(map(len, queues), default=0)) for q in queues if k < len(q)]
