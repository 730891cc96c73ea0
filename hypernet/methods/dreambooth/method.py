"""DreamBooth: fine-tune the whole UNet (optionally the text encoder) on the photos, with the
class-prior loss. Training works on copies, so the caller's pipeline never changes; the artifact
is a complete diffusers pipeline directory (`StableDiffusionPipeline.from_pretrained` loads it).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from hypernet.base import base_fingerprint
from hypernet.base.loading import MODEL_LOAD_LOCK
from hypernet.errors import IncompatibleAdapterError, InvalidInputError, ModelNotFoundError
from hypernet.methods._common import TrainCall, config_json, dir_size, personaliser, pipe_resolution
from hypernet.methods.base import HDB_META_FILE
from hypernet.methods.dreambooth.config import DreamBoothMethodConfig
from hypernet.methods.dreambooth.prior import class_images
from hypernet.training import build_train_data

log = logging.getLogger(__name__)

KIND = "dreambooth"


def _fit(pipe, call: TrainCall, config: DreamBoothMethodConfig) -> DreamBoothArtifact:
    """Fine-tune copies of the UNet (and text encoder) of `pipe` on photos of one person.

    SD 1.x/2.x and SDXL (UNet only: `train_text_encoder` is refused there); SD3/FLUX are refused
    before this runs (`hypernet.methods.base.METHOD_ARCHS`).
    """
    from hypernet.base.arch import pipeline_arch

    if config.train_text_encoder and pipeline_arch(pipe) != "sd15":
        raise InvalidInputError(
            f"`train_text_encoder` must be False on a {pipeline_arch(pipe)} base (DreamBooth tunes its UNet only "
            "there), got True")
    res = pipe_resolution(pipe)
    pixels = call.pixels(pipe)  # (N, 3, R, R)
    prompt = call.prompt(config.prompt)
    te_trains = config.train_text_encoder
    data = build_train_data(pipe, pixels, prompt, flip=config.train.flip, keep_ids=te_trains)
    if config.prior_preservation:
        class_prompt = call.prompt(config.class_prompt)
        prior_px = class_images(
            pipe, class_prompt, config.num_class_images, res, config.class_image_steps, config.class_images_dir
        )
        data.prior = build_train_data(pipe, prior_px, class_prompt, flip=config.train.flip, keep_ids=te_trains)
        data.prior_loss_weight = config.prior_loss_weight
    unet = copy.deepcopy(pipe.unet)
    text_encoder = copy.deepcopy(pipe.text_encoder) if te_trains else None
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if te_trains else [])
    result = call.fit(
        pipe,
        params,
        data,
        config.train,
        text_encoder_trains=te_trains,
        unet=unet,
        text_encoder=text_encoder if te_trains else pipe.text_encoder,
        stage="dreambooth",
    )
    for m in (unet, text_encoder):
        if m is not None:
            m.requires_grad_(False).eval()
    meta = {
        "method": KIND,
        "token": call.token,
        "class_noun": call.class_noun,
        "prompt": prompt,
        "train_text_encoder": te_trains,
        "base_fingerprint": base_fingerprint(pipe),
        "final_loss": result.losses[-1],
        "train_seconds": round(call.seconds(), 2),
        "config": json.loads(config_json(config)),
    }
    return DreamBoothArtifact(unet, text_encoder, meta, base=pipe)


train = personaliser(DreamBoothMethodConfig, _fit, KIND)


class DreamBoothArtifact:
    """A fine-tuned UNet (and maybe text encoder); applying swaps them into the pipeline."""

    kind = KIND

    def __init__(self, unet, text_encoder=None, metadata: dict | None = None, *, base=None, source: Path | None = None):
        self.unet, self.text_encoder = unet, text_encoder
        self.metadata = dict(metadata or {})
        self._base = base  # the pipeline trained from: its VAE, tokenizer, scheduler are saved with us
        self._source = source  # the directory we were loaded from (re-saved by copying)
        self._originals: dict[int, tuple] = {}

    @property
    def token(self) -> str | None:
        return self.metadata.get("token")

    def save(self, path: str | Path) -> int:
        """Write a complete diffusers pipeline directory (atomically: built aside, then renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            if self._base is not None and not isinstance(self._base, StableDiffusionPipeline):
                # SDXL: the base's own pipeline class with our UNet (its text encoders are frozen)
                type(self._base)(**{**self._base.components, "unet": self.unet}).save_pretrained(
                    str(tmp), safe_serialization=True)
            elif self._base is not None:
                b = self._base
                pipe = StableDiffusionPipeline(
                    vae=b.vae,
                    text_encoder=self.text_encoder or b.text_encoder,
                    tokenizer=b.tokenizer,
                    unet=self.unet,
                    scheduler=b.scheduler,
                    safety_checker=None,
                    feature_extractor=None,
                    requires_safety_checker=False,
                )
                pipe.save_pretrained(str(tmp), safe_serialization=True)
            elif self._source is not None:
                shutil.copytree(self._source, tmp, dirs_exist_ok=True)
                self.unet.save_pretrained(str(tmp / "unet"))
                if self.text_encoder is not None:
                    self.text_encoder.save_pretrained(str(tmp / "text_encoder"))
            else:
                raise InvalidInputError("DreamBooth artifact must know its base pipeline to be saved, got neither")
            (tmp / HDB_META_FILE).write_text(json.dumps(self.metadata, indent=2, sort_keys=True, default=str))
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dir_size(path)

    @classmethod
    def load(cls, path: str | Path) -> DreamBoothArtifact:
        """Load the UNet (and the text encoder when it was trained, or when the directory is a
        plain diffusers pipeline without our metadata) of a pipeline directory."""
        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(f"{path} must be a diffusers pipeline directory with model_index.json")
        meta_file = path / HDB_META_FILE
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        with MODEL_LOAD_LOCK:  # diffusers' loading patches torch.nn.Module process-wide
            unet = UNet2DConditionModel.from_pretrained(str(path / "unet"), local_files_only=True)
            te = None
            if meta.get("train_text_encoder", not meta):
                te = CLIPTextModel.from_pretrained(str(path / "text_encoder"), local_files_only=True)
        for m in (unet, te):
            if m is not None:
                m.requires_grad_(False).eval()
        return cls(unet, te, meta, source=path)

    def apply(self, pipe) -> None:
        """Swap our models into `pipe` (moved to its device and dtype)."""
        if id(pipe) in self._originals:
            raise InvalidInputError("artifact must not be applied twice to the same pipeline, got a second apply")
        _check_same_architecture(pipe.unet, self.unet, "unet")
        if self.text_encoder is not None:
            _check_same_architecture(pipe.text_encoder, self.text_encoder, "text_encoder")
        self._originals[id(pipe)] = (pipe.unet, pipe.text_encoder)
        pipe.unet = _like(self.unet, pipe.unet)
        if self.text_encoder is not None:
            pipe.text_encoder = _like(self.text_encoder, pipe.text_encoder)

    def remove(self, pipe) -> None:
        orig = self._originals.pop(id(pipe), None)
        if orig is not None:
            pipe.unet, pipe.text_encoder = orig


def _check_same_architecture(base: torch.nn.Module, ours: torch.nn.Module, name: str) -> None:
    a = {k: v for k, v in dict(base.config).items() if not k.startswith("_")}
    b = {k: v for k, v in dict(ours.config).items() if not k.startswith("_")}
    if hasattr(base.config, "to_dict"):  # transformers configs
        a, b = base.config.to_dict(), ours.config.to_dict()
        for d in (a, b):
            for k in [k for k in d if k.startswith("_") or k in ("transformers_version", "dtype", "torch_dtype")]:
                d.pop(k)
    if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
        raise IncompatibleAdapterError(f"DreamBooth {name} must have the base's architecture, got a different config")


def _like(model: torch.nn.Module, ref: torch.nn.Module) -> torch.nn.Module:
    """`model` moved to `ref`'s device and dtype (in place; no-op when they already match)."""
    p, q = next(model.parameters()), next(ref.parameters())
    if (p.device, p.dtype) != (q.device, q.dtype):
        model.to(q.device, q.dtype)
    return model
