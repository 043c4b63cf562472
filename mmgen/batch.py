# The batch contract between data pipelines, objectives and models (DESIGN.md, "The batch").
"""`MultimodalBatch`: one packed batch of fixed-length sequences that can hold every model
family in DESIGN.md's table.

Layout, per row of length ``L`` (rows are packed with several documents):

* every position is either text or visual. Text positions carry a token id in ``tokens``.
  Visual positions belong to exactly one *span* (an image or a video clip) listed in the span
  table; ``span_ids[b, i]`` is that span's row in the table, ``-1`` for text and padding.
* a span is either **continuous** (its payload is one float vector per position, rows of
  ``patches`` in row-major order of the batch's flattened ``[B, L]`` grid) or **discrete**
  (its payload is VQ code ids, stored directly in ``tokens`` with the codebook offset into the
  shared vocabulary, as Chameleon/Emu3/Show-o do; ``patches`` has no rows for it).
* a span is a **target** (to be generated: an objective noises or masks it and puts a loss on
  it) or a **condition** (given clean, e.g. the image of an image-to-text example).
* ``document_ids`` separates packed documents (attention never crosses them); ``-1`` is padding.
* ``positions`` restarts at 0 in every document (1-D RoPE index); ``coords`` gives the
  (t, h, w) grid coordinate of each visual position (0 for text), for 2-D/3-D position codes.
* ``targets`` holds, at position ``i``, the text token to predict from position ``i`` (the
  next token), or ``IGNORE_INDEX``; it is the next-token objective's loss mask.
* ``loss_masks`` holds any further per-position masks by objective name
  (``"visual"``: positions of target spans; later ``"masked"`` for Show-o style masking).

Attention follows from ``document_ids`` and ``span_ids``: causal inside a document, plus full
attention among positions of the same span (see ``mmgen.models.attention``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100

# modality ids (one per position)
TEXT, IMAGE, VIDEO = 0, 1, 2
# span kinds
CONTINUOUS, DISCRETE = 0, 1


@dataclass
class SpanTable:
    """One row per visual span in the batch (images and video clips).

    Args:
        row: batch row of the span, ``[S]``.
        start: first position of the span in that row, ``[S]``.
        length: number of positions, ``[S]`` (= grid_t * grid_h * grid_w).
        grid: ``[S, 3]`` patch grid (t, h, w); images have t == 1.
        kind: ``CONTINUOUS`` or ``DISCRETE``, ``[S]``.
        is_target: True for spans to generate (noised / masked, with a loss), ``[S]``.
        modality: ``IMAGE`` or ``VIDEO``, ``[S]``.
    """

    row: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    grid: torch.Tensor
    kind: torch.Tensor
    is_target: torch.Tensor
    modality: torch.Tensor

    def __len__(self) -> int:
        return int(self.row.numel())

    @staticmethod
    def empty() -> "SpanTable":
        z = torch.zeros(0, dtype=torch.long)
        return SpanTable(z, z, z, torch.zeros(0, 3, dtype=torch.long), z,
                         torch.zeros(0, dtype=torch.bool), z)

    def to(self, device, non_blocking: bool = False) -> "SpanTable":
        return SpanTable(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                            for f in dataclasses.fields(self)})


@dataclass
class MultimodalBatch:
    """A packed batch; see the module docstring for the layout. Shapes: B rows of L positions,
    N continuous visual positions of ``patch_dim`` features each."""

    tokens: torch.Tensor          # [B, L] long
    targets: torch.Tensor         # [B, L] long, IGNORE_INDEX where no next-token loss
    positions: torch.Tensor       # [B, L] long, restarts per document
    modality: torch.Tensor        # [B, L] long: TEXT / IMAGE / VIDEO
    document_ids: torch.Tensor    # [B, L] long, -1 = padding
    span_ids: torch.Tensor        # [B, L] long, -1 = not visual
    coords: torch.Tensor          # [B, L, 3] long (t, h, w) for visual positions, else 0
    patches: torch.Tensor         # [N, patch_dim] float, continuous spans in row-major order
    spans: SpanTable
    loss_masks: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, L] bool
    meta: dict = field(default_factory=dict)  # non-tensor info: sample keys, captions, source

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)  # type: ignore[return-value]

    def continuous_mask(self) -> torch.Tensor:
        """[B, L] bool: positions whose payload is a row of ``patches`` (row-major order)."""
        if len(self.spans) == 0:
            return torch.zeros_like(self.span_ids, dtype=torch.bool)
        kind = self.spans.kind.to(self.span_ids.device)
        safe = self.span_ids.clamp(min=0)
        return (self.span_ids >= 0) & (kind[safe] == CONTINUOUS)

    def target_visual_mask(self) -> torch.Tensor:
        """[B, L] bool: visual positions that belong to target spans."""
        if len(self.spans) == 0:
            return torch.zeros_like(self.span_ids, dtype=torch.bool)
        tgt = self.spans.is_target.to(self.span_ids.device)
        safe = self.span_ids.clamp(min=0)
        return (self.span_ids >= 0) & tgt[safe]

    def to(self, device, non_blocking: bool = False) -> "MultimodalBatch":
        def mv(t):
            return t.to(device, non_blocking=non_blocking)
        return MultimodalBatch(
            tokens=mv(self.tokens), targets=mv(self.targets), positions=mv(self.positions),
            modality=mv(self.modality), document_ids=mv(self.document_ids),
            span_ids=mv(self.span_ids), coords=mv(self.coords), patches=mv(self.patches),
            spans=self.spans.to(device, non_blocking=non_blocking),
            loss_masks={k: mv(v) for k, v in self.loss_masks.items()}, meta=self.meta)

    def pin_memory(self) -> "MultimodalBatch":
        """Called by DataLoader(pin_memory=True): page-locked tensors copy to the GPU async."""
        pin = lambda t: t.pin_memory()
        spans = SpanTable(**{f.name: pin(getattr(self.spans, f.name)) for f in dataclasses.fields(self.spans)})
        return MultimodalBatch(
            tokens=pin(self.tokens), targets=pin(self.targets), positions=pin(self.positions),
            modality=pin(self.modality), document_ids=pin(self.document_ids), span_ids=pin(self.span_ids),
            coords=pin(self.coords), patches=pin(self.patches), spans=spans,
            loss_masks={k: pin(v) for k, v in self.loss_masks.items()}, meta=self.meta)

    def num_tokens(self) -> int:
        """Non-padding positions (for throughput accounting)."""
        return int((self.document_ids >= 0).sum())
