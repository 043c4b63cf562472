# Next-token cross-entropy on text targets (the autoregressive half of every model family).
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgen.batch import IGNORE_INDEX, MultimodalBatch
from mmgen.objectives.base import normalise


def text_counts(batch: MultimodalBatch) -> torch.Tensor:
    return (batch.targets != IGNORE_INDEX).sum()


def next_token_loss_sum(text_logits: torch.Tensor, batch: MultimodalBatch) -> torch.Tensor:
    """Summed cross-entropy of ``text_logits`` (``[M, vocab]``, the model's rows at
    ``targets != IGNORE_INDEX`` in row-major order) against those targets; fp32 for stability."""
    targets = batch.targets[batch.targets != IGNORE_INDEX]
    return F.cross_entropy(text_logits.float(), targets, reduction="sum")


class NextTokenObjective:
    """Text-only language modelling (visual spans are read as clean conditions)."""

    loss_names = ("text",)
    samplers = ("text",)   # mmgen.sampling.SAMPLERS: it trains no visual output to sample

    def __init__(self, cfg=None):
        self.cfg = cfg

    def local_counts(self, batch: MultimodalBatch) -> dict[str, torch.Tensor]:
        return {"text": text_counts(batch)}

    def __call__(self, model: nn.Module, batch: MultimodalBatch,
                 denominators: dict[str, torch.Tensor],
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        out = model(batch)
        return {"text": normalise(next_token_loss_sum(out["text_logits"], batch),
                                  denominators["text"])}
