"""TAEF2: strict loading of the real weights, round-trip quality, and the diffusers VAE interface."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from hypernet.base.taef2 import TAEF2, load_taef2
from hypernet.errors import InvalidInputError, ModelNotFoundError


@pytest.mark.needs_shared("faces", "taef2")
def test_real_weights_load_strictly_and_round_trip_a_face_above_30_db(taef2_dir, faces_dir):
    from hypernet.photos import load_photos

    vae = load_taef2(taef2_dir)  # strict=True inside: any key/shape mismatch raises
    files = [faces_dir / f"image_{i:04d}.jpg" for i in (1, 5, 22, 40)]
    x = load_photos(files, 256, detector="center")  # (4, 3, 256, 256)
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        z = post.mode()
        y = vae.decode(z).sample
    assert z.shape == (4, 32, 32, 32)
    assert torch.equal(post.sample(), z)  # deterministic posterior
    mse = ((y - x) / 2).pow(2).mean(dim=(1, 2, 3))  # (4,) in [0, 1] units
    psnr = (-10 * torch.log10(mse)).mean()  # measured 31.4 dB (29.8-33.9 per photo)
    assert psnr > 30, f"mean round-trip PSNR {psnr:.1f} dB"
    # latents of real faces have ~unit std at the configured scaling factor
    assert 0.6 < (z * vae.config.scaling_factor).std() < 1.6


def test_missing_weights_raise_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="taef2_encoder.pth"):
        load_taef2(tmp_path)


def test_vae_interface_shapes_ranges_and_validation():
    torch.manual_seed(0)
    vae = TAEF2()
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample()
        y = vae.decode(z, return_dict=False)[0]
    assert z.shape == (2, 32, 8, 6) and y.shape == (2, 3, 64, 48)
    assert y.min() >= -1 and y.max() <= 1
    assert vae.config.latent_channels == 32 and vae.config.shift_factor is None
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
    with pytest.raises(InvalidInputError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(InvalidInputError, match="block_out_channels"):
        TAEF2(block_out_channels=(64, 64))


def test_pipeline_with_taef2_saves_loads_through_load_pipeline_and_generates(tmp_path, tiny_base_dir):
    from hypernet.base import load_pipeline

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=32, out_channels=32, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    tiny = load_pipeline(tiny_base_dir, device="cpu", dtype="fp32")
    pipe = StableDiffusionPipeline(
        vae=TAEF2(), text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=unet, scheduler=tiny.scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["vae"] == ["hypernet.base.taef2", "TAEF2"]
    loaded = load_pipeline(tmp_path, device="cpu", dtype="fp32")
    assert isinstance(loaded.vae, TAEF2) and loaded.vae_scale_factor == 8
    for (k, a), b in zip(pipe.vae.state_dict().items(), loaded.vae.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    out = loaded("a photo of a person", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and 0 <= out.min() and out.max() <= 1

    # a fresh process that never imported hypernet.base.taef2 (pretraining, serving, a user's
    # script): load_pipeline imports our own component module itself (this broke pretraining)
    import subprocess
    import sys

    probe = (
        "import sys; from hypernet.base.loading import load_pipeline\n"
        "assert 'hypernet.base.taef2' not in sys.modules\n"
        f"p = load_pipeline({str(tmp_path)!r}, device='cpu', dtype='fp32')\n"
        "print(type(p.vae).__name__)"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("TAEF2"), res.stderr[-2000:]
