# Parallelism backends behind one Engine interface; chosen by `parallel.name`.
from __future__ import annotations

from mmgen.parallel.base import Engine
from mmgen.parallel.dist import DistInfo


def build_engine(module, parallel_cfg, optim_cfg, dist: DistInfo, *, micro_batch_size: int = 1,
                 grad_accum: int = 1, precision: str = "auto") -> Engine:
    """Wrap the plain model according to ``parallel_cfg.name`` and build its optimizer.

    Args:
        module: the plain model, materialised on ``dist.device``.
        parallel_cfg: the ParallelConfig.
        optim_cfg: the OptimConfig.
        dist: rank/world/device.
        micro_batch_size, grad_accum, precision: ``data.batch_size``, ``trainer.grad_accum`` and
            ``trainer.precision``, which DeepSpeed's config needs (the component receives its
            sub-configs only, so the trainer passes these facts explicitly).
    """
    if parallel_cfg.name == "ddp":
        from mmgen.parallel.activation_checkpointing import apply_activation_checkpointing
        from mmgen.parallel.ddp import apply_ddp

        apply_activation_checkpointing(module, parallel_cfg.activation_checkpointing)
        return apply_ddp(module, parallel_cfg, optim_cfg, dist)
    if parallel_cfg.name == "fsdp2":
        from mmgen.parallel.fsdp import apply_fsdp

        return apply_fsdp(module, parallel_cfg, optim_cfg, dist)
    if parallel_cfg.is_zero:
        from mmgen.parallel.deepspeed import apply_deepspeed

        return apply_deepspeed(module, parallel_cfg, optim_cfg, dist, micro_batch_size=micro_batch_size,
                               grad_accum=grad_accum, precision=precision)
    raise ValueError(f"unknown parallel backend '{parallel_cfg.name}'")
