# FSDP2 backend: parameters, gradients and optimizer states sharded per block (torch fully_shard).
"""``parallel=fsdp2``: the PyTorch-native reference for sharded data parallelism.

Parallelize (on the meta model, :mod:`mmgen.parallel.parallelize`): activation checkpointing
-> compile -> ``fully_shard`` on every block of ``module.layers``, then on the root
(embeddings, norms and heads). Parameters become DTensors sharded on dim 0 over the
data-parallel mesh; :func:`~mmgen.parallel.parallelize.materialize` then allocates each rank's
shards and copies them out of an unsharded initialisation, so the weights equal those of one
process. Each block's parameters are all-gathered just before its forward/backward and freed
after (``parallel.reshard_after_forward``), gradients are reduce-scattered. The optimizer is
mmgen's AdamW over the sharded parameters, so its states are sharded too.

Checkpoints go through torch.distributed.checkpoint (DCP): every rank writes its shards under
``step_N/fsdp/``, and a resume may use another number of ranks (DCP reshards on load).
``mmgen export`` turns the directory into one plain state dict (``dcp_to_torch_save``).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from mmgen.optim import OptimConfig, build_optimizer
from mmgen.parallel.base import EngineContext, TorchEngine
from mmgen.parallel.config import ParallelConfig
from mmgen.parallel.dist import ensure_process_group
from mmgen.parallel.parallelize import apply_block_transforms

FSDP_DIR = "fsdp"
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parallelize(module: torch.nn.Module, cfg: ParallelConfig, ctx: EngineContext, *, compile: bool) -> None:
    """Activation checkpointing -> compile -> ``fully_shard`` per block and on the root, on the
    meta-device plain model (registry function)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    apply_block_transforms(module, cfg.activation_checkpointing, compile)
    ensure_process_group(ctx.dist, cfg.dist_backend, cfg.timeout_minutes)  # a mesh even for one process
    mesh = ctx.dims.dp_mesh(ctx.dist.device.type)
    # fp32 parameters by default: the same numbers as DDP under autocast. bf16 all-gathers
    # half the bytes and computes in bf16; gradients are still reduced in fp32.
    policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[cfg.fsdp_param_dtype], reduce_dtype=torch.float32)
    last = len(module.layers) - 1
    for i, block in enumerate(module.layers):
        # the last block's backward starts right after its forward: freeing its parameters
        # in between would only gather them again at once
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.reshard_after_forward and i < last)
    # the root keeps the embeddings, norm and heads; it is gathered for the whole forward
    # (the tied text head reads tok_embeddings.weight after the blocks)
    fully_shard(module, mesh=mesh, reshard_after_forward=False, mp_policy=policy)


def build_engine(module: torch.nn.Module, cfg: ParallelConfig, optim: OptimConfig, ctx: EngineContext):
    """The engine over the sharded, initialised model (registry function)."""
    return FSDPEngine(module, cfg, optim, ctx)


class FSDPEngine(TorchEngine):
    def __init__(self, module: torch.nn.Module, cfg: ParallelConfig, optim: OptimConfig, ctx: EngineContext):
        super().__init__(cfg.name, ctx)
        self.module = self.model = module
        self.optimizer = build_optimizer(optim, module)

    def accumulate(self, is_last_microbatch: bool):
        # reduce-scatter once per optimizer step: earlier micro-batches keep unsharded grads
        self.module.set_requires_gradient_sync(is_last_microbatch)
        return contextlib.nullcontext()

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.module, self.optimizer)
        return {"model": model, "optimizer": optim}

    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(path / FSDP_DIR))

    def load(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        where = path / FSDP_DIR
        if not where.is_dir():
            raise FileNotFoundError(
                f"{path}: not an FSDP checkpoint (no {FSDP_DIR}/); start a new run with "
                f"checkpoint.init_from={path.parent.parent} to take its weights into parallel=fsdp2")
        state = self._state()
        dcp.load(state, checkpoint_id=str(where))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights on CPU (a collective: every rank calls it; rank 0 gets the result,
        the others an empty dict, so host memory holds one copy per node at most)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)

        return get_model_state_dict(self.module, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False))


def checkpoint_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Plain-model weights from an FSDP checkpoint, without a process group (export)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not (ckpt / FSDP_DIR).is_dir():
        raise FileNotFoundError(f"{ckpt}: not an FSDP checkpoint (no {FSDP_DIR}/)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(ckpt / FSDP_DIR), str(out))
        state = torch.load(out, map_location="cpu", weights_only=False)
    return state["model"]
