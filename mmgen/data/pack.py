# Stages 7-9: example construction, tokenisation, and packing of documents into a MultimodalBatch.
"""Documents (the sampler builds the same layouts at inference):

* text->image:  ``[BOS] caption [BOI] <target image> [EOI] [EOS]``
  (caption dropped for classifier-free guidance: ``[BOS] [BOI] <target image> [EOI] [EOS]``)
* image->text:  ``[BOS] [BOI] <condition image> [EOI] caption [EOS]``

Next-token targets: caption bytes, the BOI that starts a generated image (t2i only, dropped
captions included), caption bytes after EOI (i2t) and EOS are predicted; a position whose next
position is visual, visual positions themselves, EOS (end of document) and padding are
``IGNORE_INDEX``.

Packing is first-fit over the rows of the open batch, documents taken strictly in stream order;
the batch closes when the next document fits in no row. So every batch holds a contiguous run of
the stream, and "the first document not in any emitted batch" is a single stream position: the
exact-resume cursor. (A look-ahead packer across batches would pack tighter but would break that.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmgen.data.batch import (CONTINUOUS, IGNORE_INDEX, IMAGE, TEXT, MultimodalBatch, SpanTable)
from mmgen.data.decode import Sample
from mmgen.data.patches import grid_coords, patchify, to_unit
from mmgen.data.sources import unit_hash

T2I, I2T = "t2i", "i2t"


# ----------------------------------------------------------------------------------------------
# Example construction: task choice is a hash of (seed, key), so resume replays it exactly
# ----------------------------------------------------------------------------------------------

def choose_task(seed: int, key: str, t2i_ratio: float, caption_dropout: float) -> tuple[str, bool]:
    """(task, caption_dropped) for one sample, a deterministic function of (seed, key)."""
    task = T2I if unit_hash("task", seed, key) < t2i_ratio else I2T
    dropped = task == T2I and unit_hash("drop", seed, key) < caption_dropout
    return task, dropped


@dataclass
class Span:
    start: int                     # offset inside the document
    grid: tuple[int, int, int]     # (t, h, w)
    is_target: bool
    patches: torch.Tensor          # [t*h*w, patch_dim]


@dataclass
class Document:
    """One tokenised document, ready to place in a row. A list of spans (not one image) so
    interleaved documents and video clips fit the same packer later."""
    tokens: torch.Tensor           # [n] long
    targets: torch.Tensor          # [n] long
    modality: torch.Tensor         # [n] long
    coords: torch.Tensor           # [n, 3] long
    spans: list[Span]
    meta: dict = field(default_factory=dict)   # key, shard, caption, task, caption_dropped

    def __len__(self) -> int:
        return int(self.tokens.numel())


def build_document(sample: Sample, task: str, caption_dropped: bool, tokenizer,
                   patch_size: int) -> Document:
    """Tokenise one image-caption example into a t2i or i2t document."""
    tok = tokenizer
    caption = [] if caption_dropped else tok.encode(sample.caption)
    patches = patchify(to_unit(sample.image), patch_size)
    gh, gw = sample.image.shape[0] // patch_size, sample.image.shape[1] // patch_size
    n_img = gh * gw
    image = [tok.visual] * n_img
    if task == T2I:
        seq = [tok.bos, *caption, tok.boi, *image, tok.eoi, tok.eos]
        img_start = 2 + len(caption)
        # predicted: every caption byte, BOI after the caption, EOS after EOI
        predict_from = [*range(0, len(caption) + 1), img_start + n_img]
    else:
        seq = [tok.bos, tok.boi, *image, tok.eoi, *caption, tok.eos]
        img_start = 2
        eoi = img_start + n_img
        # predicted: caption bytes after EOI, then EOS
        predict_from = list(range(eoi, eoi + len(caption) + 1))
    tokens = torch.tensor(seq, dtype=torch.long)
    targets = torch.full_like(tokens, IGNORE_INDEX)
    idx = torch.tensor(predict_from, dtype=torch.long)
    targets[idx] = tokens[idx + 1]
    modality = torch.full_like(tokens, TEXT)
    modality[img_start:img_start + n_img] = IMAGE
    coords = torch.zeros(len(seq), 3, dtype=torch.long)
    coords[img_start:img_start + n_img] = grid_coords(1, gh, gw)
    span = Span(img_start, (1, gh, gw), task == T2I, patches)
    meta = dict(key=sample.key, shard=sample.shard, caption=sample.caption, task=task,
                caption_dropped=caption_dropped)
    return Document(tokens, targets, modality, coords, [span], meta)


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------

class BatchPacker:
    """Places whole documents into ``batch_size`` rows of ``seq_len`` (first fit, stream order).

    ``add`` returns False when the document fits in no row; the caller then emits ``build()``
    and starts a new packer with that document. A document never splits across rows.
    """

    def __init__(self, batch_size: int, seq_len: int):
        self.batch_size, self.seq_len = batch_size, seq_len
        self.fill = [0] * batch_size
        self.placed: list[tuple[int, int, Document]] = []   # (row, offset, doc), arrival order

    def __len__(self) -> int:
        return len(self.placed)

    def add(self, doc: Document) -> bool:
        if len(doc) > self.seq_len:
            raise ValueError(f"document of {len(doc)} positions exceeds seq_len {self.seq_len}")
        for row, used in enumerate(self.fill):
            if used + len(doc) <= self.seq_len:
                self.placed.append((row, used, doc))
                self.fill[row] = used + len(doc)
                return True
        return False

    def build(self, pad_id: int, patch_dim: int) -> MultimodalBatch:
        """The packed batch. ``document_ids`` index the arrival order (= ``meta`` list order);
        spans (and ``patches``) are in row-major order of the [B, L] grid, as the contract asks."""
        B, L = self.batch_size, self.seq_len
        tokens = torch.full((B, L), pad_id, dtype=torch.long)
        targets = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((B, L), dtype=torch.long)
        modality = torch.full((B, L), TEXT, dtype=torch.long)
        document_ids = torch.full((B, L), -1, dtype=torch.long)
        span_ids = torch.full((B, L), -1, dtype=torch.long)
        coords = torch.zeros((B, L, 3), dtype=torch.long)
        for doc_id, (row, off, doc) in enumerate(self.placed):
            sl = slice(off, off + len(doc))
            tokens[row, sl], targets[row, sl] = doc.tokens, doc.targets
            positions[row, sl] = torch.arange(len(doc))
            modality[row, sl], coords[row, sl] = doc.modality, doc.coords
            document_ids[row, sl] = doc_id
        spans, patches = self._span_table(span_ids, patch_dim)
        batch = MultimodalBatch(tokens, targets, positions, modality, document_ids, span_ids,
                                coords, patches, spans,
                                meta={k: [d.meta[k] for _, _, d in self.placed]
                                      for k in ("key", "shard", "caption", "task",
                                                "caption_dropped")})
        batch.loss_masks["visual"] = batch.target_visual_mask()
        return batch

    def _span_table(self, span_ids: torch.Tensor, patch_dim: int):
        """Fill ``span_ids`` and return (SpanTable, patches), both in row-major order."""
        rows: list[list] = []
        for row, off, doc in sorted(self.placed, key=lambda p: (p[0], p[1])):
            for s in doc.spans:
                rows.append((row, off + s.start, s))
        if not rows:
            return SpanTable.empty(), torch.zeros(0, patch_dim)
        for sid, (row, start, s) in enumerate(rows):
            span_ids[row, start:start + s.patches.shape[0]] = sid
        col = lambda f: torch.tensor([f(r) for r in rows], dtype=torch.long)  # noqa: E731
        table = SpanTable(
            row=col(lambda r: r[0]), start=col(lambda r: r[1]),
            length=col(lambda r: r[2].patches.shape[0]),
            grid=torch.tensor([list(r[2].grid) for r in rows], dtype=torch.long),
            kind=torch.full((len(rows),), CONTINUOUS, dtype=torch.long),
            is_target=torch.tensor([r[2].is_target for r in rows], dtype=torch.bool),
            modality=torch.full((len(rows),), IMAGE, dtype=torch.long))
        return table, torch.cat([r[2].patches for r in rows])


def collate(batch: MultimodalBatch) -> MultimodalBatch:
    """DataLoader ``collate_fn`` (``batch_size=None``): workers yield whole packed batches, so
    there is nothing to stack; this only stops torch's default_convert from touching them."""
    return batch
