"""Dynamic batching policy for Generate: which queued images may share one UNet call.

Every image is one `GenWork`. Images with equal `batch_key` (as the library defines it: steps,
guidance, size, adapter layout; adapters without per-sample weights only batch with themselves)
run together through the library's `generate_batch`, whichever request or identity they came
from, up to `max_batch` images; a partial batch waits at most `max_wait_s` for more compatible
work to arrive.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from hypernet.errors import InvalidInputError


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int = field(default=8, metadata={"help": "most images per UNet call"})
    max_wait_s: float = field(default=0.01, metadata={
        "help": "longest a partial batch waits for compatible work (latency vs. throughput)"})

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise InvalidInputError(f"`max_batch` must be >= 1, got {self.max_batch}")
        if not self.max_wait_s >= 0:
            raise InvalidInputError(f"`max_wait_s` must be >= 0, got {self.max_wait_s}")


@dataclass
class GenWork:
    """One image to generate (a request for n images becomes n of these, seeds seed..seed+n-1)."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    height: int
    width: int
    identity: Any = None  # a loaded personalisation (see serving.engine), or None for the base
    #: Works with equal keys may share a UNet call; `Engine.batch_key` sets it (the library
    #: decides what is compatible: steps, guidance, size, adapter layout).
    batch_key: Hashable = None


def take_compatible(pending: list, key: Hashable, limit: int, key_of) -> list:
    """Remove and return up to `limit` items of `pending` whose `key_of(item) == key`, in order."""
    chosen, kept = [], []
    for item in pending:
        if len(chosen) < limit and key_of(item) == key:
            chosen.append(item)
        else:
            kept.append(item)
    pending[:] = kept
    return chosen
