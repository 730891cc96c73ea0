"""Plumbing every method shares: photos -> pixels, prompts, metadata, peft clean-up."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from hypernet.errors import InvalidInputError
from hypernet.photos import Detector, load_photos


def pipe_resolution(pipe) -> int:
    """The square image size the base was trained at (UNet latent size x VAE factor)."""
    return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))


def as_pixels(pipe, photos, detector: Detector = "auto") -> torch.Tensor:
    """Photos as (N, 3, R, R) in [-1, 1] at the base's resolution.

    Accepts a tensor already preprocessed, or anything `load_photos` takes (a directory, files,
    bytes) - which face-crops and resizes through the one shared `preprocess` path.
    """
    res = pipe_resolution(pipe)
    if isinstance(photos, torch.Tensor):
        if photos.dim() == 3:
            photos = photos[None]
        if photos.dim() != 4 or photos.shape[1] != 3 or photos.shape[-2:] != (res, res):
            raise InvalidInputError(f"`photos` must be (N, 3, {res}, {res}) for this base, got {tuple(photos.shape)}")
        return photos.float()
    return load_photos(photos, res, detector=detector)


_TOKEN_RE = re.compile(r"^[A-Za-z0-9_<>\-]{1,40}$")


def check_token(token: str, class_noun: str) -> None:
    if not isinstance(token, str) or not _TOKEN_RE.match(token):
        raise InvalidInputError(f"`token` must be one word of 1-40 letters/digits/_<>-, got {token!r}")
    if not isinstance(class_noun, str) or not class_noun.strip() or len(class_noun) > 60:
        raise InvalidInputError(f"`class_noun` must be a non-empty phrase of <= 60 characters, got {class_noun!r}")


def format_prompt(template: str, token: str, class_noun: str) -> str:
    """Fill "{token}" and "{class_noun}" into a prompt template."""
    try:
        return template.format(token=token, class_noun=class_noun)
    except (KeyError, IndexError) as e:
        raise InvalidInputError(
            f"`prompt` template must only use {{token}} and {{class_noun}}, got {template!r}"
        ) from e


def config_json(config: Any) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)


def unwrap_empty_layers(pipe) -> None:
    """Put plain base layers back where an `AdaptedLinear` holds no adapter any more.

    `AdapterHandle.remove` leaves its (now empty) wrappers in place; an empty wrapper computes the
    base output exactly, but unwrapping also restores the models' original state-dict keys.
    """
    from hypernet.adapters.inject import adapted_layers

    for name, layer in adapted_layers(pipe).items():
        if len(layer.adapters) or layer.merged_adapters:
            continue
        comp, _, path = name.partition(".")
        parent_path, _, child = path.rpartition(".")
        root = getattr(pipe, comp)
        parent = root.get_submodule(parent_path) if parent_path else root
        setattr(parent, child, layer.base_layer)


def remove_peft_adapter(model, name: str) -> None:
    """Delete peft adapter `name` from a diffusers or transformers model; when none is left,
    unwrap peft's layers entirely so the model is exactly the base again."""
    config = getattr(model, "peft_config", None) or {}
    if name not in config:
        return
    from diffusers.utils import recurse_remove_peft_layers

    if set(config) == {name}:
        recurse_remove_peft_layers(model)
        if hasattr(model, "peft_config"):
            del model.peft_config
        if hasattr(model, "_hf_peft_config_loaded"):
            model._hf_peft_config_loaded = False
        return
    if hasattr(model, "delete_adapters"):  # diffusers
        model.delete_adapters(name)
    else:  # transformers
        model.delete_adapter(name)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
