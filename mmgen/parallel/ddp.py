# DDP backend: replicated model and optimizer, gradients all-reduced by DistributedDataParallel.
from __future__ import annotations

from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from mmgen.optim import OptimConfig, build_optimizer
from mmgen.parallel.base import TorchEngine
from mmgen.parallel.config import ParallelConfig
from mmgen.parallel.dist import DistInfo


class DDPEngine(TorchEngine):
    """One process: the plain model. Several: DDP over gloo (CPU) or NCCL (GPU)."""

    def __init__(self, module: torch.nn.Module, cfg: ParallelConfig, optim: OptimConfig, dist: DistInfo):
        self.module = module
        self.dist = dist
        if dist.world_size > 1:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.model = DistributedDataParallel(
                module, device_ids=ids, bucket_cap_mb=cfg.bucket_cap_mb,
                find_unused_parameters=cfg.find_unused_parameters,
                gradient_as_bucket_view=cfg.gradient_as_bucket_view)
        else:
            self.model = module
        self.optimizer = build_optimizer(optim, module)

    def accumulate(self, is_last_microbatch: bool):
        if isinstance(self.model, DistributedDataParallel) and not is_last_microbatch:
            return self.model.no_sync()
        return super().accumulate(is_last_microbatch)

    def save(self, path: Path) -> None:
        if self.dist.is_main:  # replicated state: one copy is the whole state
            torch.save(self.module.state_dict(), path / "model.pt")
            torch.save(self.optimizer.state_dict(), path / "optimizer.pt")

    def load(self, path: Path) -> None:
        dev = self.dist.device
        if not (path / "model.pt").is_file():
            raise FileNotFoundError(
                f"{path}: not a DDP checkpoint (no model.pt; written by a sharded backend?); start "
                f"a new run with checkpoint.init_from={path.parent.parent} to take its weights "
                f"into parallel=ddp")
        self.module.load_state_dict(torch.load(path / "model.pt", map_location=dev, weights_only=True))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=dev, weights_only=True))

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}


def apply_ddp(module, cfg: ParallelConfig, optim: OptimConfig, dist: DistInfo) -> DDPEngine:
    return DDPEngine(module, cfg, optim, dist)
