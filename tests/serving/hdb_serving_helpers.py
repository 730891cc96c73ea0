"""Helpers for the serving tests (a module, not conftest, so tests can import them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest


def rpc_code(fn, *args, **kwargs) -> grpc.RpcError:
    """Call `fn` (consuming a stream), expecting an RpcError; returns it."""
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    return info.value


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `predicate` (a state, never a duration, is what tests check)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)



def start_serve_process(tmp_path: Path, base_dir: Path, hypernet_dir: Path | None = None,
                        env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int, list[str]]:
    """`hdb serve --base base_dir [--hypernet hypernet_dir]` in a subprocess on a free port; returns
    (the process, its port, its stderr lines so far and to come). The caller stops it."""
    cmd = [sys.executable, "-m", "hdb.cli", "serve", "--port", "0",
           "--metrics-port", "-1", "--no-warmup", "--base", str(base_dir),
           "--store", str(tmp_path / "store"), "--log-format", "json", "--grace-s", "60", "--device", "cpu"]
    if hypernet_dir is not None:
        cmd += ["--hypernet", str(hypernet_dir)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    lines: list[str] = []
    port: list[int] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("{") and '"listening"' in line:
                port.append(int(json.loads(line)["address"].rsplit(":", 1)[1]))

    threading.Thread(target=read, daemon=True).start()
    wait_until(lambda: port or proc.poll() is not None, timeout=180, what="the server to listen")
    assert port, "".join(lines[-20:])
    return proc, port[0], lines
