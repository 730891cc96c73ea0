"""The fast fine-tune's identity term (`PersonalizeConfig.identity_weight`): the face encoder's
1 - cos between the decoded one-step estimate and the input photos, added to the one training
loop's loss; through the library, `hdb personalize --identity-weight` and `hdb eval --override`."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from hypernet.errors import InvalidInputError
from hypernet.personalize import PersonalizeConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_term_is_seeded_by_step_depends_on_the_adapter_and_carries_gradients(tiny_pipe, make_identity,
                                                                                 face_encoder_file, photo_bytes):
    from hypernet.photos import preprocess
    from hypernet.training import build_train_data
    from hypernet.training.identity_loss import photo_identity_term

    img = Image.open(io.BytesIO(photo_bytes())).convert("RGB")
    pixels = preprocess(img, 64, detector="center")[None]  # (1, 3, 64, 64)
    data = build_train_data(tiny_pipe, pixels, "a photo of ohwx person")
    term = photo_identity_term(tiny_pipe, pixels, data, weight=2.0, seed=0)
    with torch.no_grad():
        a, again, other = term(3).item(), term(3).item(), term(4).item()
    assert a == again and a != other  # its draws are a function of (seed, step)
    assert 0 <= a <= 4  # weight x (1 - cos)
    ident = make_identity(tiny_pipe, 1, scale=1.0)
    ident.apply(tiny_pipe)
    try:
        with torch.no_grad():
            adapted = term(3).item()
    finally:
        ident.remove(tiny_pipe)
    assert adapted != pytest.approx(a, abs=1e-6)  # it scores what the adapted model makes
    w = tiny_pipe.unet.conv_out.weight
    w.requires_grad_(True)
    try:
        (g,) = torch.autograd.grad(term(3), [w])
    finally:
        w.requires_grad_(False)
    assert g.abs().sum() > 0
    with pytest.raises(InvalidInputError, match=r"`weight` must be > 0, got 0"):
        photo_identity_term(tiny_pipe, pixels, data, weight=0, seed=0)


def test_other_photos_move_only_the_target(tiny_pipe, face_encoder_file, photo_bytes):
    """`others` (photos the fine-tune leaves out, `finetune_photos`) join the target embedding: the
    same photo again leaves the term as it was, another person's photo changes it."""
    from hypernet.photos import preprocess
    from hypernet.training import build_train_data
    from hypernet.training.identity_loss import photo_identity_term

    def pix(i):
        return preprocess(Image.open(io.BytesIO(photo_bytes(i))).convert("RGB"), 64, detector="center")[None]

    pixels = pix(0)  # (1, 3, 64, 64)
    data = build_train_data(tiny_pipe, pixels, "a photo of ohwx person")
    with torch.no_grad():
        alone = photo_identity_term(tiny_pipe, pixels, data, weight=1.0, seed=0)(2).item()
        same = photo_identity_term(tiny_pipe, pixels, data, weight=1.0, seed=0, others=pix(0))(2).item()
        other = photo_identity_term(tiny_pipe, pixels, data, weight=1.0, seed=0, others=pix(2))(2).item()
    assert same == pytest.approx(alone, abs=1e-5)
    assert other != pytest.approx(alone, abs=1e-4)
    with pytest.raises(InvalidInputError, match=r"`others` must have shape \(K, 3, H, W\), got \(3, 64, 64\)"):
        photo_identity_term(tiny_pipe, pixels, data, weight=1.0, seed=0, others=pix(2)[0])


@pytest.mark.parametrize("value", [-1, 101, True, "1"])
def test_bad_identity_weight_is_named(value):
    with pytest.raises(InvalidInputError, match=r"`identity_weight` must be a number in \[0, 100\]"):
        PersonalizeConfig(identity_weight=value)


def test_cli_identity_weight_changes_what_the_fine_tune_learns(tiny_base_dir, tiny_hypernet, tmp_path, capsys,
                                                               face_encoder_file, photo_bytes):
    from hdb.cli import main
    from hypernet.identity import Identity

    photo = tmp_path / "me.jpg"
    photo.write_bytes(photo_bytes(2))
    common = [str(photo), "--base", str(tiny_base_dir), "--hypernet", str(tiny_hypernet), "--steps", "3",
              "--detector", "center", "--device", "cpu"]
    got = {}
    for name, extra in (("off", []), ("on", ["--identity-weight", "5"])):
        assert main(["personalize", *common, "--out", str(tmp_path / f"{name}.safetensors"), *extra]) == 0
        got[name] = Identity.load(tmp_path / f"{name}.safetensors").lidb
    assert any(not torch.allclose(got["off"][k], got["on"][k]) for k in got["off"])
    capsys.readouterr()
    assert main(["personalize", *common, "--out", str(tmp_path / "bad.safetensors"), "--identity-weight", "-1"]) != 0
    assert "`identity_weight` must be a number in [0, 100], got -1.0" in capsys.readouterr().err


def test_eval_cells_key_the_identity_weight_only_when_on():
    """Cells computed before the term existed keep their key; with it on they are recomputed."""
    from hypernet.eval.conditions import finetune_of

    plain = finetune_of("fast-finetune")
    assert "identity_weight" not in plain
    assert finetune_of("fast-finetune", {"identity_weight": 0}) == plain
    on = finetune_of("hyperdreambooth", {"identity_weight": 1})
    assert on["identity_weight"] == 1.0 and on != finetune_of("hyperdreambooth")
