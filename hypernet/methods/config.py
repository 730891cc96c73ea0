"""What every method's settings share: the training schedule and the flat shortcuts onto it.

Each method's own `config.py` subclasses `MethodConfig` and redeclares `train` with that method's
default schedule, so a reader finds a method's defaults (and why they were chosen) in one file:

    @dataclass
    class LoRAMethodConfig(MethodConfig):
        rank: int = field(default=4, ...)
        train: TrainConfig = field(default_factory=_default_train, metadata={"help": "optimisation"})

        def __post_init__(self) -> None:
            super().__post_init__()  # folds steps/lr/seed into train
            ...  # the method's own checks
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypernet.training import TrainConfig


@dataclass
class MethodConfig:
    """The optimisation schedule (`train`, no default here: each method states its own) and the
    `steps`/`lr`/`seed` shortcuts that the CLI, the server and the benchmarks set without
    building a `TrainConfig`; `__post_init__` folds the shortcuts that are not None into `train`.
    """

    train: TrainConfig = field(metadata={"help": "optimisation"})
    steps: int | None = field(default=None, metadata={"help": "shortcut: overrides train.steps"})
    lr: float | None = field(default=None, metadata={"help": "shortcut: overrides train.lr"})
    seed: int | None = field(default=None, metadata={"help": "shortcut: overrides train.seed"})

    def __post_init__(self) -> None:
        self.train = self.train.with_overrides(steps=self.steps, lr=self.lr, seed=self.seed)
