"""Helpers for the serving tests (a module, not conftest, so tests can import them)."""

from __future__ import annotations

import time

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

