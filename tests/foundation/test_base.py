"""Base models: the tiny pipeline, the real CLIP tokenizer, offline loading, device/dtype."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline

from hypernet.base import base_fingerprint, load_pipeline, make_tiny_pipeline
from hypernet.base.tokenizer import load_clip_tokenizer
from hypernet.device import resolve_device, resolve_dtype
from hypernet.errors import InvalidInputError, ModelNotFoundError


def _digest(directory) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_make_tiny_cli_is_byte_identical_per_seed(tmp_path, tiny_base_dir):
    for name, seed in (("a", 0), ("b", 1)):
        r = subprocess.run(
            [sys.executable, "-m", "hdb.cli", "base", "make-tiny", str(tmp_path / name),
             "--seed", str(seed)],
            capture_output=True, text=True, check=True,
        )
        assert "wrote tiny base" in r.stdout
    same, other = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert same == _digest(tiny_base_dir)  # seed 0 again -> byte-identical
    weights = [k for k in same if k.endswith(".safetensors")]
    assert len(weights) == 3 and all(same[k] != other[k] for k in weights)


def test_tiny_loads_with_stock_diffusers_and_is_small(tiny_base_dir):
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_base_dir, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        local_files_only=True,
    )
    for comp in ("unet", "vae", "text_encoder"):
        n = sum(p.numel() for p in getattr(pipe, comp).parameters())
        assert 0 < n < 3_000_000, (comp, n)
    image = pipe("a photo of a person", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and image.std() > 0


def test_tokenizer_matches_openai_ids(tiny_base_dir):
    tok = load_clip_tokenizer(tiny_base_dir / "tokenizer")
    assert len(tok) == 49408
    assert tok("a photo of a person").input_ids == [49406, 320, 1125, 539, 320, 2533, 49407]
    assert tok.model_max_length == 77


def test_load_pipeline_defaults_cpu_fp32(tiny_base_dir):
    pipe = load_pipeline(tiny_base_dir)
    assert pipe.unet.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert pipe.unet.dtype == torch.float32
    bf16 = load_pipeline(tiny_base_dir, device="cpu", dtype="bf16")
    assert bf16.unet.dtype == torch.bfloat16


def test_missing_base_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        load_pipeline(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_pipeline(tmp_path / "empty")
    (tmp_path / "x.ckpt").write_bytes(b"")
    with pytest.raises(InvalidInputError, match="safetensors"):
        load_pipeline(tmp_path / "x.ckpt")


def test_device_and_dtype_resolution():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(InvalidInputError, match="`dtype` must be one of"):
        resolve_dtype("fp8", torch.device("cpu"))
    if not torch.cuda.is_available():
        assert resolve_device(None).type == "cpu"
        with pytest.raises(RuntimeError, match="CUDA is not present"):
            resolve_device("cuda")


def test_fingerprint_tracks_weights_not_dtype(tmp_path, tiny_base_dir):
    a = load_pipeline(tiny_base_dir, device="cpu")
    b = load_pipeline(make_tiny_pipeline(tmp_path / "s1", seed=1), device="cpu")
    assert base_fingerprint(a) != base_fingerprint(b)
    assert base_fingerprint(a) == base_fingerprint(load_pipeline(tiny_base_dir, device="cpu", dtype="bf16"))


def test_loads_in_several_threads_at_once_leave_torch_unpatched(tiny_base_dir):
    """Regression: diffusers loads under accelerate's `init_empty_weights`, which swaps
    `nn.Module.register_parameter` process-wide. Four threads loading at once restored each
    other's patch and left it installed, so every module built afterwards, in any thread, got
    meta-device parameters (CI then failed 154 unrelated tests). `load_pipeline` serialises loads."""
    import threading

    original = torch.nn.Module.register_parameter
    pipes, errors = [], []

    def load():
        try:
            pipes.append(load_pipeline(tiny_base_dir, device="cpu", dtype="fp32"))
        except Exception as e:  # collected: an assert in a thread would not fail the test
            errors.append(e)

    for _ in range(2):
        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    try:
        assert errors == []
        assert torch.nn.Module.register_parameter is original
        assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
        assert len(pipes) == 8
        for pipe in pipes:
            assert {p.device.type for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()} == {"cpu"}
    finally:  # never let a leak from this test break the rest of the session
        torch.nn.Module.register_parameter = original
