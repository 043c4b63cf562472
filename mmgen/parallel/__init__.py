# Parallelism backends behind one Engine interface; chosen by `parallel.name`.
from __future__ import annotations

from mmgen.parallel.base import Engine
from mmgen.parallel.dist import DistInfo


def build_engine(module, parallel_cfg, optim_cfg, dist: DistInfo) -> Engine:
    """Wrap the plain model according to ``parallel_cfg.name`` and build its optimizer."""
    if parallel_cfg.name == "ddp":
        from mmgen.parallel.ddp import apply_ddp

        return apply_ddp(module, parallel_cfg, optim_cfg, dist)
    raise ValueError(f"unknown parallel backend '{parallel_cfg.name}'")
