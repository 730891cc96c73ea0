"""`AdapterHandle`: one named adapter spread over many layers of a pipeline.

Kinds (LiDB, LoRA) differ only in how they build each layer's module and pack their weights;
enabling, merging, removing and exporting factors are shared here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from hypernet.adapters.inject import delete_adapter, inject
from hypernet.adapters.layer import AdaptedLinear


class AdapterHandle:
    """A named adapter on `layers` (pipeline-wide names, fixed order) of `pipe`."""

    def __init__(self, pipe, name: str, layers: list[str]):
        self.pipe = pipe
        self.name = name
        self.layer_names = list(layers)
        self.layers: dict[str, AdaptedLinear] = inject(pipe, self.layer_names)

    def modules(self) -> list[nn.Module]:
        return [self.layers[n].adapters[self.name] for n in self.layer_names]

    def parameters(self) -> Iterator[nn.Parameter]:
        for m in self.modules():
            yield from m.parameters()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (A (r, n_in), B (n_out, r)) with the scale folded into B."""
        return {n: m.factors() for n, m in zip(self.layer_names, self.modules(), strict=True)}

    def enable(self, on: bool = True) -> None:
        for layer in self.layers.values():
            (layer.disabled.discard if on else layer.disabled.add)(self.name)

    @contextmanager
    def disabled(self):
        self.enable(False)
        try:
            yield self
        finally:
            self.enable(True)

    def merge(self) -> None:
        for n in self.layer_names:
            self.layers[n].merge(self.name)

    def unmerge(self) -> None:
        for n in reversed(self.layer_names):
            self.layers[n].unmerge(self.name)

    def remove(self) -> None:
        """Take this adapter out of every layer (the wrappers stay; `uninject` removes those)."""
        delete_adapter(self.pipe, self.name)
