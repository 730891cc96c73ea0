"""The stage-2 data order: an endless, seeded sequence of (sample, flip) a step maps into exactly.

Global position k -> epoch k // n, a permutation of that epoch seeded by (seed, epoch). Step s,
micro-step m, rank r reads positions s*G + (m*world + r)*B ... + B, G = B * world * accum. So the
data position is a pure function of the step: resuming at step s needs nothing else, and no
sample repeats within an epoch across ranks (DistributedSampler semantics, without the sampler).
"""

from __future__ import annotations

import torch


class SampleStream:
    def __init__(self, n: int, seed: int, flip: bool):
        if n < 1:
            raise ValueError(f"`n` must be >= 1 training sample, got {n}")
        self.n, self.seed, self.flip = n, seed, flip
        self._cache: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def _epoch(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] != e:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            perm = torch.randperm(self.n, generator=g)  # (n,)
            flips = torch.rand(self.n, generator=g) < 0.5 if self.flip else torch.zeros(self.n, dtype=torch.bool)
            self._cache = (e, perm, flips)
        return self._cache[1], self._cache[2]

    def at(self, k: int) -> tuple[int, bool]:
        e, i = divmod(k, self.n)
        perm, flips = self._epoch(e)
        return int(perm[i]), bool(flips[i])

    def micro_batch(self, step: int, micro: int, rank: int, world: int, accum: int,
                    batch: int) -> list[tuple[int, bool]]:
        """The (sample, flip) pairs of one rank's micro-batch."""
        start = step * batch * world * accum + (micro * world + rank) * batch
        return [self.at(start + j) for j in range(batch)]


def step_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from integers (for per-step noise generators)."""
    import hashlib

    h = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


__all__ = ["SampleStream", "step_seed"]
