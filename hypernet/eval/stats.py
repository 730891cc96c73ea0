"""Bootstrap confidence intervals over identities (the unit that was sampled).

Samples of one identity are correlated (same input photo, same fine-tuned weights), so the
resampling unit is the identity: per-identity means are resampled with replacement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from hypernet.errors import InvalidInputError

__all__ = ["Estimate", "bootstrap_mean", "paired_difference"]


@dataclass(frozen=True)
class Estimate:
    """A mean with a percentile bootstrap interval at `level` (n = identities)."""

    mean: float
    lo: float
    hi: float
    n: int
    level: float = 0.95

    def as_dict(self) -> dict:
        return asdict(self)

    def fmt(self, digits: int = 3) -> str:
        if not np.isfinite(self.mean):
            return "n/a"
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def bootstrap_mean(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of per-identity `values` (NaNs dropped) with a percentile bootstrap CI.

    Raises:
        InvalidInputError: `level` outside (0, 1) or `n_boot` < 1.
    """
    if not 0 < level < 1:
        raise InvalidInputError(f"`level` must be in (0, 1), got {level}")
    if n_boot < 1:
        raise InvalidInputError(f"`n_boot` must be >= 1, got {n_boot}")
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, level)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))  # (B, n) resampled identities
    means = v[idx].mean(axis=1)  # (B,)
    a = (1 - level) / 2
    return Estimate(float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a)), int(v.size), level)


def paired_difference(a, b, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of a - b over identities measured under both conditions (paired bootstrap)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InvalidInputError(f"`a` and `b` must pair up, got shapes {a.shape} and {b.shape}")
    return bootstrap_mean(a - b, n_boot=n_boot, level=level, seed=seed)
