# Small MultimodalBatches from explicit documents, for samplers and tests (over mmgen/documents.py).
"""Not the training packer (that lives in ``mmgen/data``); this one puts documents in rows as
given, which is what samplers and unit tests need. It is a thin layer over the one document
builder (``mmgen.documents``) that the data pipeline uses too, so the layout and the next-token
target rule are training's: tokens at continuous visual positions are ``tokenizer.visual``,
``positions`` restart per document, ``coords`` are ``grid_coords`` of the span, and
``targets[i]`` is the next token when positions ``i`` and ``i + 1`` are text of the same
document, except before the opening token (BOI) of a condition span.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from mmgen import documents
from mmgen.batch import CONTINUOUS, FULL, IMAGE, VIDEO, MultimodalBatch
from mmgen.models.tokenizers import TextTokenizer


@dataclass
class VisualSpan:
    """A visual span on grid (t, h, w): continuous ``patches`` ``[t*h*w, patch_dim]``, or
    (``kind=DISCRETE``) ``[t*h*w]`` codes already offset into the shared vocabulary;
    ``attention`` FULL or CAUSAL inside the span (as the span table's column); ``modality``
    IMAGE or VIDEO, None = IMAGE for one frame (t = 1) and VIDEO for more."""

    patches: torch.Tensor
    grid: tuple[int, int, int]
    is_target: bool
    kind: int = CONTINUOUS
    attention: int = FULL
    modality: int | None = None

    def __len__(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


Segment = Union[list, VisualSpan]   # a list of token ids, or a visual span
Document = list                     # list[Segment]


def text_to_image_doc(tokenizer: TextTokenizer, caption: str, patches: torch.Tensor,
                      grid: tuple[int, int, int], complete: bool = True) -> Document:
    """``[BOS] caption [BOI] <target span> [EOI] [EOS]``; ``complete=False`` stops after the
    span (a sampling prompt: later tokens cannot influence the span under the mask)."""
    doc = [[tokenizer.bos] + tokenizer.encode(caption) + [tokenizer.boi],
           VisualSpan(patches, grid, is_target=True)]
    return doc + [[tokenizer.eoi, tokenizer.eos]] if complete else doc


def image_to_text_doc(tokenizer: TextTokenizer, patches: torch.Tensor,
                      grid: tuple[int, int, int], caption: str | None = None,
                      kind: int = CONTINUOUS, attention: int = FULL) -> Document:
    """``[BOS] [BOI] <condition span> [EOI] caption [EOS]``; without a caption, the prompt
    ``[BOS] [BOI] <span> [EOI]`` that captioning continues. ``kind`` / ``attention`` as in
    :class:`VisualSpan` (discrete codes: already offset into the shared vocabulary)."""
    doc = [[tokenizer.bos, tokenizer.boi],
           VisualSpan(patches, grid, is_target=False, kind=kind, attention=attention),
           [tokenizer.eoi]]
    return doc if caption is None else doc + [tokenizer.encode(caption) + [tokenizer.eos]]


def text_to_video_doc(tokenizer: TextTokenizer, caption: str, patches: torch.Tensor,
                      grid: tuple[int, int, int], complete: bool = True, kind: int = CONTINUOUS,
                      attention: int = FULL) -> Document:
    """``[BOS] caption [BOV] <target clip> [EOV] [EOS]``, the data pipeline's text->video
    layout (``mmgen.data.pack.build_video_document``); ``complete=False`` stops after the clip
    (a sampling prompt), ``kind`` / ``attention`` as in :class:`VisualSpan`."""
    doc = [[tokenizer.bos] + tokenizer.encode(caption) + [tokenizer.bov],
           VisualSpan(patches, grid, is_target=True, kind=kind, attention=attention,
                      modality=VIDEO)]
    return doc + [[tokenizer.eov, tokenizer.eos]] if complete else doc


def video_to_text_doc(tokenizer: TextTokenizer, patches: torch.Tensor,
                      grid: tuple[int, int, int], caption: str | None = None,
                      kind: int = CONTINUOUS, attention: int = FULL) -> Document:
    """``[BOS] [BOV] <condition clip> [EOV] caption [EOS]`` (the pipeline's video->text
    layout); without a caption, the prompt that captioning continues. Arguments as in
    :func:`image_to_text_doc`."""
    doc = [[tokenizer.bos, tokenizer.bov],
           VisualSpan(patches, grid, is_target=False, kind=kind, attention=attention,
                      modality=VIDEO),
           [tokenizer.eov]]
    return doc if caption is None else doc + [tokenizer.encode(caption) + [tokenizer.eos]]


def build_batch(docs: list[Document], tokenizer: TextTokenizer, seq_len: int | None = None,
                patch_dim: int | None = None) -> MultimodalBatch:
    """One document per row, right-padded to ``seq_len`` (default: the longest document)."""
    return pack_rows([[doc] for doc in docs], tokenizer, seq_len, patch_dim)


def pack_rows(rows: list[list[Document]], tokenizer: TextTokenizer, seq_len: int | None = None,
              patch_dim: int | None = None) -> MultimodalBatch:
    """Several documents per row, in the given order, right-padded to ``seq_len``.

    Args:
        rows: ``rows[b]`` lists the documents packed into row ``b``.
        tokenizer: a ``TextTokenizer`` (``pad`` and ``visual`` ids).
        seq_len: row length; default the longest row.
        patch_dim: width of ``patches``; needed only when the batch has no visual span.
    """
    placed, widths, lengths = [], [], []
    for r, row in enumerate(rows):
        offset = 0
        for doc in row:
            built = _document(doc, tokenizer)
            placed.append((r, offset, built))
            widths += [s.payload.shape[1] for s in built.spans if s.kind == CONTINUOUS]
            offset += len(built)
        lengths.append(offset)
    seq_len = seq_len or max(lengths)
    if max(lengths) > seq_len:
        raise ValueError(f"a row of {max(lengths)} positions does not fit seq_len={seq_len}")
    width = widths[0] if widths else (patch_dim or 0)
    return documents.pack_documents(placed, len(rows), seq_len, tokenizer.pad, width)


def _document(doc: Document, tokenizer: TextTokenizer) -> documents.Document:
    segments = [documents.Visual(seg.patches, seg.grid, _modality(seg), seg.is_target,
                                 kind=seg.kind, attention=seg.attention)
                if isinstance(seg, VisualSpan) else seg
                for seg in doc]
    return documents.build_document(segments, tokenizer.visual)


def _modality(span: VisualSpan) -> int:
    if span.modality is not None:
        return span.modality
    return IMAGE if span.grid[0] == 1 else VIDEO
