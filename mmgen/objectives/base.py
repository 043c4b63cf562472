# The objective protocol (batch -> named, globally normalised losses) and the weighted total.
"""An objective owns everything between the batch and the losses: noise, timestep sampling,
the model call, and the per-loss reductions. The model only maps inputs to outputs.

Normalisation (STYLE habit 8): each loss is ``sum over this micro-batch's valid positions /
denominators[name]``, where the trainer passes the *global* number of valid positions (summed
over micro-batches and ranks from :meth:`Objective.local_counts`). Summing the returned losses
over micro-batches and ranks then gives the same value however the batch is split.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn

from mmgen.batch import MultimodalBatch


class Objective(Protocol):
    loss_names: tuple[str, ...]
    samplers: tuple[str, ...]   # names in mmgen.sampling.SAMPLERS (samples and evaluations)

    def local_counts(self, batch: MultimodalBatch) -> dict[str, torch.Tensor]:
        """Valid positions per loss name in this micro-batch (0-dim long tensors on the
        batch's device, ready for an all-reduce)."""
        ...

    def __call__(self, model: nn.Module, batch: MultimodalBatch,
                 denominators: dict[str, torch.Tensor],
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Named losses, each = local sum / ``denominators[name]``; 0 when the sum is empty.
        ``generator`` is the only source of randomness (exact resume)."""
        ...


def normalise(loss_sum: torch.Tensor, denominator: torch.Tensor | int | float) -> torch.Tensor:
    """``loss_sum / denominator``; a zero denominator means an empty (zero, still
    graph-connected) sum, so clamping it to 1 returns 0 instead of NaN."""
    denom = torch.as_tensor(denominator, device=loss_sum.device).to(torch.float32)
    return loss_sum.float() / denom.clamp(min=1.0)


def weighted_total(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """``sum(weights[name] * loss)``; every loss needs a weight, so a misspelt weight key
    cannot silently leave a loss out."""
    missing = sorted(set(losses) - set(weights))
    if missing:
        raise KeyError(f"no weight for loss(es) {missing}; weights given: {sorted(weights)}")
    return sum(weights[name] * loss for name, loss in losses.items())
