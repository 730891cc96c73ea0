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
