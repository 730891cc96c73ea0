"""Merged corpora and their held-out split (`hdb base make-corpus`): labels never collide, a
part split alone and split inside a merge hold out the same people, and the CLI writes files
that `read_manifest` / `IdentitySplit.load` read back."""

from __future__ import annotations

import pytest

from hypernet.errors import InvalidInputError
from hypernet.eval.corpus import (
    IdentitySplit,
    merge_corpora,
    read_manifest,
    split_corpora,
    split_identities,
)


def _corpus(root, name, counts, images_subdir=False):
    folder = root / name
    photo_dir = folder / "images" if images_subdir else folder
    rows = []
    for ident, n in counts.items():
        for k in range(n):
            f = f"{ident}/{ident}_{k:04d}.jpg"
            (photo_dir / ident).mkdir(parents=True, exist_ok=True)
            (photo_dir / f).write_bytes(b"x")
            rows.append(f"{f},{ident}")
    (folder / "identities.csv").write_text("file,identity\n" + "\n".join(rows) + "\n")
    return read_manifest(folder / "identities.csv")


def test_merge_prefixes_caps_and_splits_like_the_part_alone(tmp_path):
    a = _corpus(tmp_path, "a", {"x": 6, "y": 5, "z": 1, "w": 9}, images_subdir=True)  # LFW layout
    b = _corpus(tmp_path, "b", {"1": 4, "2": 3, "3": 2, "10": 5})
    merged = merge_corpora({"a": a, "b": b}, max_photos=5)
    assert set(merged.photos) == {"a:x", "a:y", "a:z", "a:w", "b:1", "b:2", "b:3", "b:10"}
    assert len(merged.photos["a:w"]) == 5 and merged.photos["a:w"] == a.photos["w"][:5]
    split = split_corpora({"a": a, "b": b}, {"a": (2, 5), "b": (2, 3)}, seed=3)
    assert sorted(split.holdout) == sorted(split_corpora({"a": a}, {"a": (2, 5)}, 3).holdout
                                           + ["b:" + i for i in split_identities(b, 2, 3).holdout])
    assert not set(split.holdout) & set(split.train)
    assert set(split.holdout) | set(split.train) == set(merged.photos)
    held_a = [h for h in split.holdout if h.startswith("a:")]
    assert all(len(a.photos[h[2:]]) >= 5 for h in held_a)  # min_photos is honoured
    with pytest.raises(InvalidInputError, match="holdout of part 'a'"):
        split_corpora({"a": a}, {"a": (4, 5)})  # only x, y, w have >= 5
    with pytest.raises(InvalidInputError, match="must name parts"):
        split_corpora({"a": a}, {"c": (1, 3)})
    with pytest.raises(InvalidInputError, match="part names"):
        merge_corpora({"a:b": a})


def test_make_corpus_cli_round_trips(tmp_path, capsys):
    from hdb.cli import main

    _corpus(tmp_path, "a", {"x": 6, "y": 5, "z": 1})
    _corpus(tmp_path, "b", {"1": 4, "2": 3})
    out = tmp_path / "merged"
    rc = main(["base", "make-corpus", "--out", str(out), "--part", f"a={tmp_path / 'a' / 'identities.csv'}",
               "--part", f"b={tmp_path / 'b'}", "--holdout", "a=1:5", "--holdout", "b=1", "--max-photos", "4"])
    assert rc == 0
    corpus = read_manifest(out / "identities.csv")
    split = IdentitySplit.load(out / "split.json")
    assert set(corpus.photos) == {"a:x", "a:y", "a:z", "b:1", "b:2"}
    assert max(len(v) for v in corpus.photos.values()) == 4
    assert len(split.holdout) == 2 and {h.split(":")[0] for h in split.holdout} == {"a", "b"}
    assert "2 held out" in capsys.readouterr().out
