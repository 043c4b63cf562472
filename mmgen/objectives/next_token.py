# Next-token cross-entropy on text targets (the autoregressive half of every model family).
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgen.batch import IGNORE_INDEX, MultimodalBatch
from mmgen.objectives.base import aux_losses, normalise, position_count


def text_positions(batch: MultimodalBatch) -> torch.Tensor:
    """``[B, L]`` bool: positions with a next-token target, where the "lm" head runs."""
    return batch.targets != IGNORE_INDEX


def text_counts(batch: MultimodalBatch) -> torch.Tensor:
    return text_positions(batch).sum()


def next_token_loss_sum(text_logits: torch.Tensor, batch: MultimodalBatch) -> torch.Tensor:
    """Summed cross-entropy of ``text_logits`` (``[M, vocab]``, the "lm" head's rows at
    :func:`text_positions` in row-major order) against those targets; fp32 for stability."""
    targets = batch.targets[text_positions(batch)]
    return F.cross_entropy(text_logits.float(), targets, reduction="sum")


class NextTokenObjective:
    """Text-only language modelling: loss "text". Visual spans are read as clean conditions
    (t = 0), so the model needs only the "lm" head."""

    loss_names = ("text",)
    heads = ("lm",)
    samplers = ("text",)   # mmgen.sampling.SAMPLERS: it trains no visual output to sample

    def __init__(self, cfg=None):
        self.cfg = cfg

    def local_counts(self, batch: MultimodalBatch) -> dict[str, torch.Tensor]:
        return {"text": text_counts(batch), **position_count(batch)}

    def __call__(self, model: nn.Module, batch: MultimodalBatch,
                 denominators: dict[str, torch.Tensor],
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        out = model(batch, heads={"lm": text_positions(batch)})
        losses = {"text": normalise(next_token_loss_sum(out["lm"], batch), denominators["text"])}
        return {**losses, **aux_losses(out["aux"], batch, denominators, self.loss_names)}
