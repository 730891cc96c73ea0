"""Stage-2 checkpoints with exact resume, written by every rank, published atomically.

    stage2/checkpoints/step-0000040/
        state.pt          model, optimizer, scheduler, EMA, step, settings key (rank 0)
        rng-rank0.pt ...  each rank's RNG states (torch CPU/CUDA, numpy, python)

All ranks write into a hidden `.step-N.tmp/` folder; after a barrier rank 0 renames it, so a
folder named `step-N` is always complete, whatever moment the job was killed at.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from hypernet.errors import InvalidInputError
from pretrain.distributed import DistInfo, barrier

log = logging.getLogger(__name__)


def _name(step: int) -> str:
    return f"step-{step:07d}"


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    if not ckpt_dir.is_dir():
        return None
    done = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and (p / "state.pt").is_file())
    return done[-1] if done else None


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(ckpt_dir: Path, step: int, state: dict, dist: DistInfo, keep: int) -> Path:
    """Collective: every rank must call it at the same step. Returns the published folder."""
    tmp = ckpt_dir / f".{_name(step)}.tmp"
    final = ckpt_dir / _name(step)
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(dist.device), tmp / f"rng-rank{dist.rank}.pt")
    if dist.is_main:
        torch.save(state, tmp / "state.pt")
    barrier()
    if dist.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        old = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
        log.info("stage2: checkpoint %s", final)
    barrier()
    return final


def load_checkpoint(path: Path, key: str, dist: DistInfo) -> dict:
    """Rank's view of a checkpoint: state (on CPU) and its own RNG restored.

    Raises:
        InvalidInputError: the checkpoint was made under other training settings.
    """
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    if state.get("key") != key:
        raise InvalidInputError(
            f"stage-2 checkpoint {path} must come from the same settings to resume (key {key}), got "
            f"key {state.get('key')}; use a new --output-dir or delete {path.parent}"
        )
    rng = path / f"rng-rank{dist.rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=False), dist.device)
    else:
        log.warning("stage2: %s has no RNG state for rank %d (world size changed?): resume is not "
                    "bit-exact", path, dist.rank)
    return state


__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]
