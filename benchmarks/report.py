"""REPORT.md from the result JSONs (placeholder; filled in below)."""

from __future__ import annotations

from pathlib import Path


def write_report(out_dir: Path) -> Path:
    path = Path(out_dir) / "REPORT.md"
    path.write_text("# Benchmarks\n")
    return path
