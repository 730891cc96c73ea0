"""Bases beyond SD 1.5: tiny SDXL/SD3/FLUX pipelines, family detection, the offline T5 tokenizer,
and the real bases' architectures at full shape on the meta device."""

from __future__ import annotations

import hashlib
import json

import diffusers
import pytest
import torch

from hypernet.base import load_pipeline, make_tiny_pipeline
from hypernet.base.arch import ARCH_PIPELINE_CLASS, arch_from_model_index, pipeline_arch
from hypernet.base.real_configs import BASES, DENOISER_PARAMS, arch_of, meta_base
from hypernet.base.t5_tokenizer import make_t5_tokenizer
from hypernet.errors import InvalidInputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ARCHS = ("sdxl", "sd3", "flux")


def _digest(directory) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, object]:
    return {a: make_tiny_pipeline(tmp_path_factory.mktemp(f"tiny-{a}"), seed=0, arch=a) for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_make_tiny_is_byte_identical_per_arch_and_seed(tiny_dirs, tmp_path, arch, capsys):
    if arch == "flux":  # the command line, once (in process: a subprocess re-imports torch/diffusers)
        from hdb.cli import main

        assert main(["base", "make-tiny", str(tmp_path / "a"), "--arch", arch, "--seed", "0"]) == 0
        assert f"wrote tiny base ({arch})" in capsys.readouterr().out
    else:
        make_tiny_pipeline(tmp_path / "a", seed=0, arch=arch)
    make_tiny_pipeline(tmp_path / "b", seed=1, arch=arch)
    same, other = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert same == _digest(tiny_dirs[arch])
    weights = [k for k in same if k.endswith(".safetensors")]
    assert len(weights) == {"sdxl": 4, "sd3": 5, "flux": 4}[arch]
    assert all(same[k] != other[k] for k in weights)
    assert json.loads((tmp_path / "a" / "model_index.json").read_text())["_class_name"] == ARCH_PIPELINE_CLASS[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_stock_pipeline_class_generates_from_each_tiny_base(tiny_dirs, arch):
    cls = getattr(diffusers, ARCH_PIPELINE_CLASS[arch])
    pipe = cls.from_pretrained(tiny_dirs[arch], local_files_only=True)  # stock diffusers, no hdb code
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            assert 0 < sum(p.numel() for p in comp.parameters()) < 3_000_000, name
    kw = {"max_sequence_length": 32} if arch != "sdxl" else {}
    image = pipe("a photo of a person", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
    assert image.shape == (1, 64, 64, 3) and image.std() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_load_pipeline_picks_the_family_class(tiny_dirs, arch):
    pipe = load_pipeline(tiny_dirs[arch], device="cpu")
    assert type(pipe).__name__ == ARCH_PIPELINE_CLASS[arch]
    assert pipeline_arch(pipe) == arch


def test_load_pipeline_refuses_other_families(tiny_base_dir, tmp_path):
    index = json.loads((tiny_base_dir / "model_index.json").read_text())
    assert arch_from_model_index(index) == "sd15"
    assert arch_from_model_index({"_class_name": "MyFluxPipeline", "transformer": ["diffusers",
                                                                                   "FluxTransformer2DModel"]}) == "flux"
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "model_index.json").write_text(json.dumps({"_class_name": "StableVideoDiffusionPipeline"}))
    with pytest.raises(InvalidInputError, match="StableVideoDiffusionPipeline"):
        load_pipeline(tmp_path / "x", device="cpu")
    (tmp_path / "m.safetensors").write_bytes(b"")
    with pytest.raises(InvalidInputError, match="StableVideoDiffusionPipeline"):  # a single file's config dir
        load_pipeline(tmp_path / "m.safetensors", config_dir=tmp_path / "x", device="cpu")


def test_t5_tokenizer_follows_t5_conventions(tiny_dirs):
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(tiny_dirs["flux"] / "tokenizer_2")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.tokenize("a photo of a person") == ["▁a", "▁photo", "▁of", "▁a", "▁person"]
    ids = tok("a photo of ohwx person, Oil painting!").input_ids
    assert ids[-1] == 1 and tok.unk_token_id not in ids  # every ASCII prompt segments without <unk>
    assert len(tok) == len(make_t5_tokenizer()) and "<extra_id_99>" in tok.get_vocab()


@pytest.mark.parametrize("name", sorted(BASES))
def test_real_bases_build_at_full_shape_on_meta(name):
    ns = meta_base(name)
    net = ns.unet if hasattr(ns, "unet") else ns.transformer
    assert next(net.parameters()).is_meta
    assert sum(p.numel() for p in net.parameters()) == DENOISER_PARAMS[name]
    assert pipeline_arch(ns) == arch_of(name)
