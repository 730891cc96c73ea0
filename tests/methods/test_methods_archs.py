"""The classic methods on tiny SDXL, SD3 and FLUX pipelines: what each arch supports (and the
refusals), LoRA files that stock `load_lora_weights` loads to the same output, Textual Inversion
in both SDXL text encoders loadable by stock `load_textual_inversion`, DreamBooth on SDXL."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hypernet.base import load_pipeline
from hypernet.base.arch import denoiser
from hypernet.errors import InvalidInputError
from hypernet.methods import get_method, methods_for
from hypernet.training import objective_for

ARCHS = ("sdxl", "sd3", "flux")
PROMPT = "a photo of ohwx person"


@pytest.fixture(scope="module")
def pipes(tiny_arch_dir) -> dict:
    return {a: load_pipeline(tiny_arch_dir(a), device="cpu", dtype="fp32") for a in ARCHS}


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (2, 3, 64, 64)


def _denoise(pipe, prompt: str = PROMPT) -> torch.Tensor:
    """The denoiser's output on fixed latents and timestep for `prompt` (through its text encoders)."""
    obj = objective_for(pipe)
    net = denoiser(pipe)
    g = torch.Generator().manual_seed(3)
    c = 4 if obj.arch == "sdxl" else 16
    x = torch.randn(1, c, 8, 8, generator=g)
    t = torch.tensor([500.0]) if obj.flow_matching else torch.tensor([500])
    with torch.no_grad():
        emb, pooled = obj.encode_prompts(pipe, prompt)
        return obj.predict(net, x, t, emb, pooled)


def test_methods_per_arch():
    assert methods_for("sd15") == methods_for("sdxl") == ("dreambooth", "textual-inversion", "lora", "lidb")
    assert methods_for("sd3") == methods_for("flux") == ("lora", "lidb")
    assert get_method("dreambooth").archs == ("sd15", "sdxl")
    with pytest.raises(InvalidInputError, match="`arch` must be one of"):
        methods_for("sd2")


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_dreambooth_and_ti_are_refused_on_mmdit(pipes, pixels, arch):
    with pytest.raises(InvalidInputError, match="full DreamBooth of a 12B transformer is not a product here"):
        get_method("dreambooth").train(pipes[arch], pixels)
    with pytest.raises(InvalidInputError, match=f"got a {arch} base.*use lidb or lora"):
        get_method("textual-inversion").train(pipes[arch], pixels)


@pytest.mark.parametrize(("arch", "text"), [("sdxl", False), ("sdxl", True), ("sd3", False), ("flux", False)])
def test_lora_file_loads_in_stock_diffusers_to_the_same_output(pipes, tiny_arch_dir, tmp_path, arch, text):
    """Random (non-zero) LoRA weights on the training adapter -> the exported file, loaded into a
    fresh stock pipeline by `load_lora_weights`, gives the adapted pipeline's output exactly."""
    from hypernet.methods.lora import LoRAMethodConfig
    from hypernet.methods.lora.method import LoRAArtifact, _attach, _export, _remove_all

    pipe = pipes[arch]
    base = _denoise(pipe)
    params = _attach(pipe, LoRAMethodConfig(rank=2, train_text_encoder=text))
    try:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        adapted = _denoise(pipe)
        tensors = _export(pipe, text)
    finally:
        _remove_all(pipe, "hdb_train")
    assert torch.equal(_denoise(pipe), base)  # the training adapter is gone
    prefixes = {k.partition(".")[0] for k in tensors}
    want = {"sdxl": {"unet", "text_encoder", "text_encoder_2"} if text else {"unet"}}.get(arch, {"transformer"})
    assert prefixes == want
    if arch != "sdxl":  # the joint-attention context projections are adapted too
        assert any(".add_q_proj." in k for k in tensors) and any(".to_add_out." in k for k in tensors)
    path = tmp_path / "lora.safetensors"
    LoRAArtifact(tensors).save(path)
    stock = load_pipeline(tiny_arch_dir(arch), device="cpu", dtype="fp32")
    stock.load_lora_weights(str(path))
    got = _denoise(stock)
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(got, adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_method_trains_and_applies_on_every_arch(pipes, pixels, arch):
    from hypernet.methods.lora import LoRAMethodConfig

    pipe = pipes[arch]
    base = _denoise(pipe)
    art = get_method("lora").train(pipe, pixels, config=LoRAMethodConfig(rank=2, steps=2, lr=1e-2))
    assert torch.equal(_denoise(pipe), base)
    art.apply(pipe)
    try:
        assert (_denoise(pipe) - base).abs().max() > 1e-6
    finally:
        art.remove(pipe)
    assert torch.equal(_denoise(pipe), base)
    if arch != "sdxl":  # SD3/FLUX LoRA is the transformer's
        with pytest.raises(InvalidInputError, match="train_text_encoder"):
            get_method("lora").train(pipe, pixels, config=LoRAMethodConfig(steps=1, train_text_encoder=True))


def test_sdxl_textual_inversion_loads_into_both_encoders_with_stock_diffusers(pipes, tiny_arch_dir, pixels,
                                                                             tmp_path):
    from hypernet.methods.textual_inversion import TIMethodConfig

    pipe = pipes["sdxl"]
    before = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    n_tok, n_tok2 = len(pipe.tokenizer), len(pipe.tokenizer_2)
    art = get_method("textual-inversion").train(pipe, pixels, config=TIMethodConfig(steps=3, lr=5e-2))
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == (n_tok, n_tok2)  # left as it was
    assert art.vectors.shape == (1, 32) and art.vectors_2.shape == (1, 32)
    # both encoders' vectors trained away from their class-noun init
    from hypernet.methods.textual_inversion.method import _class_init

    assert not torch.allclose(art.vectors, _class_init(pipe, "person", 1))
    assert not torch.allclose(art.vectors_2, _class_init(pipe, "person", 1, pipe.tokenizer_2, pipe.text_encoder_2))
    path = tmp_path / "ti.safetensors"
    art.save(path)
    assert set(load_file(str(path))) == {"clip_l", "clip_g"}
    assert get_method("textual-inversion").artifact_cls.load(path).vectors_2.shape == (1, 32)
    # Stock diffusers, as its docs load an SDXL embedding: one call per encoder.
    stock = load_pipeline(tiny_arch_dir("sdxl"), device="cpu", dtype="fp32")
    sd = load_file(str(path))
    stock.load_textual_inversion(sd["clip_l"], token="ohwx", text_encoder=stock.text_encoder, tokenizer=stock.tokenizer)
    stock.load_textual_inversion(sd["clip_g"], token="ohwx", text_encoder=stock.text_encoder_2,
                                 tokenizer=stock.tokenizer_2)
    want = stock.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    art.apply(pipe)
    try:
        got = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    finally:
        art.remove(pipe)
    for g_, w_ in zip(got, want, strict=True):
        if g_ is None:
            continue
        torch.testing.assert_close(g_, w_, rtol=0, atol=0)
    assert not torch.equal(got[0], before[0]) and not torch.equal(got[2], before[2])  # both encoders changed
    after = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == (n_tok, n_tok2)


def test_sdxl_dreambooth_saves_a_stock_sdxl_pipeline(pipes, pixels, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from hypernet.methods.dreambooth import DreamBoothMethodConfig

    pipe = pipes["sdxl"]
    base = _denoise(pipe)
    art = get_method("dreambooth").train(pipe, pixels, config=DreamBoothMethodConfig(steps=2, lr=1e-3,
                                                                                     prior_preservation=False))
    assert torch.equal(_denoise(pipe), base)  # trained a copy
    art.apply(pipe)
    try:
        tuned = _denoise(pipe)
    finally:
        art.remove(pipe)
    assert (tuned - base).abs().max() > 1e-6
    art.save(tmp_path / "db")
    stock = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "db"), local_files_only=True)
    torch.testing.assert_close(_denoise(stock), tuned, rtol=0, atol=0)
    with pytest.raises(InvalidInputError, match="train_text_encoder"):
        get_method("dreambooth").train(pipe, pixels, config=DreamBoothMethodConfig(
            steps=1, prior_preservation=False, train_text_encoder=True))
