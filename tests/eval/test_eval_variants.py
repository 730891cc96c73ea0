"""The opt-in evaluation variants: 3 input photos against 1, and the two relaxed fine-tunes."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image

from hypernet.errors import InvalidInputError
from hypernet.eval.conditions import CONDITIONS, VARIANTS, input_photos, needs_hypernet, personalise
from hypernet.hypernetwork.runtime import HypernetRuntime

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def tiny_hypernet(tiny_pipe, tmp_path):
    from tests.personalize.conftest import random_hypernet

    return random_hypernet(tiny_pipe, tmp_path / "hypernet")


@pytest.fixture()
def photo_paths(tmp_path):
    paths = []
    for i in range(3):
        rng = np.random.default_rng(i)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (90, 80, 3), dtype=np.uint8)).save(buf, format="JPEG")
        paths.append(tmp_path / f"p{i}.jpg")
        paths[-1].write_bytes(buf.getvalue())
    return paths


def test_variants_are_opt_in_hypernet_conditions():
    assert not set(VARIANTS) & set(CONDITIONS)  # the default run is unchanged
    assert all(needs_hypernet((v,)) for v in VARIANTS)
    assert input_photos("hyperdreambooth-3photos") == 3 and input_photos("hyperdreambooth") == 1


def test_three_photo_and_relax_variants_personalise_as_named(tiny_pipe, tiny_hypernet, photo_paths):
    rt = HypernetRuntime.load(tiny_hypernet)
    kw = dict(runtime=rt, detector="center")
    one = personalise(tiny_pipe, "hypernetwork", photo_paths, **kw).artifact  # a list: takes the first
    three = personalise(tiny_pipe, "hypernetwork-3photos", photo_paths, **kw).artifact
    emb = personalise(tiny_pipe, "hypernetwork-3photos-embedding", photo_paths, **kw).artifact
    assert (one.num_photos, three.num_photos, three.combine, emb.combine) == (1, 3, "weights", "embedding")
    assert (one.lidb["A_train"] - three.lidb["A_train"]).abs().max() > 1e-4
    assert three.relaxed == {} and emb.relaxed == {}  # hypernetwork only: no fine-tune

    sub = personalise(tiny_pipe, "hyperdreambooth-relax-subspace", photo_paths[0], overrides={"steps": 1}, **kw)
    lora = personalise(tiny_pipe, "hyperdreambooth-relax-lora", photo_paths[0], overrides={"steps": 1}, **kw)
    ff = personalise(tiny_pipe, "fast-finetune-relax-subspace", photo_paths[0], overrides={"steps": 1}, **kw)
    assert (sub.artifact.relax, sub.artifact.spec.r, lora.artifact.relax) == ("subspace", 4, "lora")
    assert ff.artifact.relax == "subspace" and ff.artifact.spec.r == 4
    assert (ff.artifact.lidb["B_train"].abs().amax(dim=(1, 2)) > 0).all()  # from a zero prediction, all trained
    assert 0 < sub.nbytes < lora.nbytes
    ff_lora = personalise(tiny_pipe, "fast-finetune-relax-lora", photo_paths[0], overrides={"steps": 1}, **kw)
    assert ff_lora.artifact.relax == "lora" and ff_lora.artifact.relaxed  # the LoRA beside a zero prediction
    assert all(v.abs().sum() == 0 for v in ff_lora.artifact.lidb.values())

    with pytest.raises(InvalidInputError, match="'hyperdreambooth-3photos' must be given 3 photos, got 1"):
        personalise(tiny_pipe, "hyperdreambooth-3photos", photo_paths[0], **kw)


@pytest.mark.needs_shared
def test_eval_with_a_three_photo_variant_holds_back_three_inputs(tiny_pipe, tiny_base_dir, tiny_hypernet,
                                                                 faces_dir, tmp_path):
    """Every condition is scored against the photos after the first 3, so 1 vs 3 stays paired;
    identities without a 4th photo drop out."""
    from hdb.cli import main
    from hypernet.eval.corpus import read_manifest

    corpus = read_manifest(faces_dir / "identities.csv")
    ids = corpus.identities[:3]
    take = {ids[0]: 5, ids[1]: 5, ids[2]: 3}
    lines = ["file,identity"] + [f"{p},{i}" for i in ids for p in corpus.photos[i][: take[i]]]
    (tmp_path / "faces.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval"
    argv = ["eval", "--base", str(tiny_base_dir), "--hypernet", str(tiny_hypernet), "--corpus",
            str(tmp_path / "faces.csv"), "--out", str(out), "--images-per-id", "1", "--gen-steps", "2",
            "--device", "cpu", "--threads", "1", "--detector", "center"]
    assert main([*argv, "--conditions", "hypernetwork,hypernetwork-3photos"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["identities"] == ids[:2]
    assert set(results["conditions"]) == {"hypernetwork", "hypernetwork-3photos", "real-photo"}
    for cond in ("hypernetwork", "hypernetwork-3photos"):
        assert (out / "cells" / cond / f"{ids[0]}.json").is_file()


def test_cell_keys_change_only_when_a_variant_holds_back_more_inputs(tmp_path):
    """Other references are other cells; without a 3-photo variant the keys are those of earlier runs."""
    one = _config(tmp_path, ("hypernetwork",))
    three = _config(tmp_path, ("hypernetwork", "hypernetwork-3photos"))
    relax = _config(tmp_path, ("hypernetwork", "hyperdreambooth-relax-subspace"))
    assert (one.inputs, three.inputs, relax.inputs) == (1, 3, 1)
    assert one.cell_key("hypernetwork", "m") != three.cell_key("hypernetwork", "m")
    assert one.cell_key("hypernetwork", "m") == relax.cell_key("hypernetwork", "m")
    # A run of 1-photo conditions told to hold back 3 inputs (--inputs 3) shares the 3-photo run's
    # references, so its cells are that run's cells (two processes can split the conditions).
    held = _config(tmp_path, ("hypernetwork",), held_inputs=3)
    assert held.inputs == 3 and held.cell_key("hypernetwork", "m") == three.cell_key("hypernetwork", "m")
    assert _config(tmp_path, ("hypernetwork-3photos",), held_inputs=1).inputs == 3  # never fewer than needed
    with pytest.raises(InvalidInputError, match="held_inputs"):
        _config(tmp_path, ("hypernetwork",), held_inputs=0)


def test_cell_keys_follow_the_relaxation_and_rate_the_fine_tune_runs(tmp_path, monkeypatch):
    """A cell computed under another relaxation or learning rate (a variant, an override or the old
    default) is not reused; an override naming the default learning rate is the same computation."""
    from hypernet import personalize
    from hypernet.eval.conditions import finetune_of
    from hypernet.personalize import PersonalizeConfig

    cfg = _config(tmp_path, ("hyperdreambooth", "hyperdreambooth-relax-lora", "hyperdreambooth-relax-subspace",
                             "fast-finetune", "hypernetwork"))
    d = PersonalizeConfig()
    default = {"relax": d.relax, "lr": d.lr}
    got = (finetune_of("hyperdreambooth"), finetune_of("fast-finetune"), finetune_of("hypernetwork"))
    assert got == (default, default, None)
    assert finetune_of("hyperdreambooth-mean-adapter") == default and finetune_of("mean-adapter") is None
    assert finetune_of("hyperdreambooth-relax-lora")["relax"] == "lora"
    assert finetune_of("hyperdreambooth", {"relax": "lora", "lr": 0.5}) == {"relax": "lora", "lr": 0.5}
    other = "lora" if d.relax == "subspace" else "subspace"
    key = cfg.cell_key("hyperdreambooth", "m")
    assert key == cfg.cell_key(f"hyperdreambooth-relax-{d.relax}", "m")  # the same computation
    assert key != cfg.cell_key(f"hyperdreambooth-relax-{other}", "m")
    cfg.overrides = {"hyperdreambooth": {"relax": d.relax}}  # an override naming the default relaxation: another key
    assert cfg.cell_key("hyperdreambooth", "m") != key
    cfg.overrides = {"hyperdreambooth": {"lr": d.lr}}  # naming the default rate: the same cell
    assert cfg.cell_key("hyperdreambooth", "m") == key
    cfg.overrides = {"hyperdreambooth": {"lr": d.lr / 10}}
    assert cfg.cell_key("hyperdreambooth", "m") != key
    cfg.overrides = {}
    plain = cfg.cell_key("hypernetwork", "m")  # no fine-tune: the rate is not part of it

    @dataclasses.dataclass
    class Older(PersonalizeConfig):  # another library default
        lr: float = d.lr / 10

    monkeypatch.setattr(personalize, "PersonalizeConfig", Older)
    assert cfg.cell_key("hyperdreambooth", "m") != key and cfg.cell_key("hypernetwork", "m") == plain
    # The classic methods' cells follow their own default rate the same way.
    from hypernet.methods import get_method

    lidb_lr = get_method("lidb").config_cls().train.lr
    assert finetune_of("lidb") == {"lr": lidb_lr} and finetune_of("lidb", {"lr": 0.5}) == {"lr": 0.5}
    assert finetune_of("base") is None
    assert finetune_of("dreambooth") == {"lr": get_method("dreambooth").config_cls().train.lr}
    key = cfg.cell_key("lidb", "m")
    cfg.overrides = {"lidb": {"lr": lidb_lr}}
    assert cfg.cell_key("lidb", "m") == key
    cfg.overrides = {"lidb": {"lr": lidb_lr * 3}}
    assert cfg.cell_key("lidb", "m") != key


def _config(tmp_path, conditions, **kw):
    from hypernet.eval.runner import EvalConfig

    return EvalConfig(base=tmp_path, corpus=tmp_path / "c.csv", out=tmp_path / "o", hypernet=tmp_path / "h",
                      conditions=conditions, **kw)


def test_people_caps_run_a_condition_on_the_first_n_people_only(tmp_path):
    """`--people lidb=2`: the expensive condition runs on a prefix of the same people, the others on all."""
    from hdb.eval import _people
    from hypernet.eval.runner import Evaluation

    cfg = _config(tmp_path, ("hypernetwork", "lidb"), people=_people(["lidb=2"]))
    ev = Evaluation(cfg)
    ev.eval_ids = ["caltech:1", "lfw:a", "caltech:2", "lfw:b"]
    assert ev.people_for("lidb") == ["caltech:1", "lfw:a"]
    assert ev.people_for("hypernetwork") == ev.eval_ids
    with pytest.raises(InvalidInputError, match="people"):
        _config(tmp_path, ("hypernetwork",), people={"lidb": 2})  # a condition that is not run
    with pytest.raises(InvalidInputError, match="people"):
        _config(tmp_path, ("lidb",), people={"lidb": 0})
    with pytest.raises(InvalidInputError, match="COND=N"):
        _people(["lidb"])


def _mean_adapter(hypernet_dir, out_dir):
    """The control made from `hypernet_dir`'s model: predicts seeded fixed weights for any photo."""
    import torch

    from hypernet.hypernetwork.export import load_hypernet, save_hypernet
    from hypernet.hypernetwork.model import make_constant

    model, info = load_hypernet(hypernet_dir / "hypernet.safetensors")
    c, g = model.cfg, torch.Generator().manual_seed(5)
    w = {"A_train": torch.randn(c.num_layers, c.r, c.a, generator=g) * 0.1,
         "B_train": torch.randn(c.num_layers, c.b, c.r, generator=g) * 0.1}
    out_dir.mkdir()
    save_hypernet(out_dir / "hypernet.safetensors", make_constant(model, w), info)
    return out_dir, w


def test_mean_adapter_controls_run_the_control_hypernetwork(tiny_pipe, tiny_hypernet, photo_paths, tmp_path):
    import torch

    from hypernet.eval.conditions import CONTROLS, needs_control

    assert not set(CONTROLS) & set(CONDITIONS) and needs_control(("mean-adapter",))
    assert not needs_hypernet(tuple(CONTROLS))  # the trained hypernetwork is not needed for them
    control, w = _mean_adapter(tiny_hypernet, tmp_path / "mean")
    rt = HypernetRuntime.load(control)
    a = personalise(tiny_pipe, "mean-adapter", photo_paths[0], runtime=rt, detector="center").artifact
    b = personalise(tiny_pipe, "mean-adapter", photo_paths[1], runtime=rt, detector="center").artifact
    for k, v in w.items():  # the same adapter, whatever the photo
        torch.testing.assert_close(a.lidb[k], v)
        torch.testing.assert_close(b.lidb[k], v)
    hdb = personalise(tiny_pipe, "hyperdreambooth-mean-adapter", photo_paths[0], runtime=rt, detector="center",
                      overrides={"steps": 1}).artifact
    assert hdb.relax == "subspace" and (hdb.lidb["B_train"] - w["B_train"]).abs().max() > 0  # fine-tuned from it


@pytest.mark.needs_shared
def test_eval_pairs_the_hypernetwork_with_the_mean_adapter_over_the_cli(tiny_base_dir, tiny_hypernet, faces_dir,
                                                                         tmp_path, capsys):
    from hdb.cli import main
    from hypernet.eval.corpus import read_manifest

    corpus = read_manifest(faces_dir / "identities.csv")
    ids = corpus.identities[:2]
    lines = ["file,identity"] + [f"{p},{i}" for i in ids for p in corpus.photos[i][:3]]
    (tmp_path / "faces.csv").write_text("\n".join(lines) + "\n")
    control, _ = _mean_adapter(tiny_hypernet, tmp_path / "mean")
    out = tmp_path / "eval"
    argv = ["eval", "--base", str(tiny_base_dir), "--hypernet", str(tiny_hypernet), "--corpus",
            str(tmp_path / "faces.csv"), "--out", str(out), "--images-per-id", "1", "--gen-steps", "2",
            "--device", "cpu", "--threads", "1", "--detector", "center", "--metrics", "dlib",
            "--conditions", "hypernetwork,mean-adapter"]
    assert main(argv) == 2  # no --mean-adapter
    err = capsys.readouterr().err
    assert "`mean_adapter` must be given for the mean-adapter/hyperdreambooth-mean-adapter" in err
    assert main([*argv, "--mean-adapter", str(control)]) == 0
    results = json.loads((out / "results.json").read_text())
    pairs = {(p["a"], p["b"]): p for p in results["paired"]}
    assert pairs[("hypernetwork", "mean-adapter")]["n"] == 2
    cells = {c: json.loads((out / "cells" / c / f"{ids[0]}.json").read_text())
             for c in ("hypernetwork", "mean-adapter")}
    assert cells["hypernetwork"]["key"] != cells["mean-adapter"]["key"]
    report = (out / "REPORT.md").read_text()
    assert f"control (one adapter for everyone) `{control}`" in report
    assert "| Hypernetwork only − one adapter for everyone (what it knows of the person) | 2 |" in report


def test_identity_variants_fine_tune_with_the_term_and_key_their_cells(tiny_pipe, tiny_hypernet, photo_paths,
                                                                       face_encoder_file):
    """`*-identity` runs the same fine-tune with `identity_weight=0.15`: other weights than the plain
    condition from the same photo and seed, and a cell key of its own."""
    from hypernet.eval.conditions import finetune_of

    rt = HypernetRuntime.load(tiny_hypernet)
    kw = dict(runtime=rt, detector="center", overrides={"steps": 2})
    for plain in ("hyperdreambooth", "fast-finetune"):
        variant = f"{plain}-identity"
        a = personalise(tiny_pipe, plain, photo_paths[0], **kw).artifact
        b = personalise(tiny_pipe, variant, photo_paths[0], **kw).artifact
        assert (a.lidb["A_train"] - b.lidb["A_train"]).abs().max() > 0
        assert finetune_of(variant) == {**finetune_of(plain), "identity_weight": 0.15}


def test_each_variants_and_their_one_photo_control(tiny_pipe, tiny_hypernet, photo_paths):
    """The 3-photo "each" variants fine-tune three photos; their control the first photo three times."""
    rt = HypernetRuntime.load(tiny_hypernet)
    kw = dict(runtime=rt, detector="center", overrides={"steps": 1})
    three = personalise(tiny_pipe, "hyperdreambooth-3photos-eachnorm", photo_paths, **kw).artifact
    copies = personalise(tiny_pipe, "hyperdreambooth-1photo-x3-eachnorm", photo_paths, **kw).artifact
    assert input_photos("hyperdreambooth-1photo-x3-eachnorm") == 1
    assert (three.num_photos, three.combine, three.spec.r) == (3, "each-norm", 12)
    assert (copies.num_photos, copies.combine, copies.spec.r) == (3, "each-norm", 12)
    # the fits after the first differ: other photos there, only other seeds here
    assert (three.lidb["B_train"][..., 4:] - copies.lidb["B_train"][..., 4:]).abs().max() > 1e-6
