# Key/value cache for incremental text decoding (prefill once, then one token at a time).
"""Keys and values of every layer, kept after qk-norm and RoPE and before any GQA expansion
(``[B, n_kv_heads, capacity, head_dim]`` per layer), so a new text token only runs its own
position through the model. Used by :meth:`UnifiedTransformer.prefill` and
:meth:`UnifiedTransformer.decode_step`; training never builds one.

Slots are shared by the rows of the batch: the prefix fills slots ``[0, L)`` (``L`` = the
padded prefix length), and every decode step appends its tokens to all rows at the same slots.
Rows with shorter prefixes therefore have padding slots in the middle of their cache; the
per-row key validity (``valid``) masks those, and every slot outside the document the row
continues, so they are never attended. RoPE positions are per row (``next_positions``), as
positions restart in each document.
"""
from __future__ import annotations

import torch


def last_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of the last non-padding position of each row (``document_ids`` ``[B, L]``)."""
    real = document_ids >= 0
    if not real.any(dim=1).all():
        raise ValueError("every row of a prefill batch needs a document to continue")
    idx = torch.arange(document_ids.shape[1], device=document_ids.device)
    return torch.where(real, idx, -1).amax(dim=1)


class KVCache:
    """The cache of one batch of rows; made by ``prefill``, extended by ``decode_step``.

    Attributes:
        capacity: slots allocated per layer (prefix length + tokens that may still come).
        length: slots written so far (the same for every row).
        valid: ``[B, capacity]`` bool, True at the slots a new token of the row may attend to:
            its document's positions (never padding, never other packed documents).
        next_positions: ``[B]`` long, RoPE position of the next token of each row.
    """

    def __init__(self, n_layers: int, capacity: int, valid: torch.Tensor,
                 next_positions: torch.Tensor):
        self.capacity = capacity
        self.length = 0
        self.valid = valid
        self.next_positions = next_positions
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    @classmethod
    def for_prefix(cls, n_layers: int, document_ids: torch.Tensor, positions: torch.Tensor,
                   max_new_tokens: int, hidden: torch.Tensor | None = None) -> "KVCache":
        """An empty cache for continuing the *last* document of every row of a batch.

        Args:
            document_ids: ``[B, L]`` of the prefix batch, -1 for padding.
            positions: ``[B, L]`` RoPE positions of the prefix batch.
            max_new_tokens: how many tokens decoding may append after the prefix.
            hidden: ``[B, L]`` bool, positions of spans later positions may not see (span
                table ``visible_after=False``): new tokens never attend to them.
        """
        batch, length = document_ids.shape
        last = last_positions(document_ids)
        rows = torch.arange(batch, device=document_ids.device)
        capacity = length + max_new_tokens
        valid = torch.zeros(batch, capacity, dtype=torch.bool, device=document_ids.device)
        valid[:, :length] = document_ids == document_ids[rows, last][:, None]
        if hidden is not None:
            valid[:, :length] &= ~hidden
        return cls(n_layers, capacity, valid, positions[rows, last] + 1)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def layer(self, index: int) -> "LayerKV":
        """The view that layer ``index``'s attention reads and appends through."""
        return LayerKV(self, index)

    def update(self, index: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` (``[B, H_kv, n, D]``) of layer ``index`` at slots
        ``[length, length + n)``; return the keys/values of slots ``[0, length + n)``.

        Storage is allocated on the first call, in ``k``'s dtype and device (under autocast
        the cache holds what attention sees). ``length`` moves on in :meth:`prefilled` /
        :meth:`advance`, after every layer has stored the same slots.
        """
        start, n = self.length, k.shape[2]
        if start + n > self.capacity:
            raise ValueError(f"KV cache full: {start} + {n} tokens > capacity {self.capacity}")
        if self.keys[index] is None:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.keys[index] = k.new_empty(shape)
            self.values[index] = v.new_empty(shape)
        keys, values = self.keys[index], self.values[index]
        keys[:, :, start:start + n] = k
        values[:, :, start:start + n] = v
        if start == 0:     # prefill: the fresh tensors are the whole (contiguous) history
            return k, v
        return keys[:, :, :start + n], values[:, :, :start + n]

    def decode_mask(self, n: int) -> torch.Tensor:
        """``[B, 1, n, length + n]`` bool SDPA mask of ``n`` new text tokens: the valid cached
        slots of their row, and causal attention among themselves."""
        new = torch.ones(n, n, dtype=torch.bool, device=self.valid.device).tril()
        cached = self.valid[:, None, :self.length].expand(-1, n, -1)
        return torch.cat([cached, new.expand(self.batch_size, -1, -1)], dim=-1)[:, None]

    def prefilled(self, n: int) -> None:
        """The prefix (``n`` slots, validity already set per row) is now stored by every
        layer."""
        self.length = n

    def advance(self, n: int) -> None:
        """Mark ``n`` new tokens (now stored by every layer) as part of every row."""
        self.valid[:, self.length:self.length + n] = True
        self.length += n
        self.next_positions = self.next_positions + n


class LayerKV:
    """One layer's handle on a :class:`KVCache`, passed down to :class:`Attention`."""

    __slots__ = ("cache", "index")

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(self.index, k, v)
