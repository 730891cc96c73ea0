"""`prepare` and `stage1` in one process: validation, caching, idempotent restarts."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain.cache import PreparedData
from pretrain.config import load_config
from pretrain.context import RunContext
from pretrain.corpus import lfw_image
from pretrain.distributed import DistInfo


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """6 identities (LFW faces as PNG/JPEG files), one broken photo, one non-image file."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        d = root / f"person{i}"
        d.mkdir()
        lfw_image(i).save(d / "front.png")
        if i < 2:
            lfw_image(i + 10).save(d / "other.jpg", quality=95)
    (root / "person0" / "truncated.jpg").write_bytes((root / "person1" / "other.jpg").read_bytes()[:200])
    (root / "person3" / "notes.txt").write_text("not a photo")
    return root


def make_ctx(out, base, corpus, *extra):
    cfg = load_config("tiny-cpu", [
        f"base={base}", f'data.corpus=["{corpus}"]', "data.detector=center", "data.val_fraction=0.3",
        "data.shard_size=3", "stage1.train.steps=2", *extra,
    ])
    return RunContext(cfg, out, DistInfo(0, 1, 0, torch.device("cpu")))


def test_prepare_caches_valid_photos_and_reports_bad_ones(tmp_path, tiny_base_dir, corpus, caplog):
    from hypernet.photos import decode_image, preprocess
    from hypernet.training.data import encode_images
    from pretrain.prepare import run_prepare

    ctx = make_ctx(tmp_path, tiny_base_dir, corpus)
    run_prepare(ctx)
    idx = json.loads((tmp_path / "prepared" / "index.json").read_text())
    assert idx["counts"] == {"photos": 8, "skipped": 2, "train_identities": 4, "val_identities": 2}
    assert sorted(s["source"].rsplit("/", 1)[1] for s in idx["skipped"]) == ["notes.txt", "truncated.jpg"]
    assert "skipping" in caplog.text and len(idx["shards"]) == 4  # 10 candidates / 3 per shard
    data = PreparedData(tmp_path / "prepared")
    rows = data.rows("person1")
    srcs = idx["identities"]["person1"]["sources"]
    want = torch.stack([preprocess(decode_image(s), 64, detector="center") for s in srcs])
    assert torch.equal(data.pixels(rows), want)  # uint8 cache is lossless
    pipe = ctx.pipe()
    torch.testing.assert_close(data.latents(rows), encode_images(pipe, want))
    torch.testing.assert_close(data.latents(rows, flip=True), encode_images(pipe, want, flip=True))
    assert data.text_emb().shape == (1, 77, pipe.text_encoder.config.hidden_size)
    # A rerun with the same settings does nothing; a shard lost in a crash is redone alone.
    stamp = (tmp_path / "prepared" / "shard-00001.safetensors").stat().st_mtime_ns
    (tmp_path / "prepared" / "shard-00000.safetensors").unlink()
    (tmp_path / "prepared" / "index.json").unlink()
    run_prepare(ctx)
    assert (tmp_path / "prepared" / "shard-00000.safetensors").is_file()
    assert (tmp_path / "prepared" / "shard-00001.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "prepared" / "index.json").read_text())["counts"] == idx["counts"]


def test_stage1_fits_every_identity_and_skips_done_ones(tmp_path, tiny_base_dir, corpus):
    from hypernet.adapters import load_lidb
    from pretrain.prepare import run_prepare
    from pretrain.stage1 import load_stage1, run_stage1

    ctx = make_ctx(tmp_path, tiny_base_dir, corpus, "stage1.identities_per_call=4")  # chunks of 4 and 2
    run_prepare(ctx)
    run_stage1(ctx)
    s1 = load_stage1(tmp_path / "stage1")
    assert sorted(s1.identities) == [f"person{i}" for i in range(6)]
    assert {e["split"] for e in s1.identities.values()} == {"train", "val"}
    files = {i: tmp_path / "stage1" / e["file"] for i, e in s1.identities.items()}
    f = load_lidb(files["person2"])
    assert f.layers == s1.layers and f.metadata["identity"] == "person2"
    assert f.weights["B_train"].abs().sum() > 0  # trained away from the zero init
    t = s1.targets(["person0", "person2"])
    assert t["A_train"].shape == (2, len(s1.layers), s1.spec.r, s1.spec.a)
    # Restart after losing one identity: only that one is written again, to the same weights (its
    # chunk is refitted whole, never regrouped, so the result is bit-identical).
    before = {i: p.stat().st_mtime_ns for i, p in files.items()}
    old = load_lidb(files["person4"])
    files["person4"].unlink()
    (tmp_path / "stage1" / "index.json").unlink()
    run_stage1(ctx)
    after = {i: p.stat().st_mtime_ns for i, p in files.items()}
    assert [i for i in files if after[i] != before[i]] == ["person4"]
    new = load_lidb(files["person4"])  # seeded by identity name: reproducible
    assert all(torch.equal(old.weights[k], new.weights[k]) for k in old.weights)
    assert new.metadata == old.metadata


def test_max_identities_picks_a_nested_subset_and_chunk_size_only_changes_round_off(tmp_path, tiny_base_dir,
                                                                                    corpus):
    import shutil

    from hypernet.adapters import load_lidb
    from pretrain.corpus import select_identities
    from pretrain.prepare import run_prepare
    from pretrain.stage1 import load_stage1, run_stage1

    a = make_ctx(tmp_path / "a", tiny_base_dir, corpus, "data.max_identities=3", "stage1.identities_per_call=3")
    run_prepare(a)
    run_stage1(a)
    first = select_identities([f"person{i}" for i in range(6)], 3, seed=0)
    assert sorted(load_stage1(tmp_path / "a" / "stage1").identities) == sorted(first)
    # Raising max_identities re-prepares nothing and refits none of the identities already fitted.
    shard = tmp_path / "a" / "prepared" / "shard-00000.safetensors"
    s1 = load_stage1(tmp_path / "a" / "stage1")
    files = {i: tmp_path / "a" / "stage1" / e["file"] for i, e in s1.identities.items()}
    stamps = {p: p.stat().st_mtime_ns for p in [shard, *files.values()]}
    b = make_ctx(tmp_path / "a", tiny_base_dir, corpus, "data.max_identities=5", "stage1.identities_per_call=3")
    run_prepare(b)
    run_stage1(b)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    more = load_stage1(tmp_path / "a" / "stage1").identities
    assert set(first) < set(more) and len(more) == 5
    # What later stages train on: the split's people stage 1 has reached, in the split's order.
    everyone = [f"person{i}" for i in range(6)]
    assert s1.fitted(everyone) == [i for i in everyone if i in first]
    assert s1.fitted(list(reversed(everyone)))[::-1] == s1.fitted(everyone)
    # The same identities fitted one per call: the same weights up to float round-off.
    (tmp_path / "c").mkdir()
    shutil.copytree(tmp_path / "a" / "prepared", tmp_path / "c" / "prepared")
    c = make_ctx(tmp_path / "c", tiny_base_dir, corpus, "data.max_identities=3", "stage1.identities_per_call=1")
    run_stage1(c)
    for ident, path in files.items():
        chunked = load_lidb(path).weights
        alone = load_lidb(tmp_path / "c" / "stage1" / more[ident]["file"]).weights
        for k in chunked:
            torch.testing.assert_close(alone[k], chunked[k], atol=1e-5, rtol=1e-4)


def test_stage1_targets_of_a_base_changed_in_place_are_stale(tmp_path, tiny_base_dir, corpus):
    """A base re-exported into the same directory (the face world every `--export-every` steps) is
    another base: its stage-1 keys differ, so the targets fitted on the old weights are redone."""
    import shutil

    from safetensors.torch import load_file, save_file

    from pretrain.stage1 import stage1_key, target_key

    base = tmp_path / "base"
    shutil.copytree(tiny_base_dir, base)
    before = make_ctx(tmp_path / "a", base, corpus)
    keys = stage1_key(before), target_key(before)
    assert (stage1_key(make_ctx(tmp_path / "b", base, corpus)), target_key(make_ctx(tmp_path / "b", base, corpus))) \
        == keys  # same base, same settings: same keys (restarts skip what is done)
    (weights,) = (base / "unet").glob("*.safetensors")
    sd = load_file(weights)
    for name in sd:  # the "re-export": same path, new weights (every tensor moved, as training does)
        sd[name] = sd[name] + 0.5
    save_file(sd, weights)
    after = make_ctx(tmp_path / "a", base, corpus)
    assert stage1_key(after) != keys[0] and target_key(after) != keys[1]


def test_cross_photo_takes_the_diffusion_latents_of_another_photo_of_the_person(tmp_path, tiny_base_dir, corpus):
    from pretrain.prepare import run_prepare
    from pretrain.stage1 import run_stage1
    from pretrain.stage2 import Stage2Recipe, stage2_key

    ctx = make_ctx(tmp_path, tiny_base_dir, corpus, "stage2.cross_photo=true", "data.val_fraction=0.2")
    run_prepare(ctx)
    run_stage1(ctx)
    recipe = Stage2Recipe(ctx)
    recipe._setup_data()
    data = recipe.data
    for i, (j, row) in enumerate(recipe.samples["train"]):
        rows = recipe.rows_of["train"][j]
        pix, lat, _, _ = recipe._batch([(i, False)], gen=torch.Generator().manual_seed(0))
        same = recipe._batch([(i, False)])[1]  # the default: the conditioning photo's own latents
        assert torch.equal(pix, data.pixels([row])) and torch.equal(same, data.latents([row]))
        if len(rows) == 1:  # one photo: nothing else to take
            assert torch.equal(lat, same)
        else:
            other = [r for r in rows if tuple(r) != tuple(row)]
            assert len(other) == 1 and torch.equal(lat, data.latents(other))
        flipped = recipe._batch([(i, True)], gen=torch.Generator().manual_seed(0))[1]
        assert torch.equal(flipped, data.latents(other if len(rows) > 1 else [row], flip=True))
    assert any(len(r) > 1 for r in recipe.rows_of["train"])  # the corpus has people with 2 photos
    # Off by default; turning it on is another stage-2 run.
    off = make_ctx(tmp_path, tiny_base_dir, corpus, "data.val_fraction=0.2")
    assert not off.cfg.stage2.cross_photo and stage2_key(off) != stage2_key(ctx)
