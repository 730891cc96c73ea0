"""LiDB-from-scratch settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypernet.errors import InvalidInputError
from hypernet.methods.config import MethodConfig
from hypernet.training import TrainConfig


def _default_train() -> TrainConfig:
    # The paper gives no schedule. r=1 cores start at B_train = 0, so they need a far larger step
    # than a full LoRA. Of 1e-3, 3e-3 and 1e-2 for 400 steps, 3e-3 scored best on 24 held-out people
    # on the face world (above 1e-3 on both face metrics, level with 1e-2: eval_v2/DIAGNOSIS.md
    # section 9). The aux bases are orthonormal, so a step of the core moves delta_W by the same
    # norm on any base; SD scale itself is unmeasured. Pretraining's stage 1 has its own schedule.
    return TrainConfig(steps=400, lr=3e-3, weight_decay=0.0)


@dataclass
class LiDBMethodConfig(MethodConfig):
    """LiDB spec overrides (None: `default_spec_for(pipe)`: a = b = 100, shrunk on small bases)
    plus the prompt and the training schedule."""

    a: int | None = field(default=None, metadata={"help": "A_aux rows (paper: 100)"})
    b: int | None = field(default=None, metadata={"help": "B_aux columns (paper: 100)"})
    r: int = field(default=1, metadata={"help": "rank of the trained core (paper: 1)"})
    aux_seed: int = field(default=0, metadata={"help": "seed of the frozen aux bases"})
    text_encoder: bool = field(default=False, metadata={"help": "also adapt the text encoder's attention"})
    prompt: str = field(default="a {token} face", metadata={"help": "training prompt (the paper's)"})
    train: TrainConfig = field(default_factory=_default_train, metadata={"help": "optimisation"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for k in ("a", "b"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise InvalidInputError(f"`{k}` must be a positive integer or None, got {v!r}")
