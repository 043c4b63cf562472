# Discrete-token AR (Chameleon / Emu3 / Liquid): next-token cross-entropy on text and VQ codes.
"""The visual spans are VQ codes in ``tokens``, offset above the text vocabulary by the data
pipeline (``mmgen/data/pack.py``, DESIGN.md contract 5), framed by BOI/EOI. This objective
reads the whole document as one token stream:

* attention: every DISCRETE span becomes ``CAUSAL`` in the span table (:func:`causal_spans`;
  the pipeline's default is FULL), so with text causal anyway the mask is causal over the whole
  document, condition images included (Chameleon's layout; the captioner ``ar_text`` reads its
  image prompt the same way);
* targets: ``batch.targets`` for text (the caption predicts BOI, EOI predicts EOS ...), and
  inside every DISCRETE span the pipeline owns with ``next_token`` (a target span,
  ``SpanTable.objective``) the codes themselves: the position before the span (BOI) predicts
  the first code, each code the next one (:func:`code_targets`). The last code's successor
  (EOI) is not trained: the sampler knows the grid and closes the span itself;
* one "lm" head over the shared vocabulary at both kinds of positions, full-vocabulary
  cross-entropy, reported as two losses: "text" (text targets) and "visual" (code targets),
  each normalised by its own global count, so their weights are the usual
  ``objective.weights``.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgen.batch import CAUSAL, DISCRETE, IGNORE_INDEX, NEXT_TOKEN, MultimodalBatch
from mmgen.objectives.base import (aux_losses, normalise, per_source_counts, per_source_losses,
                                   position_count)
from mmgen.objectives.config import ObjectiveConfig
from mmgen.objectives.next_token import text_per_source, text_positions, text_source_counts
from mmgen.sequence_shard import shard_of


def causal_spans(batch: MultimodalBatch) -> MultimodalBatch:
    """``batch`` with every DISCRETE span's attention set to CAUSAL (a new span table; the
    tensors are shared, the input is not modified). Continuous spans keep their mode."""
    spans = batch.spans
    if len(spans) == 0:
        return batch
    attention = torch.where(spans.kind == DISCRETE, torch.full_like(spans.attention, CAUSAL),
                            spans.attention)
    return dataclasses.replace(batch, spans=dataclasses.replace(spans, attention=attention))


def code_targets(batch: MultimodalBatch) -> torch.Tensor:
    """``[B, L]`` long: at position ``i``, the code id (shared vocabulary) to predict from ``i``
    when ``i + 1`` is a code of a DISCRETE span owned by ``next_token``; ``IGNORE_INDEX``
    elsewhere. So a span of ``n`` codes at ``start`` has targets at ``start - 1 .. start + n - 2``
    (its opening BOI and every code but the last)."""
    owned = (batch.span_values("kind", -1) == DISCRETE) & (batch.span_values("objective", -1) == NEXT_TOKEN)
    out = torch.full_like(batch.tokens, IGNORE_INDEX)
    out[:, :-1] = torch.where(owned[:, 1:], batch.tokens[:, 1:], out[:, :-1])
    return out


def code_positions(batch: MultimodalBatch) -> torch.Tensor:
    """``[B, L]`` bool: where :func:`code_targets` has a target (the "visual" loss positions)."""
    return code_targets(batch) != IGNORE_INDEX


class VQAutoregressiveObjective:
    """Losses "text" and "visual": next-token cross-entropy over the shared text + code
    vocabulary, at text targets and at the codes of target spans (module docstring). The model
    has only the "lm" head (``model.patch_dim`` 0 under a discrete codec: no continuous input
    or flow head either)."""

    loss_names = ("text", "visual")
    heads = ("lm",)
    samplers = ("ar_t2i", "ar_text")   # mmgen.sampling.SAMPLERS
    video_samplers = ("ar_t2v", "ar_v2t")
    codec_kind = DISCRETE                # the start-up check refuses a continuous data.codec
    sources: tuple[str, ...] = ()

    def __init__(self, cfg: ObjectiveConfig | None = None):
        self.cfg = cfg.validate() if cfg is not None else None

    def model_view(self, batch: MultimodalBatch) -> MultimodalBatch:
        """The batch as the model runs it (for the trainer's FLOP count): image spans causal,
        and the ``lm`` head at the code targets as well as the text targets."""
        batch = causal_spans(batch)
        targets = torch.where(batch.targets != IGNORE_INDEX, batch.targets, code_targets(batch))
        return dataclasses.replace(batch, targets=targets)

    def local_counts(self, batch: MultimodalBatch) -> dict[str, torch.Tensor]:
        counts = {"text": text_positions(batch).sum(), "visual": code_positions(batch).sum(),
                  **position_count(batch)}
        if self.sources:
            counts.update(text_source_counts(self.sources, batch))
            counts.update(per_source_counts("visual", self.sources, code_positions(batch),
                                            batch.document_sources(self.sources)))
        return counts

    def __call__(self, model: nn.Module, batch: MultimodalBatch,
                 denominators: dict[str, torch.Tensor],
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        if shard_of(batch) is not None:
            # a context-parallel slice's mask is compiled from the whole batch, FULL spans and all
            raise ValueError("objective=vq_ar does not run under context parallelism yet (parallel.cp=1)")
        batch = causal_spans(batch)
        is_text = text_positions(batch)
        codes = code_targets(batch)
        is_code = codes != IGNORE_INDEX
        # one head call over both kinds of position (row-major), split afterwards
        out = model(batch, heads={"lm": is_text | is_code})
        where = is_text | is_code
        targets = torch.where(is_text, batch.targets, codes)[where]
        per_position = F.cross_entropy(out["lm"].float(), targets, reduction="none")
        code_rows = is_code[where]
        losses = {"text": normalise(per_position[~code_rows].sum(), denominators["text"]),
                  "visual": normalise(per_position[code_rows].sum(), denominators["visual"])}
        losses.update(aux_losses(out["aux"], batch, denominators, self.loss_names))
        if self.sources:
            losses.update(text_per_source(self.sources, out["lm"][~code_rows], batch, denominators))
            losses.update(per_source_losses("visual", self.sources, per_position[code_rows],
                                            batch.document_sources(self.sources)[is_code],
                                            denominators))
        return losses
