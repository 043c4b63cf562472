# Assembles small MultimodalBatches from explicit documents, for samplers and tests.
"""Not the training packer (that lives in ``mmgen/data``); this one puts documents in rows as
given, which is what samplers and unit tests need. The layout matches the data pipeline's:
tokens at continuous visual positions are ``tokenizer.visual``, ``positions`` restart per
document, ``coords`` are ``grid_coords`` of the span, and ``targets[i]`` is the next token
when positions ``i`` and ``i + 1`` are both text in the same document.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from mmgen.batch import (CONTINUOUS, IGNORE_INDEX, IMAGE, TEXT, VIDEO, MultimodalBatch,
                              SpanTable)
from mmgen.data.patches import grid_coords
from mmgen.models.tokenizers.text import ByteTokenizer


@dataclass
class VisualSpan:
    """A continuous visual span: ``patches`` ``[t*h*w, patch_dim]`` on grid (t, h, w)."""

    patches: torch.Tensor
    grid: tuple[int, int, int]
    is_target: bool

    def __len__(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


Segment = Union[list, VisualSpan]   # a list of token ids, or a visual span
Document = list                     # list[Segment]


def text_to_image_doc(tokenizer: ByteTokenizer, caption: str, patches: torch.Tensor,
                      grid: tuple[int, int, int], complete: bool = True) -> Document:
    """``[BOS] caption [BOI] <target span> [EOI] [EOS]``; ``complete=False`` stops after the
    span (a sampling prompt: later tokens cannot influence the span under the mask)."""
    doc = [[tokenizer.bos] + tokenizer.encode(caption) + [tokenizer.boi],
           VisualSpan(patches, grid, is_target=True)]
    return doc + [[tokenizer.eoi, tokenizer.eos]] if complete else doc


def image_to_text_doc(tokenizer: ByteTokenizer, patches: torch.Tensor,
                      grid: tuple[int, int, int], caption: str | None = None) -> Document:
    """``[BOS] [BOI] <condition span> [EOI] caption [EOS]``; without a caption, the prompt
    ``[BOS] [BOI] <span> [EOI]`` that captioning continues."""
    doc = [[tokenizer.bos, tokenizer.boi], VisualSpan(patches, grid, is_target=False),
           [tokenizer.eoi]]
    return doc if caption is None else doc + [tokenizer.encode(caption) + [tokenizer.eos]]


def build_batch(docs: list[Document], tokenizer: ByteTokenizer, seq_len: int | None = None,
                patch_dim: int | None = None) -> MultimodalBatch:
    """One document per row, right-padded to ``seq_len`` (default: the longest document)."""
    return pack_rows([[doc] for doc in docs], tokenizer, seq_len, patch_dim)


def pack_rows(rows: list[list[Document]], tokenizer: ByteTokenizer, seq_len: int | None = None,
              patch_dim: int | None = None) -> MultimodalBatch:
    """Several documents per row, in the given order, right-padded to ``seq_len``.

    Args:
        rows: ``rows[b]`` lists the documents packed into row ``b``.
        patch_dim: width of ``patches``; needed only when the batch has no visual span.
    """
    lengths = [sum(len(s) for doc in row for s in doc) for row in rows]
    seq_len = seq_len or max(lengths)
    if max(lengths) > seq_len:
        raise ValueError(f"a row of {max(lengths)} positions does not fit seq_len={seq_len}")
    b = len(rows)
    fields = {name: torch.full((b, seq_len), fill, dtype=torch.long) for name, fill in
              (("tokens", tokenizer.pad), ("targets", IGNORE_INDEX), ("positions", 0),
               ("modality", TEXT), ("document_ids", -1), ("span_ids", -1))}
    coords = torch.zeros(b, seq_len, 3, dtype=torch.long)
    spans: list[tuple[int, int, VisualSpan]] = []
    for r, row in enumerate(rows):
        start = 0
        for d, doc in enumerate(row):
            start = _write_document(doc, r, start, d, fields, coords, spans, tokenizer)
    patches = [s.patches.float() for _, _, s in spans]
    width = patches[0].shape[1] if patches else (patch_dim or 0)
    return MultimodalBatch(
        **fields, coords=coords,
        patches=torch.cat(patches) if patches else torch.zeros(0, width),
        spans=_span_table(spans))


def _write_document(doc: Document, row: int, start: int, doc_id: int, fields: dict,
                    coords: torch.Tensor, spans: list, tokenizer: ByteTokenizer) -> int:
    pos, is_text = start, []
    for seg in doc:
        n = len(seg)
        if isinstance(seg, VisualSpan):
            fields["tokens"][row, pos:pos + n] = tokenizer.visual
            fields["modality"][row, pos:pos + n] = IMAGE if seg.grid[0] == 1 else VIDEO
            fields["span_ids"][row, pos:pos + n] = len(spans)
            coords[row, pos:pos + n] = grid_coords(*seg.grid)
            spans.append((row, pos, seg))
        else:
            fields["tokens"][row, pos:pos + n] = torch.tensor(seg, dtype=torch.long)
        is_text += [not isinstance(seg, VisualSpan)] * n
        pos += n
    fields["document_ids"][row, start:pos] = doc_id
    fields["positions"][row, start:pos] = torch.arange(pos - start)
    for i in range(start, pos - 1):
        if is_text[i - start] and is_text[i + 1 - start]:
            fields["targets"][row, i] = fields["tokens"][row, i + 1]
    return pos


def _span_table(spans: list[tuple[int, int, VisualSpan]]) -> SpanTable:
    if not spans:
        return SpanTable.empty()
    long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return SpanTable(
        row=long([r for r, _, _ in spans]),
        start=long([p for _, p, _ in spans]),
        length=long([len(s) for _, _, s in spans]),
        grid=long([list(s.grid) for _, _, s in spans]).reshape(-1, 3),
        kind=long([CONTINUOUS] * len(spans)),
        is_target=torch.tensor([s.is_target for _, _, s in spans], dtype=torch.bool),
        modality=long([IMAGE if s.grid[0] == 1 else VIDEO for _, _, s in spans]))
