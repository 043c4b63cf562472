# Parallelism backends behind one Engine interface; chosen by `parallel.name` from the registry.
from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from mmgen.parallel.base import Engine, EngineContext
from mmgen.parallel.dims import ParallelDims
from mmgen.parallel.dist import DistInfo
from mmgen.parallel.parallelize import materialize, meta_copy
from mmgen.parallel.registry import BACKENDS, get_backend


def build_engine(model: nn.Module, parallel_cfg, optim_cfg, ctx: EngineContext, *,
                 init: Callable[[nn.Module], None], compile: bool = False) -> Engine:
    """Parallelize the meta-device plain ``model``, materialise and initialise it, and wrap it
    in the engine of backend ``parallel_cfg.name``.

    Args:
        model: the plain model, built under ``torch.device("meta")``.
        parallel_cfg: the ParallelConfig.
        optim_cfg: the OptimConfig.
        ctx: rank/world/device, the parallel layout and the step facts (precision, micro-batch
            size, accumulation steps).
        init: fills a materialised plain model with its initial weights (seeded
            ``init_weights``, or a checkpoint's weights); the result is the same under every
            backend and degree.
        compile: ``trainer.compile`` (every block, in place, after activation checkpointing).
    """
    backend = get_backend(parallel_cfg.name)
    reference = meta_copy(model)   # unsharded: where a sharded layout takes its initial weights from
    backend.parallelize(model, parallel_cfg, ctx, compile=compile)
    # a backend that shards at wrap time (ZeRO-3) may place pretrained weights itself
    local = getattr(backend, "materialize_pretrained", None)
    if not (getattr(init, "loads_local", False) and local and local(model, parallel_cfg, optim_cfg, ctx, init)):
        materialize(model, reference, ctx.dist.device, init)
    del reference
    return backend.build_engine(model, parallel_cfg, optim_cfg, ctx)


__all__ = ["BACKENDS", "DistInfo", "Engine", "EngineContext", "ParallelDims", "build_engine", "get_backend"]
