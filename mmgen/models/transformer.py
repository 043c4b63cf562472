# The unified Transfusion-style transformer: text tokens and visual patches in one sequence.
"""Single-device PyTorch; parallelism is applied from outside (``mmgen/parallel``).

Blocks live in ``self.layers`` (an ``nn.ModuleList``) so backends can wrap each one for
activation checkpointing, FSDP or compile. Build on the meta device, parallelize, then
``to_empty`` + :meth:`UnifiedTransformer.init_weights` (see :func:`mmgen.models.build_model`).
For inference, :meth:`UnifiedTransformer.prefill` runs a prompt once and
:meth:`UnifiedTransformer.decode_step` continues it token by token from a KV cache
(``mmgen/models/kv_cache.py``); :meth:`UnifiedTransformer.forward` never uses one.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgen.batch import IGNORE_INDEX, MultimodalBatch
from mmgen.models.attention import AttentionMask, build_mask, resolve_backend
from mmgen.models.config import ModelConfig
from mmgen.models.kv_cache import KVCache, LayerKV, last_positions
from mmgen.models.layers import (Attention, RMSNorm, SwiGLU, TimestepEmbedding, _trunc_normal,
                                 rope_cos_sin)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.qk_norm, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: AttentionMask, kv: LayerKV | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, mask, kv)
        return x + self.feed_forward(self.ffn_norm(x))

    def init_weights(self, std: float, out_std: float) -> None:
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attention.init_weights(std, out_std)
        self.feed_forward.init_weights(std, out_std)


class VisualPositionEmbedding(nn.Module):
    """Learned (t, h, w) tables summed per visual position (a factorised 3-D position code)."""

    def __init__(self, max_grid: list[int], dim: int):
        super().__init__()
        self.t = nn.Embedding(max_grid[0], dim)
        self.h = nn.Embedding(max_grid[1], dim)
        self.w = nn.Embedding(max_grid[2], dim)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return self.t(coords[..., 0]) + self.h(coords[..., 1]) + self.w(coords[..., 2])

    def init_weights(self, std: float) -> None:
        for table in (self.t, self.h, self.w):
            _trunc_normal(table.weight, std)


class UnifiedTransformer(nn.Module):
    """One transformer over packed text + visual sequences (see ``MultimodalBatch``).

    Constructed on a real device it is initialised at once; constructed under
    ``torch.device("meta")`` it waits for ``to_empty`` + :meth:`init_weights`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.patch_in = nn.Linear(cfg.patch_dim, cfg.dim)
        self.t_embedder = TimestepEmbedding(cfg.timestep_dim, cfg.dim)
        self.visual_pos = (VisualPositionEmbedding(cfg.max_grid, cfg.dim)
                           if cfg.visual_pos == "learned" else None)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # tied heads read tok_embeddings.weight directly: sharing a Parameter object would not
        # survive a meta-device build followed by to_empty
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.visual_out = nn.Linear(cfg.dim, cfg.patch_dim)
        if not self.tok_embeddings.weight.is_meta:
            self.init_weights()

    # ------------------------------------------------------------ initialisation

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter from the default RNG of its device, in a fixed order."""
        cfg = self.cfg
        std = cfg.init_std
        # residual-branch outputs shrink with depth so the stream's variance stays bounded
        out_std = std / math.sqrt(2 * cfg.n_layers)
        _trunc_normal(self.tok_embeddings.weight, std if cfg.tie_embeddings else 1.0)
        # unit-gain input projection: patches in [-1, 1] land at the same scale as text embeddings
        _trunc_normal(self.patch_in.weight, 1.0 / math.sqrt(cfg.patch_dim))
        nn.init.zeros_(self.patch_in.bias)
        self.t_embedder.init_weights(std)
        if self.visual_pos is not None:
            self.visual_pos.init_weights(std)
        for layer in self.layers:
            layer.init_weights(std, out_std)
        self.norm.init_weights()
        if self.output is not None:
            _trunc_normal(self.output.weight, cfg.dim ** -0.5)
        # zero visual output: the first flow prediction is 0 rather than noise from a random head
        nn.init.zeros_(self.visual_out.weight)
        nn.init.zeros_(self.visual_out.bias)

    # ------------------------------------------------------------ forward

    def build_mask(self, batch: MultimodalBatch) -> AttentionMask:
        """The attention mask for ``batch`` (compiled from its span table) in the encoding
        ``cfg.attention`` resolves to."""
        backend = resolve_backend(self.cfg.attention, batch.tokens.device)
        return build_mask(batch, backend)

    def embed(self, batch: MultimodalBatch, visual_in: torch.Tensor,
              span_t: torch.Tensor) -> torch.Tensor:
        """``[B, L, dim]`` inputs: token embeddings, with continuous visual positions replaced by
        projected patches plus their span's timestep embedding, plus visual position codes."""
        x = self.tok_embeddings(batch.tokens)
        cont = batch.continuous_mask()
        span_of_row = batch.span_ids[cont]                       # [N], row-major like visual_in
        vis = self.patch_in(visual_in.to(x.dtype)) + self.t_embedder(span_t)[span_of_row]
        x = x.masked_scatter(cont.unsqueeze(-1), vis.to(x.dtype))
        if self.visual_pos is not None:
            is_visual = (batch.span_ids >= 0).unsqueeze(-1)
            x = x + self.visual_pos(batch.coords) * is_visual
        return x

    def text_head(self, h: torch.Tensor) -> torch.Tensor:
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight)
        return self.output(h)

    def _inputs(self, batch: MultimodalBatch, visual_in: torch.Tensor | None,
                span_t: torch.Tensor | None, mask: AttentionMask | None):
        """Embedded inputs, RoPE tables and mask of a whole batch (defaults as in forward)."""
        if visual_in is None:
            visual_in = batch.patches
        if span_t is None:
            span_t = torch.zeros(len(batch.spans), device=batch.tokens.device)
        if mask is None:
            mask = self.build_mask(batch)
        rope = rope_cos_sin(batch.positions, self.cfg.head_dim, self.cfg.rope_theta)
        return self.embed(batch, visual_in, span_t), rope, mask

    def forward(self, batch: MultimodalBatch, visual_in: torch.Tensor | None = None,
                span_t: torch.Tensor | None = None, mask: AttentionMask | None = None
                ) -> dict[str, torch.Tensor]:
        """Map a batch to text logits and visual predictions.

        Args:
            batch: the packed batch; its ``patches`` are replaced by ``visual_in``.
            visual_in: ``[N, patch_dim]`` inputs at continuous visual positions (row-major),
                e.g. noised patches; defaults to ``batch.patches``.
            span_t: ``[S]`` flow time per span (0 = clean); defaults to zeros.
            mask: a prebuilt attention mask (:meth:`build_mask`); built here if None.

        Returns:
            ``"text_logits"``: ``[M, vocab]`` at positions where ``batch.targets`` is not
            IGNORE_INDEX (row-major); ``"visual"``: ``[N, patch_dim]`` at continuous visual
            positions (row-major).
        """
        x, rope, mask = self._inputs(batch, visual_in, span_t, mask)
        for layer in self.layers:
            x = layer(x, rope, mask)
        h = self.norm(x)
        # the vocab head only where a target exists: most packed positions have none
        text_logits = self.text_head(h[batch.targets != IGNORE_INDEX])
        visual = self.visual_out(h[batch.continuous_mask()])
        return {"text_logits": text_logits, "visual": visual}

    # ------------------------------------------------------------ incremental decoding

    def prefill(self, batch: MultimodalBatch, visual_in: torch.Tensor | None = None,
                span_t: torch.Tensor | None = None, mask: AttentionMask | None = None,
                max_new_tokens: int = 64) -> tuple[torch.Tensor, KVCache]:
        """Run a prompt batch once, keeping every layer's keys/values for :meth:`decode_step`.

        The prompt goes through the normal hybrid mask (bidirectional inside its visual spans),
        so its states equal those of :meth:`forward` on any longer sequence that starts with
        it. Decoding continues the last document of each row; rows may have different
        lengths (right padding), and padding or other packed documents are never attended.
        ``batch.targets`` is not read. Meant for inference (under ``torch.no_grad``).

        Args:
            batch, visual_in, span_t, mask: as in :meth:`forward`.
            max_new_tokens: how many tokens :meth:`decode_step` may append (cache capacity).

        Returns:
            ``[B, vocab]`` text logits at each row's last position (they pick the first new
            token), and the cache.
        """
        x, rope, mask = self._inputs(batch, visual_in, span_t, mask)
        cache = KVCache.for_prefix(len(self.layers), batch.document_ids, batch.positions,
                                   max_new_tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, cache.layer(i))
        cache.prefilled(batch.shape[1])
        last = last_positions(batch.document_ids)
        h = self.norm(x[torch.arange(x.shape[0], device=x.device), last])
        return self.text_head(h), cache

    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Append text ``tokens`` (``[B]`` or ``[B, n]``) to every row of ``cache`` and return
        their text logits (``[B, vocab]`` or ``[B, n, vocab]``).

        Each new token attends to its row's valid cached slots and, causally, to the new
        tokens before it: the same as :meth:`forward` on the whole sequence. Text only (no
        visual positions). Attention is SDPA with a boolean mask on every device.
        """
        single = tokens.dim() == 1
        if single:
            tokens = tokens[:, None]
        n = tokens.shape[1]
        positions = cache.next_positions[:, None] + torch.arange(n, device=tokens.device)
        rope = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        mask = cache.decode_mask(n)
        x = self.tok_embeddings(tokens)     # text positions: no patch or visual position code
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, cache.layer(i))
        cache.advance(n)
        logits = self.text_head(self.norm(x))
        return logits[:, 0] if single else logits
