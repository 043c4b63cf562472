# Span attention modes: both mask encodings against a brute-force reference of the rule, pair by pair.
"""The reference reads the span table row by row with plain Python (which span holds a
position, its mode, its visibility) and decides each (query, key) pair by the rule in words;
the compiled masks (dense SDPA bool and the FlexAttention mask_mod evaluated on CPU with
``create_mask``) must agree on every pair of packed rows with several documents and padding."""
from __future__ import annotations

import dataclasses
import itertools
import random
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_mask

from mmgen.batch import CAUSAL, FULL, IMAGE, VIDEO, MultimodalBatch
from mmgen.documents import Visual, build_document, pack_documents
from mmgen.models.attention import (attend, build_block_mask, build_dense_mask, build_mask,
                                    document_mask_mod)
from mmgen.models.tokenizers.text import ByteTokenizer

TOK = ByteTokenizer()
WIDTH = 6     # payload features per visual position
MODES = list(itertools.product((FULL, CAUSAL), (True, False)))   # (attention, visible_after)


def _span_at(batch: MultimodalBatch, row: int, pos: int) -> int | None:
    t = batch.spans
    for s in range(len(t)):
        start, n = int(t.start[s]), int(t.length[s])
        if int(t.row[s]) == row and start <= pos < start + n:
            return s
    return None


def reference_mask(batch: MultimodalBatch) -> torch.Tensor:
    """``[B, L, L]`` from the rule in words: same document; causal by default; the positions
    of a FULL span see each other; a CAUSAL span is causal inside; a position after a span
    with visible_after=False does not see it; padding attends to itself only."""
    B, L = batch.shape
    out = torch.zeros(B, L, L, dtype=torch.bool)
    for b in range(B):
        doc = batch.document_ids[b].tolist()
        span = [_span_at(batch, b, i) for i in range(L)]
        for q in range(L):
            for k in range(L):
                if doc[q] < 0:
                    ok = q == k
                elif doc[k] != doc[q]:
                    ok = False
                elif span[q] is not None and span[q] == span[k]:
                    ok = int(batch.spans.attention[span[q]]) == FULL or k <= q
                elif k > q:
                    ok = False
                elif span[k] is not None and not bool(batch.spans.visible_after[span[k]]):
                    ok = False
                else:
                    ok = True
                out[b, q, k] = ok
    return out


def _vis(grid, mode, is_target=True) -> Visual:
    n = grid[0] * grid[1] * grid[2]
    return Visual(torch.randn(n, WIDTH), grid, IMAGE if grid[0] == 1 else VIDEO, is_target,
                  attention=mode[0], visible_after=mode[1])


def _doc(segments):
    return build_document(segments, TOK.visual)


def hand_made_batch() -> MultimodalBatch:
    """Every mode, as a lone span, twice in a row, at a document's start, and between text;
    three rows of several documents with padding."""
    torch.manual_seed(0)
    (fv, fh), (cv, ch) = (MODES[0], MODES[1]), (MODES[2], MODES[3])
    rows = [
        [_doc([[TOK.bos, 1, 2, TOK.boi], _vis((1, 2, 2), fh), [TOK.eoi, 3, 4, TOK.eos]]),
         _doc([[TOK.bos, TOK.boi], _vis((1, 1, 3), ch), _vis((1, 2, 1), cv), [TOK.eoi, 5]])],
        [_doc([_vis((2, 1, 2), fv), [TOK.eoi, 6, TOK.boi], _vis((1, 1, 2), fh), [7, TOK.eos]]),
         _doc([[TOK.bos, 8]])],
        [_doc([[TOK.bos, TOK.bov], _vis((2, 1, 2), ch), [TOK.eov, 9], _vis((1, 2, 2), cv),
               [10, TOK.eos]])],
    ]
    placed = []
    for r, row in enumerate(rows):
        offset = 0
        for doc in row:
            placed.append((r, offset, doc))
            offset += len(doc)
    return pack_documents(placed, len(rows), 40, TOK.pad, WIDTH)


def random_batch(seed: int, batch_size: int = 3, seq_len: int = 96) -> MultimodalBatch:
    """Random documents of text runs and spans of random grids and modes, packed first-fit,
    with padding left at the end of rows."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    fill, placed = [0] * batch_size, []
    for _ in range(40):
        segments = []
        for _ in range(rng.randint(1, 5)):
            if rng.random() < 0.5:
                segments.append([rng.randrange(256) for _ in range(rng.randint(1, 6))])
            else:
                grid = (rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 3))
                segments.append(_vis(grid, rng.choice(MODES), rng.random() < 0.5))
        doc = _doc(segments)
        for r in range(batch_size):
            if fill[r] + len(doc) <= seq_len - 3:       # keep some padding in every row
                placed.append((r, fill[r], doc))
                fill[r] += len(doc)
                break
    return pack_documents(placed, batch_size, seq_len, TOK.pad, WIDTH)


BATCHES = {"hand_made": hand_made_batch, **{f"random{s}": (lambda s=s: random_batch(s))
                                           for s in range(4)}}


@pytest.mark.parametrize("name", list(BATCHES))
def test_both_encodings_match_the_brute_force_rule(name):
    batch = BATCHES[name]()
    B, L = batch.shape
    assert (batch.document_ids == -1).any() and int(batch.document_ids.max()) >= 3
    modes = set(zip(batch.spans.attention.tolist(), batch.spans.visible_after.tolist()))
    assert modes == set(MODES), f"{name} lacks span modes: {set(MODES) - modes}"
    ref = reference_mask(batch)
    assert torch.equal(build_dense_mask(batch)[:, 0], ref)
    flex = create_mask(document_mask_mod(batch), B, 1, L, L, device="cpu")
    assert torch.equal(flex[:, 0], ref)
    assert torch.equal(build_mask(batch, "sdpa")[:, 0], ref)


def test_the_modes_change_the_mask():
    """Each mode moves pairs the defaults allow (so a compiler ignoring the table fails)."""
    batch = hand_made_batch()
    moded = build_dense_mask(batch)
    t = batch.spans
    default = MultimodalBatch(**{**batch.__dict__, "spans": type(t)(
        t.row, t.start, t.length, t.grid, t.kind, t.is_target, t.modality)})
    plain = build_dense_mask(default)
    assert torch.equal(plain[:, 0], reference_mask(default))
    assert (plain & ~moded).any() and not (moded & ~plain).any()   # modes only take pairs away
    for s in range(len(t)):
        b, start, n = int(t.row[s]), int(t.start[s]), int(t.length[s])
        inside = moded[b, 0, start:start + n, start:start + n]
        later = moded[b, 0, start + n:, start:start + n]
        doc = batch.document_ids[b]
        same_doc_after = (doc[start + n:] == doc[start]).nonzero().flatten()
        if int(t.attention[s]) == FULL:
            assert inside.all()
        else:
            assert torch.equal(inside, torch.ones(n, n, dtype=torch.bool).tril())
        if len(same_doc_after) and bool(t.visible_after[s]):
            assert later[same_doc_after].all()
        elif len(same_doc_after):
            assert not later[same_doc_after].any()
        # a span sees what precedes it in its document, but for earlier hidden spans
        hidden = ~batch.span_values("visible_after", True)[b, :start]
        before = ((doc[:start] == doc[start]) & ~hidden).nonzero().flatten()
        assert moded[b, 0, start:start + n][:, before].all()


def test_flex_equals_sdpa_with_modes():
    batch = random_batch(7, seq_len=160)
    B, L = batch.shape
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, 4, L, 16, generator=gen)
    k, v = (torch.randn(B, 2, L, 16, generator=gen) for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # "flex_attention called without torch.compile"
        out_flex = attend(q, k, v, build_block_mask(batch))
    with sdpa_kernel(SDPBackend.MATH):
        out_sdpa = attend(q, k, v, build_dense_mask(batch))
    assert torch.isfinite(out_sdpa).all()
    torch.testing.assert_close(out_flex, out_sdpa, atol=1e-5, rtol=1e-5)


def test_a_hidden_span_does_not_reach_later_positions_of_the_model():
    """Through the model: changing a hidden target's payload leaves every later position's
    output unchanged; a visible one changes them; the span itself still reads its prefix."""
    from mmgen.models import FLAVORS, build_model

    cfg = FLAVORS["debug"]
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    torch.nn.init.normal_(model.visual_out.weight, std=0.1)

    def run(visible: bool, payload: torch.Tensor, caption: list[int]):
        span = Visual(payload, (1, 2, 2), IMAGE, True, visible_after=visible)
        doc = _doc([[TOK.bos, *caption, TOK.boi], span, [TOK.eoi, 65, 66, TOK.eos]])
        batch = pack_documents([(0, 0, doc)], 1, len(doc) + 2, TOK.pad, cfg.patch_dim)
        batch.targets[:] = TOK.pad                 # logits at every position
        with torch.no_grad():
            out = model(batch)
        return out["lm"], out["flow"]

    a, b = torch.randn(4, cfg.patch_dim), torch.randn(4, cfg.patch_dim)
    caption = [104, 105]
    la, va = run(False, a, caption)
    lb, vb = run(False, b, caption)
    after = slice(4 + 4, None)                      # EOI onwards (positions 8..), padding too
    torch.testing.assert_close(la[after], lb[after], atol=0, rtol=0)
    assert not torch.allclose(va, vb)
    lv, _ = run(True, a, caption)
    lw, _ = run(True, b, caption)
    assert not torch.allclose(lv[after], lw[after])
    _, vc = run(False, a, [104, 106])              # the hidden span still sees its caption
    assert not torch.allclose(va, vc)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_block_mask_and_flex_match_sdpa_on_cuda():
    """The GPU path: create_block_mask compiled over the moded mask_mod, compiled flex
    attention forward and backward, and the model with attention=flex, against SDPA.

    Raw attention runs in bf16 (the dtype the GPU path trains in; bf16 tolerance), and the
    model check under bf16 autocast, as training does. Length 96 is below one 128-block, where
    torch 2.11's compiled flex attention has no GQA kernel (NoValidChoicesError, measured on
    the H200): ``attend`` repeats the key/value heads there."""
    from mmgen.models import FLAVORS, build_model

    for seed, length in ((0, 96), (1, 128), (2, 300), (3, 1024)):
        batch = random_batch(seed, seq_len=length).to("cuda")
        gen = torch.Generator(device="cuda").manual_seed(seed)
        q = torch.randn(3, 4, length, 64, device="cuda", generator=gen).bfloat16().requires_grad_()
        k, v = (torch.randn(3, 2, length, 64, device="cuda", generator=gen).bfloat16().requires_grad_()
                for _ in range(2))
        outs = []
        for mask in (build_block_mask(batch), build_dense_mask(batch)):
            out = attend(q, k, v, mask)
            outs.append((out, *torch.autograd.grad(out.float().square().sum(), (q, k, v))))
        for a, b in zip(*outs):
            torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)
    cfg = FLAVORS["debug"]
    torch.manual_seed(0)
    models = [build_model(dataclasses.replace(cfg, attention=a)).cuda() for a in ("sdpa", "flex")]
    torch.nn.init.normal_(models[0].visual_out.weight, std=0.1)   # a flow head that is not zero
    models[1].load_state_dict(models[0].state_dict())
    batch = random_batch(3, batch_size=2, seq_len=256)
    batch.patches = torch.randn(batch.patches.shape[0], cfg.patch_dim)
    batch = batch.to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref, got = (m(batch) for m in models)
    assert set(ref) == set(got) == {"lm", "flow", "aux"}
    for key in ("lm", "flow"):
        torch.testing.assert_close(got[key].float(), ref[key].float(), atol=3e-2, rtol=3e-2)
