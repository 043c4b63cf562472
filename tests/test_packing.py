# Document layouts and the packer: every field of a packed MultimodalBatch agrees with the others.
from __future__ import annotations

import pickle
import zlib

import numpy as np
import pytest
import torch

from mmgen.batch import IGNORE_INDEX, IMAGE, TEXT
from mmgen.data.decode import Sample
from mmgen.data.pack import I2T, T2I, BatchPacker, build_document, choose_task, collate
from mmgen.data.patches import grid_coords, patchify, to_unit
from mmgen.models.codecs import PixelCodec
from mmgen.models.tokenizers.text import ByteTokenizer

TOK = ByteTokenizer()
P = 4          # patch size; 16x16 images -> 16 visual positions
CODEC = PixelCodec(P)


def sample(key: str, caption: str, size: int = 16) -> Sample:
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    return Sample(key, "shard-0.tar", rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                  caption)


def test_t2i_layout_and_targets():
    doc = build_document(sample("a", "hi"), T2I, False, TOK, CODEC)
    v = [TOK.visual] * 16
    assert doc.tokens.tolist() == [TOK.bos, ord("h"), ord("i"), TOK.boi, *v, TOK.eoi, TOK.eos]
    I = IGNORE_INDEX
    # BOS->h, h->i, i->BOI predicted; BOI (next is visual) and visual ignored; EOI->EOS; EOS end
    assert doc.targets.tolist() == [ord("h"), ord("i"), TOK.boi, I, *[I] * 16, TOK.eos, I]
    assert doc.modality.tolist() == [TEXT] * 4 + [IMAGE] * 16 + [TEXT] * 2
    assert torch.equal(doc.coords[4:20], grid_coords(1, 4, 4))
    assert doc.coords[:4].abs().sum() == 0 and doc.coords[20:].abs().sum() == 0
    (span,) = doc.spans
    assert span.start == 4 and span.grid == (1, 4, 4) and span.is_target
    assert torch.equal(span.payload, patchify(to_unit(sample("a", "hi").image), P))


def test_t2i_dropped_caption_layout():
    doc = build_document(sample("a", "hi"), T2I, True, TOK, CODEC)
    I = IGNORE_INDEX
    assert doc.tokens.tolist()[:2] == [TOK.bos, TOK.boi] and len(doc) == 16 + 4
    assert doc.targets.tolist() == [TOK.boi, I, *[I] * 16, TOK.eos, I]
    assert doc.meta["caption"] == "hi" and doc.meta["caption_dropped"]


def test_i2t_layout_and_targets():
    doc = build_document(sample("a", "hi"), I2T, False, TOK, CODEC)
    v = [TOK.visual] * 16
    assert doc.tokens.tolist() == [TOK.bos, TOK.boi, *v, TOK.eoi, ord("h"), ord("i"), TOK.eos]
    I = IGNORE_INDEX
    # the image is a condition: nothing predicted before EOI; then caption bytes and EOS
    assert doc.targets.tolist() == [I, I, *[I] * 16, ord("h"), ord("i"), TOK.eos, I]
    assert not doc.spans[0].is_target and doc.spans[0].start == 2


def test_task_choice_is_deterministic_and_respects_ratios():
    keys = [f"k{i}" for i in range(2000)]
    a = [choose_task(0, k, 0.5, 0.1) for k in keys]
    assert a == [choose_task(0, k, 0.5, 0.1) for k in keys]
    assert a != [choose_task(1, k, 0.5, 0.1) for k in keys]
    t2i = [d for t, d in a if t == T2I]
    assert 0.45 < len(t2i) / len(a) < 0.55 and 0.06 < sum(t2i) / len(t2i) < 0.14
    assert all(d is False for t, d in a if t == I2T)
    assert {choose_task(0, k, 1.0, 1.0) for k in keys} == {(T2I, True)}
    assert {choose_task(0, k, 0.0, 1.0) for k in keys} == {(I2T, False)}


def check_batch(batch, docs, seq_len):
    """Every invariant of the batch contract that packing must keep."""
    B, L = batch.shape
    assert L == seq_len
    pad = batch.document_ids < 0
    assert (batch.tokens[pad] == TOK.pad).all() and (batch.targets[pad] == IGNORE_INDEX).all()
    assert (batch.span_ids[pad] == -1).all() and (batch.modality[pad] == TEXT).all()
    # each document is one contiguous run in one row, positions 0..n-1, content unchanged
    for doc_id, doc in enumerate(docs):
        rows, cols = torch.nonzero(batch.document_ids == doc_id, as_tuple=True)
        assert rows.unique().numel() == 1 and len(cols) == len(doc)
        assert torch.equal(cols, torch.arange(cols[0], cols[0] + len(doc)))
        r, sl = rows[0], slice(int(cols[0]), int(cols[-1]) + 1)
        assert torch.equal(batch.positions[r, sl], torch.arange(len(doc)))
        assert torch.equal(batch.tokens[r, sl], doc.tokens)
        assert torch.equal(batch.targets[r, sl], doc.targets)
        assert batch.meta["key"][doc_id] == doc.meta["key"]
    # spans: row-major, whole images inside one document, patches in the same order
    sp = batch.spans
    order = (sp.row * L + sp.start).tolist()
    assert order == sorted(order)
    visual = batch.span_ids >= 0
    assert torch.equal(visual, batch.modality == IMAGE)
    assert (batch.tokens[visual] == TOK.visual).all()
    assert (batch.targets[visual] == IGNORE_INDEX).all()
    for s in range(len(sp)):
        r, st, n = int(sp.row[s]), int(sp.start[s]), int(sp.length[s])
        assert n == int(sp.grid[s].prod())
        assert (batch.span_ids[r, st:st + n] == s).all()
        assert batch.document_ids[r, st:st + n].unique().numel() == 1   # never split
        assert batch.targets[r, st - 1] == IGNORE_INDEX                 # BOI: next is visual
    assert batch.patches.shape == (int(sp.length.sum()), CODEC.payload_dim)
    assert int(batch.continuous_mask().sum()) == batch.patches.shape[0]
    first_pos = [tuple(torch.nonzero(batch.document_ids == i)[0].tolist())
                 for i in range(len(docs))]
    row_major = sorted(range(len(docs)), key=lambda i: first_pos[i])
    flat = torch.cat([docs[i].spans[0].payload for i in row_major])
    assert torch.equal(batch.patches, flat)
    assert torch.equal(batch.loss_masks["visual"], batch.target_visual_mask())
    tasks = batch.meta["task"]
    target_docs = {i for i, t in enumerate(tasks) if t == T2I}
    expect = visual & torch.isin(batch.document_ids, torch.tensor(sorted(target_docs) or [-2]))
    assert torch.equal(batch.loss_masks["visual"], expect)
    # a target never reaches into the next document
    valid = batch.targets != IGNORE_INDEX
    nxt = torch.cat([batch.tokens[:, 1:], torch.full((B, 1), TOK.pad)], 1)
    same_doc = torch.cat([batch.document_ids[:, 1:] == batch.document_ids[:, :-1],
                          torch.zeros(B, 1, dtype=torch.bool)], 1)
    assert (same_doc[valid]).all() and torch.equal(batch.targets[valid], nxt[valid])


def make_docs(n, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        cap = "x" * int(rng.integers(1, 40))
        task = T2I if rng.random() < 0.5 else I2T
        docs.append(build_document(sample(f"d{i}", cap), task, bool(rng.random() < 0.2), TOK, CODEC))
    return docs


def pack_all(docs, batch_size, seq_len):
    """Drive the packer as the loader does: a batch closes at the first doc that fits no row."""
    batches, packer, current = [], BatchPacker(batch_size, seq_len), []
    for doc in docs:
        if not packer.add(doc):
            batches.append((packer.build(TOK.pad, CODEC.payload_dim), current))
            packer, current = BatchPacker(batch_size, seq_len), []
            assert packer.add(doc)
        current.append(doc)
    batches.append((packer.build(TOK.pad, CODEC.payload_dim), current))
    return batches


@pytest.mark.parametrize("batch_size,seq_len", [(1, 64), (3, 100), (4, 256)])
def test_packed_batches_are_consistent(batch_size, seq_len):
    docs = make_docs(60)
    batches = pack_all(docs, batch_size, seq_len)
    assert sum(len(d) for _, d in batches) == len(docs)     # nothing lost, nothing duplicated
    for batch, batch_docs in batches:
        check_batch(batch, batch_docs, seq_len)
    # first fit: a closed batch has no row with room for the document that closed it
    for (b, _), (_, nxt) in zip(batches, batches[1:]):
        free = seq_len - (b.document_ids >= 0).sum(1)
        assert (free < len(nxt[0])).all()


def test_packing_is_deterministic():
    a = pack_all(make_docs(30, seed=3), 2, 128)
    b = pack_all(make_docs(30, seed=3), 2, 128)
    for (x, _), (y, _) in zip(a, b):
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.patches, y.patches)


def test_oversized_document_is_an_error():
    doc = build_document(sample("a", "y" * 100), T2I, False, TOK, CODEC)
    with pytest.raises(ValueError, match="exceeds seq_len"):
        BatchPacker(2, 64).add(doc)


def test_batch_crosses_process_boundaries():
    (batch, _), *_ = pack_all(make_docs(5), 2, 128)
    back = pickle.loads(pickle.dumps(collate(batch)))
    assert torch.equal(back.tokens, batch.tokens) and back.meta == batch.meta
    assert torch.equal(back.spans.is_target, batch.spans.is_target)
