# The hybrid attention mask with default span modes: a hand-made example, and FlexAttention == SDPA on CPU.
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_mask

from mmgen.models.attention import (MaskLayout, attend, build_block_mask, build_dense_mask,
                                    document_mask_mod)


def _layout(doc: torch.Tensor, span: torch.Tensor) -> MaskLayout:
    """Every span FULL and visible after it: the span table's defaults (v1's rule)."""
    return MaskLayout(doc, span, full=span >= 0, hidden=torch.zeros_like(span, dtype=torch.bool))


def test_mask_rule_hand_made():
    # one row: doc 0 = [text, text, img, img, text], doc 1 = [text, img, img], then 2 pads
    doc = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, -1, -1]])
    span = torch.tensor([[-1, -1, 0, 0, -1, -1, 1, 1, -1, -1]])
    m = build_dense_mask(_layout(doc, span))[0, 0]
    assert m.shape == (10, 10)
    assert m[1, 0] and not m[0, 1]                 # text is causal
    assert m[2, 3] and m[3, 2]                     # bidirectional inside a span
    assert m[2, 1] and not m[1, 2]                 # span sees its prefix, not the reverse
    assert m[4, 3] and m[4, 2]                     # text after a span sees it
    assert not m[5, :5].any() and not m[:5, 5:].any()  # no cross-document attention
    assert m[6, 7] and m[7, 6] and m[6, 5] and not m[5, 6]
    assert not m[6, 3] and not m[3, 6]             # spans of different documents
    assert m[8, 8] and m[9, 9] and m[8:].sum() == 2  # padding attends to itself only
    assert not m[:8, 8:].any()


def _random_packed(batch: int, length: int, gen: torch.Generator):
    """Rows of random documents with random image spans and trailing padding."""
    doc = torch.full((batch, length), -1, dtype=torch.long)
    span = torch.full((batch, length), -1, dtype=torch.long)
    n_span = 0
    for b in range(batch):
        pos, d = 0, 0
        end = length - int(torch.randint(0, length // 4, (1,), generator=gen))
        while pos < end:
            n = min(int(torch.randint(5, length // 2, (1,), generator=gen)), end - pos)
            doc[b, pos:pos + n] = d
            s = pos + int(torch.randint(0, n, (1,), generator=gen))
            e = min(s + int(torch.randint(1, 40, (1,), generator=gen)), pos + n)
            span[b, s:e] = n_span
            n_span, pos, d = n_span + 1, pos + n, d + 1
    return doc, span


@pytest.mark.parametrize("length", [64, 200, 300])
def test_block_mask_matches_dense(length):
    gen = torch.Generator().manual_seed(length)
    doc, span = _random_packed(3, length, gen)
    dense = create_mask(document_mask_mod(_layout(doc, span)), 3, 1, length, length, device="cpu")
    assert torch.equal(dense, build_dense_mask(_layout(doc, span)))


@pytest.mark.parametrize("length,kv_heads", [(128, 4), (200, 2), (300, 1)])
def test_flex_equals_sdpa(length, kv_heads):
    gen = torch.Generator().manual_seed(length)
    doc, span = _random_packed(2, length, gen)
    q = torch.randn(2, 4, length, 16, generator=gen)
    k, v = (torch.randn(2, kv_heads, length, 16, generator=gen) for _ in range(2))
    block_mask = build_block_mask(_layout(doc, span))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # "flex_attention called without torch.compile"
        out_flex = attend(q, k, v, block_mask)   # dispatches to flex_attention
    with sdpa_kernel(SDPBackend.MATH):
        out_sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=build_dense_mask(_layout(doc, span)),
                                                  enable_gqa=kv_heads != 4)
        out_attend = attend(q, k, v, build_dense_mask(_layout(doc, span)))
    assert torch.isfinite(out_sdpa).all()
    torch.testing.assert_close(out_flex, out_sdpa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_attend, out_sdpa, atol=0, rtol=0)
