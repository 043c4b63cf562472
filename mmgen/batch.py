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

The span table (:class:`SpanTable`, one row per span, row-major order) is the contract that
attention, losses and parallelism derive from (DESIGN.md contract 1); beside the geometry
(row, start, length, grid) and the payload kind, each span says:

* ``is_target``: generated (noised / masked, with a loss) or a clean condition;
* ``objective``: which objective owns it, an index into ``SPAN_OBJECTIVES`` (``"none"``: no
  loss is put on the span, e.g. a condition; ``"flow"``: flow matching on a continuous target;
  ``"next_token"`` / ``"masked"`` / ``"mar"``: the discrete AR, masked-diffusion and per-token
  head families). ``default_objective`` gives the data pipeline's choice;
* ``attention``: ``FULL`` (bidirectional inside the span) or ``CAUSAL`` (causal inside it);
* ``visible_after``: whether positions after the span may attend to it (False hides a noised
  target from what follows, as in BAGEL; the span itself still sees what precedes it);
* ``source``: index into ``meta["source_names"]`` (the distinct data sources of the batch's
  documents, in arrival order), -1 when the document has no source (sampler batches).

A table built without the last four columns gets today's behaviour: the default owner, FULL,
visible, no source. The attention mask is compiled from ``document_ids``, ``span_ids`` and this
table only (``mmgen.models.attention``, which states the rule).
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
# attention inside a span
FULL, CAUSAL = 0, 1
# span owners (SpanTable.objective is an index into this tuple); a new family adds its name
SPAN_OBJECTIVES = ("none", "flow", "next_token", "masked", "mar")
NO_OBJECTIVE, FLOW, NEXT_TOKEN, MASKED, MAR = range(len(SPAN_OBJECTIVES))


def objective_id(name: str) -> int:
    """Index of ``name`` in ``SPAN_OBJECTIVES`` (ValueError naming the known owners)."""
    if name not in SPAN_OBJECTIVES:
        raise ValueError(f"unknown span objective {name!r} (known: {', '.join(SPAN_OBJECTIVES)})")
    return SPAN_OBJECTIVES.index(name)


def default_objective(kind: torch.Tensor | int, is_target: torch.Tensor | bool):
    """The owner the data pipeline gives a span: a continuous target is flow-matched, a discrete
    target is predicted token by token, a condition carries no loss. Works on ints or tensors.

    Args:
        kind: ``CONTINUOUS`` or ``DISCRETE`` (int or ``[S]`` long).
        is_target: bool or ``[S]`` bool.
    """
    if isinstance(kind, torch.Tensor):
        owner = torch.where(kind == CONTINUOUS, FLOW, NEXT_TOKEN)
        return torch.where(is_target, owner, NO_OBJECTIVE).long()
    if not is_target:
        return NO_OBJECTIVE
    return FLOW if kind == CONTINUOUS else NEXT_TOKEN


@dataclass
class SpanTable:
    """One row per visual span in the batch (images and video clips), row-major order.

    Args:
        row: batch row of the span, ``[S]``.
        start: first position of the span in that row, ``[S]``.
        length: number of positions, ``[S]`` (= grid_t * grid_h * grid_w).
        grid: ``[S, 3]`` patch grid (t, h, w); images have t == 1.
        kind: ``CONTINUOUS`` or ``DISCRETE``, ``[S]``.
        is_target: True for spans to generate (noised / masked, with a loss), ``[S]``.
        modality: ``IMAGE`` or ``VIDEO``, ``[S]``.
        objective: owner, index into ``SPAN_OBJECTIVES``, ``[S]`` long; default
            :func:`default_objective`.
        attention: ``FULL`` or ``CAUSAL`` inside the span, ``[S]`` long; default FULL.
        visible_after: may later positions attend to the span, ``[S]`` bool; default True.
        source: index into the batch's ``meta["source_names"]``, -1 = none, ``[S]`` long;
            default -1.
    """

    row: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    grid: torch.Tensor
    kind: torch.Tensor
    is_target: torch.Tensor
    modality: torch.Tensor
    objective: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    visible_after: torch.Tensor | None = None
    source: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # the defaults are today's behaviour, so a table built by hand keeps its old meaning
        n, dev = self.row.numel(), self.row.device
        if self.objective is None:
            self.objective = default_objective(self.kind, self.is_target)
        if self.attention is None:
            self.attention = torch.full((n,), FULL, dtype=torch.long, device=dev)
        if self.visible_after is None:
            self.visible_after = torch.ones(n, dtype=torch.bool, device=dev)
        if self.source is None:
            self.source = torch.full((n,), -1, dtype=torch.long, device=dev)
        for f in dataclasses.fields(self):
            if getattr(self, f.name).shape[0] != n:
                raise ValueError(f"span table: column {f.name} has {getattr(self, f.name).shape[0]} "
                                 f"rows, row has {n}")

    def __len__(self) -> int:
        return int(self.row.numel())

    @staticmethod
    def empty() -> "SpanTable":
        z = torch.zeros(0, dtype=torch.long)
        return SpanTable(z, z, z, torch.zeros(0, 3, dtype=torch.long), z,
                         torch.zeros(0, dtype=torch.bool), z)

    def _map(self, fn) -> "SpanTable":
        return SpanTable(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def to(self, device, non_blocking: bool = False) -> "SpanTable":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "SpanTable":
        return self._map(lambda t: t.pin_memory())


@dataclass
class RowIndex:
    """Flat (row-major) indices of a batch's row sets (:meth:`MultimodalBatch.rows`), computed
    on the host where a boolean mask costs no device synchronisation, and valid only for the
    very tensors they were computed from (``sources``, compared by identity: a batch whose
    targets or span table were replaced recomputes them)."""

    rows: dict[str, torch.Tensor]
    sources: tuple

    def valid_for(self, batch: "MultimodalBatch") -> bool:
        return all(a is b for a, b in zip(self.sources, batch._row_sources(), strict=True))


@dataclass
class MultimodalBatch:
    """A packed batch; see the module docstring for the layout. Shapes: B rows of L positions,
    N continuous visual positions of ``payload_dim`` features each (the codec's width)."""

    tokens: torch.Tensor          # [B, L] long
    targets: torch.Tensor         # [B, L] long, IGNORE_INDEX where no next-token loss
    positions: torch.Tensor       # [B, L] long, restarts per document
    modality: torch.Tensor        # [B, L] long: TEXT / IMAGE / VIDEO
    document_ids: torch.Tensor    # [B, L] long, -1 = padding
    span_ids: torch.Tensor        # [B, L] long, -1 = not visual
    coords: torch.Tensor          # [B, L, 3] long (t, h, w) for visual positions, else 0
    patches: torch.Tensor         # [N, payload_dim] float, continuous spans in row-major order
    spans: SpanTable
    loss_masks: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, L] bool
    meta: dict = field(default_factory=dict)  # non-tensor info: sample keys, captions, source
    row_index: RowIndex | None = field(default=None, repr=False, compare=False)  # see rows()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)  # type: ignore[return-value]

    def span_values(self, column: str, fill) -> torch.Tensor:
        """``[B, L]``: the span table's ``column`` (a 1-D column, e.g. ``"attention"``) gathered
        at every position of its span, ``fill`` at positions outside spans."""
        values = getattr(self.spans, column).to(self.span_ids.device)
        inside = self.span_ids >= 0
        if len(self.spans) == 0:
            return torch.full(self.span_ids.shape, fill, dtype=values.dtype, device=values.device)
        gathered = values[self.span_ids.clamp(min=0)]
        # a Python fill, not a tensor made on the device (that copy would synchronise the host)
        return torch.where(inside, gathered, fill)

    def document_sources(self, names: tuple[str, ...] | list[str]) -> torch.Tensor:
        """``[B, L]`` long: at each position, the index in ``names`` of its document's data
        source (``meta["source"]``, one entry per document, which ``document_ids`` index);
        -1 for padding, a document without a source, or a source not in ``names``. ``names``
        is the run's fixed source list, so the index means the same on every rank and batch
        (``meta["source_names"]``, the span table's index, is per batch).

        Args:
            names: source names, e.g. the data config's sources in order.
        """
        per_doc = self.meta.get("source") or []
        none = torch.full_like(self.document_ids, -1)
        if not per_doc:           # sampler or hand-built batches carry no sources
            return none
        lookup = torch.tensor([names.index(s) if s in names else -1 for s in per_doc],
                              dtype=torch.long, device=self.document_ids.device)
        return torch.where(self.document_ids >= 0, lookup[self.document_ids.clamp(min=0)], none)

    def text_target_mask(self) -> torch.Tensor:
        """[B, L] bool: positions with a next-token target (where the "lm" head runs)."""
        return self.targets != IGNORE_INDEX

    def continuous_mask(self) -> torch.Tensor:
        """[B, L] bool: positions whose payload is a row of ``patches`` (row-major order)."""
        return self.span_values("kind", -1) == CONTINUOUS

    def target_visual_mask(self) -> torch.Tensor:
        """[B, L] bool: visual positions that belong to target spans."""
        return self.span_values("is_target", False)

    # -- row sets ---------------------------------------------------------------------------
    def rows(self, name: str) -> torch.Tensor:
        """``[n]`` long: flat row-major indices (into ``[B * L]``) of the positions of row set
        ``name``: ``"text"`` (a next-token target) or ``"continuous"`` (a row of ``patches``).
        ``x.flatten(0, 1)[batch.rows(name)]`` equals ``x[mask]``; but where :meth:`with_row_index`
        computed them on the host, no device synchronisation is needed to know ``n`` (a boolean
        mask on a GPU stops the host until the GPU has caught up)."""
        index = self.row_index
        if index is not None and index.valid_for(self) and name in index.rows:
            return index.rows[name]
        return ROW_SETS[name](self).flatten().nonzero().squeeze(1)

    def with_row_index(self) -> "MultimodalBatch":
        """This batch with every row set of :data:`ROW_SETS` computed now (call it on the host,
        before :meth:`to`; the copy carries them)."""
        rows = {name: mask(self).flatten().nonzero().squeeze(1) for name, mask in ROW_SETS.items()}
        if self.targets.device.type == "cpu" and self.targets.is_pinned():   # copies to the GPU async
            rows = {name: r.pin_memory() for name, r in rows.items()}
        return dataclasses.replace(self, row_index=RowIndex(rows, self._row_sources()))

    def _row_sources(self) -> tuple:
        # the tensors the row sets are computed from (RowIndex.valid_for compares them with `is`)
        return self.targets, self.span_ids, self.spans.kind

    def _moved_index(self, moved: "MultimodalBatch", fn) -> RowIndex | None:
        index = self.row_index
        if index is None or not index.valid_for(self):
            return None
        return RowIndex({k: fn(v) for k, v in index.rows.items()}, moved._row_sources())

    def to(self, device, non_blocking: bool = False) -> "MultimodalBatch":
        def mv(t):
            return t.to(device, non_blocking=non_blocking)
        moved = MultimodalBatch(
            tokens=mv(self.tokens), targets=mv(self.targets), positions=mv(self.positions),
            modality=mv(self.modality), document_ids=mv(self.document_ids),
            span_ids=mv(self.span_ids), coords=mv(self.coords), patches=mv(self.patches),
            spans=self.spans.to(device, non_blocking=non_blocking),
            loss_masks={k: mv(v) for k, v in self.loss_masks.items()}, meta=self.meta)
        moved.row_index = self._moved_index(moved, mv)
        return moved

    def pin_memory(self) -> "MultimodalBatch":
        """Called by DataLoader(pin_memory=True): page-locked tensors copy to the GPU async."""
        pin = lambda t: t.pin_memory()
        pinned = MultimodalBatch(
            tokens=pin(self.tokens), targets=pin(self.targets), positions=pin(self.positions),
            modality=pin(self.modality), document_ids=pin(self.document_ids), span_ids=pin(self.span_ids),
            coords=pin(self.coords), patches=pin(self.patches), spans=self.spans.pin_memory(),
            loss_masks={k: pin(v) for k, v in self.loss_masks.items()}, meta=self.meta)
        pinned.row_index = self._moved_index(pinned, pin)
        return pinned

    def num_tokens(self) -> int:
        """Non-padding positions (for throughput accounting)."""
        return int((self.document_ids >= 0).sum())


# the row sets MultimodalBatch.rows knows: name -> the [B, L] bool mask they index
ROW_SETS = {
    "text": lambda b: b.text_target_mask(),
    "continuous": lambda b: b.continuous_mask(),
}
