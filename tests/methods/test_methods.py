"""The four methods on real photos: loss falls, artifacts round-trip (through diffusers' own
loaders where stated), change the image, and removing them restores the base output exactly."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hypernet.generate import generate
from hypernet.methods import get_method, load_artifact
from hypernet.training import TrainingCancelled, diffusion_loss, encode_images, make_noise_scheduler

pytestmark = pytest.mark.needs_shared

PROMPT = "a photo of ohwx person"
#: Few steps at a high LR: enough to fit the tiny base measurably (tests run 2-20 steps).
SETTINGS = {
    "lidb": dict(steps=12, lr=2e-2),
    "lora": dict(steps=12, lr=1e-2),
    "textual-inversion": dict(steps=12, lr=5e-2),
    "dreambooth": dict(steps=12, lr=1e-3, extra=dict(num_class_images=2, class_image_steps=2)),
}
SUFFIX = {"dreambooth": ""}


def _config(name: str, **extra):
    s = SETTINGS[name]
    cls = get_method(name).config_cls
    cfg = cls(**{"steps": s["steps"], "lr": s["lr"], **s.get("extra", {}), **extra})
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=2, log_every=0))


def _image(pipe, artifact=None, prompt=PROMPT) -> np.ndarray:
    return np.asarray(generate(pipe, prompt, artifact=artifact, steps=4, seed=7)[0]).astype(np.int16)


@torch.no_grad()
def _eval_loss(pipe, pixels, prompt=PROMPT) -> float:
    """Diffusion loss on the photos with fixed noise/timesteps: comparable before and after."""
    lat = encode_images(pipe, pixels)  # (N, 4, 8, 8)
    emb = pipe.encode_prompt(prompt, "cpu", 1, False)[0].expand(len(lat), -1, -1)
    g = torch.Generator().manual_seed(0)
    losses = [diffusion_loss(pipe.unet, make_noise_scheduler(pipe), lat, emb, g) for _ in range(8)]
    return float(torch.stack(losses).mean())


def _models_state(pipe) -> dict[str, torch.Tensor]:
    sd = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    sd.update({f"text_encoder.{k}": v for k, v in pipe.text_encoder.state_dict().items()})
    return sd


@pytest.fixture(scope="module", params=list(SETTINGS))
def trained(request, shared_pipe, identity_pixels):
    name = request.param
    before = {k: v.clone() for k, v in _models_state(shared_pipe).items()}
    artifact = get_method(name).train(shared_pipe, identity_pixels, config=_config(name))
    return name, artifact, before


def test_training_lowers_the_loss_and_leaves_the_pipeline_unchanged(trained, shared_pipe, identity_pixels):
    name, artifact, before = trained
    assert artifact.kind == name
    after = _models_state(shared_pipe)
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    te = shared_pipe.text_encoder
    assert len(shared_pipe.tokenizer) == te.config.vocab_size == te.get_input_embeddings().weight.shape[0] == 49408
    assert not getattr(shared_pipe.unet, "peft_config", None)
    base_loss = _eval_loss(shared_pipe, identity_pixels)
    artifact.apply(shared_pipe)
    try:
        tuned_loss = _eval_loss(shared_pipe, identity_pixels)
    finally:
        artifact.remove(shared_pipe)
    assert tuned_loss < base_loss, f"{name}: loss {base_loss:.4f} -> {tuned_loss:.4f}"
    if name == "textual-inversion":  # the token alone changes the prompt: beat the untrained init too
        from hypernet.methods.textual_inversion import TIArtifact
        from hypernet.methods.textual_inversion.method import _class_init

        untrained = TIArtifact(artifact.token, _class_init(shared_pipe, "person", 1))
        untrained.apply(shared_pipe)
        try:
            assert tuned_loss < _eval_loss(shared_pipe, identity_pixels)
        finally:
            untrained.remove(shared_pipe)


def test_round_trip_changes_the_image_and_removal_restores_it(trained, shared_pipe, tmp_path):
    name, artifact, _ = trained
    base = _image(shared_pipe)
    path = tmp_path / f"artifact{SUFFIX.get(name, '.safetensors')}"
    size = artifact.save(path)
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    assert size == on_disk > 0
    loaded = load_artifact(path)
    assert type(loaded) is type(artifact) and loaded.kind == name
    in_memory = _image(shared_pipe, artifact)
    from_disk = _image(shared_pipe, loaded)
    assert np.array_equal(in_memory, from_disk)
    assert np.abs(in_memory - base).max() > 0, f"{name} did not change the image"
    assert np.array_equal(_image(shared_pipe), base), f"removing {name} did not restore the base"


def test_stock_loaders_read_the_artifact(trained, shared_pipe, tiny_pipe, tmp_path):
    """LoRA / TI through diffusers' loaders, DreamBooth as a plain pipeline, LiDB via load_lidb."""
    name, artifact, _ = trained
    path = tmp_path / f"artifact{SUFFIX.get(name, '.safetensors')}"
    artifact.save(path)
    want = _image(shared_pipe, artifact)
    if name == "lora":
        tiny_pipe.load_lora_weights(str(path))
        got = _image(tiny_pipe)
    elif name == "textual-inversion":
        tiny_pipe.load_textual_inversion(str(path))
        got = _image(tiny_pipe)
    elif name == "dreambooth":
        from hypernet.base import load_pipeline

        got = _image(load_pipeline(path, device="cpu", dtype="fp32"))
    else:
        from hypernet.adapters import LiDB, load_lidb

        f = load_lidb(path)
        LiDB(tiny_pipe, f.spec).load_state_dict(f.weights)
        got = _image(tiny_pipe)
    assert np.array_equal(got, want)


def test_variants_text_encoder_lora_and_multi_vector_ti(shared_pipe, identity_pixels, tmp_path):
    base = _image(shared_pipe)
    lora = get_method("lora").train(
        shared_pipe, identity_pixels[:2], config=_config("lora", rank=2, train_text_encoder=True, steps=2)
    )
    assert any(k.startswith("text_encoder.") for k in lora.tensors)
    ti = get_method("textual-inversion").train(
        shared_pipe, identity_pixels[:2], token="sks", config=_config("textual-inversion", num_vectors=2, steps=2)
    )
    assert ti.vectors.shape == (2, 32) and ti.tokens == ["sks", "sks_1"]
    for art, prompt in ((lora, PROMPT), (ti, "a photo of sks person")):
        path = tmp_path / f"{art.kind}.safetensors"
        art.save(path)
        loaded = load_artifact(path)
        assert np.abs(_image(shared_pipe, loaded, prompt) - _image(shared_pipe, None, prompt)).max() > 0
    assert np.array_equal(_image(shared_pipe), base)
    assert not getattr(shared_pipe.text_encoder, "peft_config", None)


def test_textual_inversion_resume_equals_uninterrupted(shared_pipe, identity_pixels, tmp_path):
    cfg = _config("textual-inversion", steps=4)
    ref = get_method("textual-inversion").train(shared_pipe, identity_pixels, config=cfg)
    polls = iter(range(100))
    with pytest.raises(TrainingCancelled):
        get_method("textual-inversion").train(
            shared_pipe, identity_pixels, config=cfg, checkpoint_dir=tmp_path, should_stop=lambda: next(polls) >= 2
        )
    assert len(shared_pipe.tokenizer) == 49408  # the cancelled run cleaned up its token
    resumed = get_method("textual-inversion").train(shared_pipe, identity_pixels, config=cfg, checkpoint_dir=tmp_path)
    assert torch.equal(ref.vectors, resumed.vectors)


def test_dreambooth_class_images_are_generated_once_and_cached(shared_pipe):
    from hypernet.methods.dreambooth.prior import class_images, class_images_dir

    first = class_images(shared_pipe, "a photo of dog", 2, 64, 2)
    folder = class_images_dir(shared_pipe, "a photo of dog", 64, 2)
    stamps = {f: f.stat().st_mtime_ns for f in folder.iterdir()}
    again = class_images(shared_pipe, "a photo of dog", 2, 64, 2)
    assert torch.equal(first, again) and first.shape == (2, 3, 64, 64)
    assert {f: f.stat().st_mtime_ns for f in folder.iterdir()} == stamps
