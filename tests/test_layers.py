"""The layer contract (pyproject.toml `[tool.importlinter]`) holds, and the check can fail.

hdb -> benchmarks -> (serving | pretrain) -> hypernet; the library imports none of the edges;
serving and pretrain never import each other; no import circles between sibling modules. A new
arrow anywhere (even a function-level import) fails this test, so CI catches it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("hdb", "benchmarks", "serving", "pretrain", "hypernet")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_layer_contract_is_kept():
    out = _lint_imports(ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_a_new_upward_arrow_breaks_the_contract(tmp_path):
    """The same contracts on a copy of the tree with one library module importing the service."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "_proto", "results"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    errors = tmp_path / "hypernet" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _arrow():\n    import serving.client  # noqa: F401\n")
    out = _lint_imports(tmp_path)
    assert out.returncode != 0, out.stdout[-4000:]
    assert "hypernet.errors -> serving.client" in out.stdout, out.stdout[-4000:]
