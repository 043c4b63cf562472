# The hybrid attention mask (causal text, bidirectional spans, per document) and attention ops.
"""One rule, two encodings.

``allowed(q, k) = doc[q] == doc[k] and doc[q] >= 0 and (k <= q or (span[q] >= 0 and
span[q] == span[k]))``; a padding position (``doc == -1``) attends to itself only, so no
softmax row is empty (an empty row gives NaN under SDPA).

* :func:`build_dense_mask`: ``[B, 1, L, L]`` bool for SDPA (True = attend). Used on CPU,
  where FlexAttention has no backward.
* :func:`build_block_mask`: a FlexAttention ``BlockMask`` from the same rule (GPU), which
  skips fully masked 128x128 blocks, so packed documents cost only their own attention.
"""
from __future__ import annotations

import functools
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

AttentionMask = Union[torch.Tensor, BlockMask]


def build_dense_mask(document_ids: torch.Tensor, span_ids: torch.Tensor) -> torch.Tensor:
    """``[B, 1, L, L]`` bool, True where query ``q`` may attend to key ``k``.

    Args:
        document_ids: ``[B, L]`` long, -1 for padding.
        span_ids: ``[B, L]`` long, -1 outside visual spans.
    """
    length = document_ids.shape[1]
    idx = torch.arange(length, device=document_ids.device)
    doc_q, doc_k = document_ids[:, :, None], document_ids[:, None, :]
    span_q, span_k = span_ids[:, :, None], span_ids[:, None, :]
    causal = (idx[:, None] >= idx[None, :])[None]
    same_span = (span_q >= 0) & (span_q == span_k)
    allowed = (doc_q == doc_k) & (doc_q >= 0) & (causal | same_span)
    pad_self = (doc_q < 0) & (idx[:, None] == idx[None, :])[None]
    return (allowed | pad_self)[:, None]


def document_mask_mod(document_ids: torch.Tensor, span_ids: torch.Tensor) -> Callable:
    """The mask rule as a FlexAttention ``mask_mod(b, h, q, k)`` closed over the batch."""

    def mask_mod(b, h, q, k):
        doc_q, doc_k = document_ids[b, q], document_ids[b, k]
        span_q, span_k = span_ids[b, q], span_ids[b, k]
        same_span = (span_q >= 0) & (span_q == span_k)
        allowed = (doc_q == doc_k) & (doc_q >= 0) & ((k <= q) | same_span)
        return allowed | ((doc_q < 0) & (q == k))

    return mask_mod


def build_block_mask(document_ids: torch.Tensor, span_ids: torch.Tensor) -> BlockMask:
    """FlexAttention block mask of the same rule as :func:`build_dense_mask` (shared by heads)."""
    batch, length = document_ids.shape
    mask_mod = document_mask_mod(document_ids, span_ids)
    # compiling the mask construction avoids materialising B*L*L booleans at long lengths
    compile_mask = document_ids.device.type == "cuda"
    return create_block_mask(mask_mod, batch, None, length, length,
                             device=document_ids.device, _compile=compile_mask)


def resolve_backend(attention: str, device: torch.device) -> str:
    """Map the config's "auto" to "flex" on CUDA and "sdpa" elsewhere."""
    if attention == "auto":
        return "flex" if torch.device(device).type == "cuda" else "sdpa"
    return attention


def build_mask(document_ids: torch.Tensor, span_ids: torch.Tensor, backend: str) -> AttentionMask:
    """The mask in the encoding ``backend`` ("sdpa" or "flex") expects."""
    if backend == "flex":
        return build_block_mask(document_ids, span_ids)
    return build_dense_mask(document_ids, span_ids)


@functools.cache
def _compiled_flex() -> Callable:
    # uncompiled flex materialises the full score matrix and is many times slower on GPU
    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Masked attention; ``q``: ``[B, H, L, D]``, ``k``/``v``: ``[B, H_kv, L, D]`` (GQA when
    ``H_kv < H``). Dispatches on the mask type: BlockMask -> FlexAttention, bool -> SDPA."""
    gqa = k.shape[1] != q.shape[1]
    if isinstance(mask, BlockMask):
        # inside a compiled region dynamo fuses flex itself; a nested compile would only warn
        eager = q.device.type != "cuda" or torch.compiler.is_compiling()
        fn = flex_attention if eager else _compiled_flex()
        return fn(q, k, v, block_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
