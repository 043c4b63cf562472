# parallel=megatron: megatron-core TP/SP linears, pipeline schedules, DDP and distributed optimizer (README.md).
"""The backend's registry functions (mmgen.parallel.registry). megatron-core is imported only
when a function here runs (importing it costs 8-14 s), so ``import mmgen.parallel.megatron``
is cheap."""
from __future__ import annotations

from pathlib import Path

import torch


def parallelize(model: torch.nn.Module, cfg, ctx, *, compile: bool) -> None:
    """Nothing on the meta model: the megatron form is built from the materialised plain model
    (``build_engine``), whose initialisation (seed or ``checkpoint.init_from``) is the one every
    backend shares."""
    from mmgen.parallel.float8 import check_backend as check_fp8_backend

    check_fp8_backend(ctx.fp8, cfg.name)
    if cfg.activation_checkpointing != "none":
        from mmgen.errors import ConfigError

        raise ConfigError("parallel=megatron: parallel.activation_checkpointing is not wired yet (use none)")
    if compile:
        from mmgen.errors import ConfigError

        raise ConfigError("parallel=megatron: trainer.compile=true is not supported yet")


def build_engine(model: torch.nn.Module, cfg, optim, ctx):
    """This rank's megatron stage cut from the materialised plain ``model`` (see engine.py)."""
    from mmgen.parallel.megatron.engine import build

    return build(model, cfg, optim, ctx)


def checkpoint_state_dict(ckpt: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Full plain weights of a megatron checkpoint, without a process group (export)."""
    from mmgen.parallel.megatron.export import read_weights

    return read_weights(ckpt, trust=trust)
