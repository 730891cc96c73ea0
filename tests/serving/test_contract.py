"""The API contract passes `buf lint` (STANDARD) and has no breaking change against its committed
baseline (`proto/contract-baseline.json`), with the pinned buf that `make buf` installs from the
npm registry. This is how `make test` (and so CI) runs the contract checks; `make lint` runs
them too, plus `buf breaking` against the previous commit."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".cache" / "buf" / "node_modules" / ".bin" / "buf"

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def buf() -> Path:
    if shutil.which("npm") is None:
        pytest.skip("npm (Node.js) is not installed: buf comes from the npm registry (@bufbuild/buf)")
    done = subprocess.run(["make", "--no-print-directory", "buf"], cwd=ROOT, capture_output=True,
                          text=True, timeout=540)
    assert done.returncode == 0, f"make buf failed:\n{done.stdout}\n{done.stderr}"
    return BUF


def _buf(buf: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(buf), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_proto_passes_buf_lint(buf):
    done = _buf(buf, "lint", "proto")
    assert done.returncode == 0, done.stdout + done.stderr


def test_proto_has_no_breaking_change_against_the_baseline(buf):
    done = _buf(buf, "breaking", "proto", "--against", "proto/contract-baseline.json")
    assert done.returncode == 0, done.stdout + done.stderr


def test_buf_lint_catches_what_issue_15_fixed(buf, tmp_path):
    """The check can fail: the pre-issue-15 style (bare enum values, a shared event response)."""
    shutil.copy(ROOT / "proto" / "buf.yaml", tmp_path / "buf.yaml")
    (tmp_path / "a.proto").write_text(
        'syntax = "proto3";\npackage demo.v1;\n'
        "enum Method { METHOD_UNSPECIFIED = 0; LORA = 1; }\n"
        "message Event { Method method = 1; }\n"
        "message GoRequest {}\n"
        "service Personalization { rpc Go(GoRequest) returns (Event); }\n")
    (tmp_path / "demo" / "v1").mkdir(parents=True)
    (tmp_path / "a.proto").rename(tmp_path / "demo" / "v1" / "a.proto")
    out = _buf(buf, "lint", cwd=tmp_path).stdout
    for rule in ('"LORA" should be prefixed with "METHOD_"', 'should be suffixed with "Service"',
                 'should be named "GoResponse"'):
        assert rule in out, out
