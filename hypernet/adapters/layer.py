"""`AdaptedLinear`: a wrapper around a base `nn.Linear` that holds named low-rank adapters.

Every adapter kind (LiDB, LoRA) only has to provide its low-rank factors; this module is the one
place that turns factors into an output delta, a weight delta, a merge or an unmerge.

Factors come in two shapes:
- shared: A (r, n_in), B (n_out, r) -> the same delta for every sample;
- per sample: A (N, r, n_in), B (N, n_out, r) -> sample i of the batch gets its own delta
  (a zero row means "no identity"). A batch of k*N samples (classifier-free guidance stacks
  [uncond; cond]) reuses the N rows k times.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from hypernet.errors import InvalidInputError


@runtime_checkable
class LowRankAdapter(Protocol):
    """What an adapter kind must provide: its factors (already scaled)."""

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (A, B): (r, n_in), (n_out, r), or per sample (N, r, n_in), (N, n_out, r)."""
        ...


class AdaptedLinear(nn.Module):
    """A base `nn.Linear` plus named adapters; the base weights are never changed except by
    `merge`, which `unmerge` undoes bit-exactly."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.disabled: set[str] = set()
        self._merged: list[tuple[str, torch.Tensor]] = []  # stack of (name, weight before merge)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # some diffusers code reads `.weight.dtype`
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def merged_adapters(self) -> list[str]:
        return [name for name, _ in self._merged]

    def active_adapters(self) -> list[str]:
        merged = set(self.merged_adapters)
        return [n for n in self.adapters if n not in self.disabled and n not in merged]

    def delta_weight(self, name: str) -> torch.Tensor:
        """The adapter's weight delta B @ A, shape (n_out, n_in). Shared factors only."""
        A, B = self.adapters[name].factors()
        if A.dim() != 2:
            raise InvalidInputError(
                f"`{name}` must hold shared weights to form a weight delta, got per-sample "
                f"weights of shape {tuple(A.shape)}"
            )
        return B @ A  # (n_out, r) @ (r, n_in) -> (n_out, n_in)

    def merge(self, name: str) -> None:
        """Add adapter `name` into the base weight; its forward term is then skipped.

        Raises:
            ValueError: the merged weight would contain NaN/inf (the base is left untouched).
        """
        if name in self.merged_adapters:
            return
        w = self.base_layer.weight
        with torch.no_grad():
            new = w + self.delta_weight(name).to(w.dtype)
            if not torch.isfinite(new).all():
                raise InvalidInputError(f"adapter `{name}` must have finite weights to merge, got NaN/inf")
            self._merged.append((name, w.detach().clone()))
            w.copy_(new)

    def unmerge(self, name: str | None = None) -> None:
        """Undo the most recent merge (which must be `name` when given), restoring the exact
        base weight that was there before it."""
        if not self._merged:
            return
        if name is not None and self._merged[-1][0] != name:
            raise InvalidInputError(
                f"`name` must be the last merged adapter {self._merged[-1][0]!r}, got {name!r}"
            )
        _, before = self._merged.pop()
        with torch.no_grad():
            self.base_layer.weight.copy_(before)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        for name in self.active_adapters():
            A, B = self.adapters[name].factors()
            y = y + _low_rank_apply(x, A.to(x.dtype), B.to(x.dtype))
        return y


def _low_rank_apply(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """x (N', ..., n_in) -> delta (N', ..., n_out) for shared or per-sample factors."""
    if A.dim() == 2:
        return (x @ A.T) @ B.T  # (..., n_in) -> (..., r) -> (..., n_out)
    n = A.shape[0]
    if x.shape[0] % n != 0:
        raise InvalidInputError(
            f"batch size must be a multiple of the {n} per-sample adapter rows, got {x.shape[0]}"
        )
    reps = x.shape[0] // n
    if reps > 1:  # CFG: [uncond; cond] stacks -> reuse rows in the same order
        A, B = A.repeat(reps, 1, 1), B.repeat(reps, 1, 1)
    xs = x.reshape(x.shape[0], -1, x.shape[-1])  # (N', T, n_in)
    h = torch.bmm(xs, A.transpose(1, 2))  # (N', T, r)
    out = torch.bmm(h, B.transpose(1, 2))  # (N', T, n_out)
    return out.reshape(*x.shape[:-1], out.shape[-1])
