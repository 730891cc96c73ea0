"""The shared training loop and its parts: config, cached data, losses, checkpoints.

The names below load lazily (PEP 562): `hypernet.training.config` is read by CLI parsers that
must start without importing torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names, for type checkers and linters
    from hypernet.training.config import TrainConfig
    from hypernet.training.data import (
        TrainData,
        build_train_data,
        embed_ids,
        encode_images,
        encode_prompts,
        tokenize,
    )
    from hypernet.training.loop import ProgressEvent, TrainingCancelled, TrainResult, train
    from hypernet.training.losses import diffusion_loss, make_noise_scheduler, snr

__all__ = [
    "ProgressEvent",
    "TrainConfig",
    "TrainData",
    "TrainResult",
    "TrainingCancelled",
    "build_train_data",
    "diffusion_loss",
    "embed_ids",
    "encode_images",
    "encode_prompts",
    "make_noise_scheduler",
    "snr",
    "tokenize",
    "train",
]

_HOME = {
    "TrainConfig": "config",
    **dict.fromkeys(
        ("TrainData", "build_train_data", "embed_ids", "encode_images", "encode_prompts", "tokenize"), "data"
    ),
    **dict.fromkeys(("ProgressEvent", "TrainingCancelled", "TrainResult", "train"), "loop"),
    **dict.fromkeys(("diffusion_loss", "make_noise_scheduler", "snr"), "losses"),
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"hypernet.training.{_HOME[name]}"), name)
    raise AttributeError(f"module 'hypernet.training' has no attribute {name!r}")
