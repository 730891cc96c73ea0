"""`personalize`: photo -> hypernetwork -> rank-relaxed fast fine-tune -> Identity."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hypernet.adapters.inject import adapted_layers
from hypernet.batch_generate import GenRequest, generate_batch
from hypernet.errors import Cancelled, ImageDecodeError, InvalidInputError
from hypernet.hypernetwork.runtime import HypernetRuntime
from hypernet.personalize import PersonalizeConfig, personalize
from hypernet.photos import preprocess


def _photo_bytes(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (90, 80, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def _clean(pipe) -> bool:
    return all(not layer.adapters for layer in adapted_layers(pipe).values())


def test_personalize_builds_identity_and_leaves_pipe_clean(tiny_pipe, tiny_hypernet):
    """relax="lora": the prediction stays frozen and a rank-3 LoRA trains beside it (the default,
    relax="subspace", trains the LiDB core itself: tests/personalize/test_subspace_relax.py)."""
    events = []
    ident = personalize(tiny_pipe, _photo_bytes(), hypernet=tiny_hypernet, steps=6, rank=3, detector="center",
                        progress=events.append, relax="lora")
    assert _clean(tiny_pipe)
    assert ident.method == "hyperdreambooth" and ident.relaxed_rank == 3
    assert set(ident.timings) == {"decode", "preprocess", "hypernetwork", "finetune"}
    stages = [e.stage for e in events]
    assert stages[0] == "preprocess" and "hypernetwork" in stages and stages[-1] == "done"
    assert [e.step for e in events if e.stage == "finetune"][-1] == 6
    assert any(v.abs().sum() > 0 for k, v in ident.relaxed.items() if k.endswith(".B"))  # it trained

    # the LiDB part is exactly the hypernetwork's prediction on the preprocessed photo
    rt = HypernetRuntime.load(tiny_hypernet)
    img = Image.open(io.BytesIO(_photo_bytes())).convert("RGB")
    pred = rt.predict(preprocess(img, 64, detector="center")[None])
    for k in ("A_train", "B_train"):
        torch.testing.assert_close(ident.lidb[k], pred[k][0], atol=1e-6, rtol=1e-5)


def test_steps_zero_is_hypernetwork_only_and_changes_images(tiny_pipe, tiny_hypernet):
    ident = personalize(tiny_pipe, _photo_bytes(1), hypernet=tiny_hypernet, steps=0, detector="center")
    assert ident.method == "hypernetwork" and ident.relaxed == {}
    base = generate_batch(tiny_pipe, [GenRequest("a photo of ohwx person", None, steps=3)])[0][0]
    mine = generate_batch(tiny_pipe, [GenRequest("a photo of ohwx person", ident, steps=3)])[0][0]
    assert np.abs(np.asarray(base, dtype=int) - np.asarray(mine, dtype=int)).max() > 0


def test_prediction_scale_multiplies_the_predicted_delta(tiny_pipe, tiny_hypernet):
    """`prediction_scale` s: the hypernetwork-only identity's delta_W (B_train @ A_train per layer)
    is s times the plain prediction's, with both factors scaled alike (sqrt(s) each)."""
    plain = personalize(tiny_pipe, _photo_bytes(2), hypernet=tiny_hypernet, steps=0, detector="center")
    scaled = personalize(tiny_pipe, _photo_bytes(2), hypernet=tiny_hypernet, steps=0, detector="center",
                         prediction_scale=4.0)
    delta = {name: i.lidb["B_train"] @ i.lidb["A_train"] for name, i in (("plain", plain), ("scaled", scaled))}
    assert delta["plain"].abs().max() > 0
    torch.testing.assert_close(delta["scaled"], 4.0 * delta["plain"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scaled.lidb["A_train"], 2.0 * plain.lidb["A_train"], rtol=1e-5, atol=1e-7)
    assert _clean(tiny_pipe)
    for bad in (-1, 101, "2", float("nan")):
        with pytest.raises(InvalidInputError, match="`prediction_scale`"):
            PersonalizeConfig(prediction_scale=bad)


def test_the_hypernetwork_files_own_prediction_scale_is_the_default(tmp_path, tiny_pipe, tiny_hypernet):
    """A hypernetwork exported with prediction_scale 4 predicts 4x the delta by default; an
    explicit `prediction_scale` wins over the file's."""
    from hypernet.hypernetwork.export import load_hypernet, read_info, save_hypernet
    from hypernet.personalize import load_runtime

    src = next(Path(tiny_hypernet).glob("*.safetensors")) if Path(tiny_hypernet).is_dir() else Path(tiny_hypernet)
    model, info = load_hypernet(src)
    assert info.prediction_scale == 1.0
    info.prediction_scale = 4.0
    save_hypernet(tmp_path / "hypernet.safetensors", model, info)
    assert read_info(tmp_path / "hypernet.safetensors").prediction_scale == 4.0

    def delta(hypernet, **kw):
        i = personalize(tiny_pipe, _photo_bytes(3), hypernet=hypernet, steps=0, detector="center", **kw)
        return i.lidb["B_train"] @ i.lidb["A_train"]

    plain = delta(load_runtime(str(src), backend="torch"))
    scaled = load_runtime(str(tmp_path / "hypernet.safetensors"), backend="torch")
    torch.testing.assert_close(delta(scaled), 4.0 * plain, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(delta(scaled, prediction_scale=1.0), plain, rtol=1e-5, atol=1e-7)


def test_cancellation_stops_and_keeps_nothing(tiny_pipe, tiny_hypernet):
    seen = []

    def stop():
        seen.append(1)
        return len(seen) > 3

    with pytest.raises(Cancelled):
        personalize(tiny_pipe, _photo_bytes(), hypernet=tiny_hypernet, steps=50, detector="center", should_stop=stop)
    assert _clean(tiny_pipe)
    assert len(seen) < 10  # stopped at the next step, not after 50


def test_bad_inputs_are_clear_errors(tiny_pipe, tiny_hypernet):
    with pytest.raises(ImageDecodeError):
        personalize(tiny_pipe, b"definitely not an image", hypernet=tiny_hypernet)
    with pytest.raises(InvalidInputError, match="`rank`"):
        PersonalizeConfig(rank=0)
    with pytest.raises(InvalidInputError, match="`steps`"):
        personalize(tiny_pipe, _photo_bytes(), hypernet=tiny_hypernet, steps=-1)
    with pytest.raises(InvalidInputError, match="`hypernet` must be"):  # the library builds no default
        personalize(tiny_pipe, _photo_bytes(), hypernet=None, detector="center")
    assert _clean(tiny_pipe)


@pytest.fixture(scope="session")
def default_hypernet():
    """The embedded tiny-cpu hypernetwork (built once per session: the pretraining pipeline)."""
    from hdb.defaults import default_hypernet_path

    return default_hypernet_path()


@pytest.mark.needs_shared
def test_prediction_start_beats_zero_start(faces_dir, default_hypernet):
    """The reason the method exists: 40 steps from the prediction reach a lower loss on the photo
    than the same 40 steps of the same LoRA from zero (paired: identical noise and timesteps)."""
    from hypernet.base import load_pipeline
    from hypernet.defaults import default_base_dir
    from hypernet.personalize import PersonalizeConfig
    from hypernet.training import build_train_data
    from hypernet.training.eval_loss import paired_diffusion_loss

    pipe = load_pipeline(default_base_dir(), device="cpu")
    photo = (faces_dir / "image_0301.jpg").read_bytes()
    losses = {}
    for init in ("hypernetwork", "zero"):
        cfg = PersonalizeConfig(steps=40, init=init)
        ident = personalize(pipe, photo, hypernet=default_hypernet, config=cfg)
        assert ident.method == ("hyperdreambooth" if init == "hypernetwork" else "finetune-only")
        pixels = preprocess(Image.open(io.BytesIO(photo)).convert("RGB"), 64)[None]
        data = build_train_data(pipe, pixels, cfg.prompt, flip=False)
        ident.apply(pipe)
        losses[init] = paired_diffusion_loss(pipe, data.latents, data.text_emb, draws=64)
        ident.remove(pipe)
    assert losses["hypernetwork"] < losses["zero"], losses


def test_cli_prediction_scale_flag(tiny_base_dir, tiny_hypernet, tmp_path, capsys):
    """`hdb personalize --prediction-scale 4 --steps 0` saves 4x the plain prediction's delta;
    an out-of-range value exits non-zero and says what is wrong."""
    from hdb.cli import main
    from hypernet.identity import Identity

    photo = tmp_path / "me.jpg"
    photo.write_bytes(_photo_bytes(4))
    common = [str(photo), "--base", str(tiny_base_dir), "--hypernet", str(tiny_hypernet), "--steps", "0",
              "--detector", "center", "--device", "cpu"]
    deltas = []
    for name, extra in (("plain", []), ("scaled", ["--prediction-scale", "4"])):
        assert main(["personalize", *common, "--out", str(tmp_path / f"{name}.safetensors"), *extra]) == 0
        ident = Identity.load(tmp_path / f"{name}.safetensors")
        deltas.append(ident.lidb["B_train"] @ ident.lidb["A_train"])
    torch.testing.assert_close(deltas[1], 4.0 * deltas[0], rtol=1e-5, atol=1e-7)
    capsys.readouterr()
    assert main(["personalize", *common, "--out", str(tmp_path / "bad.safetensors"), "--prediction-scale", "-2"]) != 0
    assert "`prediction_scale` must be a number in [0, 100], got -2.0" in capsys.readouterr().err
