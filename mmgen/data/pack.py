# Stages 7-9: example construction, tokenisation, and packing of documents into a MultimodalBatch.
"""Documents (the sampler builds the same layouts at inference):

* text->image:  ``[BOS] caption [BOI] <target image> [EOI] [EOS]``
  (caption dropped for classifier-free guidance: ``[BOS] [BOI] <target image> [EOI] [EOS]``)
* image->text:  ``[BOS] [BOI] <condition image> [EOI] caption [EOS]``
* text->video / video->text: the same with ``[BOV] <video> [EOV]``; a video span has the
  codec's grid of the clip (pixel patches: ``(T, H/p, W/p)``, rows in (t, h, w) row-major
  order), modality VIDEO.
* interleaved:  ``[BOS] text [BOI] <image> [EOI] text [BOI] <image> [EOI] ... [EOS]``; each image
  is a target (generated) with probability ``t2i_ratio`` (a hash of seed, key and image index),
  else a condition. A document longer than ``seq_len`` is cut at the last segment that fits
  (text may be cut mid-way; an image is never split) and closed with EOS.

Next-token targets follow the one rule of ``mmgen/documents.py`` (the builder the samplers
use too): from every text position the next token is predicted, except when the next position
is visual or is the opening token (BOI/BOV) of a *condition* span, and except at EOS (end of
document) and padding (``IGNORE_INDEX``). So the caption bytes, the BOI/BOV that starts a
generated span (also after a dropped caption), text after EOI/EOV, and EOS are predicted.

Visual payloads come from the codec (``mmgen.models.codecs``, ``data.codec``): this module asks
it for rows and grids and never patches pixels itself. Spans get the table's default owner
(flow for a continuous target, none for a condition), FULL attention and visible_after, and
their document's source.

Packing is first-fit over the rows of the open batch, documents taken strictly in stream order;
the batch closes when the next document fits in no row. So every batch holds a contiguous run of
the stream, and "the first document not in any emitted batch" is a single stream position: the
exact-resume cursor. (A look-ahead packer across batches would pack tighter but would break that.)
"""
from __future__ import annotations

import dataclasses

from dataclasses import dataclass

import torch

from mmgen import documents
from mmgen.batch import CONTINUOUS, DISCRETE, FULL, IGNORE_INDEX, IMAGE, VIDEO, MultimodalBatch
from mmgen.data.config import INTERLEAVED_TARGETS
from mmgen.data.decode import InterleavedSample, Sample, VideoSample
from mmgen.data.latents import CachedLatent
from mmgen.data.sources import unit_hash
from mmgen.documents import Document, Span, Visual  # noqa: F401  (Document/Span: the loader's types)
from mmgen.models.codecs import VisualCodec, to_unit

T2I, I2T = "t2i", "i2t"
T2V, V2T = "t2v", "v2t"
INTERLEAVED = "interleaved"
META_KEYS = ("key", "shard", "caption", "task", "caption_dropped", "source", "type", "clip",
             "epoch", "encoded")


# ----------------------------------------------------------------------------------------------
# Example construction: task choice is a hash of (seed, key), so resume replays it exactly
# ----------------------------------------------------------------------------------------------

def choose_task(seed: int, key: str, t2i_ratio: float, caption_dropout: float) -> tuple[str, bool]:
    """(task, caption_dropped) for one sample, a deterministic function of (seed, key)."""
    task = T2I if unit_hash("task", seed, key) < t2i_ratio else I2T
    dropped = task == T2I and unit_hash("drop", seed, key) < caption_dropout
    return task, dropped


@dataclass
class _Framed:
    """A visual span with the token ids that open and close it (BOI/EOI or BOV/EOV)."""
    visual: Visual
    open_id: int
    close_id: int


def assemble(parts: list, tok, meta: dict) -> Document:
    """``parts``: text as lists of token ids and ``_Framed`` spans, in order; BOS and EOS are
    added here, and the targets follow ``mmgen.documents``' one rule."""
    segments: list = [[tok.bos]]
    for part in parts:
        if isinstance(part, _Framed):
            segments += [[part.open_id], part.visual, [part.close_id]]
        else:
            segments.append(part)
    segments.append([tok.eos])
    full_meta = {k: None for k in META_KEYS}
    full_meta.update(meta)
    return documents.build_document(segments, tok.visual, full_meta)


def _visual(pixels, codec: VisualCodec, modality: int, is_target: bool, tok) -> Visual:
    """``pixels`` (a tensor, or a :class:`~mmgen.data.latents.CachedLatent` read from a latent
    shard) as a span; discrete codes go above the text vocabulary (DESIGN.md contract 5)."""
    rows, grid = (pixels.rows, pixels.grid) if isinstance(pixels, CachedLatent) else codec.encode(pixels)
    if codec.kind == DISCRETE:
        rows = rows.long() + tok.vocab_size
    return Visual(rows, grid, modality, is_target, kind=codec.kind)


def _image_visual(image, codec: VisualCodec, is_target: bool, tok) -> _Framed:
    pixels = image if isinstance(image, CachedLatent) else to_unit(image)
    return _Framed(_visual(pixels, codec, IMAGE, is_target, tok), tok.boi, tok.eoi)


def build_document(sample: Sample, task: str, caption_dropped: bool, tokenizer,
                   codec: VisualCodec, source: str = "", sample_type: str = "pair") -> Document:
    """Tokenise one image-caption example into a t2i or i2t document.

    Args:
        sample: the decoded image and caption.
        task: T2I (the image is a target) or I2T (a condition).
        caption_dropped: leave the caption out (classifier-free guidance).
        tokenizer: a ``TextTokenizer``.
        codec: the ``VisualCodec`` that encodes the image.
        source, sample_type: recorded in the document's meta.
    """
    tok = tokenizer
    caption = [] if caption_dropped else tok.encode(sample.caption)
    image = _image_visual(sample.image, codec, task == T2I, tok)
    parts = [caption, image] if task == T2I else [image, caption]
    return assemble(parts, tok, dict(key=sample.key, shard=sample.shard, caption=sample.caption,
                                     task=task, caption_dropped=caption_dropped, source=source,
                                     type=sample_type,
                                     encoded=isinstance(sample.image, CachedLatent)))


def build_video_document(sample: VideoSample, task: str, caption_dropped: bool, tokenizer,
                         codec: VisualCodec, source: str = "") -> Document:
    """Tokenise one clip-caption example: ``task`` is T2I (-> text->video) or I2T (video->text);
    the other arguments as in :func:`build_document`."""
    tok = tokenizer
    generate = task in (T2I, T2V)
    caption = [] if caption_dropped else tok.encode(sample.caption)
    frames = sample.frames
    pixels = torch.stack([to_unit(f) for f in frames])
    video = _Framed(_visual(pixels, codec, VIDEO, generate, tok), tok.bov, tok.eov)
    parts = [caption, video] if generate else [video, caption]
    clip = {"fps": sample.fps, "frames": int(frames.shape[0]), "start": round(sample.clip_start, 4),
            "held": sample.held}
    return assemble(parts, tok, dict(key=sample.key, shard=sample.shard, caption=sample.caption,
                                     task=T2V if generate else V2T,
                                     caption_dropped=caption_dropped, source=source,
                                     type="video", clip=clip))


def build_interleaved_document(sample: InterleavedSample, seed: int, t2i_ratio: float, tokenizer,
                               codec: VisualCodec, seq_len: int, source: str = "",
                               targets: str = "random") -> Document:
    """Tokenise an interleaved document, cut to ``seq_len`` at a segment boundary (text may be
    cut); ``meta["truncated"]`` tells whether anything was cut.

    Args:
        targets: which images are generated (targets, with a visual loss; the text before one
            predicts its BOI) and which are clean conditions (``data.interleaved_targets``):
            ``random`` (each with probability ``t2i_ratio``, a hash of seed, key and image
            index), ``last`` (the last image kept after the cut; earlier ones condition it),
            ``all`` or ``none`` (understanding only).
    """
    if targets not in INTERLEAVED_TARGETS:
        raise ValueError(f"interleaved targets '{targets}' not in {INTERLEAVED_TARGETS}")
    tok = tokenizer
    room = seq_len - 2                       # BOS and EOS
    parts: list = []
    truncated = False
    texts: list[str] = []
    image_index = 0
    for seg in sample.segments:
        if isinstance(seg, str):
            glue = " " if parts and not isinstance(parts[-1], _Framed) else ""
            ids = tok.encode(glue + seg)
            if len(ids) > room:
                ids, truncated = ids[:room], True
            if ids:
                parts.append(ids)
                room -= len(ids)
            texts.append(seg)
        else:
            is_target = targets == "all" or (
                targets == "random" and unit_hash("interleaved", seed, sample.key, image_index) < t2i_ratio)
            image_index += 1
            vis = _image_visual(seg, codec, is_target, tok)
            need = len(vis.visual) + 2
            if need > room:
                truncated = True
            else:
                parts.append(vis)
                room -= need
        if truncated:
            break
    images = [p for p in parts if isinstance(p, _Framed)]
    if targets == "last" and images:   # objective=None: re-derived for a target span
        images[-1].visual = dataclasses.replace(images[-1].visual, is_target=True, objective=None)
    doc = assemble(parts, tok, dict(key=sample.key, shard=sample.shard,
                                    caption=" ".join(texts)[:200], task=INTERLEAVED,
                                    caption_dropped=False, source=source, type="interleaved"))
    doc.meta["truncated"] = truncated
    return doc


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------

def document_pairs(doc: Document) -> int:
    """Allowed (query, key) attention pairs of one document under the mask rule
    (``mmgen.metrics.flops.attention_pairs``): causal over the document, plus the pairs above
    the diagonal of every FULL span; hidden spans are ignored (an estimate, a little high)."""
    n = len(doc)
    return n * (n + 1) // 2 + sum(len(s) * (len(s) - 1) // 2 for s in doc.spans if s.attention == FULL)


@dataclass(frozen=True)
class DocumentCost:
    """Estimated training FLOPs of a document, from the FLOP model's per-unit costs
    (``mmgen.metrics.flops.unit_costs``: per position, attention pair, text target, continuous
    visual position and span), and the budget a batch may not exceed.

    Args:
        units: ``unit_costs(model_cfg)``.
        budget_fraction: a batch closes before the document that would take its estimated
            compute above ``budget_fraction`` x the cost of ``batch_size`` rows each holding one
            causal text document of ``seq_len`` positions (the reference batch).
    """

    units: tuple[tuple[str, float], ...]
    budget_fraction: float

    @staticmethod
    def from_units(units: dict[str, float], budget_fraction: float) -> "DocumentCost":
        return DocumentCost(tuple(sorted(units.items())), float(budget_fraction))

    def __call__(self, doc: Document) -> float:
        u = dict(self.units)
        continuous = sum(len(s) for s in doc.spans if s.kind == CONTINUOUS)
        return (u["tokens"] * len(doc) + u["attention_pairs"] * document_pairs(doc)
                + u["text_targets"] * int((doc.targets != IGNORE_INDEX).sum())
                + u["visual_positions"] * continuous + u["spans"] * len(doc.spans))

    def budget(self, batch_size: int, seq_len: int) -> float:
        u = dict(self.units)
        row = u["tokens"] * seq_len + u["attention_pairs"] * seq_len * (seq_len + 1) // 2
        return self.budget_fraction * batch_size * row


class BatchPacker:
    """Places whole documents into ``batch_size`` rows of ``seq_len`` (first fit, stream order).

    ``add`` returns False when the document fits in no row, or (with ``cost``) when it would
    take the batch's estimated compute above the budget; the caller then emits ``build()`` and
    starts a new packer with that document. A document never splits across rows; the first
    document of a batch is always taken, so a costly one cannot stall the stream. Either way a
    batch is a contiguous run of the stream, decided by that stream's documents alone: exact
    resume and the layout invariance of streams hold (README.md "Compute-balanced packing").
    """

    def __init__(self, batch_size: int, seq_len: int, cost: DocumentCost | None = None):
        self.batch_size, self.seq_len = batch_size, seq_len
        self.fill = [0] * batch_size
        self.placed: list[tuple[int, int, Document]] = []   # (row, offset, doc), arrival order
        self.cost_of = cost
        self.budget = cost.budget(batch_size, seq_len) if cost is not None else None
        self.compute = 0.0

    def __len__(self) -> int:
        return len(self.placed)

    def add(self, doc: Document) -> bool:
        if len(doc) > self.seq_len:
            raise ValueError(f"document of {len(doc)} positions exceeds seq_len {self.seq_len}")
        c = self.cost_of(doc) if self.cost_of is not None else 0.0
        if self.budget is not None and self.placed and self.compute + c > self.budget:
            return False
        for row, used in enumerate(self.fill):
            if used + len(doc) <= self.seq_len:
                self.placed.append((row, used, doc))
                self.fill[row] = used + len(doc)
                self.compute += c
                return True
        return False

    def build(self, pad_id: int, payload_dim: int) -> MultimodalBatch:
        """The packed batch (``mmgen.documents.pack_documents``). ``document_ids`` index the
        arrival order (= ``meta`` list order); spans (and ``patches``) are in row-major order
        of the [B, L] grid, as the contract asks.

        Args:
            pad_id: the tokenizer's padding id.
            payload_dim: the codec's ``payload_dim`` (width of an empty ``patches``).
        """
        return documents.pack_documents(self.placed, self.batch_size, self.seq_len, pad_id,
                                        payload_dim, META_KEYS)


def collate(batch: MultimodalBatch) -> MultimodalBatch:
    """DataLoader ``collate_fn`` (``batch_size=None``): workers yield whole packed batches, so
    there is nothing to stack; this only stops torch's default_convert from touching them."""
    return batch
