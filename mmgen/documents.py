# The one document builder: segments -> tokenised documents -> packed MultimodalBatch rows.
"""Used by the data pipeline (``mmgen/data/pack.py``) and by the samplers
(``mmgen/sampling/batching.py``), so training and inference lay documents out by one rule.

A document is a list of *segments*: lists of token ids (text, with whatever framing tokens the
caller places: BOS, BOI/EOI, BOV/EOV, EOS) and :class:`Visual` spans. :func:`build_document`
turns it into a :class:`Document`; :func:`pack_documents` places documents at given (row,
offset) slots of a batch.

Layout of one document:

* text positions hold their token id; a **continuous** span's positions hold the tokenizer's
  visual placeholder id and its payload rows go to ``MultimodalBatch.patches``; a
  **discrete** span's positions hold its codes (already offset into the shared vocabulary)
  and add no ``patches`` rows;
* ``modality`` is TEXT for text, the span's IMAGE / VIDEO inside it; ``coords`` are
  :func:`grid_coords` of the span (0 for text); ``positions`` restart at 0 per document.

Next-token targets, the one rule (training's; samplers use the same): from a text position
``i`` the next token is predicted when position ``i + 1`` is text of the same document, except
when ``i + 1`` is the opening token (the text position right before the span: BOI/BOV) of a
*condition* span. So a caption predicts the BOI that starts a generated span (also after a
dropped caption), the BOI of a given image is not predicted (nothing in the text says an image
comes), visual positions predict nothing, and the last position of a document (EOS, or the
end of a sampling prompt) predicts nothing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from mmgen.batch import (CONTINUOUS, DISCRETE, FULL, IGNORE_INDEX, IMAGE, TEXT, MultimodalBatch,
                         SpanTable, default_objective)


def grid_coords(grid_t: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """``[t*h*w, 3]`` (t, h, w) coordinates in row-major order (the order of a span's rows)."""
    t, h, w = torch.meshgrid(torch.arange(grid_t), torch.arange(grid_h), torch.arange(grid_w),
                             indexing="ij")
    return torch.stack([t, h, w], -1).reshape(-1, 3)


@dataclass
class Visual:
    """A visual span to place in a document.

    Args:
        payload: continuous: ``[t*h*w, payload_dim]`` float rows (a codec's ``encode``);
            discrete: ``[t*h*w]`` long codes, already offset into the shared vocabulary.
        grid: (t, h, w) of the span.
        modality: IMAGE or VIDEO.
        is_target: generated (with a loss) or a clean condition.
        kind: CONTINUOUS or DISCRETE.
        objective: owner (index into ``mmgen.batch.SPAN_OBJECTIVES``); None = the default
            owner (:func:`mmgen.batch.default_objective`).
        attention: FULL or CAUSAL inside the span.
        visible_after: whether later positions may attend to the span.
    """

    payload: torch.Tensor
    grid: tuple[int, int, int]
    modality: int = IMAGE
    is_target: bool = False
    kind: int = CONTINUOUS
    objective: int | None = None
    attention: int = FULL
    visible_after: bool = True

    def __post_init__(self) -> None:
        self.grid = tuple(int(g) for g in self.grid)
        if self.payload.shape[0] != len(self):
            raise ValueError(f"visual span: payload has {self.payload.shape[0]} rows, grid "
                             f"{self.grid} has {len(self)} positions")
        if self.objective is None:
            self.objective = default_objective(self.kind, self.is_target)

    def __len__(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


@dataclass
class Span(Visual):
    """A :class:`Visual` placed in a document: ``start`` is its first position there."""

    start: int = 0


@dataclass
class Document:
    """One tokenised document, ready to place in a row: text and any number of visual spans."""

    tokens: torch.Tensor           # [n] long
    targets: torch.Tensor          # [n] long
    modality: torch.Tensor         # [n] long
    coords: torch.Tensor           # [n, 3] long
    spans: list[Span]
    meta: dict = field(default_factory=dict)   # e.g. key, caption, task, source

    def __len__(self) -> int:
        return int(self.tokens.numel())


def build_document(segments: list, visual_id: int, meta: dict | None = None) -> Document:
    """Tokenise a document given as segments, with the module docstring's target rule.

    Args:
        segments: in order, lists of token ids and :class:`Visual` spans.
        visual_id: the tokenizer's placeholder id at continuous visual positions.
        meta: per-document info carried into the batch's ``meta`` (``"source"`` names the
            data source of the document's spans).
    """
    tokens: list[int] = []
    modality: list[int] = []
    spans: list[Span] = []
    for seg in segments:
        if isinstance(seg, Visual):
            start, n = len(tokens), len(seg)
            if seg.kind == DISCRETE:
                tokens += seg.payload.long().tolist()
            else:
                tokens += [visual_id] * n
            modality += [seg.modality] * n
            spans.append(Span(**{f.name: getattr(seg, f.name) for f in dataclasses.fields(seg)},
                              start=start))
        else:
            tokens += list(seg)
            modality += [TEXT] * len(seg)
    if not tokens:
        raise ValueError("a document needs at least one position")
    tok = torch.tensor(tokens, dtype=torch.long)
    mod = torch.tensor(modality, dtype=torch.long)
    is_text = mod == TEXT
    predict = torch.zeros(len(tokens), dtype=torch.bool)
    predict[:-1] = is_text[:-1] & is_text[1:]
    for s in spans:
        if not s.is_target and s.start >= 2 and is_text[s.start - 1]:
            predict[s.start - 2] = False      # would predict the opening token of a condition
    targets = torch.full_like(tok, IGNORE_INDEX)
    idx = torch.nonzero(predict).flatten()
    targets[idx] = tok[idx + 1]
    coords = torch.zeros(len(tokens), 3, dtype=torch.long)
    for s in spans:
        coords[s.start:s.start + len(s)] = grid_coords(*s.grid)
    return Document(tok, targets, mod, coords, spans, dict(meta or {}))


def pack_documents(placed: list[tuple[int, int, Document]], batch_size: int, seq_len: int,
                   pad_id: int, payload_dim: int, meta_keys: tuple = ()) -> MultimodalBatch:
    """Place documents at (row, offset) slots of a ``[batch_size, seq_len]`` batch.

    ``document_ids`` index ``placed`` (its order is the ``meta`` lists' order); the span table
    and ``patches`` are in row-major order of the [B, L] grid, as the contract asks; padding
    is ``pad_id`` with ``document_ids == -1``.

    Args:
        placed: ``(row, offset, document)`` triples; documents must not overlap.
        payload_dim: width of ``patches`` (the codec's ``payload_dim``), used when the batch
            has no continuous span.
        meta_keys: per-document ``meta`` entries gathered into ``batch.meta[key]`` lists.
    """
    B, L = batch_size, seq_len
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    targets = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, L), dtype=torch.long)
    modality = torch.full((B, L), TEXT, dtype=torch.long)
    document_ids = torch.full((B, L), -1, dtype=torch.long)
    span_ids = torch.full((B, L), -1, dtype=torch.long)
    coords = torch.zeros((B, L, 3), dtype=torch.long)
    for doc_id, (row, off, doc) in enumerate(placed):
        if not (0 <= row < B and 0 <= off and off + len(doc) <= L):
            raise ValueError(f"document {doc_id} of {len(doc)} positions at row {row}, offset "
                             f"{off} does not fit a {B} x {L} batch")
        if (document_ids[row, off:off + len(doc)] >= 0).any():
            raise ValueError(f"document {doc_id} overlaps another one in row {row}")
        sl = slice(off, off + len(doc))
        tokens[row, sl], targets[row, sl] = doc.tokens, doc.targets
        positions[row, sl] = torch.arange(len(doc))
        modality[row, sl], coords[row, sl] = doc.modality, doc.coords
        document_ids[row, sl] = doc_id
    source_names: list[str] = []
    for _, _, doc in placed:
        name = doc.meta.get("source")
        if name is not None and name not in source_names:
            source_names.append(name)
    spans, patches = _span_table(placed, span_ids, payload_dim, source_names)
    meta = {k: [d.meta.get(k) for _, _, d in placed] for k in meta_keys}
    meta["source_names"] = source_names
    batch = MultimodalBatch(tokens, targets, positions, modality, document_ids, span_ids,
                            coords, patches, spans, meta=meta)
    batch.loss_masks["visual"] = batch.target_visual_mask()
    return batch


def _span_table(placed: list, span_ids: torch.Tensor, payload_dim: int, source_names: list):
    """Fill ``span_ids`` and return (SpanTable, patches), both in row-major order."""
    rows: list[tuple[int, int, Span, int]] = []
    for row, off, doc in sorted(placed, key=lambda p: (p[0], p[1])):
        name = doc.meta.get("source")
        source = source_names.index(name) if name is not None else -1
        rows += [(row, off + s.start, s, source) for s in doc.spans]
    if not rows:
        return SpanTable.empty(), torch.zeros(0, payload_dim)
    for sid, (row, start, s, _) in enumerate(rows):
        span_ids[row, start:start + len(s)] = sid
    long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    spans = [r[2] for r in rows]
    table = SpanTable(
        row=long([r[0] for r in rows]), start=long([r[1] for r in rows]),
        length=long([len(s) for s in spans]),
        grid=long([list(s.grid) for s in spans]).reshape(-1, 3),
        kind=long([s.kind for s in spans]),
        is_target=torch.tensor([s.is_target for s in spans], dtype=torch.bool),
        modality=long([s.modality for s in spans]),
        objective=long([s.objective for s in spans]),
        attention=long([s.attention for s in spans]),
        visible_after=torch.tensor([s.visible_after for s in spans], dtype=torch.bool),
        source=long([r[3] for r in rows]))
    continuous = [s.payload.float() for s in spans if s.kind == CONTINUOUS]
    patches = torch.cat(continuous) if continuous else torch.zeros(0, payload_dim)
    return table, patches
