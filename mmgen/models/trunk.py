# The trunk of every model family: registered blocks + final norm, hidden states plus aux losses.
"""The trunk maps embedded inputs ``[B, L, dim]`` (with RoPE tables and an attention mask) to
normalised hidden states ``[B, L, dim]`` and a dict of auxiliary losses. It knows nothing of
modalities, inputs or heads: embedders (``embedders.py``) build its input and heads
(``heads.py``) read its output at the positions an objective chooses.

Its blocks live in the model's ``layers`` (an ``nn.ModuleList``) and its final norm in the
model's ``norm``, so backends wrap each block from outside (activation checkpointing, FSDP,
compile) and state-dict keys stay ``layers.<i>.*`` / ``norm.weight``.

Block protocol: ``block(x, rope, mask[, kv]) -> x``, or ``-> (x, aux)`` for a block with
auxiliary losses (an MoE block's balance or z-loss, one scalar per micro-batch). A block class
with ``uses_towers = True`` (modality towers, ``mmgen/models/mot.py``) is called
``block(x, rope, mask, kv, routing)`` with the per-position tower routing the model derived
from the span table (``kv`` None in training); other blocks never see it. The trunk sums
each named aux loss over the blocks that return it; a dense block returns ``x`` alone, so its
forward (and what checkpoint wrappers and compile see) stays a plain tensor function.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mmgen.models.attention import AttentionMask
from mmgen.models.config import ModelConfig
from mmgen.models.kv_cache import KVCache, LayerKV
from mmgen.models.layers import Attention, RMSNorm, SwiGLU
from mmgen.models.moe import MoEBlock, MoEFeedForward
from mmgen.models.mot import MoTBlock, TowerRouting, dense_ffn


class TransformerBlock(nn.Module):
    """Dense pre-norm block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.qk_norm, cfg.norm_eps,
                                   head_dim=cfg.head_dim, qkv_bias=cfg.qkv_bias)
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


class MoTMoEBlock(MoTBlock):
    """Modality towers whose FFNs are token-routed experts (MoT x MoE): each tower's FFN is an
    :class:`~mmgen.models.moe.MoEFeedForward` on the layers ``i % moe_every == 0`` (the dense
    SwiGLU elsewhere); its router sees only that tower's tokens."""

    @classmethod
    def ffn_for_layer(cls, cfg: ModelConfig, layer_id: int):
        return MoEFeedForward if layer_id % cfg.moe_every == 0 else dense_ffn


# `model.block=<name>`: an MoE or modality-tower block registers here, with the same protocol;
# built as BLOCKS[name](cfg, layer_id=i) (an MoE block is dense on the layers moe_every skips)
BLOCKS: dict[str, type[nn.Module]] = {
    "dense": TransformerBlock,
    "mot": MoTBlock,
    "moe": MoEBlock,
    "motmoe": MoTMoEBlock,
}


def build_blocks(cfg: ModelConfig) -> nn.ModuleList:
    """``cfg.n_layers`` blocks of kind ``cfg.block`` (the model's ``layers``)."""
    return nn.ModuleList(BLOCKS[cfg.block](cfg, layer_id=i) for i in range(cfg.n_layers))


def run_trunk(layers: nn.ModuleList, norm: nn.Module, x: torch.Tensor,
              rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask,
              cache: KVCache | None = None, routing: TowerRouting | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Blocks then final norm.

    Args:
        layers, norm: the model's blocks and final norm.
        x: ``[B, L, dim]`` embedded inputs.
        rope: cos/sin tables at the inputs' positions (``layers.rope_cos_sin``).
        mask: attention mask (with ``cache``: one column per cached slot).
        cache: incremental decoding only: each block appends its keys/values to its layer.
        routing: the tower of every position (``model.tower_split`` set), for tower blocks.

    Returns:
        ``[B, L, dim]`` normalised hidden states, and auxiliary losses by name (empty for
        dense blocks).
    """
    aux: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        kv = None if cache is None else cache.layer(i)
        if routing is not None and getattr(layer, "uses_towers", False):
            out = layer(x, rope, mask, kv, routing)
        else:
            # the cache argument only when there is one: training calls stay layer(x, rope, mask)
            out = layer(x, rope, mask) if kv is None else layer(x, rope, mask, kv)
        if isinstance(out, tuple):
            x, block_aux = out
            for name, value in block_aux.items():
                aux[name] = aux[name] + value if name in aux else value
        else:
            x = out
    return norm(x), aux
