"""Textual Inversion settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypernet.errors import InvalidInputError
from hypernet.methods.config import MethodConfig
from hypernet.training import TrainConfig


def _default_train() -> TrainConfig:
    # diffusers' textual_inversion example (README): 3000 steps at lr 5e-4. No weight decay:
    # decay pulls the new vectors toward zero, off the manifold of real token embeddings.
    return TrainConfig(steps=3000, lr=5e-4, weight_decay=0.0)


@dataclass
class TIMethodConfig(MethodConfig):
    num_vectors: int = field(default=1, metadata={"help": "embedding vectors the token stands for"})
    prompt: str = field(default="a photo of {token} {class_noun}", metadata={"help": "training prompt"})
    train: TrainConfig = field(default_factory=_default_train, metadata={"help": "optimisation"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_vectors, int) or not 1 <= self.num_vectors <= 16:
            raise InvalidInputError(f"`num_vectors` must be an integer in 1..16, got {self.num_vectors!r}")
