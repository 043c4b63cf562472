# Transfusion objective: next-token loss on text plus flow matching on continuous visual spans.
from __future__ import annotations

import torch
import torch.nn as nn

from mmgen.batch import MultimodalBatch
from mmgen.objectives.base import aux_losses, normalise, position_count
from mmgen.objectives.config import ObjectiveConfig
from mmgen.objectives.flow import FlowSample, flow_loss_sum, sample_flow, visual_counts
from mmgen.objectives.next_token import next_token_loss_sum, text_counts, text_positions


class TransfusionObjective:
    """Losses "text" (cross-entropy per text target) and "visual" (velocity MSE per target
    patch), one model forward for both (Zhou et al. 2024): target spans go in noised, the
    "lm" head runs at text targets and the "flow" head at every continuous visual position."""

    loss_names = ("text", "visual")
    heads = ("lm", "flow")
    samplers = ("flow_t2i", "text")   # mmgen.sampling.SAMPLERS: what it trains, drawn and scored

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg.validate()

    def local_counts(self, batch: MultimodalBatch) -> dict[str, torch.Tensor]:
        return {"text": text_counts(batch), "visual": visual_counts(batch),
                **position_count(batch)}

    def __call__(self, model: nn.Module, batch: MultimodalBatch,
                 denominators: dict[str, torch.Tensor],
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        sample = sample_flow(batch, self.cfg, generator)
        return self.losses(model, batch, sample, denominators)

    def losses(self, model: nn.Module, batch: MultimodalBatch, sample: FlowSample,
               denominators: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The losses for a given draw of times and noise (split out for exact tests)."""
        # "flow" at every continuous row, condition spans included: FlowSample's rows (and
        # is_loss, which keeps target spans only) are aligned with exactly these
        out = model(batch, sample.x_t, sample.span_t,
                    heads={"lm": text_positions(batch), "flow": batch.continuous_mask()})
        text = next_token_loss_sum(out["lm"], batch)
        visual = flow_loss_sum(out["flow"], sample, self.cfg)
        losses = {"text": normalise(text, denominators["text"]),
                  "visual": normalise(visual, denominators["visual"])}
        return {**losses, **aux_losses(out["aux"], batch, denominators, self.loss_names)}
