# Transfusion objective: next-token loss on text plus flow matching on continuous visual spans.
from __future__ import annotations

import torch
import torch.nn as nn

from mmgen.batch import MultimodalBatch
from mmgen.objectives.base import (aux_losses, normalise, per_source_counts, per_source_losses,
                                   position_count)
from mmgen.objectives.config import ObjectiveConfig
from mmgen.objectives.flow import (FlowSample, flow_loss_sum, sample_flow, visual_counts,
                                   visual_loss_mask)
from mmgen.objectives.next_token import (next_token_loss_sum, text_counts, text_per_source,
                                         text_source_counts)


class TransfusionObjective:
    """Losses "text" (cross-entropy per text target) and "visual" (velocity MSE per target
    patch), one model forward for both (Zhou et al. 2024): target spans go in noised, the
    "lm" head runs at text targets and the "flow" head at every continuous visual position."""

    loss_names = ("text", "visual")
    heads = ("lm", "flow")
    samplers = ("flow_t2i", "text")   # mmgen.sampling.SAMPLERS: what it trains, drawn and scored
    video_samplers = ("flow_t2v", "text_v2t")   # the same for clips (mmgen eval shapes --video)
    sources: tuple[str, ...] = ()

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg.validate()

    def local_counts(self, batch: MultimodalBatch) -> dict[str, torch.Tensor]:
        counts = {"text": text_counts(batch), "visual": visual_counts(batch),
                  **position_count(batch)}
        if self.sources:
            counts.update(text_source_counts(self.sources, batch))
            counts.update(per_source_counts("visual", self.sources, visual_loss_mask(batch),
                                            batch.document_sources(self.sources)))
        return counts

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
                    heads={"lm": batch.rows("text"), "flow": batch.rows("continuous")})
        text = next_token_loss_sum(out["lm"], batch)
        per_position = [] if self.sources else None
        visual = flow_loss_sum(out["flow"], sample, self.cfg, per_position)
        losses = {"text": normalise(text, denominators["text"]),
                  "visual": normalise(visual, denominators["visual"])}
        losses.update(aux_losses(out["aux"], batch, denominators, self.loss_names))
        if self.sources:
            losses.update(text_per_source(self.sources, out["lm"], batch, denominators))
            where = batch.continuous_mask()
            losses.update(per_source_losses("visual", self.sources, per_position[0],
                                            batch.document_sources(self.sources)[where],
                                            denominators))
        return losses
