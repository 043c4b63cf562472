# The interface every parallelism backend implements; the trainer only talks to this.
"""An ``Engine`` owns the (possibly wrapped) model and its optimizer and hides how gradients
are synchronised and how state is sharded: DDP (ddp.py), FSDP2 (fsdp.py) and DeepSpeed ZeRO
(deepspeed.py) implement it; megatron-core plugs in behind the same methods."""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from mmgen.parallel.dist import DistInfo


class Engine(ABC):
    """What the trainer steps.

    Attributes:
        model: callable used for training forwards (may be a wrapper such as DDP).
        module: the plain single-device model (sampling, evaluation, export).
        optimizer: the optimizer the LR scheduler drives.
        dist: rank/world/device of this process.
        dp_size: data-parallel degree (ranks that see different data).
    """

    model: torch.nn.Module
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    dist: DistInfo

    @property
    def dp_size(self) -> int:
        return self.dist.world_size

    @property
    def dp_rank(self) -> int:
        return self.dist.rank

    def accumulate(self, is_last_microbatch: bool):
        """Context for one micro-batch's forward+backward; gradient sync only on the last."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss that is already normalised by *global* counts: backends that
        average gradients over data-parallel ranks must undo that average here."""

    @abstractmethod
    def step(self, grad_clip: float) -> torch.Tensor:
        """Clip (if > 0), step the optimizer, zero gradients; returns the pre-clip grad norm."""

    def skip_step(self) -> None:
        """Drop the accumulated gradients without updating (non-finite loss)."""
        self.optimizer.zero_grad(set_to_none=True)

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write model and optimizer state under ``path`` (called on every rank)."""

    @abstractmethod
    def load(self, path: Path) -> None:
        """Restore what :meth:`save` wrote (called on every rank)."""

    @abstractmethod
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Full, unsharded plain-model state on rank 0 (export)."""


class TorchEngine(Engine):
    """An engine whose gradients torch averages over data-parallel ranks (DDP, FSDP2) and
    whose optimizer is a plain torch optimizer over ``module``'s parameters."""

    def backward(self, loss: torch.Tensor) -> None:
        # the backend averages gradients over ranks; the loss is a global sum-normalised value,
        # so the correct gradient is the sum over ranks: scale by the data-parallel size
        (loss * self.dp_size).backward()

    def step(self, grad_clip: float) -> torch.Tensor:
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = grad_clip if grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):      # sharded (DTensor) gradients: the global norm
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()
