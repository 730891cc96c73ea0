"""One distributed code path, detected from torchrun's environment (nanoGPT style).

`torchrun --nproc-per-node N -m pretrain ...` sets RANK/WORLD_SIZE/LOCAL_RANK; a plain
`python -m pretrain ...` (or `hdb pretrain ...`) is world size 1 and never creates a process
group. Backend: NCCL when the ranks use CUDA, gloo on CPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from hypernet.device import resolve_device
from hypernet.errors import EnvironmentProblem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_min: float = 120.0) -> DistInfo:
    """Join the torchrun job (if any) and pick this rank's device.

    Raises:
        EnvironmentProblem: WORLD_SIZE > 1 but the process group cannot be created, or more
            ranks than GPUs on this node.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(None if device == "auto" else device)
    if dev.type == "cuda" and dev.index is None:
        if local >= torch.cuda.device_count():
            raise EnvironmentProblem(
                f"LOCAL_RANK must be < the {torch.cuda.device_count()} visible GPUs, got {local}"
            )
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=timedelta(minutes=timeout_min),
                                    device_id=dev if dev.type == "cuda" else None)
        except (RuntimeError, ValueError) as e:
            raise EnvironmentProblem(f"torch.distributed must initialise ({backend}), got {e}") from e
        log.info("rank %d/%d joined (%s, %s)", rank, world, backend, dev)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def is_main_process() -> bool:
    """True on rank 0 (and in a single-process run): the one that logs and writes shared files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op alone); returns `t`."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj):
    """Rank 0's value of `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


__all__ = ["DistInfo", "all_reduce_sum", "barrier", "broadcast_object", "cleanup", "init_distributed",
           "is_main_process"]
