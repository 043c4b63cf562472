# Next-token cross-entropy on text targets (the autoregressive half of every model family).
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgen.batch import MultimodalBatch
from mmgen.objectives.base import (aux_losses, normalise, per_source_counts, per_source_losses,
                                   position_count)


def text_positions(batch: MultimodalBatch) -> torch.Tensor:
    """``[B, L]`` bool: positions with a next-token target, where the "lm" head runs."""
    return batch.text_target_mask()


def text_counts(batch: MultimodalBatch) -> torch.Tensor:
    return text_positions(batch).sum()


def next_token_loss_sum(text_logits: torch.Tensor, batch: MultimodalBatch) -> torch.Tensor:
    """Summed cross-entropy of ``text_logits`` (``[M, vocab]``, the "lm" head's rows at
    :func:`text_positions` in row-major order) against those targets; fp32 for stability."""
    targets = batch.targets.flatten()[batch.rows("text")]
    return F.cross_entropy(text_logits.float(), targets, reduction="sum")


def text_per_source(sources: tuple[str, ...], text_logits: torch.Tensor, batch: MultimodalBatch,
                    denominators: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``"text/<source>"`` losses (detached). The cross-entropy is recomputed per position under
    no_grad rather than reused, so the main loss keeps its own ``reduction="sum"`` (its bits).

    Args:
        sources: the run's source names (empty: {}).
        text_logits: the "lm" head's rows at :func:`text_positions`.
        batch: the micro-batch.
        denominators: the step's global counts.
    """
    if not sources:
        return {}
    where = text_positions(batch)
    with torch.no_grad():
        per_position = F.cross_entropy(text_logits.detach().float(), batch.targets[where],
                                       reduction="none")
    return per_source_losses("text", sources, per_position, batch.document_sources(sources)[where],
                             denominators)


def text_source_counts(sources: tuple[str, ...], batch: MultimodalBatch) -> dict[str, torch.Tensor]:
    """``"text/<source>"`` counts (empty without sources)."""
    if not sources:
        return {}
    return per_source_counts("text", sources, text_positions(batch), batch.document_sources(sources))


class NextTokenObjective:
    """Text-only language modelling: loss "text". Visual spans are read as clean conditions
    (t = 0), so the model needs only the "lm" head."""

    loss_names = ("text",)
    heads = ("lm",)
    samplers = ("text",)   # mmgen.sampling.SAMPLERS: it trains no visual output to sample
    video_samplers = ("text_v2t",)
    sources: tuple[str, ...] = ()

    def __init__(self, cfg=None):
        self.cfg = cfg

    def local_counts(self, batch: MultimodalBatch) -> dict[str, torch.Tensor]:
        return {"text": text_counts(batch), **position_count(batch),
                **text_source_counts(self.sources, batch)}

    def __call__(self, model: nn.Module, batch: MultimodalBatch,
                 denominators: dict[str, torch.Tensor],
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        out = model(batch, heads={"lm": batch.rows("text")})
        losses = {"text": normalise(next_token_loss_sum(out["lm"], batch), denominators["text"])}
        return {**losses, **aux_losses(out["aux"], batch, denominators, self.loss_names),
                **text_per_source(self.sources, out["lm"], batch, denominators)}
