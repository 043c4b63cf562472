# FSDP2 backend: parameters, gradients and optimizer states sharded per block (torch fully_shard).
"""``parallel=fsdp2``: the PyTorch-native reference for sharded data parallelism.

Order (STYLE habit 1): activation checkpointing -> compile (done by the trainer, per block)
-> ``fully_shard`` on every block of ``module.layers``, then on the root (embeddings, norms
and heads). Parameters become DTensors sharded on dim 0 over a 1-D device mesh; each block's
parameters are all-gathered just before its forward/backward and freed after
(``parallel.reshard_after_forward``), gradients are reduce-scattered. The optimizer is mmgen's
AdamW over the sharded parameters, so its states are sharded too.

Checkpoints go through torch.distributed.checkpoint (DCP): every rank writes its shards under
``step_N/fsdp/``, and a resume may use another number of ranks (DCP reshards on load).
``mmgen export`` turns the directory into one plain state dict (``dcp_to_torch_save``).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from mmgen.optim import OptimConfig, build_optimizer
from mmgen.parallel.base import TorchEngine
from mmgen.parallel.config import ParallelConfig
from mmgen.parallel.dist import DistInfo

FSDP_DIR = "fsdp"
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class FSDPEngine(TorchEngine):
    def __init__(self, module: torch.nn.Module, cfg: ParallelConfig, optim: OptimConfig,
                 dist: DistInfo):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.module = self.model = module
        self.dist = dist
        if not torch.distributed.is_initialized():    # one process: a group of one
            backend = "nccl" if dist.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(),
                                                 rank=0, world_size=1)
        self.mesh = init_device_mesh(dist.device.type, (dist.world_size,))
        # fp32 parameters by default: the same numbers as DDP under autocast. bf16 all-gathers
        # half the bytes and computes in bf16; gradients are still reduced in fp32.
        policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[cfg.fsdp_param_dtype],
                                      reduce_dtype=torch.float32)
        last = len(module.layers) - 1
        for i, block in enumerate(module.layers):
            # the last block's backward starts right after its forward: freeing its parameters
            # in between would only gather them again at once
            fully_shard(block, mesh=self.mesh, mp_policy=policy,
                        reshard_after_forward=cfg.reshard_after_forward and i < last)
        # the root keeps the embeddings, norm and heads; it is gathered for the whole forward
        # (the tied text head reads tok_embeddings.weight after the blocks)
        fully_shard(module, mesh=self.mesh, reshard_after_forward=False, mp_policy=policy)
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
        """Full fp32 weights on CPU (a collective: every rank calls it; all get the result)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)

        return get_model_state_dict(self.module, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False))


def apply_fsdp(module, cfg: ParallelConfig, optim: OptimConfig, dist: DistInfo) -> FSDPEngine:
    from mmgen.parallel.activation_checkpointing import apply_activation_checkpointing

    apply_activation_checkpointing(module, cfg.activation_checkpointing)
    return FSDPEngine(module, cfg, optim, dist)


def fsdp_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Plain-model weights from an FSDP checkpoint, without a process group (export)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(ckpt / FSDP_DIR), str(out))
        state = torch.load(out, map_location="cpu", weights_only=False)
    return state["model"]
