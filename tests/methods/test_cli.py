"""`hdb train` and `hdb generate` end to end on the tiny base (synthetic photos: no ../shared)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hdb.cli import main


@pytest.fixture()
def photos(tmp_path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    for i in range(2):
        x = np.linspace(0, 255, 80, dtype=np.uint8)[None, :].repeat(60, 0)
        Image.fromarray(np.stack([x, x[:, ::-1], np.full_like(x, 40 * i)], -1)).save(d / f"p{i}.png")
    return d


def test_train_then_generate(tiny_base_dir, photos, tmp_path, capsys):
    out = tmp_path / "me.safetensors"
    rc = main(
        [
            "train",
            "--method",
            "lidb",
            "--base",
            str(tiny_base_dir),
            "--images",
            str(photos),
            "--out",
            str(out),
            "--steps",
            "2",
            "--detector",
            "center",
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    assert f"artifact: {out}" in printed
    assert int(re.search(r"size: (\d+) bytes", printed).group(1)) == out.stat().st_size
    assert re.search(r"time: [\d.]+ s", printed)
    imgs = tmp_path / "imgs"
    rc = main(
        [
            "generate",
            "--base",
            str(tiny_base_dir),
            "--identity",
            str(out),
            "--prompt",
            "a ohwx face",
            "--out",
            str(imgs),
            "--steps",
            "2",
            "--num-images",
            "2",
            "--seed",
            "3",
        ]
    )
    assert rc == 0
    files = sorted(imgs.glob("*.png"))
    assert [f.name for f in files] == ["000-seed3.png", "001-seed4.png"]
    assert Image.open(files[0]).size == (64, 64)


def test_bad_photo_is_a_clear_error_naming_the_file(tiny_base_dir, photos, tmp_path, capsys):
    (photos / "broken.jpg").write_text("not a photo")
    rc = main(
        [
            "train",
            "--method",
            "lidb",
            "--base",
            str(tiny_base_dir),
            "--images",
            str(photos),
            "--out",
            str(tmp_path / "x.safetensors"),
            "--steps",
            "1",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "broken.jpg" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "--method", "lidb", "--rank", "8"], "`--rank` applies to lora only"),
        (["train", "--method", "lora", "--num-vectors", "2"], "`--num-vectors` applies to textual-inversion"),
        (["train", "--method", "lora", "--steps", "0"], "`steps` must be a positive integer"),
        (["generate", "--prompt", "x", "--steps", "0"], "`steps` must be an integer"),
        (["generate", "--prompt", "x", "--identity", "/nonexistent/me.safetensors"], "must be an existing"),
    ],
)
def test_argument_errors_exit_cleanly(argv, match, tmp_path, capsys):
    if argv[0] == "train":
        argv = argv + ["--images", str(tmp_path), "--out", str(tmp_path / "o.safetensors")]
    else:
        argv = argv + ["--out", str(tmp_path / "imgs")]
    rc = main(argv)
    assert rc in (2, 3) and match in capsys.readouterr().err


def test_train_checkpoint_dir_resumes_exactly_through_the_cli(tiny_base_dir, photos, tmp_path, caplog):
    """`hdb train --checkpoint-dir` continues a cancelled run of the same settings (made here
    with the library's own cancel, deterministic: no signal timing) and ends bit-identical to an
    uninterrupted `hdb train`; the finished run removes the checkpoint."""
    import logging

    import torch
    from safetensors.torch import load_file

    from hdb.cli import build_parser
    from hdb.train import build_config
    from hypernet.base import load_pipeline
    from hypernet.methods import get_method
    from hypernet.training import TrainingCancelled

    def argv(out: Path, *extra: str) -> list[str]:
        return ["train", "--method", "lora", "--base", str(tiny_base_dir), "--images", str(photos), "--out",
                str(out), "--steps", "4", "--rank", "2", "--lr", "1e-2", "--detector", "center", "--no-progress",
                *extra]

    assert main(argv(tmp_path / "straight.safetensors")) == 0
    ckpt = tmp_path / "ckpt"
    resume_argv = argv(tmp_path / "resumed.safetensors", "--checkpoint-dir", str(ckpt))
    config = build_config(build_parser().parse_args(resume_argv))
    polls = iter(range(100))
    with pytest.raises(TrainingCancelled):
        get_method("lora").train(load_pipeline(tiny_base_dir, device="cpu", dtype="fp32"), photos, config=config,
                                 checkpoint_dir=ckpt, should_stop=lambda: next(polls) >= 2, detector="center")
    assert torch.load(ckpt / "checkpoint.pt", weights_only=True)["step"] == 2
    caplog.set_level(logging.INFO, logger="hypernet.training.loop")
    assert main(resume_argv) == 0
    assert "resumed from step 2 of 4" in caplog.text
    assert not (ckpt / "checkpoint.pt").exists()
    a, b = load_file(str(tmp_path / "straight.safetensors")), load_file(str(tmp_path / "resumed.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
