"""A tiny Stable-Diffusion-architecture pipeline with random weights (SDXL/SD3/FLUX: `tiny_archs.py`).

It has every component of SD 1.x (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, the real
CLIP tokenizer, SD's noise schedule) at a few million parameters, so the whole product runs on a
2-core CPU in seconds. It is the embedded default base and the test-suite fixture.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from hypernet.base.arch import ARCHS, Arch
from hypernet.base.tokenizer import MODEL_MAX_LENGTH, write_clip_tokenizer
from hypernet.errors import InvalidInputError

log = logging.getLogger(__name__)

#: Image size the tiny base generates and trains at (8x8 latents).
TINY_RESOLUTION = 64

# SD 1.x noise schedule (sd15-architecture.md); prediction type epsilon like SD 1.5.
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
)


def tiny_unet_config() -> dict:
    """Two resolution levels; 4 transformer blocks (16 attention projections), widths 32/64."""
    return dict(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_vae_config() -> dict:
    """Four levels so latents are 1/8 of the image, as in SD."""
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        scaling_factor=0.18215,
    )


def clip_text_config(width: int, mlp_width: int, layers: int = 2, heads: int = 4) -> CLIPTextConfig:
    """A small CLIP text tower `width` wide with the real 49,408-token vocabulary and special
    tokens, so the stock tokenizer's ids (and a new token like "ohwx") index it as they would SD's."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=mlp_width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=width,
    )


def tiny_text_config() -> CLIPTextConfig:
    """CLIP text tower with the real 49,408-token vocabulary and 32-wide hidden states."""
    return clip_text_config(32, mlp_width=64)


def make_tiny_pipeline(out_dir: str | Path, seed: int = 0, arch: Arch = "sd15") -> Path:
    """Write a tiny pipeline of `arch` to `out_dir`; same `seed` -> byte-identical files.

    The directory loads with the family's stock class (`StableDiffusionPipeline`,
    `StableDiffusionXLPipeline`, `StableDiffusion3Pipeline`, `FluxPipeline`).from_pretrained(out_dir),
    and with `load_pipeline(out_dir)`.

    Raises:
        InvalidInputError: `arch` is not one of `ARCHS`.
    """
    if arch not in ARCHS:
        raise InvalidInputError(f"`arch` must be one of {list(ARCHS)}, got {arch!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if arch != "sd15":
        from hypernet.base.tiny_archs import BUILDERS

        index = {"_diffusers_version": _diffusers_version(), **BUILDERS[arch](out, seed)}
        (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        log.info("wrote tiny %s pipeline (seed %d) to %s", arch, seed, out)
        return out
    # Each component gets its own seeded generator state so adding one never changes another.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config())
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**tiny_vae_config())
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(tiny_text_config())
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    text_encoder.save_pretrained(out / "text_encoder")
    write_clip_tokenizer(out / "tokenizer")
    DDPMScheduler(**SD_SCHEDULER).save_pretrained(out / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": _diffusers_version(),
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")
    log.info("wrote tiny SD pipeline (seed %d) to %s", seed, out)
    return out


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
