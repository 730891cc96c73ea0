"""Which base architecture a pipeline (or a pipeline directory) is: SD 1.x/2.x, SDXL, SD3 or FLUX.

Four families differ in everything personalisation touches: the denoiser (`unet` for SD 1.x/2.x
and SDXL, `transformer` for the MMDiTs SD3 and FLUX), its attention layer names, the text
encoders, the objective (epsilon/v noise prediction vs flow matching) and the native size. The
rest of the library asks `pipeline_arch(pipe)` instead of guessing from attribute names.

"sd15" names the whole SD 1.x/2.x family (same pipeline class and UNet layout; SD 2.x differs in
widths, its OpenCLIP text tower and v-prediction, all read from the configs).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from hypernet.errors import InvalidInputError

Arch = Literal["sd15", "sdxl", "sd3", "flux"]
ARCHS: tuple[Arch, ...] = ("sd15", "sdxl", "sd3", "flux")

#: model_index.json `_class_name` -> arch. Only text-to-image pipelines of the four families.
PIPELINE_CLASS_ARCH: dict[str, Arch] = {
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
ARCH_PIPELINE_CLASS: dict[Arch, str] = {v: k for k, v in PIPELINE_CLASS_ARCH.items()}

#: Transformer class named in model_index.json -> arch (a fallback for renamed pipeline classes).
_TRANSFORMER_CLASS_ARCH: dict[str, Arch] = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}

#: Image size each family was trained at: the default generation size on a real base.
NATIVE_RESOLUTION: dict[Arch, int] = {"sd15": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024}
#: Height and width must be multiples of this (VAE /8; SD3 patches of 2 latents; FLUX packs 2x2).
SIZE_MULTIPLE: dict[Arch, int] = {"sd15": 8, "sdxl": 8, "sd3": 16, "flux": 16}
#: Flow-matching bases train and sample a velocity along straight paths, not epsilon/v.
FLOW_MATCHING: dict[Arch, bool] = {"sd15": False, "sdxl": False, "sd3": True, "flux": True}


def arch_from_model_index(index: dict, source: str = "model_index.json") -> Arch:
    """The arch a diffusers `model_index.json` describes.

    Args:
        index: the parsed JSON.
        source: how to name it in errors.

    Raises:
        InvalidInputError: a pipeline of none of the four families (inpainting, video, ...).
    """
    cls = index.get("_class_name")
    if cls in PIPELINE_CLASS_ARCH:
        return PIPELINE_CLASS_ARCH[cls]
    transformer = index.get("transformer")
    if isinstance(transformer, list) and len(transformer) == 2 and transformer[1] in _TRANSFORMER_CLASS_ARCH:
        return _TRANSFORMER_CLASS_ARCH[transformer[1]]
    raise InvalidInputError(
        f"{source} must describe one of {sorted(PIPELINE_CLASS_ARCH)} (text-to-image SD 1.x/2.x, SDXL, SD3 "
        f"or FLUX), got _class_name {cls!r}"
    )


def denoiser(pipe) -> nn.Module:
    """The pipeline's denoising network: its `unet` (SD 1.x/2.x, SDXL) or `transformer` (SD3, FLUX).

    Raises:
        InvalidInputError: the object has neither.
    """
    for attr in ("unet", "transformer"):
        mod = getattr(pipe, attr, None)
        if mod is not None:
            return mod
    raise InvalidInputError(f"pipeline must have a `unet` or a `transformer`, got {type(pipe).__name__}")


def default_size(pipe) -> int:
    """The square image size a pipeline generates and trains at by default, in pixels.

    What the stock pipeline itself would pick, read from the loaded configs so that a tiny base
    (64 px) and SD 2.x-768 get their own size: the denoiser's latent `sample_size` x the VAE
    factor (SD 1.x/2.x, SDXL, SD3). FLUX's transformer has no sample size and its pipeline
    hard-codes 1024 px, which would be wrong for a tiny base: there the VAE's `sample_size` (1024
    on FLUX.1) says it. `NATIVE_RESOLUTION` is the fallback when neither config has one.

    Raises:
        InvalidInputError: not a pipeline of the four families.
    """
    arch = pipeline_arch(pipe)
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    latent = getattr(denoiser(pipe).config, "sample_size", None)
    if isinstance(latent, int) and latent > 0:
        return latent * factor
    vae = getattr(pipe, "vae", None)
    pixels = getattr(getattr(vae, "config", None), "sample_size", None)
    if isinstance(pixels, int) and pixels > 0:
        return pixels
    return NATIVE_RESOLUTION[arch]


def check_image_size(name: str, value, arch: Arch, max_side: int = 2048) -> None:
    """Raise InvalidInputError unless `value` is a valid `height`/`width` for `arch` (None: the
    base's default): a multiple of `SIZE_MULTIPLE[arch]` in SIZE_MULTIPLE..max_side."""
    m = SIZE_MULTIPLE[arch]
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value % m or not m <= value <= max_side:
        raise InvalidInputError(f"`{name}` must be a multiple of {m} for {arch} in {m}..{max_side} or None, "
                                f"got {value!r}")


def pipeline_arch(pipe) -> Arch:
    """The arch of a loaded pipeline (or any object holding its denoiser as `unet`/`transformer`,
    e.g. a namespace of meta-device models), read from the denoiser's class and config.

    Raises:
        InvalidInputError: a denoiser of another family.
    """
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    net = denoiser(pipe)
    if isinstance(net, FluxTransformer2DModel):
        return "flux"
    if isinstance(net, SD3Transformer2DModel):
        return "sd3"
    if isinstance(net, UNet2DConditionModel):
        # SDXL conditions on pooled text + size/crop "time ids" through this addition embedding.
        return "sdxl" if getattr(net.config, "addition_embed_type", None) == "text_time" else "sd15"
    raise InvalidInputError(
        f"the denoiser must be a UNet2DConditionModel, SD3Transformer2DModel or FluxTransformer2DModel, "
        f"got {type(net).__name__}"
    )


__all__ = ["ARCHS", "ARCH_PIPELINE_CLASS", "Arch", "FLOW_MATCHING", "NATIVE_RESOLUTION", "PIPELINE_CLASS_ARCH",
           "SIZE_MULTIPLE", "arch_from_model_index", "check_image_size", "default_size", "denoiser",
           "pipeline_arch"]
