# Transfusion objective: next-token loss on text plus flow matching on continuous visual spans.
from __future__ import annotations

import torch
import torch.nn as nn

from mmgen.batch import MultimodalBatch
from mmgen.objectives.base import normalise
from mmgen.objectives.config import ObjectiveConfig
from mmgen.objectives.flow import FlowSample, flow_loss_sum, sample_flow, visual_counts
from mmgen.objectives.next_token import next_token_loss_sum, text_counts


class TransfusionObjective:
    """Losses "text" (cross-entropy per text target) and "visual" (velocity MSE per target
    patch), one model forward for both (Zhou et al. 2024)."""

    loss_names = ("text", "visual")
    samplers = ("flow_t2i", "text")   # mmgen.sampling.SAMPLERS: what it trains, drawn and scored

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg.validate()

    def local_counts(self, batch: MultimodalBatch) -> dict[str, torch.Tensor]:
        return {"text": text_counts(batch), "visual": visual_counts(batch)}

    def __call__(self, model: nn.Module, batch: MultimodalBatch,
                 denominators: dict[str, torch.Tensor],
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        sample = sample_flow(batch, self.cfg, generator)
        return self.losses(model, batch, sample, denominators)

    def losses(self, model: nn.Module, batch: MultimodalBatch, sample: FlowSample,
               denominators: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The losses for a given draw of times and noise (split out for exact tests)."""
        out = model(batch, sample.x_t, sample.span_t)
        text = next_token_loss_sum(out["text_logits"], batch)
        visual = flow_loss_sum(out["visual"], sample, self.cfg)
        return {"text": normalise(text, denominators["text"]),
                "visual": normalise(visual, denominators["visual"])}
