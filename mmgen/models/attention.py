# The attention mask, compiled from the batch's span table, and the attention ops.
"""One rule, compiled from the span table, two encodings.

Per position ``i`` of a row, :func:`mask_layout` gathers from the batch (and nothing else):
``doc[i]`` (``document_ids``, -1 = padding), ``span[i]`` (``span_ids``, -1 outside spans),
``full[i]`` (``i`` is in a span whose ``attention`` is ``FULL``) and ``hidden[i]`` (``i`` is in
a span whose ``visible_after`` is False). Query ``q`` may attend to key ``k`` iff::

    doc[q] >= 0 and doc[q] == doc[k] and (
        (k <= q and not (hidden[k] and span[k] != span[q]))    # causal, hidden spans left out
        or (full[q] and span[q] == span[k]))                   # a FULL span sees all of itself
    or (doc[q] < 0 and q == k)                                 # padding: itself only

In words: same document; causal by default; the positions of a FULL span see each other; a
CAUSAL span is causal inside; a position after a span with ``visible_after=False`` does not see
that span's positions (the span's own positions still see what precedes them, and later
positions still see the text before the span). A padding position attends to itself only, so
no softmax row is empty (an empty row gives NaN under SDPA); every real query sees at least
itself. With the table's defaults (FULL, visible) this is v1's rule: causal text plus
bidirectional spans. Allowed (query, key) pairs of real positions are what
``mmgen.metrics.flops`` counts as attention work.

* :func:`build_dense_mask`: ``[B, 1, L, L]`` bool for SDPA (True = attend). Used on CPU,
  where FlexAttention has no backward.
* :func:`build_block_mask`: a FlexAttention ``BlockMask`` of the same rule (GPU), from
  :func:`document_mask_mod`; it skips fully masked 128x128 blocks, so packed documents cost
  only their own attention.

Under context parallelism a block holds one slice of the positions (mmgen/sequence_shard.py);
its mask is a :class:`SequenceParallelMask`: the whole sequence's mask plus the exchange that
gives :func:`attend` the whole sequence for a subset of the heads and takes it back.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from mmgen.batch import FULL, MultimodalBatch



@dataclass
class SequenceParallelMask:
    """The mask of a context-parallel slice: ``mask`` covers all ``L`` positions (either
    encoding); ``exchange(q, k, v, attend_fn)`` (``mmgen.sequence_shard.Exchange``) moves the
    slice's queries/keys/values to whole-sequence ones and the output back."""

    mask: Union[torch.Tensor, BlockMask]
    exchange: Callable


AttentionMask = Union[torch.Tensor, BlockMask, SequenceParallelMask]


@dataclass
class MaskLayout:
    """The per-position inputs of the mask rule (module docstring), all ``[B, L]``.

    Args:
        document_ids: long, -1 for padding.
        span_ids: long, -1 outside visual spans.
        full: bool, position of a span with FULL attention.
        hidden: bool, position of a span that later positions may not see.
    """

    document_ids: torch.Tensor
    span_ids: torch.Tensor
    full: torch.Tensor
    hidden: torch.Tensor


def mask_layout(batch: MultimodalBatch) -> MaskLayout:
    """Gather the rule's per-position inputs from ``batch``'s ids and span table."""
    full = batch.span_values("attention", -1) == FULL
    hidden = ~batch.span_values("visible_after", True)
    return MaskLayout(batch.document_ids, batch.span_ids, full, hidden)


def _layout(source: MultimodalBatch | MaskLayout) -> MaskLayout:
    if isinstance(source, MaskLayout):
        return source
    if isinstance(source, MultimodalBatch):
        return mask_layout(source)
    raise TypeError(f"the mask is compiled from a MultimodalBatch or a MaskLayout, got "
                    f"{type(source).__name__}")


def build_dense_mask(source: MultimodalBatch | MaskLayout) -> torch.Tensor:
    """``[B, 1, L, L]`` bool, True where query ``q`` may attend to key ``k``.

    Args:
        source: the batch (its span table gives the modes), or its :func:`mask_layout`.
    """
    m = _layout(source)
    length = m.document_ids.shape[1]
    idx = torch.arange(length, device=m.document_ids.device)
    doc_q, doc_k = m.document_ids[:, :, None], m.document_ids[:, None, :]
    span_q, span_k = m.span_ids[:, :, None], m.span_ids[:, None, :]
    causal = (idx[:, None] >= idx[None, :])[None]
    same_span = (span_q >= 0) & (span_q == span_k)
    hidden_k = m.hidden[:, None, :] & ~same_span
    sees = (causal & ~hidden_k) | (same_span & m.full[:, :, None])
    allowed = (doc_q == doc_k) & (doc_q >= 0) & sees
    pad_self = (doc_q < 0) & (idx[:, None] == idx[None, :])[None]
    return (allowed | pad_self)[:, None]


def document_mask_mod(source: MultimodalBatch | MaskLayout) -> Callable:
    """The mask rule as a FlexAttention ``mask_mod(b, h, q, k)`` closed over the batch."""
    m = _layout(source)
    document_ids, span_ids, full, hidden = m.document_ids, m.span_ids, m.full, m.hidden

    def mask_mod(b, h, q, k):
        doc_q, doc_k = document_ids[b, q], document_ids[b, k]
        span_q, span_k = span_ids[b, q], span_ids[b, k]
        same_span = (span_q >= 0) & (span_q == span_k)
        hidden_k = hidden[b, k] & ~same_span
        sees = ((k <= q) & ~hidden_k) | (same_span & full[b, q])
        allowed = (doc_q == doc_k) & (doc_q >= 0) & sees
        return allowed | ((doc_q < 0) & (q == k))

    return mask_mod


def build_block_mask(source: MultimodalBatch | MaskLayout) -> BlockMask:
    """FlexAttention block mask of the same rule as :func:`build_dense_mask` (shared by heads)."""
    m = _layout(source)
    batch, length = m.document_ids.shape
    # compiling the mask construction avoids materialising B*L*L booleans at long lengths
    compile_mask = m.document_ids.device.type == "cuda"
    return create_block_mask(document_mask_mod(m), batch, None, length, length,
                             device=m.document_ids.device, _compile=compile_mask)


def resolve_backend(attention: str, device: torch.device) -> str:
    """Map the config's "auto" to "flex" on CUDA and "sdpa" elsewhere."""
    if attention == "auto":
        return "flex" if torch.device(device).type == "cuda" else "sdpa"
    return attention


def build_mask(batch: MultimodalBatch | MaskLayout, backend: str) -> AttentionMask:
    """The mask of ``batch`` (or its layout) in the encoding ``backend`` ("sdpa" or "flex") expects."""
    layout = _layout(batch)
    if backend == "flex":
        return build_block_mask(layout)
    return build_dense_mask(layout)


FLEX_GQA_MIN_LENGTH = 128


@functools.cache
def _compiled_flex() -> Callable:
    # uncompiled flex materialises the full score matrix and is many times slower on GPU
    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Masked attention; ``q``: ``[B, H, L, D]``, ``k``/``v``: ``[B, H_kv, L, D]`` (GQA when
    ``H_kv < H``). Dispatches on the mask type: BlockMask -> FlexAttention, bool -> SDPA,
    SequenceParallelMask -> its exchange around one of those (``L`` is then the slice's)."""
    if isinstance(mask, SequenceParallelMask):
        return mask.exchange(q, k, v, functools.partial(attend, mask=mask.mask))
    gqa = k.shape[1] != q.shape[1]
    if isinstance(mask, BlockMask):
        if gqa and q.device.type == "cuda" and k.shape[-2] < FLEX_GQA_MIN_LENGTH:
            # compiled flex finds no GQA kernel below one 128-block (torch 2.11, measured on the
            # H200: NoValidChoicesError at length 96); short sequences (sampler prompts) are
            # cheap, so give every query head its own copy of its key/value head instead
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
            gqa = False
        # inside a compiled region dynamo fuses flex itself; a nested compile would only warn
        eager = q.device.type != "cuda" or torch.compiler.is_compiling()
        fn = flex_attention if eager else _compiled_flex()
        return fn(q, k, v, block_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
