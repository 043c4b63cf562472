# Pretrained (Hugging Face) weights into each rank's own part of the parameters: whole, FSDP2 shards, ZeRO-3 partitions.
"""``checkpoint.init_from=hf:<dir>``. The values come from a
:class:`~mmgen.models.hf.source.PretrainedSource` (rows of any parameter, read from the
safetensors files row range by row range); here they go where each layout keeps them:

* unsharded (DDP, ZeRO-1/2, one process): every parameter whole (:meth:`PretrainedInit.__call__`);
* FSDP2: each DTensor's local rows only (:meth:`PretrainedInit.load_local`), with no unsharded
  reference model: a rank reads and holds its own shard of each tensor;
* ZeRO-3: parameters are partitioned one by one before ``deepspeed.initialize``
  (:func:`materialize_zero3`), each rank writing its flat partition from the rows it spans;
  a full parameter exists for one parameter at a time, never the whole model.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


class PretrainedInit:
    """The ``init`` of :func:`mmgen.parallel.build_engine` for a pretrained start.

    Args:
        source: the initial values (``mmgen.models.hf.source.PretrainedSource``).
    """

    loads_local = True  # materialize: fill sharded parameters in place, no unsharded copy

    def __init__(self, source):
        self.source = source

    def __call__(self, module: nn.Module) -> None:
        """Fill an unsharded, materialised plain model."""
        self.source.load_into(module)

    @torch.no_grad()
    def load_local(self, model: nn.Module) -> None:
        """Fill a materialised model whose parameters may be DTensors sharded on dim 0: each
        rank reads only its rows."""
        from torch.distributed.tensor import DTensor, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        for key, p in model.named_parameters():
            if not isinstance(p, DTensor):
                p.copy_(self.source.rows(key).to(p.dtype))
                continue
            if any(not isinstance(pl, Shard) or pl.dim != 0 for pl in p.placements if not pl.is_replicate()):
                raise ValueError(f"{key}: placements {p.placements}: pretrained loading reads dim-0 shards only")
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            local = p.to_local()
            if local.numel():
                rows = self.source.rows(key, offset[0], offset[0] + shape[0])
                local.copy_(rows.to(local.dtype))
        self.load_buffers(model)

    @torch.no_grad()
    def load_buffers(self, model: nn.Module) -> None:
        """Every buffer of a materialised model (``to_empty`` leaves them unset; no layout
        shards them): an MoE router's ``expert_bias``."""
        for key, b in model.named_buffers():
            b.copy_(self.source.buffer(key).to(b.dtype))


@torch.no_grad()
def materialize_zero3(model: nn.Module, init: PretrainedInit, ds_config: dict, device: torch.device,
                      dtype: torch.dtype, group=None) -> None:
    """Partition the meta-device ``model`` parameter by parameter as ZeRO-3 keeps it, each
    rank writing its flat partition from the pretrained source (before ``deepspeed.initialize``,
    which then finds every parameter already partitioned).

    Args:
        model: the parallelized plain model, still on the meta device.
        init: the pretrained values.
        ds_config: the DeepSpeed config the engine will use (offload, partitioning).
        device: this rank's device; dtype: the parameters' dtype under the engine (bf16 or fp32).
        group: the data-parallel group parameters are partitioned over (None: all ranks).
    """
    import deepspeed

    first = None
    for module in model.modules():
        direct = list(module.named_parameters(recurse=False))
        if not direct:
            continue
        module.to_empty(device=device, recurse=False)  # this module's parameters only
        params = []
        for name, _ in direct:
            p = module._parameters[name]
            p.data = p.data.to(dtype)
            params.append(p)
        if first is None:
            holder = nn.Module()
            for i, p in enumerate(params):
                holder.register_parameter(f"p{i}", p)
            deepspeed.zero.Init(module=holder, config_dict_or_path=ds_config, data_parallel_group=group)
            first = params[0]
        else:
            first.convert_to_zero_parameters(param_list=params)
    for key, p in model.named_parameters():
        part = p.ds_tensor
        start = part.ds_numel * _partition_rank(p, group)
        stop = min(start + part.ds_numel, p.ds_numel)
        part.zero_()
        if start < stop:
            part[:stop - start].copy_(init.source.flat(key, start, stop).to(part.dtype))
    init.load_buffers(model)


def _partition_rank(p, group) -> int:
    import torch.distributed as dist

    return dist.get_rank(group)


def pretrained_init(model: nn.Module, path: str, seed: int) -> PretrainedInit:
    """The init of a run started from Hugging Face directory ``path``; logs in one line what
    is initialised fresh.

    Args:
        model: the plain meta-device model (before the backend's transforms).
        path: the HF model directory (``checkpoint.init_from=hf:<path>``).
        seed: ``trainer.seed`` (the fresh parts).

    Raises:
        ConfigError: one line naming a missing/unexpected tensor or a shape mismatch.
    """
    from mmgen.errors import ConfigError
    from mmgen.models.hf.source import PretrainedSource

    try:
        source = PretrainedSource(model, path, seed)
    except ValueError as e:
        raise ConfigError(f"checkpoint.init_from=hf:...: {e}") from None
    copies = []
    if source.map.towers:
        copies.append(f"{source.map.towers} modality-tower copies")
    if source.map.experts:
        copies.append(f"{len(source.map.experts)} expert stacks upcycled")
    log.info("init_from hf:%s: %d tensors from the checkpoint%s; initialised fresh: %s", path,
             len(source.map.source), f" ({', '.join(copies)})" if copies else "", source.fresh_summary())
    return PretrainedInit(source)
