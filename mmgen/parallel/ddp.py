# DDP backend: replicated model and optimizer, gradients all-reduced by DistributedDataParallel.
"""``parallel=ddp`` (also the single-process path). Parallelize: activation checkpointing ->
compile on the meta model; the DistributedDataParallel wrapper comes after materialisation
(it broadcasts rank 0's parameters at construction, so it needs real ones)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from mmgen.optim import OptimConfig, build_optimizer
from mmgen.parallel.base import EngineContext, TorchEngine
from mmgen.parallel.config import ParallelConfig
from mmgen.parallel.parallelize import apply_block_transforms


class DDPEngine(TorchEngine):
    """One data-parallel rank: the plain model. Several: DDP over the data-parallel group,
    gloo (CPU) or NCCL (GPU)."""

    def __init__(self, module: torch.nn.Module, cfg: ParallelConfig, optim: OptimConfig, ctx: EngineContext):
        super().__init__(cfg.name, ctx)
        self.module = module
        dev = self.dist.device
        if self.dp_size > 1:
            self.model = DistributedDataParallel(
                module, device_ids=[dev.index] if dev.type == "cuda" else None, process_group=self.dp_group,
                bucket_cap_mb=cfg.bucket_cap_mb, find_unused_parameters=cfg.find_unused_parameters,
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


# -- the backend's registry functions (mmgen.parallel.registry) ----------------------------------
def parallelize(model: torch.nn.Module, cfg: ParallelConfig, ctx: EngineContext, *, compile: bool) -> None:
    """Activation checkpointing -> compile, on the meta-device plain model."""
    apply_block_transforms(model, cfg.activation_checkpointing, compile)


def build_engine(model: torch.nn.Module, cfg: ParallelConfig, optim: OptimConfig, ctx: EngineContext) -> DDPEngine:
    """Wrap the materialised model (DDP when there are several data-parallel ranks)."""
    return DDPEngine(model, cfg, optim, ctx)


def checkpoint_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The replicated weights, one file."""
    if not (ckpt / "model.pt").is_file():
        raise FileNotFoundError(f"{ckpt}: not a DDP checkpoint (no model.pt)")
    return torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
