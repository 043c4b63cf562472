# The one document builder: data pipeline and samplers give identical rows; span table columns.
from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest
import torch

from mmgen.batch import (CAUSAL, DISCRETE, FLOW, FULL, IGNORE_INDEX, IMAGE, NEXT_TOKEN,
                         NO_OBJECTIVE, SPAN_OBJECTIVES, SpanTable, objective_id)
from mmgen.data.decode import Sample
from mmgen.data.pack import I2T, T2I, BatchPacker, build_document
from mmgen.documents import Visual, build_document as build_segments, pack_documents
from mmgen.models.codecs import PixelCodec, to_unit
from mmgen.models.tokenizers.text import ByteTokenizer
from mmgen.sampling.batching import build_batch, image_to_text_doc, pack_rows, text_to_image_doc

TOK = ByteTokenizer()
CODEC = PixelCodec(4)


def _sample(key: str, caption: str) -> Sample:
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    return Sample(key, "shard-0.tar", rng.integers(0, 256, (8, 12, 3), dtype=np.uint8), caption)


def _fields(batch):
    out = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)
           if f.name not in ("spans", "meta", "loss_masks", "row_index")}
    out.update({f"spans.{f.name}": getattr(batch.spans, f.name)
                for f in dataclasses.fields(batch.spans) if f.name != "source"})
    out["loss_masks.visual"] = batch.loss_masks["visual"]
    return out


def test_pipeline_and_sampler_documents_are_identical():
    """t2i, dropped-caption t2i and i2t documents: the data pipeline's (from a decoded sample,
    through the codec) and the sampler's (batching.py) give the same batch, target rule included."""
    a, b, c = _sample("a", "red"), _sample("b", "blue box"), _sample("c", "hi")
    packer = BatchPacker(3, 13)          # one document per row (first fit)
    for doc in (build_document(a, T2I, False, TOK, CODEC, "src"),
                build_document(b, T2I, True, TOK, CODEC, "src"),
                build_document(c, I2T, False, TOK, CODEC, "src")):
        assert packer.add(doc)
    data = packer.build(TOK.pad, CODEC.payload_dim)
    rows = lambda s: CODEC.encode(to_unit(s.image))       # noqa: E731
    grid = CODEC.grid((8, 12))
    sampler = build_batch([text_to_image_doc(TOK, "red", rows(a)[0], grid),
                           text_to_image_doc(TOK, "", rows(b)[0], grid),
                           image_to_text_doc(TOK, rows(c)[0], grid, "hi")], TOK, seq_len=13)
    for name, value in _fields(data).items():
        assert torch.equal(value, _fields(sampler)[name]), name
    # the one rule: a caption predicts the BOI of a generated image, nothing predicts the BOI of
    # a given one (batching.py predicted it before the builders were merged)
    assert data.targets[0, 3] == TOK.boi and data.targets[1, 0] == TOK.boi
    assert sampler.tokens[2, 1] == TOK.boi and sampler.targets[2, 0] == IGNORE_INDEX
    assert data.meta["source_names"] == ["src"] and data.spans.source.tolist() == [0, 0, 0]
    assert sampler.meta["source_names"] == [] and sampler.spans.source.tolist() == [-1, -1, -1]


def test_span_table_columns_from_the_pipeline():
    packer = BatchPacker(2, 64)
    for key, task, source in (("a", T2I, "pairs"), ("b", I2T, "more"), ("c", T2I, "more")):
        assert packer.add(build_document(_sample(key, key), task, False, TOK, CODEC, source))
    batch = packer.build(TOK.pad, CODEC.payload_dim)
    t = batch.spans
    # documents a, b share row 0, c sits in row 1 (first fit): row-major order is a, b, c
    assert t.is_target.tolist() == [True, False, True]
    assert t.objective.tolist() == [FLOW, NO_OBJECTIVE, FLOW]
    assert [SPAN_OBJECTIVES[i] for i in t.objective] == ["flow", "none", "flow"]
    assert t.attention.tolist() == [FULL] * 3 and t.visible_after.tolist() == [True] * 3
    names = batch.meta["source_names"]
    assert names == ["pairs", "more"] and [names[i] for i in t.source] == ["pairs", "more", "more"]
    assert torch.equal(batch.span_values("objective", -1)[batch.span_ids < 0],
                       torch.full(((batch.span_ids < 0).sum(),), -1))
    assert objective_id("flow") == FLOW
    with pytest.raises(ValueError, match="unknown span objective 'vq'"):
        objective_id("vq")


def test_discrete_span_codes_live_in_tokens():
    codes = torch.tensor([300, 301, 302, 303, 304, 305])
    doc = build_segments([[TOK.bos, 1, TOK.boi], Visual(codes, (1, 2, 3), IMAGE, True, kind=DISCRETE,
                                                        attention=CAUSAL), [TOK.eoi, TOK.eos]],
                         TOK.visual)
    cont = Visual(torch.ones(2, 5), (1, 1, 2), IMAGE, False)
    other = build_segments([[TOK.bos, TOK.boi], cont, [TOK.eoi, 7, TOK.eos]], TOK.visual)
    batch = pack_documents([(0, 0, doc), (1, 0, other)], 2, 12, TOK.pad, 5)
    assert batch.tokens[0, 3:9].tolist() == codes.tolist()
    assert batch.spans.kind.tolist() == [DISCRETE, 0]
    assert batch.spans.objective.tolist() == [NEXT_TOKEN, NO_OBJECTIVE]
    assert batch.spans.attention.tolist() == [CAUSAL, FULL]
    assert not batch.continuous_mask()[0].any() and int(batch.continuous_mask().sum()) == 2
    assert torch.equal(batch.patches, torch.ones(2, 5))          # only the continuous span's rows
    assert (batch.targets[0, 2:9] == IGNORE_INDEX).all() and batch.targets[0, 1] == TOK.boi
    assert batch.targets[1, 0] == IGNORE_INDEX                     # BOS before a condition's BOI
    assert batch.coords[0, 3:9].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2],
                                             [0, 1, 0], [0, 1, 1], [0, 1, 2]]


def test_pack_rows_numbers_documents_in_arrival_order():
    p = torch.zeros(4, 48)
    rows = [[text_to_image_doc(TOK, "a", p, (1, 2, 2)), [[TOK.bos, 5, TOK.eos]]],
            [image_to_text_doc(TOK, p, (1, 2, 2), "bc")]]
    batch = pack_rows(rows, TOK)
    assert batch.document_ids[0].unique().tolist() == [0, 1]
    assert batch.document_ids[1].unique().tolist() == [-1, 2]
    assert batch.positions[0, 9:12].tolist() == [0, 1, 2]           # restart per document
    assert batch.targets[0, 9:12].tolist() == [5, TOK.eos, IGNORE_INDEX]
    assert build_batch([[[TOK.bos, 1]]], TOK, patch_dim=48).patches.shape == (0, 48)


def test_pack_documents_rejects_what_does_not_fit():
    doc = build_segments([[TOK.bos, 1, 2, TOK.eos]], TOK.visual)
    with pytest.raises(ValueError, match="does not fit a 1 x 6 batch"):
        pack_documents([(0, 3, doc)], 1, 6, TOK.pad, 4)
    with pytest.raises(ValueError, match="overlaps"):
        pack_documents([(0, 0, doc), (0, 2, doc)], 1, 8, TOK.pad, 4)
    with pytest.raises(ValueError, match="payload has 3 rows, grid"):
        Visual(torch.zeros(3, 4), (1, 2, 2))


def test_span_table_defaults_and_moves():
    empty = SpanTable.empty()
    assert len(empty) == 0
    for f in dataclasses.fields(empty):
        assert getattr(empty, f.name).shape[0] == 0, f.name
    long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    t = SpanTable(long([0, 1]), long([2, 0]), long([4, 2]), long([[1, 2, 2], [1, 1, 2]]),
                  long([0, 1]), torch.tensor([True, True]), long([IMAGE, IMAGE]))
    assert t.objective.tolist() == [FLOW, NEXT_TOKEN] and t.attention.tolist() == [FULL, FULL]
    assert t.visible_after.all() and t.source.tolist() == [-1, -1]
    moved = t.to("cpu")
    for f in dataclasses.fields(t):
        assert torch.equal(getattr(moved, f.name), getattr(t, f.name))
    with pytest.raises(ValueError, match="column attention has 1 rows"):
        SpanTable(t.row, t.start, t.length, t.grid, t.kind, t.is_target, t.modality,
                  attention=long([FULL]))
    if torch.cuda.is_available():
        pinned = t.pin_memory()
        assert all(getattr(pinned, f.name).is_pinned() for f in dataclasses.fields(t))
