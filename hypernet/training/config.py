"""`TrainConfig`: the knobs of the one training loop every method shares."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from typing import Literal

from hypernet.errors import InvalidInputError

LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
MixedPrecision = Literal["no", "fp16", "bf16"]

#: Fields that may differ between an interrupted run and its resumption without changing results.
RESUME_FREE_FIELDS = ("checkpoint_every", "progress_bar", "log_every")


@dataclass
class TrainConfig:
    """One optimisation run. Defaults are neutral; each method supplies its published ones.

    A "step" is one optimizer step; it consumes `grad_accum` micro-batches of `batch_size`.
    """

    steps: int = field(default=500, metadata={"help": "optimizer steps"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    batch_size: int = field(default=1, metadata={"help": "photos per micro-batch (drawn with replacement)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr_scheduler: str = field(default="constant", metadata={"help": f"one of {LR_SCHEDULERS}"})
    warmup_steps: int = field(default=0, metadata={"help": "linear LR warm-up steps"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW decoupled weight decay (torch's default)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "clip the global grad norm (None: no clipping); diffusers' default"}
    )
    min_snr_gamma: float | None = field(
        default=None, metadata={"help": "min-SNR loss weighting gamma (Hang et al. 2023 use 5); None: off"}
    )
    mixed_precision: MixedPrecision = field(
        default="no", metadata={"help": "autocast dtype on CUDA: no/fp16/bf16 (ignored on CPU)"}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in backward (less memory, ~30% slower)"}
    )
    flip: bool = field(default=True, metadata={"help": "horizontal-flip augmentation with p=0.5"})
    seed: int = field(default=0, metadata={"help": "seeds batches, flips, noise and timesteps"})
    checkpoint_every: int = field(
        default=0, metadata={"help": "save a resumable checkpoint every N steps (0: only on interrupt)"}
    )
    progress_bar: bool = field(default=False, metadata={"help": "show a tqdm bar on stderr"})
    log_every: int = field(default=50, metadata={"help": "log the loss every N steps (0: never)"})

    def __post_init__(self) -> None:
        for k in ("steps", "batch_size", "grad_accum"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidInputError(f"`{k}` must be a positive integer, got {v!r}")
        for k in ("warmup_steps", "checkpoint_every", "log_every", "seed"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InvalidInputError(f"`{k}` must be a non-negative integer, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise InvalidInputError(f"`lr` must be a positive number, got {self.lr!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise InvalidInputError(f"`lr_scheduler` must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise InvalidInputError(f"`mixed_precision` must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise InvalidInputError(f"`min_snr_gamma` must be > 0 or None, got {self.min_snr_gamma!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise InvalidInputError(f"`max_grad_norm` must be > 0 or None, got {self.max_grad_norm!r}")
        if not 0 <= self.weight_decay:
            raise InvalidInputError(f"`weight_decay` must be >= 0, got {self.weight_decay!r}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise InvalidInputError(
                f"`adam_beta1`/`adam_beta2` must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}"
            )

    def with_overrides(self, **overrides) -> TrainConfig:
        """A copy with the non-None `overrides` (validated again)."""
        kw = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **kw) if kw else self

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def resume_key(self) -> str:
        """What must match for a checkpoint to be resumed under this config."""
        d = asdict(self)
        for k in RESUME_FREE_FIELDS:
            d.pop(k)
        return json.dumps(d, sort_keys=True)
