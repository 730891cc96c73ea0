"""The shared training loop and its parts: config, cached data, losses, checkpoints."""

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
