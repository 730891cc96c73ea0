"""Resumable checkpoints: everything a run needs to continue bit-for-bit where it stopped.

A checkpoint holds the trained parameters, the optimizer's and LR scheduler's state, the loop's
random generator, the global RNG states (dropout), the step and the losses so far, plus the
config's resume key so a checkpoint is never continued under different settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hypernet.errors import IncompatibleAdapterError
from hypernet.files import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"


def checkpoint_path(checkpoint_dir: str | Path) -> Path:
    return Path(checkpoint_dir) / CHECKPOINT_NAME


def save_checkpoint(checkpoint_dir: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write `state` (torch.save streamed to a temp file in the same folder, then rename).

    Streams to disk rather than through a bytes buffer: a full UNet's AdamW state is gigabytes.
    """
    return atomic_write(checkpoint_path(checkpoint_dir), lambda f: torch.save(state, f))


def load_checkpoint(checkpoint_dir: str | Path, resume_key: str) -> dict[str, Any] | None:
    """The saved state, or None when there is none.

    Raises:
        IncompatibleAdapterError: the checkpoint was made under a different config.
    """
    path = checkpoint_path(checkpoint_dir)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("resume_key") != resume_key:
        raise IncompatibleAdapterError(
            f"checkpoint {path} must come from a run with the same config to resume, got a different one "
            "(delete it to start over)"
        )
    return state


def remove_checkpoint(checkpoint_dir: str | Path) -> None:
    checkpoint_path(checkpoint_dir).unlink(missing_ok=True)
