"""Stage-2 optimisation pieces: cosine schedule with linear warm-up, EMA of weights."""

from __future__ import annotations

import math

import torch
from torch import nn


def cosine_with_warmup(opt: torch.optim.Optimizer, warmup: int, total: int,
                       min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """LR factor: linear 0 -> 1 over `warmup` steps, then cosine 1 -> `min_ratio` at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class EMA:
    """Exponential moving average of a module's floating-point state (params and buffers).

    Kept in fp32 on the module's device; `state_dict`/`load_state_dict` make it part of exact
    resume. decay 0.999 ~ averaging over the last ~1000 steps.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()
                       if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)

    def copy_to(self, module: nn.Module) -> None:
        """Overwrite `module`'s weights with the averages."""
        own = module.state_dict()
        with torch.no_grad():
            for k, v in self.shadow.items():
                own[k].copy_(v.to(own[k].dtype))


__all__ = ["EMA", "cosine_with_warmup"]
