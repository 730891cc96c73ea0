"""Face world: a 2-step smoke run on real photos through `hdb base train-face-world`, then resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hdb.cli import main
from hypernet.errors import InvalidInputError
from hypernet.eval.corpus import IdentitySplit, read_manifest, split_identities
from hypernet.face_world import FaceWorldConfig, _load_crops, face_world_lr


@pytest.fixture()
def small_corpus(faces_dir, tmp_path):
    """3 identities x 3 photos, absolute paths (the manifest format users write)."""
    corpus = read_manifest(faces_dir / "identities.csv")
    lines = ["file,identity"]
    for ident in corpus.identities[:3]:
        lines += [f"{p},{ident}" for p in corpus.photos[ident][:3]]
    path = tmp_path / "faces.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.needs_shared
def test_split_is_seeded_and_keeps_identities_with_few_photos_in_training(faces_dir):
    corpus = read_manifest(faces_dir / "identities.csv")
    a, b = split_identities(corpus, 7, seed=0), split_identities(corpus, 7, seed=0)
    assert a == b and len(a.holdout) == 7 and set(a.train).isdisjoint(a.holdout)
    assert sorted(a.train + a.holdout, key=int) == corpus.identities
    assert all(len(corpus.photos[i]) >= 3 for i in a.holdout)
    assert split_identities(corpus, 7, seed=1) != a
    with pytest.raises(InvalidInputError, match="n_holdout"):
        split_identities(corpus, 22, seed=0)


@pytest.mark.needs_shared
def test_crops_at_the_default_margin_equal_the_product_preprocessing(faces_dir):
    from hypernet.photos import load_photos

    path = faces_dir / "image_0003.jpg"
    ours = _load_crops(path, (0.5,), "center")[0]  # (3, 128, 128)
    theirs = load_photos([path], 128, detector="center")[0]
    assert torch.equal(ours, theirs)


def test_config_validation():
    with pytest.raises(InvalidInputError, match="`width` must be a multiple of 32"):
        FaceWorldConfig(width=40)
    with pytest.raises(InvalidInputError, match="`caption_dropout`"):
        FaceWorldConfig(caption_dropout=1.0)
    with pytest.raises(InvalidInputError, match="`decay_start` must be below `steps` \\(100\\), got 100"):
        FaceWorldConfig(steps=100, decay_start=100)


def test_learning_rate_warms_up_holds_then_decays_from_decay_start_only():
    const = FaceWorldConfig(steps=1000, lr=1e-3, warmup_steps=10)
    decay = FaceWorldConfig(steps=1000, lr=1e-3, warmup_steps=10, decay_start=600)
    assert face_world_lr(0, const) == pytest.approx(1e-4)  # warm-up: (step + 1) / warmup
    # identical up to decay_start, so a resumed run that adds a decay continues the same schedule
    assert [face_world_lr(s, decay) for s in range(601)] == [face_world_lr(s, const) for s in range(601)]
    assert face_world_lr(999, const) == 1e-3
    assert face_world_lr(800, decay) == pytest.approx(0.5e-3)  # half way down the cosine
    lrs = [face_world_lr(s, decay) for s in range(600, 1000)]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False)) and 0 < lrs[-1] < 1e-7


@pytest.mark.needs_shared("faces", "taef2")
def test_train_face_world_smoke_exports_a_pipeline_and_resumes(small_corpus, taef2_dir, tmp_path):
    from hypernet.base import load_pipeline
    from hypernet.face_world import FaceWorldTrainer

    out = tmp_path / "world"
    common = ["--corpus", str(small_corpus), "--batch-size", "2", "--holdout", "1", "--width", "32",
              "--export-every", "2", "--grid-samples", "1", "--detect-samples", "2", "--threads", "1",
              "--taef2", str(taef2_dir)]
    args = ["base", "train-face-world", "--out", str(out), *common]
    assert main([*args, "--steps", "2"]) == 0
    split = IdentitySplit.load(out / "split.json")
    assert len(split.holdout) == 1 and len(split.train) == 2
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"] == ["hypernet.base.taef2", "TAEF2"]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert (out / "samples" / "step000002.png").is_file()
    info = json.loads((out / "face_world.json").read_text())
    assert info["detections"] == [{"step": 2, "detected": info["detections"][0]["detected"], "samples": 2,
                                   "seeds": "1000..1001"}]  # not the grid's sample: other seeds, more of them
    assert info["unet_parameters"] > 0
    ema = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert ema["conv_in.weight"].shape[1] == 32  # 32-channel TAEF2 latents

    pipe = load_pipeline(out, device="cpu", dtype="fp32")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.in_channels == 32 and pipe.vae_scale_factor == 8

    # an existing checkpoint is never silently overwritten; --resume continues counting
    assert main([*args, "--steps", "3"]) == 2
    assert main([*args, "--steps", "3", "--resume"]) == 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3
    # the record keeps the detection rate of the export the checkpoint was taken at (it used to be lost)
    assert [d["step"] for d in json.loads((out / "face_world.json").read_text())["detections"]] == [2, 3]
    # ... and resumes exactly: weights, EMA and optimizer equal those of 3 uninterrupted steps
    straight = tmp_path / "straight"
    assert main(["base", "train-face-world", "--out", str(straight), *common, "--steps", "3"]) == 0
    for name in ("unet.safetensors", "ema.safetensors"):
        a, b = load_file(str(out / "checkpoint" / name)), load_file(str(straight / "checkpoint" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after --resume"
    opt_a, opt_b = (torch.load(d / "checkpoint" / "optim.pt", weights_only=False)["opt"]["state"]
                    for d in (out, straight))
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    # training used only the training identities' photos: 6 photos x 1 margin... x2 flips
    trainer = FaceWorldTrainer(small_corpus, out, FaceWorldConfig(width=32, margins=(0.5, 0.4, 0.6)), taef2_dir)
    trainer._setup_split()
    corpus = read_manifest(small_corpus)
    assert set(trainer.files) == set(corpus.files(split.train))
    assert set(trainer.files).isdisjoint(corpus.files(split.holdout))
