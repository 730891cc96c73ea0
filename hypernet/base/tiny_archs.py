"""Tiny random SDXL, SD3 and FLUX pipelines: every component of the real family at toy widths.

Like the tiny SD 1.x base (`hypernet.base.tiny`), each is a few million parameters, loads with
its stock diffusers pipeline class, and is byte-identical for the same seed. The layouts keep
what personalisation depends on:
- SDXL: two CLIP text encoders (the second with a projection, pooled output), the "text_time"
  addition embedding, a level with 2 transformer layers per block (SDXL has 2 and 10);
- SD3: the MMDiT with joint attention (context projections add_q/k/v_proj and to_add_out), the
  last block "context pre-only" (no to_add_out) as in SD3, two CLIPs plus T5, flow matching;
- FLUX: double-stream (joint) blocks and single-stream blocks, RoPE, CLIP pooled + T5 sequence,
  latents packed 2x2, 16 latent channels, flow matching with resolution-dependent shift.
Text encoders use the real CLIP tokenizer and the offline T5 tokenizer (`t5_tokenizer.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from hypernet.base.t5_tokenizer import make_t5_tokenizer, write_t5_tokenizer
from hypernet.base.tokenizer import MODEL_MAX_LENGTH, write_clip_tokenizer

TINY_RESOLUTION = 64  # same as the tiny SD 1.x base: 8x8 latents
_CLIP_WIDTH = 32
_T5_WIDTH = 64  # SD3 pads the two CLIPs' concatenated 2 x 32 features to T5's width

# SDXL base 1.0's noise schedule (its scheduler/scheduler_config.json).
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
                      interpolation_type="linear", use_karras_sigmas=False)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def _clip_config(projection: bool) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=_CLIP_WIDTH, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=MODEL_MAX_LENGTH, hidden_act="gelu"
                          if projection else "quick_gelu", bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407, projection_dim=_CLIP_WIDTH)


def _t5_config(vocab_size: int) -> T5Config:
    """T5 v1.1 layout (gated GELU, no dropout) like T5-XXL, at width 64."""
    return T5Config(vocab_size=vocab_size, d_model=_T5_WIDTH, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                    is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1)


def _vae(latent_channels: int, scaling: float, shift: float | None) -> AutoencoderKL:
    """SD-style VAE (/8); SD3/FLUX's has 16 channels, a shift factor and no quant convs."""
    kw = dict(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16, 32, 32),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=1, norm_num_groups=8, sample_size=TINY_RESOLUTION, scaling_factor=scaling)
    if shift is not None:
        kw.update(shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(**kw)


def tiny_sdxl_unet_config() -> dict:
    """Two levels; the second has 2 transformer layers per block (SDXL: 2 and 10)."""
    return dict(sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                transformer_layers_per_block=(1, 2), use_linear_projection=True,
                cross_attention_dim=2 * _CLIP_WIDTH,  # both CLIPs' penultimate features, concatenated
                addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + _CLIP_WIDTH,  # 6 time ids + pooled CLIP-2
                norm_num_groups=8)


def tiny_sd3_transformer_config() -> dict:
    """Two joint blocks (the last context-pre-only), inner width 32, 2x2 patches."""
    return dict(sample_size=TINY_RESOLUTION // 8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                attention_head_dim=8, num_attention_heads=4, joint_attention_dim=_T5_WIDTH,
                caption_projection_dim=32, pooled_projection_dim=2 * _CLIP_WIDTH, pos_embed_max_size=16)


def tiny_flux_transformer_config() -> dict:
    """Two double-stream and two single-stream blocks, inner width 32, RoPE axes summing to 16."""
    return dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=_T5_WIDTH, pooled_projection_dim=_CLIP_WIDTH,
                guidance_embeds=False, axes_dims_rope=(4, 6, 6))


def _seeded(seed: int, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(seed)
    return make()


def build_sdxl(out: Path, seed: int) -> dict:
    """Write SDXL components under `out`; return the model_index entries."""
    _seeded(seed, lambda: UNet2DConditionModel(**tiny_sdxl_unet_config())).save_pretrained(out / "unet")
    _seeded(seed + 1, lambda: _vae(4, 0.13025, None)).save_pretrained(out / "vae")
    _seeded(seed + 2, lambda: CLIPTextModel(_clip_config(False))).save_pretrained(out / "text_encoder")
    _seeded(seed + 3, lambda: CLIPTextModelWithProjection(_clip_config(True))).save_pretrained(out / "text_encoder_2")
    write_clip_tokenizer(out / "tokenizer")
    write_clip_tokenizer(out / "tokenizer_2", pad_token="!")
    EulerDiscreteScheduler(**SDXL_SCHEDULER).save_pretrained(out / "scheduler")
    return {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
            "feature_extractor": [None, None], "image_encoder": [None, None],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def build_sd3(out: Path, seed: int) -> dict:
    """Write SD3 components under `out`; return the model_index entries."""
    t5_vocab = len(make_t5_tokenizer())
    _seeded(seed, lambda: SD3Transformer2DModel(**tiny_sd3_transformer_config())).save_pretrained(out / "transformer")
    _seeded(seed + 1, lambda: _vae(16, 1.5305, 0.0609)).save_pretrained(out / "vae")
    _seeded(seed + 2, lambda: CLIPTextModelWithProjection(_clip_config(False))).save_pretrained(out / "text_encoder")
    _seeded(seed + 3, lambda: CLIPTextModelWithProjection(_clip_config(True))).save_pretrained(out / "text_encoder_2")
    _seeded(seed + 4, lambda: T5EncoderModel(_t5_config(t5_vocab))).save_pretrained(out / "text_encoder_3")
    write_clip_tokenizer(out / "tokenizer")
    write_clip_tokenizer(out / "tokenizer_2", pad_token="!")
    write_t5_tokenizer(out / "tokenizer_3")
    FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER).save_pretrained(out / "scheduler")
    return {"_class_name": "StableDiffusion3Pipeline", "feature_extractor": [None, None],
            "image_encoder": [None, None], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_3": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "tokenizer_3": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}


def build_flux(out: Path, seed: int) -> dict:
    """Write FLUX components under `out`; return the model_index entries."""
    t5_vocab = len(make_t5_tokenizer())
    _seeded(seed, lambda: FluxTransformer2DModel(**tiny_flux_transformer_config())).save_pretrained(
        out / "transformer")
    _seeded(seed + 1, lambda: _vae(16, 0.3611, 0.1159)).save_pretrained(out / "vae")
    _seeded(seed + 2, lambda: CLIPTextModel(_clip_config(False))).save_pretrained(out / "text_encoder")
    _seeded(seed + 3, lambda: T5EncoderModel(_t5_config(t5_vocab))).save_pretrained(out / "text_encoder_2")
    write_clip_tokenizer(out / "tokenizer")
    write_t5_tokenizer(out / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER).save_pretrained(out / "scheduler")
    return {"_class_name": "FluxPipeline", "feature_extractor": [None, None], "image_encoder": [None, None],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}


BUILDERS: dict[str, Callable[[Path, int], dict]] = {"sdxl": build_sdxl, "sd3": build_sd3, "flux": build_flux}

__all__ = ["BUILDERS", "TINY_RESOLUTION", "build_flux", "build_sd3", "build_sdxl", "tiny_flux_transformer_config",
           "tiny_sd3_transformer_config", "tiny_sdxl_unet_config"]
