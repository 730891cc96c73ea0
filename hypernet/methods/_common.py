"""Plumbing every method shares: the `train` entry point around a method's own fit, photos ->
pixels, prompts, metadata, peft clean-up."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from hypernet.errors import InvalidInputError
from hypernet.photos import Detector, load_photos

if TYPE_CHECKING:
    from hypernet.training import TrainConfig, TrainData, TrainResult

C = TypeVar("C")  # a method's config class
A = TypeVar("A")  # a method's artifact class


def pipe_resolution(pipe) -> int:
    """The square image size the base was trained at: the denoiser's latent size x the VAE factor
    (UNets, SD3's transformer), else the VAE's own sample size (FLUX's transformer has none; the
    VAE config says 1024 on FLUX.1, 64 on the tiny FLUX)."""
    from hypernet.base.arch import denoiser

    size = getattr(denoiser(pipe).config, "sample_size", None)
    if size is None:
        return int(pipe.vae.config.sample_size)
    return int(size) * int(getattr(pipe, "vae_scale_factor", 8))


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


@dataclasses.dataclass
class TrainCall:
    """One call of a method's `train`: whose photos, and the caller's progress, stop and
    checkpoint controls, passed on by `fit` so a method's body holds only what is its own.

    The photos are read when the method asks (`pixels`), so a method's own checks on its inputs
    can still come before the (slow) photo loading.
    """

    photos: Any  # a tensor, a directory, files or bytes: whatever `as_pixels` takes
    token: str
    class_noun: str
    detector: Detector = "auto"
    progress: Callable | None = None
    should_stop: Callable[[], bool] | None = None
    checkpoint_dir: str | Path | None = None
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def pixels(self, pipe) -> torch.Tensor:
        """The photos as (N, 3, R, R) in [-1, 1] at the base's resolution."""
        return as_pixels(pipe, self.photos, self.detector)

    def prompt(self, template: str) -> str:
        """`template` with this call's token and class noun filled in."""
        return format_prompt(template, self.token, self.class_noun)

    def fit(self, pipe, params: list[torch.nn.Parameter], data: TrainData, cfg: TrainConfig, **kw) -> TrainResult:
        """The shared training loop (`hypernet.training.train`) under the caller's controls;
        `kw` are the loop's other keywords (`stage`, `text_encoder_trains`, ...)."""
        from hypernet.training import train

        return train(
            pipe,
            params,
            data,
            cfg,
            progress=self.progress,
            should_stop=self.should_stop,
            checkpoint_dir=self.checkpoint_dir,
            **kw,
        )

    def seconds(self) -> float:
        """Seconds since the call started."""
        return time.perf_counter() - self.started

    def metadata(self, kind: str, prompt: str, final_loss: float, config: Any, **extra: str) -> dict[str, str]:
        """The "hdb_*" metadata a .safetensors artifact carries (safetensors wants str values);
        `extra` are the method's own keys."""
        return {
            "hdb_method": kind,
            "hdb_token": self.token,
            "hdb_class_noun": self.class_noun,
            "hdb_prompt": prompt,
            **extra,
            "hdb_final_loss": f"{final_loss:.6f}",
            "hdb_train_seconds": f"{self.seconds():.2f}",
            "hdb_config": config_json(config),
        }


def personaliser(config_cls: type[C], fit: Callable[[Any, TrainCall, C], A], kind: str | None = None
                 ) -> Callable[..., A]:
    """A method's public `train` (the `Personaliser` signature) around its `fit(pipe, call, config)`.

    The signature, the default config, the token check, the base-arch check (`kind`: the method's
    registry name, see `hypernet.methods.base.METHOD_ARCHS`) and the clock are the same for every
    method, so they live here once; the returned function carries `fit`'s docstring.
    """

    def train(
        pipe,
        photos,
        token: str = "ohwx",
        class_noun: str = "person",
        config: C | None = None,
        progress: Callable | None = None,
        *,
        should_stop: Callable[[], bool] | None = None,
        checkpoint_dir: str | Path | None = None,
        detector: Detector = "auto",
    ) -> A:
        config = config or config_cls()
        check_token(token, class_noun)
        if kind is not None:
            from hypernet.methods.base import check_method_arch

            check_method_arch(kind, pipe)
        return fit(pipe, TrainCall(photos, token, class_noun, detector, progress, should_stop, checkpoint_dir), config)

    train.__doc__, train.__module__, train.__qualname__ = fit.__doc__, fit.__module__, "train"
    # help() and inspect name the method's own config and artifact types rather than C and A.
    train.__annotations__ |= {"config": f"{config_cls.__name__} | None", "return": fit.__annotations__.get("return")}
    return train


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
