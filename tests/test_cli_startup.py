"""`hdb --help` and every subcommand's `--help` answer without importing torch or diffusers.

A user's first contact with the CLI is `--help`; importing torch + diffusers took ~37 s of it on a
busy 2-core machine. Parsers read only light config modules; the work imports the heavy stack.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from hdb.cli import build_parser


def _subcommands(parser: argparse.ArgumentParser | None = None) -> list[list[str]]:
    """Every command path, nested ones included (`base train-face-world`)."""
    parser = parser or build_parser()
    out = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                out += [[name], *([name, *rest] for rest in _subcommands(sub))]
    return out

PROBE = """
import sys
from hdb.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "peft", "timm", "onnxruntime") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
"""


@pytest.mark.parametrize("argv", [["--help"], *[[*path, "--help"] for path in _subcommands()]], ids=" ".join)
def test_help_imports_no_heavy_library(argv):
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, timeout=120)
    assert "usage:" in out.stdout, out.stderr[-2000:]
    heavy = out.stdout.rsplit("HEAVY=", 1)[1].strip()
    assert heavy == "", f"`hdb {' '.join(argv)}` imported {heavy}"
