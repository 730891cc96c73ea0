"""Diffusers SD 1.x pipeline -> one original-layout (LDM/CompVis) `.safetensors` checkpoint.

Most fine-tuned SD 1.x bases circulate as one file in the original layout (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.transformer.*`). `load_pipeline(file, config_dir=DIR)`
reads such files through diffusers' single-file loader; this module writes them. That lets the
tiny base stand in for a real single-file checkpoint in tests (nothing can be downloaded here),
and lets `hdb base to-single-file` hand a diffusers base to tools that only read single files.

    hdb base to-single-file DIR OUT.safetensors

The mapping is built from the pipeline's own module tree, not from SD 1.5's fixed block counts,
so it covers any SD 1.x-family UNet/VAE (any number of levels, `layers_per_block`, attention on any
subset of levels). Why the index arithmetic looks the way it does:
- UNet `input_blocks` is one flat list: [conv_in], then per level `layers_per_block` entries of
  [ResBlock, (SpatialTransformer)], then a [Downsample] entry on every level but the last.
- `output_blocks` is flat too: per level `layers_per_block + 1` entries of [ResBlock,
  (SpatialTransformer), (Upsample on the level's last entry)]; the upsampler's index inside its
  entry is 2 after an attention, else 1.
- The VAE decoder numbers its levels bottom-up (`up.{n-1-i}` = diffusers `up_blocks.{i}`), and
  its attention projections are 1x1 convolutions (4-D weights), not linears.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from hypernet.errors import InvalidInputError

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."

# Sub-module renames inside one residual block (diffusers name -> original name).
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def diffusers_to_ldm(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and CLIP text encoder as one original-layout state dict.

    Returns:
        name -> tensor (CPU unless meta, contiguous, the pipeline's dtype), keyed `model.diffusion_model.*`,
        `first_stage_model.*` and `cond_stage_model.transformer.text_model.*`.

    Raises:
        InvalidInputError: a component this SD 1.x layout cannot express (e.g. a UNet with class
            or addition embeddings, per-level `layers_per_block`, or a non-CLIP text encoder).
    """
    out: dict[str, torch.Tensor] = {}
    out.update(_convert(pipe.unet.state_dict(), _unet_prefixes(pipe.unet), _UNET_RESNET, UNET_PREFIX,
                        "unet"))
    out.update(_convert(pipe.vae.state_dict(), _vae_prefixes(pipe.vae), _VAE_RESNET, VAE_PREFIX, "vae"))
    out.update(_text_encoder(pipe.text_encoder))
    # Meta tensors (shape-only models, e.g. SD 1.5 built without memory) stay on meta.
    return {k: (v.detach() if v.is_meta else v.detach().to("cpu")).contiguous() for k, v in out.items()}


def save_single_file(pipe: StableDiffusionPipeline, path: str | Path) -> Path:
    """Write `diffusers_to_ldm(pipe)` to `path` (.safetensors), replacing it atomically.

    Returns:
        The path written.

    Raises:
        InvalidInputError: `path` does not end in .safetensors, or see `diffusers_to_ldm`.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise InvalidInputError(f"`path` must end in .safetensors, got {str(path)!r}")
    state = diffusers_to_ldm(pipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt", "layout": "ldm"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("wrote %d tensors in the original SD layout to %s", len(state), path)
    return path


# --------------------------------------------------------------------------- UNet
def _unet_prefixes(unet) -> dict[str, tuple[str, str]]:
    """diffusers module path -> (original module path, kind) for every module the layout moves."""
    cfg = unet.config
    if not isinstance(cfg.layers_per_block, int):
        raise InvalidInputError(
            f"`unet.layers_per_block` must be one int in the SD 1.x layout, got {cfg.layers_per_block!r}")
    for name in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type"):
        if getattr(cfg, name, None) is not None:
            raise InvalidInputError(f"`unet.{name}` must be None in the SD 1.x layout, got {getattr(cfg, name)!r}")
    m: dict[str, tuple[str, str]] = {
        "conv_in": ("input_blocks.0.0", "plain"),
        "time_embedding.linear_1": ("time_embed.0", "plain"),
        "time_embedding.linear_2": ("time_embed.2", "plain"),
        "conv_norm_out": ("out.0", "plain"),
        "conv_out": ("out.2", "plain"),
    }
    k = 1  # input_blocks.0 is conv_in
    for b, block in enumerate(unet.down_blocks):
        attns = getattr(block, "attentions", None)
        for i in range(len(block.resnets)):
            m[f"down_blocks.{b}.resnets.{i}"] = (f"input_blocks.{k}.0", "resnet")
            if attns is not None:
                m[f"down_blocks.{b}.attentions.{i}"] = (f"input_blocks.{k}.1", "plain")
            k += 1
        if block.downsamplers is not None:
            m[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{k}.0.op", "plain")
            k += 1
    mid = unet.mid_block
    if mid is None:
        raise InvalidInputError("`unet.mid_block` must exist in the SD 1.x layout, got None")
    m["mid_block.resnets.0"] = ("middle_block.0", "resnet")
    if getattr(mid, "attentions", None) is not None:
        m["mid_block.attentions.0"] = ("middle_block.1", "plain")
        m["mid_block.resnets.1"] = ("middle_block.2", "resnet")
    k = 0
    for b, block in enumerate(unet.up_blocks):
        attns = getattr(block, "attentions", None)
        last = len(block.resnets) - 1
        for i in range(len(block.resnets)):
            m[f"up_blocks.{b}.resnets.{i}"] = (f"output_blocks.{k}.0", "resnet")
            if attns is not None:
                m[f"up_blocks.{b}.attentions.{i}"] = (f"output_blocks.{k}.1", "plain")
            if i == last and block.upsamplers is not None:
                m[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{k}.{2 if attns is not None else 1}.conv",
                                                         "plain")
            k += 1
    return m


# --------------------------------------------------------------------------- VAE
def _vae_prefixes(vae) -> dict[str, tuple[str, str]]:
    m: dict[str, tuple[str, str]] = {"quant_conv": ("quant_conv", "plain"),
                                     "post_quant_conv": ("post_quant_conv", "plain")}
    for side in ("encoder", "decoder"):
        m[f"{side}.conv_in"] = (f"{side}.conv_in", "plain")
        m[f"{side}.conv_norm_out"] = (f"{side}.norm_out", "plain")
        m[f"{side}.conv_out"] = (f"{side}.conv_out", "plain")
        m[f"{side}.mid_block.resnets.0"] = (f"{side}.mid.block_1", "resnet")
        m[f"{side}.mid_block.resnets.1"] = (f"{side}.mid.block_2", "resnet")
        m[f"{side}.mid_block.attentions.0"] = (f"{side}.mid.attn_1", "attention")
    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", "resnet")
        if block.downsamplers is not None:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", "plain")
    n = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        level = n - 1 - i  # the original decoder counts levels from the bottom
        for j in range(len(block.resnets)):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", "resnet")
        if block.upsamplers is not None:
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", "plain")
    return m


# --------------------------------------------------------------------------- shared
def _convert(state: dict[str, torch.Tensor], prefixes: dict[str, tuple[str, str]],
             resnet_names: dict[str, str], out_prefix: str, what: str) -> dict[str, torch.Tensor]:
    """Rename every key of `state` by its longest module prefix in `prefixes`."""
    by_len = sorted(prefixes, key=len, reverse=True)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        src = next((p for p in by_len if key.startswith(p + ".")), None)
        if src is None:
            raise InvalidInputError(f"{what} key must have a place in the original SD layout, got {key!r}")
        dst, kind = prefixes[src]
        rest = key[len(src) + 1:]
        if kind == "resnet":
            sub, _, leaf = rest.rpartition(".")
            if sub not in resnet_names:
                raise InvalidInputError(f"{what} residual-block key must be one of {sorted(resnet_names)}, "
                                        f"got {key!r}")
            rest = f"{resnet_names[sub]}.{leaf}"
        elif kind == "attention":
            sub, _, leaf = rest.rpartition(".")
            if sub not in _VAE_ATTENTION:
                raise InvalidInputError(f"{what} attention key must be one of {sorted(_VAE_ATTENTION)}, "
                                        f"got {key!r}")
            rest = f"{_VAE_ATTENTION[sub]}.{leaf}"
            if leaf == "weight" and tensor.ndim == 2 and sub != "group_norm":
                tensor = tensor[:, :, None, None]  # (C, C) linear -> (C, C, 1, 1) conv, as in LDM
        out[f"{out_prefix}{dst}.{rest}"] = tensor
    return out


def _text_encoder(text_encoder) -> dict[str, torch.Tensor]:
    """CLIPTextModel keys under `cond_stage_model.transformer.text_model.` (transformers >= 5.6
    drops the `text_model.` wrapper from the state dict; the original files always have it)."""
    from transformers import CLIPTextModel

    if not isinstance(text_encoder, CLIPTextModel):
        raise InvalidInputError(
            f"`text_encoder` must be a CLIPTextModel in the SD 1.x layout, got {type(text_encoder).__name__}")
    return {TEXT_PREFIX + k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


__all__ = ["diffusers_to_ldm", "save_single_file"]
