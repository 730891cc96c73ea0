"""The shared training loop and its parts: config, cached data, losses, per-arch objectives, checkpoints.

The names below load lazily (PEP 562): `hypernet.training.config` is read by CLI parsers that
must start without importing torch and diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypernet.lazy import lazy_exports

if TYPE_CHECKING:  # the names, for type checkers and linters
    from hypernet.training.config import TrainConfig
    from hypernet.training.data import (
        TrainData,
        build_train_data,
        embed_ids,
        encode_conditioning,
        encode_images,
        encode_prompts,
        tokenize,
    )
    from hypernet.training.loop import ProgressEvent, TrainingCancelled, TrainResult, train
    from hypernet.training.losses import diffusion_loss, make_noise_scheduler, snr
    from hypernet.training.objectives import Objective, objective_for

__all__ = [
    "Objective",
    "ProgressEvent",
    "TrainConfig",
    "TrainData",
    "TrainResult",
    "TrainingCancelled",
    "build_train_data",
    "diffusion_loss",
    "embed_ids",
    "encode_conditioning",
    "encode_images",
    "encode_prompts",
    "make_noise_scheduler",
    "objective_for",
    "snr",
    "tokenize",
    "train",
]

_HOME = {
    "TrainConfig": "hypernet.training.config",
    **dict.fromkeys(
        ("TrainData", "build_train_data", "embed_ids", "encode_conditioning", "encode_images", "encode_prompts",
         "tokenize"),
        "hypernet.training.data",
    ),
    **dict.fromkeys(("ProgressEvent", "TrainingCancelled", "TrainResult", "train"), "hypernet.training.loop"),
    **dict.fromkeys(("diffusion_loss", "make_noise_scheduler", "snr"), "hypernet.training.losses"),
    **dict.fromkeys(("Objective", "objective_for"), "hypernet.training.objectives"),
}


__getattr__ = lazy_exports(__name__, _HOME)
