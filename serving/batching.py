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


BatchKey = tuple[Hashable, Hashable]  # (shape, layout); layout None: the bare base


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
    #: (shape, layout): works with `compatible` keys may share a UNet call. `Engine.batch_key`
    #: sets it (the library decides: shape = steps, guidance, size; layout = adapter layout).
    batch_key: BatchKey = ((), None)


def compatible(a: BatchKey, b: BatchKey) -> bool:
    """Equal shape, and equal adapter layouts (the bare base, layout None, fits any)."""
    return a[0] == b[0] and (a[1] is None or b[1] is None or a[1] == b[1])


def take_compatible(pending: list, key: BatchKey, limit: int, key_of) -> tuple[list, BatchKey]:
    """Remove and return up to `limit` items of `pending` compatible with `key`, in order.

    Returns the chosen items and the batch's key, narrowed to a concrete layout once one is
    chosen (a batch started by a bare-base image can then only take that layout).
    """
    chosen, kept = [], []
    for item in pending:
        k = key_of(item)
        if len(chosen) < limit and k is not None and compatible(key, k):
            chosen.append(item)
            if key[1] is None:
                key = k
        else:
            kept.append(item)
    pending[:] = kept
    return chosen, key
