"""Pretraining configs: shipped YAMLs load, overrides reach every nested field, typos fail loudly."""

from __future__ import annotations

import pytest

from hypernet.errors import InvalidInputError
from pretrain.cli import collect_overrides
from pretrain.config import CONFIG_DIR, load_config


@pytest.mark.parametrize("name", ["tiny-cpu", "sd15-gpu", "face-world-cpu"])
def test_shipped_configs_load(name):
    cfg = load_config(name)
    assert cfg.stage2.steps > 0 and cfg.stage1.train.steps > 0
    assert (CONFIG_DIR / f"{name}.yaml").read_text().startswith("#")  # documented header


def test_overrides_reach_nested_dataclasses_and_parse_as_yaml():
    cfg = load_config("tiny-cpu", [
        "stage2.steps=7", "stage2.model.iterations=2", "stage1.train.lr=1e-4",
        "stage2.model.encoder_kwargs={patch_size: 16, depth: 1}", "data.max_identities=null",
        'data.corpus=["skimage:lfw_subset"]',
    ])
    assert cfg.stage2.steps == 7 and cfg.stage2.model.iterations == 2
    assert cfg.stage1.train.lr == 1e-4
    assert cfg.stage2.model.encoder_kwargs == {"patch_size": 16, "depth": 1}
    assert cfg.data.max_identities is None and cfg.data.corpus == ["skimage:lfw_subset"]


@pytest.mark.parametrize("override, match", [
    ("stage2.stepz=3", "unknown"),
    ("stage2.steps=0", "positive"),
    ("stage2.model.dim=30", "divisible"),
    ("stage1.train.lr_scheduler=wild", "lr_scheduler"),
    ("no-equals-sign", "section.key=value"),
    ("data.val_fraction=1.5", "val_fraction"),
    ("stage1.identities_per_call=0", "identities_per_call"),
])
def test_bad_values_are_rejected_with_the_key(override, match):
    with pytest.raises(InvalidInputError, match=match):
        load_config("tiny-cpu", [override])


def test_toml_config_and_missing_file(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('[stage2]\nsteps = 3\n[stage2.model]\ndepth = 1\n')
    cfg = load_config(p)
    assert cfg.stage2.steps == 3 and cfg.stage2.model.depth == 1
    with pytest.raises(InvalidInputError, match="tiny-cpu"):
        load_config(tmp_path / "nope.yaml")


def test_hdb_pretrain_parses_every_field_as_an_option(tmp_path):
    from hdb.cli import build_parser

    args = build_parser().parse_args([
        "pretrain", "stage2", "--output-dir", str(tmp_path), "--stage2.model.depth", "3",
        "--set", "stage2.lr=0.01", "--data.val_fraction", "0.3",
    ])
    assert args.stage == "stage2"
    got = sorted(collect_overrides(args))
    assert got == ["data.val_fraction=0.3", "stage2.lr=0.01", "stage2.model.depth=3"]
    cfg = load_config(args.config, got)
    assert (cfg.stage2.model.depth, cfg.stage2.lr, cfg.data.val_fraction) == (3, 0.01, 0.3)
