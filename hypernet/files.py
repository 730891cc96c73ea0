"""Crash-safe file writes (a reader sees the old file or the complete new one, never a torn one),
and reading a .safetensors file a user handed us with a clear error when it is not one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from hypernet.errors import InvalidInputError


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Stream `write(f)` into a temp file beside `path`, fsync, rename over `path`, fsync the folder.

    Streaming (rather than building bytes first) keeps multi-GB checkpoints out of memory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """`atomic_write` of a bytes object."""
    return atomic_write(path, lambda f: f.write(data))


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """-> (tensors, metadata) of the .safetensors file at `path`.

    Raises:
        InvalidInputError: the file is missing or not safetensors; `what` names what it should
            be (e.g. "a LoRA .safetensors file") so the message says what the user got wrong.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types (and OSError for a missing file)
        raise InvalidInputError(f"{path} must be {what}, got unreadable data ({e})") from e
    return tensors, meta
