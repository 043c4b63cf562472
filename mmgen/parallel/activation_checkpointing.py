# Activation checkpointing per transformer block, applied from outside the model.
"""Each block of ``model.layers`` gets an instance-level ``forward`` that runs the class
forward under a checkpoint function, so its activations are recomputed in the backward instead
of stored. Nothing is wrapped: module names, state-dict keys and the parameters DeepSpeed
records for its checkpoints stay those of the plain model, and module hooks (DDP, ZeRO-3's
parameter gathering) still run around ``block(...)`` and around each child module inside it,
also during the recomputation.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint


def apply_activation_checkpointing(model: nn.Module, mode: str) -> int:
    """Checkpoint every block of ``model.layers``.

    Args:
        model: a model with an ``nn.ModuleList`` of blocks in ``model.layers``.
        mode: ``none``, ``torch`` (``torch.utils.checkpoint``, non-reentrant) or ``deepspeed``
            (``deepspeed.checkpointing.checkpoint``; the caller configures it after
            ``deepspeed.initialize``).

    Returns:
        the number of blocks now checkpointed.
    """
    if mode == "none":
        return 0
    if mode == "torch":
        fn = functools.partial(torch_checkpoint, use_reentrant=False)
    elif mode == "deepspeed":
        import deepspeed  # `import deepspeed.checkpointing` fails in 0.19.8: use the attribute

        fn = deepspeed.checkpointing.checkpoint
    else:
        raise ValueError(f"activation checkpointing mode '{mode}' must be none, torch or deepspeed")
    for block in model.layers:
        if getattr(block, "_mmgen_checkpointing", None) is not None:
            raise RuntimeError(f"block already checkpointed ({block._mmgen_checkpointing})")
        block.forward = _checkpointed(type(block).forward.__get__(block), fn)
        block._mmgen_checkpointing = mode
    return len(model.layers)


def _checkpointed(forward, fn):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # sampling/evaluation: nothing would be saved anyway
            return forward(*args, **kwargs)
        return fn(forward, *args, **kwargs)

    return run
