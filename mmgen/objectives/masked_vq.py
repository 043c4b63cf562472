# Masked discrete diffusion (Show-o / MaskGIT): masked-token cross-entropy on VQ codes, next-token text.
"""The visual spans are VQ codes in ``tokens``, above the text vocabulary (as for ``vq_ar``,
DESIGN.md contract 5). Per step, this objective:

* owns every DISCRETE target span the pipeline gave the default discrete owner
  (:func:`owned_spans`) and marks it in the span table (:func:`masked_spans`): owner
  ``masked``, attention FULL inside (the pipeline's default: every code sees the whole span)
  and ``visible_after=False``, so the positions after a masked target (EOI, EOS, later text
  and images of an interleaved document) do not read a partly masked image (BAGEL's rule for
  noised targets). Condition spans stay as the pipeline built them: clean, FULL, visible;
* draws per owned span a mask ratio ``r = schedule(u)``, ``u ~ U(0, 1)`` (``cosine``:
  ``cos(pi/2 u)``, MaskGIT / Show-o; ``linear``: ``1 - u``), masks
  ``m = clamp(ceil(r n), 1, n)`` of its ``n`` codes (at least one), and puts the mask token
  (``objective.mask_id``, the first id above the codes) at those positions of the input;
* runs the one "lm" head at the masked positions and at the text targets: "visual" is the
  cross-entropy of the original code at each masked position, "text" the next-token
  cross-entropy of the pipeline's targets (causal text, as for every family); each is
  normalised by its own global count (the "visual" count is the number of masked positions).

The cross-entropy is over the full shared vocabulary, as ``vq_ar``'s: the two families' visual
losses are then in the same units (nats over one vocabulary) and compare step for step, and
the model learns by itself to put no mass on text ids or the mask id at a visual position; the
sampler (``maskgit_t2i``) reads the codebook's slice only.

**Where the randomness comes from.** ``local_counts`` runs on the host before the step, without
the step's generator, yet must give exactly the number of masked positions. So the draw is split:

* how many codes of a span are masked is a function of the batch (:func:`mask_counts`): ``u`` is a
  keyed hash (:func:`unit_hash`, as the pipeline's seeded choices use) of the span's
  document (source, key, epoch) and its index in the document. A document gets a fresh ratio
  each epoch, the same one however the stream is split into micro-batches or ranks, and
  ``local_counts`` and the objective compute it alike. A hand-built batch without document keys
  (samplers, tests) hashes the span's place (row, start, length) instead;
* which codes are masked is drawn from ``generator`` (:func:`draw_mask`: one uniform score per
  position, the ``m`` lowest of each span), so it changes every step and resumes exactly.

The per-micro-batch host read of the span table (a few ints) is a device synchronisation on a
GPU; the boolean head positions are another, as in ``vq_ar``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgen.batch import DISCRETE, FULL, IGNORE_INDEX, MASKED, NEXT_TOKEN, MultimodalBatch
from mmgen.objectives.base import (aux_losses, normalise, per_source_counts, per_source_losses,
                                   position_count)
from mmgen.objectives.config import MASK_SCHEDULES, ObjectiveConfig
from mmgen.objectives.next_token import text_per_source, text_positions, text_source_counts
from mmgen.sequence_shard import shard_of


def mask_ratio(u: torch.Tensor, schedule: str) -> torch.Tensor:
    """Mask ratio in [0, 1] of each ``u`` in [0, 1] (``u`` uniform gives the schedule's ratio
    distribution): "cosine" ``cos(pi/2 u)`` or "linear" ``1 - u``.

    Args:
        u: any shape, float.
        schedule: one of ``MASK_SCHEDULES``.
    """
    if schedule == "cosine":
        return torch.cos(0.5 * math.pi * u)
    if schedule == "linear":
        return 1.0 - u
    raise ValueError(f"mask schedule '{schedule}' not in {MASK_SCHEDULES}")


def unit_hash(*parts) -> float:
    """A uniform number in [0, 1) determined by ``parts`` (blake2b: stable across processes
    and versions, unlike ``hash()``; the rule of ``mmgen.data.sources.unit_hash``, which this
    layer does not import)."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def owned_spans(batch: MultimodalBatch) -> torch.Tensor:
    """``[S]`` bool: the spans this objective masks: DISCRETE targets whose owner is the
    pipeline's default for them (``next_token``) or already ``masked``."""
    s = batch.spans
    return (s.kind == DISCRETE) & s.is_target & ((s.objective == NEXT_TOKEN) | (s.objective == MASKED))


def masked_spans(batch: MultimodalBatch) -> MultimodalBatch:
    """``batch`` with every owned span (:func:`owned_spans`) owned by ``masked``, FULL inside and
    hidden from later positions (a new span table; the tensors are shared, the input is not
    modified). Other spans keep their columns."""
    spans = batch.spans
    if len(spans) == 0:
        return batch
    own = owned_spans(batch)
    table = dataclasses.replace(
        spans, objective=torch.where(own, torch.full_like(spans.objective, MASKED), spans.objective),
        attention=torch.where(own, torch.full_like(spans.attention, FULL), spans.attention),
        visible_after=spans.visible_after & ~own)
    return dataclasses.replace(batch, spans=table)


def mask_counts(batch: MultimodalBatch, schedule: str) -> torch.Tensor:
    """``[S]`` long on the host: how many codes of each span are masked (0 for a span this
    objective does not own, else ``clamp(ceil(schedule(u) * n), 1, n)``), ``u`` a keyed hash of
    the span's document and index in it (module docstring). The same for a batch and its copy on
    another device.

    Args:
        batch: the micro-batch (on any device; its span table is read on the host).
        schedule: one of ``MASK_SCHEDULES``.
    """
    spans = batch.spans.to("cpu")
    if len(spans) == 0:
        return torch.zeros(0, dtype=torch.long)
    own = owned_spans(dataclasses.replace(batch, spans=spans))
    rows, starts, lengths = spans.row.tolist(), spans.start.tolist(), spans.length.tolist()
    doc_of = batch.document_ids[spans.row.to(batch.document_ids.device),
                                spans.start.to(batch.document_ids.device)].tolist()
    keys, epochs = batch.meta.get("key"), batch.meta.get("epoch")
    sources = batch.meta.get("source") or []
    keyed = bool(keys) and all(k is not None for k in keys)
    seen: dict[int, int] = {}
    u = []
    for row, start, n, doc in zip(rows, starts, lengths, doc_of):
        index = seen.get(doc, 0)          # the span's index among its document's spans
        seen[doc] = index + 1
        if keyed:
            src = sources[doc] if doc < len(sources) else None
            ep = epochs[doc] if epochs and doc < len(epochs) else None
            u.append(unit_hash("masked_vq", src, keys[doc], ep, index))
        else:
            u.append(unit_hash("masked_vq", row, start, n))
    n = spans.length.double()
    ratio = mask_ratio(torch.tensor(u, dtype=torch.float64), schedule)
    counts = torch.minimum(torch.ceil(ratio * n).clamp(min=1), n).long()
    return torch.where(own, counts, torch.zeros_like(counts))


def _rank_in_span(batch: MultimodalBatch, own_pos: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` long: at a position of an owned span, its rank (0 = lowest score) among its
    span's positions; undefined elsewhere."""
    flat_span = batch.span_ids.flatten()
    key = torch.where(own_pos.flatten(), flat_span.double() + scores.flatten().double(),
                      torch.full_like(scores.flatten(), float("inf"), dtype=torch.float64))
    order = key.argsort(stable=True)     # owned positions grouped by span id, by score inside
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    # span s's positions occupy ranks [offset_s, offset_s + n_s) (owned spans in id order)
    lengths = torch.where(owned_spans(batch), batch.spans.length, torch.zeros_like(batch.spans.length))
    offset = lengths.cumsum(0) - lengths
    return (rank - offset[flat_span.clamp(min=0)]).view_as(batch.span_ids)


def draw_mask(batch: MultimodalBatch, counts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``[B, L]`` bool: the masked positions, ``counts[s]`` of owned span ``s`` chosen uniformly
    at random: one uniform score per position drawn on ``generator``'s device (the same numbers
    on any accelerator), the lowest ``counts[s]`` of each span masked.

    Args:
        batch: the micro-batch (its owned spans per :func:`owned_spans`).
        counts: ``[S]`` from :func:`mask_counts`.
        generator: the step's generator, the only source of the choice.
    """
    dev = batch.tokens.device
    scores = torch.rand(batch.tokens.shape, generator=generator, device=generator.device).to(dev)
    if len(batch.spans) == 0:
        return torch.zeros_like(batch.tokens, dtype=torch.bool)
    own_pos = (batch.span_ids >= 0) & owned_spans(batch).to(dev)[batch.span_ids.clamp(min=0)]
    rank = _rank_in_span(batch, own_pos, scores)
    return own_pos & (rank < counts.to(dev)[batch.span_ids.clamp(min=0)])


def counted_positions(batch: MultimodalBatch, counts: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: the first ``counts[s]`` positions of each span: as many per span (so per
    document and source) as :func:`draw_mask` masks, without the draw. For counts and FLOPs."""
    if len(batch.spans) == 0:
        return torch.zeros_like(batch.tokens, dtype=torch.bool)
    idx = torch.arange(batch.tokens.shape[1], device=batch.tokens.device).expand_as(batch.tokens)
    sid = batch.span_ids.clamp(min=0)
    start, n = batch.spans.start[sid], counts.to(batch.tokens.device)[sid]
    return (batch.span_ids >= 0) & (idx - start < n)


class MaskedVQObjective:
    """Losses "text" (next-token cross-entropy at text targets) and "visual" (cross-entropy of
    the masked codes), one "lm" head over the shared vocabulary, one forward (module docstring).
    The model has no continuous input or flow head (``model.patch_dim`` 0 under a VQ codec)."""

    loss_names = ("text", "visual")
    heads = ("lm",)
    samplers = ("maskgit_t2i", "text")   # MaskGIT decoding; captions read FULL clean spans, as trained
    video_samplers = ("text_v2t",)       # captions of clips; no MaskGIT text-to-video sampler yet
    codec_kind = DISCRETE                # the start-up check refuses a continuous data.codec
    mask_token = True                    # ... and asks model.vocab_size to hold objective.mask_id
    sources: tuple[str, ...] = ()

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg.validate()
        if cfg.mask_id < 0:
            raise ValueError("objective=masked_vq needs objective.mask_id, the first id above the codes "
                             "(text ids + codebook size; configs/objective/masked_vq.yaml resolves it)")

    def model_view(self, batch: MultimodalBatch) -> MultimodalBatch:
        """The batch as the model runs it (for the trainer's FLOP count): owned spans hidden from
        what follows, and the ``lm`` head at as many positions per span as are masked."""
        batch = masked_spans(batch)
        at = counted_positions(batch, mask_counts(batch, self.cfg.mask_schedule))
        return dataclasses.replace(batch, targets=torch.where(at, batch.tokens, batch.targets))

    def local_counts(self, batch: MultimodalBatch) -> dict[str, torch.Tensor]:
        counts = mask_counts(batch, self.cfg.mask_schedule)
        out = {"text": text_positions(batch).sum(), "visual": counts.sum(), **position_count(batch)}
        if self.sources:
            out.update(text_source_counts(self.sources, batch))
            out.update(per_source_counts("visual", self.sources, counted_positions(batch, counts),
                                         batch.document_sources(self.sources)))
        return out

    def __call__(self, model: nn.Module, batch: MultimodalBatch,
                 denominators: dict[str, torch.Tensor],
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        if shard_of(batch) is not None:
            # a context-parallel slice's mask is compiled from the whole batch, spans visible
            raise ValueError("objective=masked_vq does not run under context parallelism yet (parallel.cp=1)")
        batch = masked_spans(batch)
        masked = draw_mask(batch, mask_counts(batch, self.cfg.mask_schedule), generator)
        return self.losses(model, batch, masked, denominators)

    def losses(self, model: nn.Module, batch: MultimodalBatch, masked: torch.Tensor,
               denominators: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The losses for a given mask (``[B, L]`` bool; split out for exact tests). ``batch``
        is already :func:`masked_spans`'s."""
        inputs = dataclasses.replace(batch, tokens=torch.where(masked, self.cfg.mask_id, batch.tokens))
        is_text = text_positions(batch)
        where = is_text | masked
        # one head call over both kinds of position (row-major), split afterwards
        out = model(inputs, heads={"lm": where})
        targets = torch.where(is_text, batch.targets, batch.tokens)[where]
        per_position = F.cross_entropy(out["lm"].float(), targets, reduction="none")
        code_rows = masked[where]
        losses = {"text": normalise(per_position[~code_rows].sum(), denominators["text"]),
                  "visual": normalise(per_position[code_rows].sum(), denominators["visual"])}
        losses.update(aux_losses(out["aux"], batch, denominators, self.loss_names))
        if self.sources:
            losses.update(text_per_source(self.sources, out["lm"][~code_rows], batch, denominators))
            losses.update(per_source_losses("visual", self.sources, per_position[code_rows],
                                            batch.document_sources(self.sources)[masked],
                                            denominators))
        return losses
