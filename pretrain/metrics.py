"""Stage-2 metrics: a long-format CSV (step, metric, value) and TensorBoard, rank 0 only.

On resume both are cut back to the checkpoint's step, so a killed-and-resumed run ends with the
same metrics file as an uninterrupted one (no duplicate rows for the replayed steps).
"""

from __future__ import annotations

import csv
from pathlib import Path


class MetricsWriter:
    """Writes nothing on ranks other than 0 (pass `enabled=False` there)."""

    def __init__(self, out: Path, resume_step: int, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.csv_path = out / "metrics.csv"
        self._tb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        rows = [r for r in _rows(self.csv_path) if int(r["step"]) <= resume_step]
        with self.csv_path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "metric", "value"])
            w.writerows([r["step"], r["metric"], r["value"]] for r in rows)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out / "tb"), purge_step=resume_step + 1)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.csv_path.open("a", newline="") as f:
            w = csv.writer(f)
            for k, v in values.items():
                w.writerow([step, k, repr(float(v))])
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, float(v), step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value), ...] from a metrics.csv."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in _rows(Path(path)):
        out.setdefault(r["metric"], []).append((int(r["step"]), float(r["value"])))
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    """Well-formed rows only: a job killed mid-write can leave a torn last line."""
    if not path.is_file():
        return []
    good = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            try:
                int(r["step"]), float(r["value"])
            except (TypeError, ValueError, KeyError):
                continue
            if r.get("metric"):
                good.append(r)
    return good


__all__ = ["MetricsWriter", "read_metrics"]
