# Model FLOPs counted from the batch: hand counts, the dense mask as brute force, the classic 6NT case.
import dataclasses
import random

import pytest
import torch
from torch import nn

from mmgen.batch import IGNORE_INDEX
from mmgen.metrics.flops import (
    BatchWork,
    attention_pairs,
    batch_work,
    forward_flops,
    mask_pairs,
    training_flops,
)
from mmgen.models import build_model
from mmgen.models.attention import MaskLayout, build_dense_mask, mask_layout
from mmgen.models.config import ModelConfig
from mmgen.models.tokenizers.text import ByteTokenizer
from mmgen.sampling.batching import VisualSpan, pack_rows

TOK = ByteTokenizer()
# small enough to count by hand: head_dim 4, GQA with 2 query heads sharing 1 key/value head
HAND = ModelConfig(dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=16, vocab_size=300,
                   patch_dim=12, timestep_dim=4)


def image(grid, patch_dim=12, is_target=True):
    return VisualSpan(torch.zeros(grid[0] * grid[1] * grid[2], patch_dim), grid, is_target)


def hand_batch(seq_len=16):
    """Row 0: a 5-token text document, then [BOS BOI] <2x2 image> [EOI] (7 positions), then
    padding to ``seq_len``."""
    docs = [[[1, 2, 3, 4, 5]], [[TOK.bos, TOK.boi], image((1, 2, 2)), [TOK.eoi]]]
    return pack_rows([docs], TOK, seq_len)


def test_hand_count_text_doc_image_doc_and_padding():
    batch = hand_batch()
    work = batch_work(batch)
    # positions 16; tokens 5 + 7 = 12. Targets: 4 in the text doc (the last token has no next),
    # 1 in the image doc (BOS -> BOI; BOI precedes the span, EOI ends the document).
    # Pairs: text doc 5*6/2 = 15; image doc 7*8/2 = 28 causal + 4*3/2 = 6 inside the span;
    # the 4 padding self-pairs are not counted.
    assert work == BatchWork(positions=16, tokens=12, text_targets=5, visual_positions=4, spans=1,
                             attention_pairs=15 + 28 + 6)
    parts = forward_flops(HAND, work)
    # per position and layer: q 2*8*8 = 128, k 2*8*4 = 64, v 64, o 2*8*8 = 128,
    # SwiGLU 3 * 2*8*16 = 768 -> 1152; x 2 layers x 12 tokens
    assert parts["linear"] == 1152 * 2 * 12 == 27648
    # per pair and layer: (QK^T + AV) 2 * 2 FLOPs * head_dim 4 * 2 query heads = 32
    assert parts["attention"] == 32 * 2 * 49 == 3136
    assert parts["text_head"] == 2 * 8 * 300 * 5 == 24000
    assert parts["visual_in"] == parts["visual_head"] == 2 * 12 * 8 * 4 == 768
    assert parts["timestep"] == 2 * (4 * 8 + 8 * 8) * 1 == 192
    assert training_flops(HAND, batch) == 3 * (27648 + 3136 + 24000 + 768 + 768 + 192) == 169536


def test_padding_costs_no_model_flops():
    short, long = hand_batch(16), hand_batch(40)
    assert batch_work(long).positions == 40
    assert training_flops(HAND, long) == training_flops(HAND, short)


def test_hand_count_two_rows_gqa_and_an_empty_row():
    """Row 0: a text doc of 3 and a text doc of 2; row 1: only padding."""
    batch = pack_rows([[[[7, 8, 9]], [[10, 11]]], []], TOK, 8, patch_dim=12)
    work = batch_work(batch)
    assert work == BatchWork(positions=16, tokens=5, text_targets=2 + 1, visual_positions=0,
                             spans=0, attention_pairs=3 * 4 // 2 + 2 * 3 // 2)
    # no GQA: k and v widen from 4 to 8, 2 * 2*8*4 = 128 more FLOPs per position and layer
    mha = dataclasses.replace(HAND, n_kv_heads=2)
    diff = forward_flops(mha, work)["linear"] - forward_flops(HAND, work)["linear"]
    assert diff == 128 * 2 * 5
    assert forward_flops(HAND, work)["attention"] == forward_flops(mha, work)["attention"] == 32 * 2 * 9


def random_rows(rng: random.Random, n_rows: int, seq_len: int):
    rows = []
    for _ in range(n_rows):
        row, used = [], 0
        while True:
            doc = [[rng.randrange(256) for _ in range(rng.randint(1, 6))]]
            for _ in range(rng.randint(0, 2)):
                doc += [image((1, rng.randint(1, 3), rng.randint(1, 3)), is_target=rng.random() < 0.5),
                        [rng.randrange(256) for _ in range(rng.randint(0, 3))]]
            size = sum(len(s) for s in doc)
            if used + size > seq_len - rng.randint(0, 3):    # leave some rows padded
                break
            row.append(doc)
            used += size
        rows.append(row)
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_pair_count_equals_dense_mask_brute_force(seed):
    rng = random.Random(seed)
    batch = pack_rows(random_rows(rng, 3, 48), TOK, 48, patch_dim=12)
    mask = build_dense_mask(batch)
    pairs = attention_pairs(batch.document_ids, batch.span_ids)
    assert pairs == mask_pairs(mask, batch.document_ids)
    # the dense mask's only other True entries are the padding self-pairs
    assert int(mask.sum()) == pairs + int((batch.document_ids < 0).sum())
    assert len(batch.spans) > 0 and int((batch.document_ids.max(1).values >= 1).sum()) > 0


def test_non_contiguous_document_follows_the_mask_rule():
    """The arithmetic does not assume a document is contiguous: ids interleaved by hand."""
    doc = torch.tensor([[0, 1, 0, 1, 0, -1]])
    span = torch.tensor([[-1, 0, -1, 0, -1, -1]])
    layout = MaskLayout(doc, span, full=span >= 0, hidden=torch.zeros_like(doc, dtype=torch.bool))
    assert attention_pairs(doc, span) == mask_pairs(build_dense_mask(layout), doc) == 6 + 3 + 1


@pytest.mark.parametrize("seed", range(6))
def test_pair_count_follows_causal_and_hidden_spans(seed):
    """Spans made CAUSAL inside or hidden from later positions (span table columns): the
    arithmetic still equals the dense mask compiled from the same table."""
    from mmgen.batch import CAUSAL

    rng = random.Random(100 + seed)
    batch = pack_rows(random_rows(rng, 3, 48), TOK, 48, patch_dim=12)
    S = len(batch.spans)
    assert S > 0
    g = torch.Generator().manual_seed(seed)
    batch.spans.attention = torch.where(torch.rand(S, generator=g) < 0.5, CAUSAL, batch.spans.attention)
    batch.spans.visible_after = torch.rand(S, generator=g) < 0.5
    layout = mask_layout(batch)
    pairs = attention_pairs(layout.document_ids, layout.span_ids, layout.full, layout.hidden)
    assert pairs == mask_pairs(build_dense_mask(batch), batch.document_ids)
    assert pairs == batch_work(batch).attention_pairs
    if (~batch.spans.visible_after).any() or (batch.spans.attention == CAUSAL).any():
        assert pairs < attention_pairs(batch.document_ids, batch.span_ids)


def test_one_causal_document_with_logits_everywhere_is_6NT_plus_causal_attention():
    """The textbook case: a dense LM step is 6 N T FLOPs (N: matmul weights that each token
    passes through; 2 per weight forward, 4 backward) plus attention, here causal."""
    cfg = ModelConfig()  # the debug flavor: GQA, qk-norm (norms are not matmuls)
    b, t = 2, 32
    rows = [[[[random.Random(r).randrange(256) for _ in range(t)]]] for r in range(b)]
    batch = pack_rows(rows, TOK, t)
    batch.targets = torch.roll(batch.tokens, -1, dims=1)  # a target at every position
    assert int((batch.targets == IGNORE_INDEX).sum()) == 0
    model = build_model(cfg, device="meta")
    # every token passes through each trunk Linear and the LM head; patch_in, visual_out and the
    # timestep MLP never run on a text-only batch
    n = sum(m.weight.numel() for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("layers."))
    n += model.output.weight.numel()
    # QK^T and AV: 2 matmuls of 2 * d FLOPs per (query, key) pair summed over heads, forward;
    # x 3 with the backward. PaLM's 12 L d T per token is this with all T^2 pairs; a causal
    # row has T (T + 1) / 2.
    attention = 3 * 2 * 2 * cfg.dim * cfg.n_layers * b * t * (t + 1) // 2
    assert training_flops(cfg, batch) == 6 * n * b * t + attention


# -- heads other families have: no flow head, the MAR denoiser ---------------------------------------
def test_no_visual_head_without_a_flow_head():
    """A model without "flow" (MAR's lm + mar) has no ``visual_out``: nothing is charged for it;
    ``patch_in`` still runs at every continuous position."""
    work = batch_work(hand_batch())
    no_flow = dataclasses.replace(HAND, heads=["lm"])
    parts = forward_flops(no_flow, work)
    assert parts["visual_head"] == 0 and parts["visual_in"] == 2 * 12 * 8 * 4
    assert not hasattr(build_model(no_flow, device="meta"), "visual_out")
    assert training_flops(no_flow, work) == training_flops(HAND, work) - 3 * 2 * 8 * 12 * 4


MAR_CFG = dataclasses.replace(HAND, heads=["lm", "mar"], mar_width=6, mar_depth=2)


def test_mar_row_flops_is_every_linear_of_the_denoiser_once():
    """Hand count from the module's parameter shapes (every Linear of ``MARDenoiser`` runs once
    per noised row: 2 * in * out), and torch's own FLOP counter on a real forward of M rows."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmgen.metrics.flops import mar_row_flops

    head = build_model(MAR_CFG, device="cpu").mar_head
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 + 3 * MAR_CFG.mar_depth + 2   # input, cond, time x2; blocks; final ada, out
    by_shape = sum(2 * m.in_features * m.out_features for m in linears)
    w, p, d, f = 6, 12, 8, 4
    hand = 2 * p * w + 2 * (f * w + w * w) + 2 * d * w + 2 * 2 * (3 * w * w + 2 * w * w) + 2 * w * 2 * w + 2 * w * p
    assert mar_row_flops(MAR_CFG) == by_shape == hand == 1368
    m = 7
    with FlopCounterMode(display=False) as counter:
        head(torch.randn(m, p), torch.rand(m), torch.randn(m, d))
    assert counter.get_total_flops() == m * hand


def test_mar_model_view_charges_the_denoiser_at_the_expected_masked_positions():
    """MARObjective.model_view: the batch's own counts plus mar_draws x E[masked] denoiser rows
    (the 2x2 target image of hand_batch: 4 candidates), no flow head; the expectation equals
    the mean of the objective's own mask draws."""
    from mmgen.metrics.flops import mar_row_flops
    from mmgen.objectives.config import ObjectiveConfig
    from mmgen.objectives.mar import MARObjective, expected_masked, sample_mask

    batch = hand_batch()
    obj = MARObjective(ObjectiveConfig(name="mar", mar_draws=3, mar_mask_min=0.7))
    view = obj.model_view(batch)
    assert dataclasses.replace(view, denoiser_rows=0.0) == batch_work(batch)
    e4 = float(expected_masked(torch.tensor([4]), 0.7)[0])
    # r in [0.7, 1]: ceil(4 r) is 3 for r <= 0.75, else 4: E = 3 + P(r > 0.75)
    phi = lambda x: 0.5 * (1 + torch.erf(torch.tensor(x / 0.25) / 2 ** 0.5))  # noqa: E731
    assert abs(e4 - (3 + (phi(0.0) - phi(-0.25)) / (phi(0.0) - phi(-0.3)))) < 1e-6
    assert view.denoiser_rows == pytest.approx(3 * e4)
    parts = forward_flops(MAR_CFG, view)
    assert parts["visual_head"] == 0 and parts["mar_head"] == round(mar_row_flops(MAR_CFG) * 3 * e4)
    plain = forward_flops(MAR_CFG, batch_work(batch))
    assert training_flops(MAR_CFG, view) - training_flops(MAR_CFG, batch) == 3 * parts["mar_head"] > 0
    assert plain["mar_head"] == 0
    g = torch.Generator().manual_seed(0)
    draws = [int(sample_mask(batch, 0.7, g).sum()) for _ in range(3000)]
    assert sum(draws) / len(draws) == pytest.approx(e4, abs=0.03)
    assert set(draws) == {3, 4}
