# The unified transformer: registered embedders -> trunk -> registered heads, in one sequence.
"""Single-device PyTorch; parallelism is applied from outside (``mmgen/parallel``).

A model is a trunk plus registered embedders and heads (DESIGN.md, contract 2):

* embedders (``embedders.py``) turn a batch into ``[B, L, dim]`` inputs: token embeddings,
  continuous visual rows projected and tagged with their span's timestep, position codes;
* the trunk (``trunk.py``: blocks in ``self.layers``, an ``nn.ModuleList`` that backends wrap
  per block for activation checkpointing, FSDP or compile, and the final ``self.norm``) maps
  them to hidden states and auxiliary losses;
* heads (``heads.py``, chosen by ``model.heads``) map hidden states at the positions the
  objective asks for to outputs: "lm" logits, "flow" patch predictions, "mar" (the trunk's
  state as the conditioning of a per-token MLP denoiser, and that denoiser's prediction when
  the objective passes it noised tokens through ``head_inputs``).

Everything a training step needs runs inside :meth:`UnifiedTransformer.forward`, the one call
that goes through a backend's wrapper (DDP's reducer, FSDP2's and ZeRO-3's parameter
gathering). Every submodule sits on the root under the attribute name it always had, so
state-dict keys (``tok_embeddings.weight``, ``layers.0.attention.wq.weight``, ``output.weight``,
``visual_out.bias``, ...) do not depend on the registries.

Build on the meta device, parallelize, then ``to_empty`` + :meth:`UnifiedTransformer.init_weights`
(see :func:`mmgen.models.build_model`). For inference, :meth:`UnifiedTransformer.prefill` runs a
prompt once and :meth:`UnifiedTransformer.decode_step` continues it token by token from a KV
cache (``mmgen/models/kv_cache.py``); :meth:`UnifiedTransformer.forward` never uses one.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn as nn

from mmgen.batch import MultimodalBatch
from mmgen.models.attention import (AttentionMask, SequenceParallelMask, build_mask, mask_layout,
                                    resolve_backend)
from mmgen.models.config import ModelConfig
from mmgen.models.embedders import EMBEDDERS, embedder_names
from mmgen.models.heads import HEADS, head_names, select_rows
from mmgen.models.kv_cache import KVCache, last_positions
from mmgen.models.layers import RMSNorm, RopeScaling, rope_cos_sin
from mmgen.models.mot import TowerRouting, tower_ids
from mmgen.models.trunk import build_blocks, run_trunk
from mmgen.sequence_shard import shard_of


def rope_scaling(cfg: ModelConfig) -> RopeScaling | None:
    """The config's long-context RoPE scaling (None for plain RoPE)."""
    if cfg.rope_scaling == "none":
        return None
    return RopeScaling(cfg.rope_scaling, cfg.rope_factor, cfg.rope_low_freq_factor,
                       cfg.rope_high_freq_factor, cfg.rope_original_max_len)


class UnifiedTransformer(nn.Module):
    """One transformer over packed text + visual sequences (see ``MultimodalBatch``).

    Constructed on a real device it is initialised at once; constructed under
    ``torch.device("meta")`` it waits for ``to_empty`` + :meth:`init_weights`.

    Attributes:
        embedder_names, head_names: what ``cfg`` built, in registry order.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embedder_names = tuple(embedder_names(cfg))
        self.head_names = tuple(head_names(cfg))
        # registration order = parameter order (optimizer state, ZeRO flat buffers):
        # embedders, blocks, final norm, heads, as it has always been
        for name in self.embedder_names:
            for attr, module in EMBEDDERS[name].build(cfg).items():
                self.add_module(attr, module)
        self.layers = build_blocks(cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        for name in self.head_names:
            for attr, module in HEADS[name].build(cfg).items():
                self.add_module(attr, module)
        if not self.tok_embeddings.weight.is_meta:
            self.init_weights()

    # ------------------------------------------------------------ initialisation

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter from the default RNG of its device, in a fixed order
        (embedders, blocks, norm, heads, each in registry order)."""
        cfg = self.cfg
        std = cfg.init_std
        # residual-branch outputs shrink with depth so the stream's variance stays bounded
        out_std = std / math.sqrt(2 * cfg.n_layers)
        for name in self.embedder_names:
            EMBEDDERS[name].init_weights(self, cfg)
        for layer in self.layers:
            layer.init_weights(std, out_std)
        self.norm.init_weights()
        for name in self.head_names:
            HEADS[name].init_weights(self, cfg)

    # ------------------------------------------------------------ forward

    def build_mask(self, batch: MultimodalBatch) -> AttentionMask:
        """The attention mask for ``batch`` (compiled from its span table) in the encoding
        ``cfg.attention`` resolves to. A context-parallel slice (``mmgen/sequence_shard.py``)
        gets the whole batch's mask, wrapped with its group's exchange."""
        backend = resolve_backend(self.cfg.attention, batch.tokens.device)
        shard = shard_of(batch)
        if shard is not None:
            return SequenceParallelMask(build_mask(shard.full, backend), shard.exchange)
        return build_mask(batch, backend)

    def embed(self, batch: MultimodalBatch, visual_in: torch.Tensor,
              span_t: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, L, dim]`` trunk inputs: every embedder in turn (token embeddings; continuous
        visual positions replaced by their projected ``visual_in`` row plus their span's
        timestep embedding; ``masked`` rows by the learned mask vector, "mar" models only;
        visual position codes added)."""
        if masked is not None and "mar_mask" not in self.embedder_names:
            raise ValueError("masked visual inputs need the mask embedding, which only a model with "
                             f"the 'mar' head builds (model.heads={list(self.head_names)})")
        x = None
        for name in self.embedder_names:
            x = EMBEDDERS[name].embed(self, x, batch, visual_in, span_t, masked)
        return x

    def trunk(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
              mask: AttentionMask, cache: KVCache | None = None,
              routing: TowerRouting | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Blocks + final norm: hidden states ``[B, L, dim]`` and auxiliary losses by name
        (see ``mmgen.models.trunk.run_trunk``)."""
        return run_trunk(self.layers, self.norm, x, rope, mask, cache, routing)

    def route(self, batch: MultimodalBatch) -> TowerRouting | None:
        """The tower of every position of ``batch`` (``model.tower_split``, from its span
        table; ``mmgen/models/mot.py``), or None for a model without towers."""
        if self.cfg.tower_split == "none":
            return None
        return TowerRouting.from_ids(tower_ids(batch, self.cfg.tower_split))

    def run_head(self, name: str, h: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """Head ``name`` on hidden states ``h`` (``[..., dim]``), with the head's own keyword
        ``inputs`` (``Head.inputs``: the "mar" denoiser's ``x_t`` and ``t``)."""
        if name not in self.head_names:
            raise ValueError(f"the model has no '{name}' head (model.heads="
                             f"{list(self.head_names)}; registered: {list(HEADS)})")
        unknown = sorted(set(inputs) - set(HEADS[name].inputs))
        if unknown:
            raise ValueError(f"head '{name}' reads no input(s) {unknown} (its inputs: "
                             f"{list(HEADS[name].inputs)})")
        return HEADS[name].run(self, h, **inputs)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin tables at ``positions`` (``[B, L]``), with ``cfg.rope_scaling``."""
        return rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, rope_scaling(self.cfg))

    def _inputs(self, batch: MultimodalBatch, visual_in: torch.Tensor | None,
                span_t: torch.Tensor | None, mask: AttentionMask | None,
                masked: torch.Tensor | None = None):
        """Embedded inputs, RoPE tables and mask of a whole batch (defaults as in forward)."""
        if visual_in is None:
            visual_in = batch.patches
        if span_t is None:
            span_t = torch.zeros(len(batch.spans), device=batch.tokens.device)
        if mask is None:
            mask = self.build_mask(batch)
        rope = self.rope(batch.positions)
        return self.embed(batch, visual_in, span_t, masked), rope, mask

    def forward(self, batch: MultimodalBatch, visual_in: torch.Tensor | None = None,
                span_t: torch.Tensor | None = None, mask: AttentionMask | None = None,
                heads: Mapping[str, torch.Tensor] | None = None,
                masked: torch.Tensor | None = None,
                head_inputs: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> dict:
        """Embed, run the trunk, then each requested head at its positions.

        Args:
            batch: the packed batch; its ``patches`` are replaced by ``visual_in``.
            visual_in: ``[N, patch_dim]`` inputs at continuous visual positions (row-major),
                e.g. noised patches; defaults to ``batch.patches``.
            span_t: ``[S]`` flow time per span (0 = clean); defaults to zeros.
            mask: a prebuilt attention mask (:meth:`build_mask`); built here if None.
            heads: head name -> the positions where it runs, the objective's choice: a
                ``[B, L]`` bool mask or flat row-major indices (``batch.rows(...)``, which need
                no device synchronisation). None: every built head at its ``default_positions`` ("lm" where
                ``batch.targets`` is not IGNORE_INDEX, "flow" at continuous visual positions).
            masked: ``[N]`` bool over the continuous rows (row-major): inputs the trunk sees as
                the learned mask embedding instead of ``visual_in`` (MAR; a model with the
                "mar" head only). None: nothing masked.
            head_inputs: head name -> its extra keyword inputs (``Head.inputs``), e.g.
                ``{"mar": {"x_t": ..., "t": ...}}`` for the denoiser's K noise draws per position.

        Returns:
            one entry per requested head: its output at its positions (row-major), e.g.
            ``"lm"``: ``[M, vocab]``, ``"flow"``: ``[N, patch_dim]``; and ``"aux"``: the
            trunk's auxiliary losses by name (empty for dense blocks).
        """
        x, rope, mask = self._inputs(batch, visual_in, span_t, mask, masked)
        h, aux = self.trunk(x, rope, mask, routing=self.route(batch))
        if heads is None:
            heads = {name: HEADS[name].default_positions(batch) for name in self.head_names}
        head_inputs = head_inputs or {}
        # each head only where it is asked for: the vocabulary head at ~12% of positions
        out = {name: self.run_head(name, select_rows(h, positions), **head_inputs.get(name, {}))
               for name, positions in heads.items()}
        out["aux"] = aux
        return out

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
            ``[B, vocab]`` "lm" logits at each row's last position (they pick the first new
            token), and the cache.
        """
        x, rope, mask = self._inputs(batch, visual_in, span_t, mask)
        cache = KVCache.for_prefix(len(self.layers), batch.document_ids, batch.positions,
                                   max_new_tokens, hidden=mask_layout(batch).hidden)
        h, _ = self.trunk(x, rope, mask, cache, self.route(batch))
        cache.prefilled(batch.shape[1])
        last = last_positions(batch.document_ids)
        return self.run_head("lm", h[torch.arange(h.shape[0], device=h.device), last]), cache

    def decode_step(self, tokens: torch.Tensor, cache: KVCache,
                    coords: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``tokens`` (``[B]`` or ``[B, n]``) to every row of ``cache`` and return
        their "lm" logits (``[B, vocab]`` or ``[B, n, vocab]``).

        Each new token attends to its row's valid cached slots and, causally, to the new
        tokens before it: the same as :meth:`forward` on the whole sequence when the span the
        tokens belong to is CAUSAL (text always is). Attention is SDPA with a boolean mask on
        every device.

        Args:
            tokens: text ids, or discrete visual codes (already offset into the shared
                vocabulary) of a generated span (discrete-token AR, ``objective=vq_ar``).
            cache: from :meth:`prefill`.
            coords: None for text; for codes, their (t, h, w) grid coordinates (``[B, 3]`` or
                ``[B, n, 3]`` long), so they get the visual position code they trained with
                (``model.visual_pos=learned``) and, with modality towers, the visual /
                generation tower (tower 1 under both splits: a generated span is a target).
        """
        single = tokens.dim() == 1
        if single:
            tokens = tokens[:, None]
            coords = None if coords is None else coords[:, None]
        n = tokens.shape[1]
        positions = cache.next_positions[:, None] + torch.arange(n, device=tokens.device)
        rope = self.rope(positions)
        mask = cache.decode_mask(n)
        x = self.tok_embeddings(tokens)     # text / codes: no continuous input
        if coords is not None and "visual_pos" in self.embedder_names:
            x = x + self.visual_pos(coords)
        if self.cfg.tower_split == "none":
            routing = None
        elif coords is None:
            routing = TowerRouting.text(tokens.shape, tokens.device)
        else:
            routing = TowerRouting.from_ids(torch.ones(tokens.shape, dtype=torch.long, device=tokens.device))
        h, _ = self.trunk(x, rope, mask, cache, routing)
        cache.advance(n)
        logits = self.run_head("lm", h)
        return logits[:, 0] if single else logits

