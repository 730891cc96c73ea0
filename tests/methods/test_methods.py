"""The four methods, trained on synthetic photos (so a clone without ../shared trains every one,
DreamBooth included): loss falls, artifacts round-trip, diffusers' own loaders reproduce the
trained model's output, training resumes exactly, and removing an artifact restores the base.
The same training on real face photos runs as extras marked `needs_shared`."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hypernet.generate import generate
from hypernet.methods import get_method, load_artifact
from hypernet.training import TrainingCancelled, diffusion_loss, encode_images, make_noise_scheduler

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
    """The base weights by their plain names. An idle `AdaptedLinear` wrapper (no adapter in it)
    computes exactly what the bare Linear does; a training run may leave or unwrap such idle
    wrappers that earlier tests on the shared pipeline left, so `.base_layer` is not compared."""
    sd = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    sd.update({f"text_encoder.{k}": v for k, v in pipe.text_encoder.state_dict().items()})
    return {k.replace(".base_layer.", "."): v for k, v in sd.items()}


def _eval_mode_image(pipe) -> np.ndarray:
    """The pipeline's image as it stands (called mid-training: models briefly in eval mode)."""
    modes = [(m, m.training) for m in (pipe.unet, pipe.text_encoder)]
    for m, _ in modes:
        m.eval()
    try:
        return _image(pipe)
    finally:
        for m, was in modes:
            m.train(was)


def _train(name: str, pipe, pixels, **config):
    """(artifact, image of the trained model itself): the image is generated inside the last
    progress event, while the method's own trained modules (peft LoRA, the TI embedding, the
    LiDB adapter) are live in the pipeline, before any export or save. DreamBooth trains copies of
    the UNet outside the pipeline: its own image is the artifact's modules swapped in."""
    own: dict[str, np.ndarray] = {}

    def progress(ev) -> None:
        if ev.loss is not None and ev.step == ev.total and name != "dreambooth":
            own["image"] = _eval_mode_image(pipe)

    artifact = get_method(name).train(pipe, pixels, config=_config(name, **config), progress=progress)
    return artifact, own["image"] if name != "dreambooth" else _image(pipe, artifact)


@pytest.fixture(scope="module", params=list(SETTINGS))
def trained(request, shared_pipe, synthetic_pixels):
    name = request.param
    before = {k: v.clone() for k, v in _models_state(shared_pipe).items()}
    artifact, own_image = _train(name, shared_pipe, synthetic_pixels)
    return name, artifact, before, own_image


def _check_lowers_the_loss_and_leaves_the_pipeline_unchanged(name, artifact, before, pipe, pixels) -> None:
    assert artifact.kind == name
    after = _models_state(pipe)
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    te = pipe.text_encoder
    assert len(pipe.tokenizer) == te.config.vocab_size == te.get_input_embeddings().weight.shape[0] == 49408
    assert not getattr(pipe.unet, "peft_config", None)
    base_loss = _eval_loss(pipe, pixels)
    artifact.apply(pipe)
    try:
        tuned_loss = _eval_loss(pipe, pixels)
    finally:
        artifact.remove(pipe)
    assert tuned_loss < base_loss, f"{name}: loss {base_loss:.4f} -> {tuned_loss:.4f}"
    if name == "textual-inversion":  # the token alone changes the prompt: beat the untrained init too
        from hypernet.methods.textual_inversion import TIArtifact
        from hypernet.methods.textual_inversion.method import _class_init

        untrained = TIArtifact(artifact.token, _class_init(pipe, "person", 1))
        untrained.apply(pipe)
        try:
            assert tuned_loss < _eval_loss(pipe, pixels)
        finally:
            untrained.remove(pipe)


def test_training_lowers_the_loss_and_leaves_the_pipeline_unchanged(trained, shared_pipe, synthetic_pixels):
    name, artifact, before, _ = trained
    _check_lowers_the_loss_and_leaves_the_pipeline_unchanged(name, artifact, before, shared_pipe, synthetic_pixels)


@pytest.mark.needs_shared
@pytest.mark.parametrize("name", list(SETTINGS))
def test_training_on_real_face_photos_lowers_the_loss(name, shared_pipe, real_pixels):
    """The extra: the same training on four real photos of one person (MTCNN crops)."""
    before = {k: v.clone() for k, v in _models_state(shared_pipe).items()}
    artifact = get_method(name).train(shared_pipe, real_pixels, config=_config(name))
    _check_lowers_the_loss_and_leaves_the_pipeline_unchanged(name, artifact, before, shared_pipe, real_pixels)


def test_round_trip_changes_the_image_and_removal_restores_it(trained, shared_pipe, tmp_path):
    name, artifact, _, _ = trained
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


def test_stock_loaders_reproduce_the_trained_model(trained, shared_pipe, tiny_pipe, tmp_path):
    """The saved file, read by diffusers' own loaders into a fresh pipeline (LoRA, TI; DreamBooth
    as a plain `StableDiffusionPipeline.from_pretrained` folder), gives the image the trained model
    itself gave before anything was exported or saved. LiDB has no stock loader: `load_lidb`."""
    name, artifact, _, own_image = trained
    path = tmp_path / f"artifact{SUFFIX.get(name, '.safetensors')}"
    artifact.save(path)
    if name == "lora":
        tiny_pipe.load_lora_weights(str(path))
        got = _image(tiny_pipe)
    elif name == "textual-inversion":
        tiny_pipe.load_textual_inversion(str(path))
        got = _image(tiny_pipe)
    elif name == "dreambooth":
        from diffusers import StableDiffusionPipeline

        stock = StableDiffusionPipeline.from_pretrained(
            str(path), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            local_files_only=True)
        got = _image(stock)
    else:
        from hypernet.adapters import LiDB, load_lidb

        f = load_lidb(path)
        LiDB(tiny_pipe, f.spec).load_state_dict(f.weights)
        got = _image(tiny_pipe)
    assert np.abs(got - _image(shared_pipe)).max() > 0, f"{name}: the loaded artifact changed nothing"
    assert np.abs(got - own_image).max() <= 1, f"{name}: stock-loaded output differs from the trained model's"


def test_variants_text_encoder_lora_and_multi_vector_ti(shared_pipe, synthetic_pixels, tmp_path):
    base = _image(shared_pipe)
    lora = get_method("lora").train(
        shared_pipe, synthetic_pixels[:2], config=_config("lora", rank=2, train_text_encoder=True, steps=2)
    )
    assert any(k.startswith("text_encoder.") for k in lora.tensors)
    ti = get_method("textual-inversion").train(
        shared_pipe, synthetic_pixels[:2], token="sks", config=_config("textual-inversion", num_vectors=2, steps=2)
    )
    assert ti.vectors.shape == (2, 32) and ti.tokens == ["sks", "sks_1"]
    for art, prompt in ((lora, PROMPT), (ti, "a photo of sks person")):
        path = tmp_path / f"{art.kind}.safetensors"
        art.save(path)
        loaded = load_artifact(path)
        assert np.abs(_image(shared_pipe, loaded, prompt) - _image(shared_pipe, None, prompt)).max() > 0
    assert np.array_equal(_image(shared_pipe), base)
    assert not getattr(shared_pipe.text_encoder, "peft_config", None)


def test_textual_inversion_resume_equals_uninterrupted(shared_pipe, synthetic_pixels, tmp_path):
    cfg = _config("textual-inversion", steps=4)
    ref = get_method("textual-inversion").train(shared_pipe, synthetic_pixels, config=cfg)
    polls = iter(range(100))
    with pytest.raises(TrainingCancelled):
        get_method("textual-inversion").train(
            shared_pipe, synthetic_pixels, config=cfg, checkpoint_dir=tmp_path, should_stop=lambda: next(polls) >= 2
        )
    assert len(shared_pipe.tokenizer) == 49408  # the cancelled run cleaned up its token
    resumed = get_method("textual-inversion").train(shared_pipe, synthetic_pixels, config=cfg, checkpoint_dir=tmp_path)
    assert torch.equal(ref.vectors, resumed.vectors)


def _cancel_after_two_steps(name, pipe, pixels, cfg, ckpt_dir) -> dict:
    """Train `name` with checkpoints in `ckpt_dir`, cancelled before step 3; the checkpoint."""
    polls = iter(range(100))
    with pytest.raises(TrainingCancelled):
        get_method(name).train(pipe, pixels, config=cfg, checkpoint_dir=ckpt_dir, should_stop=lambda: next(polls) >= 2)
    state = torch.load(ckpt_dir / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    opt = state["optimizer"]["state"]  # AdamW moments of every trained tensor, after 2 steps
    assert len(opt) == len(state["params"]) and all(int(v["step"]) == 2 and v["exp_avg"].abs().sum() > 0
                                                     for v in opt.values())
    return state


def test_lora_resume_restores_peft_parameters_and_optimizer_state(shared_pipe, synthetic_pixels, tmp_path):
    """Uninterrupted 4 steps == 2 steps, cancel, resume 2: the checkpoint holds the peft LoRA
    tensors as they were after step 2, and AdamW's moments (without them the resumed updates
    differ, and so do the final tensors)."""
    cfg = _config("lora", steps=4)
    at_step_2: list[torch.Tensor] = []

    def progress(ev) -> None:
        if ev.step == 2 and ev.loss is not None:
            at_step_2.extend(p.detach().clone() for n, p in shared_pipe.unet.named_parameters() if "lora_" in n)

    ref = get_method("lora").train(shared_pipe, synthetic_pixels, config=cfg, progress=progress)
    state = _cancel_after_two_steps("lora", shared_pipe, synthetic_pixels, cfg, tmp_path)
    assert len(state["params"]) == len(at_step_2) > 0
    assert all(torch.equal(a, b) for a, b in zip(state["params"], at_step_2, strict=True))
    assert not getattr(shared_pipe.unet, "peft_config", None)  # the cancelled run removed its adapter
    resumed = get_method("lora").train(shared_pipe, synthetic_pixels, config=cfg, checkpoint_dir=tmp_path)
    assert ref.tensors.keys() == resumed.tensors.keys()
    assert all(torch.equal(ref.tensors[k], resumed.tensors[k]) for k in ref.tensors)
    assert not (tmp_path / "checkpoint.pt").exists()  # a finished run removes its checkpoint


def test_dreambooth_resume_equals_uninterrupted(shared_pipe, synthetic_pixels, tmp_path):
    cfg = _config("dreambooth", steps=4)
    ref = get_method("dreambooth").train(shared_pipe, synthetic_pixels, config=cfg)
    _cancel_after_two_steps("dreambooth", shared_pipe, synthetic_pixels, cfg, tmp_path)
    resumed = get_method("dreambooth").train(shared_pipe, synthetic_pixels, config=cfg, checkpoint_dir=tmp_path)
    a, b = ref.unet.state_dict(), resumed.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in shared_pipe.unet.state_dict().items())  # it trained


def test_dreambooth_class_images_are_generated_once_and_cached(shared_pipe):
    from hypernet.methods.dreambooth.prior import class_images, class_images_dir

    first = class_images(shared_pipe, "a photo of dog", 2, 64, 2)
    folder = class_images_dir(shared_pipe, "a photo of dog", 64, 2)
    stamps = {f: f.stat().st_mtime_ns for f in folder.iterdir()}
    again = class_images(shared_pipe, "a photo of dog", 2, 64, 2)
    assert torch.equal(first, again) and first.shape == (2, 3, 64, 64)
    assert {f: f.stat().st_mtime_ns for f in folder.iterdir()} == stamps
