# Stages 7-9: example construction, tokenisation, and packing of documents into a MultimodalBatch.
"""Documents (the sampler builds the same layouts at inference):

* text->image:  ``[BOS] caption [BOI] <target image> [EOI] [EOS]``
  (caption dropped for classifier-free guidance: ``[BOS] [BOI] <target image> [EOI] [EOS]``)
* image->text:  ``[BOS] [BOI] <condition image> [EOI] caption [EOS]``
* text->video / video->text: the same with ``[BOV] <video> [EOV]``; a video span has grid
  ``(T, H/p, W/p)``, per-frame patches in (t, h, w) row-major order, modality VIDEO.
* interleaved:  ``[BOS] text [BOI] <image> [EOI] text [BOI] <image> [EOI] ... [EOS]``; each image
  is a target (generated) with probability ``t2i_ratio`` (a hash of seed, key and image index),
  else a condition. A document longer than ``seq_len`` is cut at the last segment that fits
  (text may be cut mid-way; an image is never split) and closed with EOS.

Next-token targets, one rule for every layout: from every non-visual position the next token is
predicted, except when the next position is visual or is the opening token (BOI/BOV) of a
*condition* span, and except at EOS (end of document) and padding (``IGNORE_INDEX``). So the
caption bytes, the BOI/BOV that starts a generated span (also after a dropped caption), text
after EOI/EOV, and EOS are predicted.

Packing is first-fit over the rows of the open batch, documents taken strictly in stream order;
the batch closes when the next document fits in no row. So every batch holds a contiguous run of
the stream, and "the first document not in any emitted batch" is a single stream position: the
exact-resume cursor. (A look-ahead packer across batches would pack tighter but would break that.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mmgen.batch import (CONTINUOUS, IGNORE_INDEX, IMAGE, TEXT, VIDEO, MultimodalBatch,
                              SpanTable)
from mmgen.data.decode import InterleavedSample, Sample, VideoSample
from mmgen.data.patches import grid_coords, patchify, to_unit
from mmgen.data.sources import unit_hash

T2I, I2T = "t2i", "i2t"
T2V, V2T = "t2v", "v2t"
INTERLEAVED = "interleaved"
META_KEYS = ("key", "shard", "caption", "task", "caption_dropped", "source", "type", "clip",
             "epoch")


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
    modality: int = IMAGE          # IMAGE or VIDEO


@dataclass
class Document:
    """One tokenised document, ready to place in a row: text and any number of visual spans."""
    tokens: torch.Tensor           # [n] long
    targets: torch.Tensor          # [n] long
    modality: torch.Tensor         # [n] long
    coords: torch.Tensor           # [n, 3] long
    spans: list[Span]
    meta: dict = field(default_factory=dict)   # META_KEYS

    def __len__(self) -> int:
        return int(self.tokens.numel())


@dataclass
class _Visual:
    """A visual span to place: its patches, grid, modality, role, and framing token ids."""
    patches: torch.Tensor
    grid: tuple[int, int, int]
    modality: int
    is_target: bool
    open_id: int
    close_id: int


def assemble(parts: list, tok, meta: dict) -> Document:
    """``parts``: text as lists of token ids and ``_Visual`` spans, in order; BOS and EOS are
    added here. Targets follow the module docstring's single rule."""
    seq: list[int] = [tok.bos]
    modality: list[int] = [TEXT]
    no_predict: set[int] = set()        # positions whose next token is not predicted
    spans: list[Span] = []
    coords_at: list[tuple[int, torch.Tensor]] = []
    for part in parts:
        if isinstance(part, _Visual):
            if not part.is_target:
                no_predict.add(len(seq) - 1)           # the token before a condition's BOI/BOV
            seq.append(part.open_id)
            modality.append(TEXT)
            start, n = len(seq), part.patches.shape[0]
            seq += [tok.visual] * n
            modality += [part.modality] * n
            spans.append(Span(start, part.grid, part.is_target, part.patches, part.modality))
            coords_at.append((start, grid_coords(*part.grid)))
            seq.append(part.close_id)
            modality.append(TEXT)
        else:
            seq += part
            modality += [TEXT] * len(part)
    seq.append(tok.eos)
    modality.append(TEXT)
    tokens = torch.tensor(seq, dtype=torch.long)
    mod = torch.tensor(modality, dtype=torch.long)
    nxt_text = torch.zeros(len(seq), dtype=torch.bool)
    nxt_text[:-1] = mod[1:] == TEXT
    predict = (mod == TEXT) & nxt_text
    if no_predict:
        predict[torch.tensor(sorted(no_predict))] = False
    targets = torch.full_like(tokens, IGNORE_INDEX)
    idx = torch.nonzero(predict).flatten()
    targets[idx] = tokens[idx + 1]
    coords = torch.zeros(len(seq), 3, dtype=torch.long)
    for start, c in coords_at:
        coords[start:start + c.shape[0]] = c
    full_meta = {k: None for k in META_KEYS}
    full_meta.update(meta)
    return Document(tokens, targets, mod, coords, spans, full_meta)


def _image_visual(image: np.ndarray, patch_size: int, is_target: bool, tok) -> _Visual:
    gh, gw = image.shape[0] // patch_size, image.shape[1] // patch_size
    return _Visual(patchify(to_unit(image), patch_size), (1, gh, gw), IMAGE, is_target,
                   tok.boi, tok.eoi)


def build_document(sample: Sample, task: str, caption_dropped: bool, tokenizer,
                   patch_size: int, source: str = "", sample_type: str = "pair") -> Document:
    """Tokenise one image-caption example into a t2i or i2t document."""
    tok = tokenizer
    caption = [] if caption_dropped else tok.encode(sample.caption)
    image = _image_visual(sample.image, patch_size, task == T2I, tok)
    parts = [caption, image] if task == T2I else [image, caption]
    return assemble(parts, tok, dict(key=sample.key, shard=sample.shard, caption=sample.caption,
                                     task=task, caption_dropped=caption_dropped, source=source,
                                     type=sample_type))


def build_video_document(sample: VideoSample, task: str, caption_dropped: bool, tokenizer,
                         patch_size: int, source: str = "") -> Document:
    """Tokenise one clip-caption example: ``task`` is T2I (-> text->video) or I2T (video->text)."""
    tok = tokenizer
    generate = task in (T2I, T2V)
    caption = [] if caption_dropped else tok.encode(sample.caption)
    frames = sample.frames
    t, gh, gw = frames.shape[0], frames.shape[1] // patch_size, frames.shape[2] // patch_size
    patches = torch.cat([patchify(to_unit(f), patch_size) for f in frames])
    video = _Visual(patches, (t, gh, gw), VIDEO, generate, tok.bov, tok.eov)
    parts = [caption, video] if generate else [video, caption]
    clip = {"fps": sample.fps, "frames": int(t), "start": round(sample.clip_start, 4),
            "held": sample.held}
    return assemble(parts, tok, dict(key=sample.key, shard=sample.shard, caption=sample.caption,
                                     task=T2V if generate else V2T,
                                     caption_dropped=caption_dropped, source=source,
                                     type="video", clip=clip))


def build_interleaved_document(sample: InterleavedSample, seed: int, t2i_ratio: float, tokenizer,
                               patch_size: int, seq_len: int, source: str = "") -> Document:
    """Tokenise an interleaved document, cut to ``seq_len`` at a segment boundary (text may be
    cut); ``meta["truncated"]`` tells whether anything was cut."""
    tok = tokenizer
    room = seq_len - 2                       # BOS and EOS
    parts: list = []
    truncated = False
    texts: list[str] = []
    image_index = 0
    for seg in sample.segments:
        if isinstance(seg, str):
            glue = " " if parts and not isinstance(parts[-1], _Visual) else ""
            ids = tok.encode(glue + seg)
            if len(ids) > room:
                ids, truncated = ids[:room], True
            if ids:
                parts.append(ids)
                room -= len(ids)
            texts.append(seg)
        else:
            is_target = unit_hash("interleaved", seed, sample.key, image_index) < t2i_ratio
            image_index += 1
            vis = _image_visual(seg, patch_size, is_target, tok)
            need = vis.patches.shape[0] + 2
            if need > room:
                truncated = True
            else:
                parts.append(vis)
                room -= need
        if truncated:
            break
    doc = assemble(parts, tok, dict(key=sample.key, shard=sample.shard,
                                    caption=" ".join(texts)[:200], task=INTERLEAVED,
                                    caption_dropped=False, source=source, type="interleaved"))
    doc.meta["truncated"] = truncated
    return doc


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
                                meta={k: [d.meta.get(k) for _, _, d in self.placed]
                                      for k in META_KEYS})
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
            modality=torch.tensor([r[2].modality for r in rows], dtype=torch.long))
        return table, torch.cat([r[2].patches for r in rows])


def collate(batch: MultimodalBatch) -> MultimodalBatch:
    """DataLoader ``collate_fn`` (``batch_size=None``): workers yield whole packed batches, so
    there is nothing to stack; this only stops torch's default_convert from touching them."""
    return batch
