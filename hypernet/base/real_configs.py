"""The real bases' architectures, as numbers: build them at full shape on the meta device.

No weights can be downloaded here, but sizes (LiDB parameters, identity bytes, FLOPs) at real scale
only need shapes. These are the published configs of each base's diffusers release
(`<repo>/<component>/config.json`), written out so that nothing is fetched:
- SD 1.5 (runwayml/stable-diffusion-v1-5), the same numbers as `sd15-architecture.md`;
- SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0);
- SD3-medium (stabilityai/stable-diffusion-3-medium-diffusers);
- FLUX.1-dev and FLUX.1-schnell (black-forest-labs/*); they differ only in the guidance
  embedding (dev is guidance-distilled) and the scheduler's shift.

`DENOISER_PARAMS` records each denoiser's parameter count as built by diffusers 0.42 from these
numbers; a test checks it, so a typo in a width cannot go unnoticed.

    from hypernet.base.real_configs import meta_base
    flux = meta_base("flux.1-dev")            # SimpleNamespace(transformer=<12B params on meta>)
    LiDB(flux, default_spec_for(flux))        # real-shape adapter, no memory
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from hypernet.base.arch import Arch
from hypernet.errors import InvalidInputError

SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    norm_num_groups=32, act_fn="silu",
)

# 70 transformer blocks: levels 2/3 hold 2 and 10 layers per block, the mid block 10; level 1 none.
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048,  # CLIP ViT-L (768) + OpenCLIP bigG (1280) penultimate features
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + bigG pooled 1280
    norm_num_groups=32, act_fn="silu",
)

# 24 joint (MMDiT) blocks, width 24 x 64 = 1536; the last block is context-pre-only.
SD3_MEDIUM_TRANSFORMER: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)

# 19 double-stream + 38 single-stream blocks, width 24 x 128 = 3072.
FLUX_DEV_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_SCHNELL_TRANSFORMER: dict[str, Any] = {**FLUX_DEV_TRANSFORMER, "guidance_embeds": False}

#: Text towers (transformers configs).
CLIP_L: dict[str, Any] = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                              projection_dim=768)
OPENCLIP_BIGG: dict[str, Any] = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                     num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                                     hidden_act="gelu", projection_dim=1280)
T5_XXL: dict[str, Any] = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")

#: VAEs: SD/SDXL 4 latent channels; SD3 and FLUX 16, with a shift and no quant convs.
SD_VAE: dict[str, Any] = dict(in_channels=3, out_channels=3, latent_channels=4,
                              block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                              sample_size=512, scaling_factor=0.18215)
SDXL_VAE: dict[str, Any] = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025}
SD3_VAE: dict[str, Any] = {**SD_VAE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305,
                           "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False}
FLUX_VAE: dict[str, Any] = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}


# name -> (arch, denoiser class, denoiser config, VAE config, text towers (component, class, config))
BASES: dict[str, tuple[Arch, str, dict, dict, tuple[tuple[str, str, dict], ...]]] = {
    "sd15": ("sd15", "UNet2DConditionModel", SD15_UNET, SD_VAE, (("text_encoder", "CLIPTextModel", CLIP_L),)),
    "sdxl-base-1.0": ("sdxl", "UNet2DConditionModel", SDXL_UNET, SDXL_VAE,
                      (("text_encoder", "CLIPTextModel", CLIP_L),
                       ("text_encoder_2", "CLIPTextModelWithProjection", OPENCLIP_BIGG))),
    "sd3-medium": ("sd3", "SD3Transformer2DModel", SD3_MEDIUM_TRANSFORMER, SD3_VAE,
                   (("text_encoder", "CLIPTextModelWithProjection", CLIP_L),
                    ("text_encoder_2", "CLIPTextModelWithProjection", OPENCLIP_BIGG),
                    ("text_encoder_3", "T5EncoderModel", T5_XXL))),
    "flux.1-dev": ("flux", "FluxTransformer2DModel", FLUX_DEV_TRANSFORMER, FLUX_VAE,
                   (("text_encoder", "CLIPTextModel", CLIP_L), ("text_encoder_2", "T5EncoderModel", T5_XXL))),
    "flux.1-schnell": ("flux", "FluxTransformer2DModel", FLUX_SCHNELL_TRANSFORMER, FLUX_VAE,
                       (("text_encoder", "CLIPTextModel", CLIP_L), ("text_encoder_2", "T5EncoderModel", T5_XXL))),
}

#: Denoiser parameters as built by diffusers 0.42 from the configs above (checked by a test).
DENOISER_PARAMS: dict[str, int] = {
    "sd15": 859_520_964,
    "sdxl-base-1.0": 2_567_463_684,
    "sd3-medium": 2_028_328_000,
    "flux.1-dev": 11_901_408_320,
    "flux.1-schnell": 11_891_178_560,
}


def meta_denoiser(name: str):
    """The base's UNet or transformer at full shape on the meta device (no memory, no weights).

    Raises:
        InvalidInputError: `name` is not one of `BASES`.
    """
    import diffusers
    import torch

    if name not in BASES:
        raise InvalidInputError(f"`name` must be one of {sorted(BASES)}, got {name!r}")
    _, cls, cfg, _, _ = BASES[name]
    with torch.device("meta"):
        return getattr(diffusers, cls)(**cfg)


def meta_base(name: str, text_encoders: bool = False) -> SimpleNamespace:
    """A namespace holding the base's denoiser (as `unet` or `transformer`) on the meta device,
    plus its text towers when `text_encoders`: enough for `LiDB`, `pipeline_arch` and sizes."""
    import torch
    import transformers

    net = meta_denoiser(name)
    arch, cls, _, _, towers = BASES[name]
    ns = SimpleNamespace(**{("unet" if cls == "UNet2DConditionModel" else "transformer"): net})
    if text_encoders:
        for comp, tcls, tcfg in towers:
            config_cls = transformers.T5Config if tcls == "T5EncoderModel" else transformers.CLIPTextConfig
            with torch.device("meta"):
                setattr(ns, comp, getattr(transformers, tcls)(config_cls(**tcfg)))
    return ns


def arch_of(name: str) -> Arch:
    return BASES[name][0]


__all__ = ["BASES", "CLIP_L", "DENOISER_PARAMS", "FLUX_DEV_TRANSFORMER", "FLUX_SCHNELL_TRANSFORMER", "FLUX_VAE",
           "OPENCLIP_BIGG", "SD15_UNET", "SD3_MEDIUM_TRANSFORMER", "SD3_VAE", "SDXL_UNET", "SDXL_VAE", "SD_VAE",
           "T5_XXL", "arch_of", "meta_base", "meta_denoiser"]
