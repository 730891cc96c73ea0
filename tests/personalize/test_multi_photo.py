"""Several photos of one person: combined predictions, a fine-tune on all of them, errors, the CLI."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from hypernet.adapters.inject import adapted_layers
from hypernet.errors import ImageDecodeError, InvalidInputError
from hypernet.hypernetwork.runtime import HypernetRuntime
from hypernet.identity import Identity
from hypernet.personalize import MAX_PHOTOS, personalize
from hypernet.photos import preprocess

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _photo_bytes(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (90, 80, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def _pixels(photos: list[bytes]) -> torch.Tensor:
    return torch.stack([preprocess(Image.open(io.BytesIO(p)).convert("RGB"), 64, detector="center")
                        for p in photos])  # (K, 3, 64, 64)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("combine,relax", [("weights", "lora"), ("embedding", "subspace")])
def test_one_photo_in_a_list_is_the_single_photo_result_bit_for_bit(tiny_pipe, tiny_hypernet, combine, relax):
    kw = dict(hypernet=tiny_hypernet, steps=2, rank=2, detector="center", relax=relax)
    bare = personalize(tiny_pipe, _photo_bytes(3), **kw)
    listed = personalize(tiny_pipe, [_photo_bytes(3)], combine=combine, **kw)
    assert _equal(bare.lidb, listed.lidb) and _equal(bare.relaxed, listed.relaxed)
    assert listed.num_photos == 1 and listed.combine is None and listed.spec == bare.spec


def test_predictions_combine_in_weight_or_embedding_space(tiny_pipe, tiny_hypernet):
    photos = [_photo_bytes(i) for i in range(3)]
    rt = HypernetRuntime.load(tiny_hypernet)
    pixels = _pixels(photos)
    by_photo = rt.predict(pixels)  # (3, L, r, a), (3, L, b, r)
    tokens = rt.encode(pixels)  # (3, T, d)
    want_embedding = rt.decode(tokens.mean(0, keepdim=True))
    # the split is the whole network: decode(encode(x)) is predict(x)
    assert _equal(rt.decode(tokens), by_photo)

    got = {c: personalize(tiny_pipe, photos, hypernet=rt, steps=0, detector="center", combine=c)
           for c in ("weights", "embedding")}
    for k in ("A_train", "B_train"):
        torch.testing.assert_close(got["weights"].lidb[k], by_photo[k].mean(0), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got["embedding"].lidb[k], want_embedding[k][0], atol=1e-6, rtol=1e-6)
        # the decoder is non-linear: the two combinations really differ, and differ from one photo
        assert (got["weights"].lidb[k] - got["embedding"].lidb[k]).abs().max() > 1e-4
        assert (got["weights"].lidb[k] - by_photo[k][0]).abs().max() > 1e-4
    assert got["embedding"].num_photos == 3 and got["embedding"].combine == "embedding"
    back = Identity.from_bytes(got["weights"].to_bytes())
    assert (back.num_photos, back.combine) == (3, "weights")


def test_fine_tune_trains_on_every_photo(tiny_pipe, tiny_hypernet, monkeypatch):
    import hypernet.personalize as mod

    seen = []
    real = mod.build_train_data

    def recording(pipe, pixels, prompt, **kw):
        seen.append(pixels.shape[0])
        return real(pipe, pixels, prompt, **kw)

    monkeypatch.setattr(mod, "build_train_data", recording)
    photos = [_photo_bytes(i) for i in range(3)]
    three = personalize(tiny_pipe, photos, hypernet=tiny_hypernet, steps=3, detector="center", flip=False)
    one = personalize(tiny_pipe, photos[:1], hypernet=tiny_hypernet, steps=3, detector="center", flip=False)
    assert seen == [3, 1]
    assert three.relax == one.relax == "subspace"  # the default: the trained LiDB core holds what differs
    assert not _equal(three.lidb, one.lidb)


def test_batch_size_zero_steps_on_every_photo_at_once(tiny_pipe, tiny_hypernet):
    """batch_size=0 is one draw per photo given: with one photo it is the default, bit for bit; with
    three it is another fine-tune than one photo per step (the same seed, steps and photos)."""
    photos = [_photo_bytes(i) for i in range(3)]
    kw = dict(hypernet=tiny_hypernet, steps=3, detector="center")
    one_default = personalize(tiny_pipe, photos[:1], **kw)
    one_all = personalize(tiny_pipe, photos[:1], batch_size=0, **kw)
    assert _equal(one_default.lidb, one_all.lidb)
    three_b1 = personalize(tiny_pipe, photos, batch_size=1, **kw)
    three_all = personalize(tiny_pipe, photos, batch_size=0, **kw)
    three_b3 = personalize(tiny_pipe, photos, batch_size=3, **kw)
    assert not _equal(three_b1.lidb, three_all.lidb)
    assert _equal(three_all.lidb, three_b3.lidb)
    for bad in (-1, MAX_PHOTOS + 1, 1.5, True):
        with pytest.raises(InvalidInputError, match=rf"`batch_size` must be an integer in \[0, {MAX_PHOTOS}\]"):
            personalize(tiny_pipe, photos, batch_size=bad, **kw)


def test_finetune_photos_trains_on_the_first_ones_from_the_combined_prediction(tiny_pipe, tiny_hypernet):
    """finetune_photos=1 on 3 photos: the prediction of all three, the fine-tune on the first alone."""
    from hypernet.personalize import PersonalizeConfig, finetune

    photos = [_photo_bytes(i) for i in range(3)]
    kw = dict(hypernet=tiny_hypernet, steps=3, detector="center")
    ft1 = personalize(tiny_pipe, photos, finetune_photos=1, **kw)
    assert not _equal(ft1.lidb, personalize(tiny_pipe, photos, **kw).lidb)  # all three photos trained
    assert not _equal(ft1.lidb, personalize(tiny_pipe, photos[:1], **kw).lidb)  # one photo's prediction
    rt = HypernetRuntime.load(tiny_hypernet)
    pred = {k: v.mean(0) for k, v in rt.predict(_pixels(photos)).items()}  # the weights-combined prediction
    want, _ = finetune(tiny_pipe, _pixels(photos)[:1], rt.spec, pred, layers=list(rt.layers),
                       config=PersonalizeConfig(steps=3, detector="center"))
    for k in ("A_train", "B_train"):
        torch.testing.assert_close(ft1.lidb[k], want.lidb[k], atol=1e-5, rtol=1e-5)
    assert ft1.num_photos == 3
    with pytest.raises(InvalidInputError, match=rf"`finetune_photos` must be an integer in \[0, {MAX_PHOTOS}\]"):
        personalize(tiny_pipe, photos, finetune_photos=-1, **kw)


def test_errors_name_the_photo_at_fault(tiny_pipe, tiny_hypernet, tmp_path):
    good = _photo_bytes()
    with pytest.raises(ImageDecodeError, match=r"^`photos\[2\]` must be a JPEG, PNG or WebP image"):
        personalize(tiny_pipe, [good, good, b"not an image", good], hypernet=tiny_hypernet, steps=0)
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageDecodeError, match=rf"^`photos\[1\]` \({missing}\) must be an existing image file"):
        personalize(tiny_pipe, [good, missing], hypernet=tiny_hypernet, steps=0)
    with pytest.raises(InvalidInputError, match=rf"`photos` must hold 1 to {MAX_PHOTOS} photos .*got {MAX_PHOTOS + 1}"):
        personalize(tiny_pipe, [good] * (MAX_PHOTOS + 1), hypernet=tiny_hypernet, steps=0)
    with pytest.raises(InvalidInputError, match="`photos` must hold 1 to .* got 0"):
        personalize(tiny_pipe, [], hypernet=tiny_hypernet, steps=0)
    with pytest.raises(InvalidInputError, match="`combine` must be one of"):
        personalize(tiny_pipe, [good, good], hypernet=tiny_hypernet, steps=0, combine="median")
    assert all(not layer.adapters for layer in adapted_layers(tiny_pipe).values())


def test_cli_takes_several_photos(tiny_pipe, tiny_base_dir, tiny_hypernet, tmp_path, capsys):
    from hdb.cli import main

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"p{i}.jpg")
        paths[-1].write_bytes(_photo_bytes(i))
    out = tmp_path / "me.safetensors"
    common = ["--base", str(tiny_base_dir), "--hypernet", str(tiny_hypernet), "--steps", "1",
              "--detector", "center", "--device", "cpu", "--out", str(out)]
    assert main(["personalize", *map(str, paths), "--combine", "embedding", "--relax", "subspace", "--batch-size", "0",
                 "--finetune-photos", "2",
                 "--rank", "2", *common]) == 0
    ident = Identity.load(out)
    assert (ident.num_photos, ident.combine, ident.relax, ident.spec.r) == (3, "embedding", "subspace", 2)
    assert "3 photo(s)" in capsys.readouterr().out

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    assert main(["personalize", str(paths[0]), str(bad), *common]) != 0
    assert f"`photos[1]` ({bad}) must be a JPEG, PNG or WebP image" in capsys.readouterr().err


def test_mean_lidb_averages_the_deltas_exactly():
    from hypernet.personalize import mean_lidb

    g = torch.Generator().manual_seed(0)
    cores = [{"A_train": torch.randn(3, r, 7, generator=g), "B_train": torch.randn(3, 5, r, generator=g)}
             for r in (1, 2, 4)]
    merged = mean_lidb(cores)
    assert merged["A_train"].shape == (3, 7, 7) and merged["B_train"].shape == (3, 5, 7)
    want = sum(c["B_train"] @ c["A_train"] for c in cores) / 3  # (L, b, a)
    torch.testing.assert_close(merged["B_train"] @ merged["A_train"], want)
    assert _equal(mean_lidb([cores[0]]), cores[0])  # one core is itself
    # keep_norm: the same direction per layer, at the mean of the K deltas' norms
    kept = mean_lidb(cores, keep_norm=True)
    got = kept["B_train"] @ kept["A_train"]  # (L, b, a)
    norms = torch.stack([(c["B_train"] @ c["A_train"]).flatten(1).norm(dim=1) for c in cores]).mean(0)  # (L,)
    torch.testing.assert_close(got.flatten(1).norm(dim=1), norms)
    torch.testing.assert_close(torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1)), torch.ones(3))
    assert (want.flatten(1).norm(dim=1) < norms).all()  # deltas that disagree average shorter
    with pytest.raises(InvalidInputError, match="`cores` must hold"):
        mean_lidb([])


def test_each_photo_fine_tuned_alone_then_averaged(tiny_pipe, tiny_hypernet):
    """combine="each-norm": photo i's own prediction fine-tuned on photo i alone (seed + i), the K
    fine-tuned deltas averaged with their norm kept."""
    from hypernet.personalize import PersonalizeConfig, finetune, mean_lidb

    photos = [_photo_bytes(i) for i in range(3)]
    rt = HypernetRuntime.load(tiny_hypernet)
    kw = dict(hypernet=rt, steps=2, rank=2, detector="center")
    events = []
    each = personalize(tiny_pipe, photos, combine="each-norm", progress=events.append, **kw)
    assert each.num_photos == 3 and each.combine == "each-norm" and each.spec.r == 3 * 2
    pixels, by_photo = _pixels(photos), rt.predict(_pixels(photos))
    alone = []
    for i in range(3):
        pred = {k: v[i] for k, v in by_photo.items()}
        cfg = PersonalizeConfig(steps=2, rank=2, seed=i, detector="center")
        ident, _ = finetune(tiny_pipe, pixels[i : i + 1], rt.spec, pred, layers=list(rt.layers), config=cfg)
        alone.append(ident.lidb)
    want = mean_lidb(alone, keep_norm=True)
    for k in want:
        torch.testing.assert_close(each.lidb[k], want[k], atol=1e-5, rtol=1e-4)
    # progress counts the K fine-tunes as one run of 3 x 2 steps
    steps = [e.step for e in events if e.stage == "finetune"]
    assert max(steps) == 6 and all(e.total == 6 for e in events if e.stage in ("finetune", "done"))
    back = Identity.from_bytes(each.to_bytes())
    assert (back.num_photos, back.combine, back.spec.r) == (3, "each-norm", 6)
    assert _equal(back.lidb, each.lidb)


def test_each_names_what_it_cannot_do(tiny_pipe, tiny_hypernet):
    photos = [_photo_bytes(i) for i in range(3)]
    with pytest.raises(InvalidInputError, match="`relax` must be 'subspace' with combine='each-norm'"):
        personalize(tiny_pipe, photos, hypernet=tiny_hypernet, steps=1, relax="lora", combine="each-norm",
                    detector="center")
    spec = HypernetRuntime.load(tiny_hypernet).spec
    too_big = min(spec.a, spec.b) // 3 + 1
    with pytest.raises(InvalidInputError, match="`photos` must number at most"):
        personalize(tiny_pipe, photos, hypernet=tiny_hypernet, steps=1, rank=too_big, combine="each-norm",
                    detector="center")
