"""A plain LoRA adapter of one layer: delta_W = scale * B @ A (used for the rank-relaxed fine-tune).

The LoRA *baseline* method uses peft itself; this kind exists so a relaxed LoRA can sit beside a
LiDB in the same `AdaptedLinear` and be batched per sample with it.
"""

from __future__ import annotations

import torch
from torch import nn

from hypernet.adapters.lidb.layer import layer_seed


class LoRAAdapter(nn.Module):
    """delta_W = (alpha / r) * B @ A, A (r, n_in) random, B (n_out, r) zero at init."""

    def __init__(self, layer_name: str, n_in: int, n_out: int, r: int, alpha: float | None = None,
                 seed: int = 0, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.scale = (alpha if alpha is not None else r) / r
        gen = torch.Generator(device="cpu").manual_seed(layer_seed(seed, "lora:" + layer_name))
        self.A = nn.Parameter((torch.randn(r, n_in, generator=gen) / n_in**0.5).to(device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(n_out, r, device=device, dtype=dtype))
        self._external: tuple[torch.Tensor, torch.Tensor] | None = None

    def use_weights(self, A: torch.Tensor | None, B: torch.Tensor | None) -> None:
        """External (possibly per-sample) A (.., r, n_in), B (.., n_out, r); None -> own params."""
        self._external = None if A is None else (A, B)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self._external if self._external is not None else (self.A, self.B)
        return A, B * self.scale
