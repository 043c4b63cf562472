# Process-group set-up from torchrun/Slurm environment variables, and the collectives the trainer uses.
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def process_group_backend(requested: str, device: torch.device) -> str:
    """The collective library of a process group: ``requested`` unless ``auto``, which means
    NCCL for CUDA tensors and gloo for CPU tensors (``parallel.dist_backend``)."""
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: str, dist_backend: str = "auto", timeout_minutes: float = 10.0) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=process_group_backend(dist_backend, dev), rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def ensure_process_group(info: DistInfo, dist_backend: str = "auto", timeout_minutes: float = 10.0) -> None:
    """A process group even for one process: FSDP2's device mesh and DeepSpeed need one, and
    ``init_distributed`` creates none for a world of one (DDP runs without)."""
    if dist.is_initialized():
        return
    if info.world_size != 1:
        raise RuntimeError(f"{info.world_size} ranks but no process group: call init_distributed first")
    dist.init_process_group(process_group_backend(dist_backend, info.device), store=dist.HashStore(),
                            rank=0, world_size=1, timeout=datetime.timedelta(minutes=timeout_minutes))


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``t`` in place over ``group`` (None: every rank) and return it.

    Args:
        t: the tensor, on the process group's device.
        group: a process group, e.g. ``Engine.dp_group`` for sums over data-parallel ranks
            only (tensor- or pipeline-parallel peers hold the same values and must not be
            counted twice); None for the default group (all ranks).
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
