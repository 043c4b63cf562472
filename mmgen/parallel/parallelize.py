# The parallelize steps every backend shares (DESIGN.md 6's fixed order) and the materialisation after them.
"""Every backend's ``parallelize(model, cfg, ctx, *, compile)`` runs on the meta-device plain
model, in one fixed order:

    TP/SP -> CP -> EP -> FP8 -> activation checkpointing -> compile -> FSDP/ZeRO

(:func:`apply_expert_parallel_from` is EP for ddp/fsdp2, :func:`apply_float8_from` FP8 for
them (``trainer.fp8``), :func:`apply_block_transforms` the middle, each backend adds its
sharding; CP changes no module: the engine slices each
micro-batch and the mask it carries brings the Ulysses exchange into attention,
mmgen/parallel/context.py). Then :func:`materialize` allocates the parameters (``to_empty``)
and initialises them so that every layout holds the same weights as one process: a layout
that shards nothing (DDP; ZeRO, which partitions later, inside ``deepspeed.initialize``)
initialises in place; a sharded one (FSDP2's DTensors, or experts split by EP) initialises an unsharded copy of the
model in the same order and copies each rank's part out of it. The unsharded copy costs one
full model per rank on the device for a moment (4.8 GB at the 1b flavor in fp32); seeding
each parameter from (seed, name) would avoid it, but would change today's weights.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn

from mmgen.parallel.activation_checkpointing import apply_activation_checkpointing


def apply_compile(model: nn.Module) -> int:
    """``torch.compile`` every block of ``model.layers``, in place (lazily: nothing compiles
    before the first call), so module names and state-dict keys stay those of the plain
    model. Returns the number of blocks compiled."""
    for block in model.layers:
        block.compile()
    return len(model.layers)


def apply_block_transforms(model: nn.Module, activation_checkpointing: str, compile: bool) -> None:
    """Activation checkpointing, then compile, on every block (the compiled call runs the
    checkpointed forward, so the recomputation is compiled too).

    Args:
        model: the plain model (meta device or materialised).
        activation_checkpointing: ``parallel.activation_checkpointing``.
        compile: ``trainer.compile``.
    """
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        apply_compile(model)


def apply_expert_parallel_from(model: nn.Module, cfg, ctx) -> None:
    """EP (``parallel.ep > 1``): split each MoE FFN's experts over the expert-parallel group
    (mmgen/parallel/ep.py), on the meta model; a no-op at ep=1.

    Args:
        model: the meta-device plain model.
        cfg: the ParallelConfig.
        ctx: the EngineContext (its dims hold the EP groups).
    """
    if getattr(cfg, "ep", 1) <= 1:
        return
    from mmgen.parallel.dist import ensure_process_group
    from mmgen.parallel.ep import apply_expert_parallel

    ensure_process_group(ctx.dist, cfg.dist_backend, cfg.timeout_minutes)
    apply_expert_parallel(model, ctx.dims.ep_group(ctx.dist.device.type))


def apply_float8_from(model: nn.Module, ctx) -> list[str]:
    """FP8 (``trainer.fp8``): the trunk's linears become torchao ``Float8Linear`` (mmgen/parallel/
    float8.py), after EP and before activation checkpointing and compile, so the checkpointed
    and compiled forward is the float8 one; a no-op at ``fp8=none``.

    Args:
        model: the meta-device plain model.
        ctx: the EngineContext (``fp8``, ``fp8_emulate`` and the device it checks).

    Returns:
        the names of the converted linears.
    """
    if ctx.fp8 == "none":
        return []
    from mmgen.parallel.float8 import apply_float8, check_device

    check_device(ctx.fp8, ctx.fp8_emulate, ctx.dist.device)
    return apply_float8(model, ctx.fp8, emulate=ctx.fp8_emulate)


def _is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def materialize(model: nn.Module, reference: nn.Module, device: torch.device,
                init: Callable[[nn.Module], None]) -> None:
    """Allocate the parallelized meta-device ``model`` on ``device`` and initialise it with the
    weights one process would have.

    Args:
        model: the parallelized model, still on the meta device.
        reference: a meta-device copy of the plain model taken before parallelize (same
            parameter names); materialised only when ``model`` has sharded parameters.
        device: where the parameters live.
        init: fills a materialised plain model with its initial weights (seed + init_weights,
            or a checkpoint's weights); runs on ``model`` itself when nothing is sharded. An
            ``init`` with ``loads_local`` (:class:`mmgen.parallel.pretrained.PretrainedInit`)
            fills sharded parameters itself (``init.load_local``), with no reference.
    """
    from mmgen.parallel.ep import expert_slices

    tensors = [*model.parameters(), *model.buffers()]
    if not all(t.is_meta for t in tensors):
        raise ValueError("materialize takes the meta-device model (build it under torch.device('meta'))")
    ep_split = bool(expert_slices(model))   # this rank's experts are cut from a full set too
    sharded = ep_split or any(_is_sharded(t) for t in tensors)
    model.to_empty(device=device)
    if sharded and not ep_split and getattr(init, "loads_local", False):
        init.load_local(model)  # pretrained weights straight into the shards (parallel/pretrained.py)
        return
    if not sharded:
        init(model)
        return
    reference.to_empty(device=device)
    init(reference)
    copy_full_weights(model, reference)


@torch.no_grad()
def copy_full_weights(model: nn.Module, reference: nn.Module) -> None:
    """Copy every parameter and buffer of the unsharded ``reference`` into ``model``: plain
    tensors whole, DTensors their local part, expert weights split by EP this rank's experts
    (cut locally, no communication: every rank holds the same reference)."""
    from torch.distributed.tensor import distribute_tensor

    from mmgen.parallel.ep import expert_slices

    experts = expert_slices(model)
    want = dict(reference.named_parameters())
    want.update(reference.named_buffers())
    have = dict(model.named_parameters())
    have.update(model.named_buffers())
    if have.keys() != want.keys():
        raise RuntimeError(f"parallelize changed the parameter names: {sorted(have.keys() ^ want.keys())[:5]}")
    for name, dst in have.items():
        src = want[name]
        if name in experts:
            src = src[experts[name][0]:experts[name][1]]
        if _is_sharded(dst):
            src = distribute_tensor(src, dst.device_mesh, dst.placements, src_data_rank=None)
        dst.copy_(src)


def meta_copy(model: nn.Module) -> nn.Module:
    """An independent meta-device copy of the plain model (the reference of :func:`materialize`)."""
    return copy.deepcopy(model)
