# Typed configuration of the parallelism backend (Hydra group `parallel/`).
from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("ddp",)


@dataclass
class ParallelConfig:
    """How the plain model is distributed. One schema for every backend, so a run switches
    backend with ``parallel=<name>`` and nothing else.

    Args:
        name: backend: ``ddp`` (torch DistributedDataParallel; also the single-process path).
        dist_backend: ``auto`` (NCCL on CUDA, gloo on CPU), ``nccl`` or ``gloo``.
        timeout_minutes: collective timeout; a hung collective becomes an error after it.
        find_unused_parameters: DDP option, for models with parameters a step may skip.
        bucket_cap_mb: DDP gradient bucket size.
    """

    name: str = "ddp"
    dist_backend: str = "auto"
    timeout_minutes: float = 10.0
    find_unused_parameters: bool = False
    bucket_cap_mb: int = 25

    def validate(self) -> None:
        if self.name not in BACKENDS:
            raise ValueError(f"parallel.name='{self.name}' is not a backend (available: {', '.join(BACKENDS)})")
        if self.dist_backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"parallel.dist_backend='{self.dist_backend}' must be auto, nccl or gloo")
        if self.timeout_minutes <= 0:
            raise ValueError("parallel.timeout_minutes must be > 0")
