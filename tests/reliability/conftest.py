"""Reliability fixtures: the serving tests' own fixtures (real servers on loopback ports, tiny
models, `photo_bytes`, `client_for`) reused, plus `rig` for `benchmarks.reliability`'s checks.

tests/serving/conftest.py is loaded under another module name (both folders are test roots
without __init__.py), and tests/serving goes on sys.path for `hdb_serving_helpers`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_SERVING_TESTS = Path(__file__).resolve().parents[1] / "serving"
if str(_SERVING_TESTS) not in sys.path:
    sys.path.insert(0, str(_SERVING_TESTS))
_spec = importlib.util.spec_from_file_location("_hdb_serving_conftest", _SERVING_TESTS / "conftest.py")
_serving = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_serving)

tiny_hypernet_dir = _serving.tiny_hypernet_dir
photo_bytes = _serving.photo_bytes
make_server = _serving.make_server
make_module_server = _serving.make_module_server
client_for = _serving.client_for


@pytest.fixture()
def rig(tiny_base_dir, tiny_hypernet_dir, tmp_path):
    """`benchmarks.reliability.rig.Rig` on the session's tiny models; its servers stop after."""
    from benchmarks.reliability.rig import Rig

    r = Rig(tiny_base_dir, tiny_hypernet_dir, tmp_path, short=True)
    yield r
    r.close()


@pytest.fixture(scope="module")
def module_rig(tiny_base_dir, tiny_hypernet_dir, tmp_path_factory):
    from benchmarks.reliability.rig import Rig

    r = Rig(tiny_base_dir, tiny_hypernet_dir, tmp_path_factory.mktemp("rig"), short=True)
    yield r
    r.close()
