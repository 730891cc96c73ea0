"""Corpus reading: folder / CSV / JSONL layouts, LFW fallback, seeded split by identity."""

from __future__ import annotations

import json

import pytest

from hypernet.errors import InvalidInputError
from pretrain.config import LFW, DataConfig
from pretrain.corpus import identity_slug, lfw_image, read_corpus, resolve_corpus, split_identities


def _touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_csv_jsonl_and_folder_layouts_agree(tmp_path):
    files = {"ann": ["a1.jpg", "a2.jpg"], "bob": ["b1.jpg"]}
    for ident, names in files.items():
        for n in names:
            _touch(tmp_path / "flat" / n)
            _touch(tmp_path / "tree" / ident / n)
    (tmp_path / "tree" / "ann" / ".hidden").write_bytes(b"")
    rows = [(n, i) for i, ns in files.items() for n in ns]
    (tmp_path / "flat" / "m.csv").write_text("file,identity\n" + "".join(f"{n},{i}\n" for n, i in rows))
    (tmp_path / "flat" / "m.jsonl").write_text("".join(json.dumps({"file": n, "identity": i}) + "\n" for n, i in rows))
    cfg = DataConfig()
    got = {}
    for name, path in [("csv", tmp_path / "flat" / "m.csv"), ("jsonl", tmp_path / "flat" / "m.jsonl"),
                       ("tree", tmp_path / "tree")]:
        refs = read_corpus(str(path), cfg)
        got[name] = [(r.identity, r.source.rsplit("/", 1)[1]) for r in refs]
    assert got["csv"] == got["jsonl"] == got["tree"] == [("ann", "a1.jpg"), ("ann", "a2.jpg"), ("bob", "b1.jpg")]
    capped = read_corpus(str(tmp_path / "tree"), DataConfig(max_identities=1, max_images_per_identity=1))
    # max_identities picks what stage 1 fits, not what is prepared: every identity stays here.
    assert [(r.identity, r.source.rsplit("/", 1)[1]) for r in capped] == [("ann", "a1.jpg"), ("bob", "b1.jpg")]


def test_select_identities_is_seeded_nested_and_spread_over_the_names():
    from pretrain.corpus import select_identities

    ids = [f"lfw:{c}{i:03d}" for c in "ABCDEFGH" for i in range(100)] + [f"caltech:{i}" for i in range(20)]
    first = select_identities(ids, 100, seed=0)
    assert len(first) == 100 == len(set(first)) and set(first) <= set(ids)
    assert select_identities(list(reversed(ids)), 100, seed=0) == first  # input order is irrelevant
    assert select_identities(ids, 300, seed=0)[:100] == first  # nested: raising n keeps these
    assert select_identities(ids, 100, seed=1) != first
    assert len({i.split(":")[1][0] for i in first if i.startswith("lfw:")}) == 8  # not just the A names
    assert select_identities(ids, None, seed=0) == select_identities(ids, len(ids), seed=0)


def test_manifest_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,person\nx.jpg,1\n")
    with pytest.raises(InvalidInputError, match="file,identity"):
        read_corpus(str(bad), DataConfig())
    bad.write_text("file,identity\nx.jpg,\n")
    with pytest.raises(InvalidInputError, match="bad.csv:2"):
        read_corpus(str(bad), DataConfig())
    with pytest.raises(InvalidInputError, match="must name an existing corpus"):
        resolve_corpus([str(tmp_path / "nope")])


def test_corpus_candidates_fall_back_to_lfw(tmp_path):
    assert resolve_corpus([str(tmp_path / "missing.csv"), LFW]) == LFW
    refs = read_corpus(LFW, DataConfig(lfw_count=5))
    assert [r.identity for r in refs] == [f"lfw-{i:03d}" for i in range(5)]
    img = refs[0].load()
    assert img.mode == "RGB" and img.size == (25, 25) and img.getextrema() != ((0, 0),) * 3
    assert lfw_image(0).tobytes() == img.tobytes()


def test_split_is_by_identity_seeded_and_disjoint():
    ids = [f"id{i}" for i in range(20)]
    cfg = DataConfig(val_fraction=0.2, split_seed=3)
    train, val = split_identities(ids + ids, cfg)  # several photos per identity
    assert len(val) == 4 and not set(train) & set(val) and set(train) | set(val) == set(ids)
    assert split_identities(ids, cfg) == (train, val)
    assert split_identities(ids, DataConfig(val_fraction=0.2, split_seed=4))[1] != val
    with pytest.raises(InvalidInputError, match="more identities"):
        split_identities(["only"], cfg)


def test_identity_slug_is_safe_and_unique():
    a, b = identity_slug("a/b"), identity_slug("a_b")
    assert "/" not in a and a != b


@pytest.mark.needs_shared
def test_real_caltech_manifest(faces_dir):
    refs = read_corpus(str(faces_dir / "identities.csv"), DataConfig())
    assert len(refs) == 350 and len({r.identity for r in refs}) == 22
    assert all(r.source.endswith(".jpg") for r in refs)
