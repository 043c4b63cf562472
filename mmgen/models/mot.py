# Modality towers (Mixture-of-Transformers, as BAGEL): per-tower projections, norms and FFN; one global attention.
"""A tower block (``model.block=mot``) holds one copy of a dense block's weights per tower
(attention q/k/v/o projections, qk-norm, the two RMSNorms, the FFN) and runs every position
through the weights of its own tower, while attention stays one global self-attention over
the whole sequence with the batch's mask (BAGEL's Mixture-of-Transformers; LMFusion with the
text tower frozen).

Which tower a position uses is derived from the batch's span table (DESIGN.md contract 1) by
:func:`tower_ids`, per ``model.tower_split``:

* ``role`` (BAGEL): tower 0 = understanding (text, padding and *condition* visual spans),
  tower 1 = generation (positions of *target* spans: the noised / masked ones with a loss);
* ``modality``: tower 0 = text (and padding), tower 1 = every visual span.

Tower 0 is the text tower in both splits, so a decoded text token always uses it.

The model derives a :class:`TowerRouting` once per forward (one host sync for the per-tower
counts) and hands it to every tower block as the block protocol's optional last argument
(``block(x, rope, mask, kv, routing)``; ``mmgen/models/trunk.py``). A block gathers the
positions of each tower into one contiguous block of rows (a stable sort by tower), runs each
tower's matmuls once on its rows, and scatters the rows back: twice per layer, around the
global attention (norm + q/k/v + qk-norm before it; o-projection, residual, norm + FFN after
it). Both moves are index permutations, so the result equals a per-position loop choosing
each token's weights (tests/test_mot.py) up to the rounding of matmuls of different row counts.

State-dict keys are the dense block's under ``towers.<t>.``: ``layers.0.towers.1.attention.wq.weight``.
:func:`expand_dense_state` maps a dense checkpoint's ``layers.<i>.<rest>`` onto every tower, so a
MoT initialised from a dense checkpoint (``checkpoint.init_from``) computes the dense model's
function at step 0.

The FFN of each tower is built by the block's ``build_ffn`` (a factory taking the
``ModelConfig``); a subclass that swaps it for an MoE FFN is MoT x MoE::

    class MoTMoEBlock(MoTBlock):
        build_ffn = staticmethod(lambda cfg: MoEFFN(cfg))    # BLOCKS["motmoe"] = MoTMoEBlock

The FFN is called on one tower's rows as a ``[1, n, dim]`` sequence (padding rows included,
on the text tower) and has ``init_weights(std, out_std)``. It may return ``(y, aux)``; the
block sums each named aux loss over its towers (as the trunk sums over blocks) and then
returns ``(x, aux)``. Each tower gets its own experts and router.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from mmgen.batch import MultimodalBatch
from mmgen.models.attention import AttentionMask, attend
from mmgen.models.config import ModelConfig
from mmgen.models.kv_cache import LayerKV
from mmgen.models.layers import Attention, RMSNorm, SwiGLU, apply_rope

TEXT_TOWER = 0
NUM_TOWERS = 2
TOWER_NAMES = {"role": ("understanding", "generation"), "modality": ("text", "visual")}


def tower_ids(batch: MultimodalBatch, split: str) -> torch.Tensor:
    """``[B, L]`` long: the tower of every position, from the span table.

    Args:
        batch: the packed batch.
        split: ``"role"`` (1 at positions of target spans) or ``"modality"`` (1 at visual
            positions); 0 elsewhere (text, padding and, for ``role``, condition spans).
    """
    if split == "role":
        second = batch.span_values("is_target", False)
    elif split == "modality":
        second = batch.span_ids >= 0
    else:
        raise ValueError(f"tower split '{split}' is not one of {tuple(TOWER_NAMES)}")
    return second.long()


@dataclass
class TowerRouting:
    """Where each tower's rows sit once the ``B * L`` positions are sorted by tower.

    Args:
        towers: ``[B, L]`` long tower per position.
        order: ``[B * L]`` flat positions in tower order (stable: row-major inside a tower).
        inverse: ``[B * L]`` the permutation that undoes ``order``.
        counts: rows per tower (host ints: ``split`` sizes).
    """

    towers: torch.Tensor
    order: torch.Tensor
    inverse: torch.Tensor
    counts: tuple[int, ...]

    @classmethod
    def from_ids(cls, towers: torch.Tensor, num_towers: int = NUM_TOWERS) -> "TowerRouting":
        """The routing of ``towers`` (``[B, L]`` long in ``[0, num_towers)``)."""
        flat = towers.reshape(-1)
        order = torch.argsort(flat, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        # the one host sync of a tower forward: split sizes must be host ints
        counts = torch.bincount(flat, minlength=num_towers).tolist()
        if len(counts) != num_towers:
            raise ValueError(f"tower ids reach {len(counts) - 1}, the blocks have {num_towers} towers")
        return cls(towers, order, inverse, tuple(counts))

    @classmethod
    def text(cls, shape: tuple[int, int], device) -> "TowerRouting":
        """Every position on the text tower (decoded text tokens)."""
        return cls.from_ids(torch.full(shape, TEXT_TOWER, dtype=torch.long, device=device))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, *f]`` -> ``[B * L, *f]`` rows in tower order."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.order)

    def scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """``[B * L, *f]`` rows in tower order -> ``[B, L, *f]``."""
        # indexing with a [B, L] index makes a fresh tensor, not a view of one (FSDP2 warns
        # that an in-place op on a block's view output would skip its pre-backward hook)
        return rows[self.inverse.view(self.towers.shape)]

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rows in tower order -> one contiguous block per tower (an empty one included, so
        every tower's weights stay in the graph and get a (zero) gradient: DDP expects one)."""
        return rows.split(self.counts)


def dense_ffn(cfg: ModelConfig) -> nn.Module:
    """The dense block's SwiGLU FFN (the default ``MoTBlock.build_ffn``)."""
    return SwiGLU(cfg.dim, cfg.ffn_dim)


class TowerLayer(nn.Module):
    """One tower's weights of a block, under the dense block's module names."""

    def __init__(self, cfg: ModelConfig, build_ffn: Callable[[ModelConfig], nn.Module]):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # used for its projections and qk-norm only: the attention itself is global (the block)
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.qk_norm, cfg.norm_eps,
                                   head_dim=cfg.head_dim, qkv_bias=cfg.qkv_bias)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = build_ffn(cfg)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, dim]`` residual rows -> ``[n, (H + 2 H_kv) * D]`` q|k|v after qk-norm."""
        a, n = self.attention, x.shape[0]
        h = self.attention_norm(x)
        q = a.wq(h).view(n, a.n_heads, a.head_dim)
        k = a.wk(h).view(n, a.n_kv_heads, a.head_dim)
        if a.q_norm is not None:
            q, k = a.q_norm(q), a.k_norm(k)
        return torch.cat([q.flatten(1), k.flatten(1), a.wv(h)], dim=-1)

    def post(self, x: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Residual rows and their attention outputs -> block output rows, FFN aux losses."""
        x = x + self.attention.wo(attn)
        # a [1, n, dim] sequence: the rank a dense block's FFN (or an MoE FFN) is given
        y = self.feed_forward(self.ffn_norm(x)[None])
        aux = {}
        if isinstance(y, tuple):
            y, aux = y
        return x + y[0], aux

    def init_weights(self, std: float, out_std: float) -> None:
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attention.init_weights(std, out_std)
        self.feed_forward.init_weights(std, out_std)


class MoTBlock(nn.Module):
    """Pre-norm block with one :class:`TowerLayer` per tower and global attention.

    Class attributes: ``uses_towers`` (the trunk passes the routing), ``num_towers``,
    ``build_ffn`` (``ModelConfig -> nn.Module``: a subclass swaps in another FFN, e.g. MoE).
    """

    uses_towers = True
    num_towers = NUM_TOWERS
    build_ffn: Callable[[ModelConfig], nn.Module] = staticmethod(dense_ffn)

    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        build_ffn = self.ffn_for_layer(cfg, layer_id)
        self.towers = nn.ModuleList(TowerLayer(cfg, build_ffn) for _ in range(self.num_towers))
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.copy_init = cfg.tower_init == "copy"
        if cfg.freeze_text_tower:
            self.towers[TEXT_TOWER].requires_grad_(False)

    @classmethod
    def ffn_for_layer(cls, cfg: ModelConfig, layer_id: int) -> Callable[[ModelConfig], nn.Module]:
        """The FFN factory of block ``layer_id`` (a subclass may vary it by layer)."""
        return cls.build_ffn

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: AttentionMask, kv: LayerKV | None = None,
                routing: TowerRouting | None = None):
        """``x`` ``[B, L, dim]``; ``routing`` of the same positions (required); ``kv`` as for
        the dense block. Returns ``x``, or ``(x, aux)`` when a tower's FFN has aux losses."""
        if routing is None:
            raise ValueError("a tower block (model.block=mot) needs the tower routing: set "
                             "model.tower_split=role|modality")
        b, length, _ = x.shape
        rows = routing.gather(x)
        qkv = torch.cat([t.qkv(r) for t, r in zip(self.towers, routing.split(rows))])
        qkv = routing.scatter(qkv)
        hq, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q = q.reshape(b, length, hq, d).transpose(1, 2)
        k = k.reshape(b, length, hkv, d).transpose(1, 2)
        v = v.reshape(b, length, hkv, d).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv is not None:
            k, v = kv.update(k, v)
        attn = routing.gather(attend(q, k, v, mask).transpose(1, 2).reshape(b, length, -1))
        outs, aux = [], {}
        for tower, r, a in zip(self.towers, routing.split(rows), routing.split(attn)):
            y, tower_aux = tower.post(r, a)
            outs.append(y)
            for name, value in tower_aux.items():
                aux[name] = aux[name] + value if name in aux else value
        x = routing.scatter(torch.cat(outs))
        return (x, aux) if aux else x

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        for tower in self.towers:
            tower.init_weights(std, out_std)
        if self.copy_init:
            copy_text_tower(self)


@torch.no_grad()
def copy_text_tower(block: MoTBlock) -> None:
    """Set every tower of ``block`` to a copy of its text tower (tower 0)."""
    source = block.towers[TEXT_TOWER].state_dict()
    for t, tower in enumerate(block.towers):
        if t != TEXT_TOWER:
            tower.load_state_dict(source)


_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")


def expand_dense_state(state: dict[str, torch.Tensor], model_keys) -> dict[str, torch.Tensor]:
    """Map a dense checkpoint's block keys onto every tower of a tower model.

    ``layers.<i>.<rest>`` becomes ``layers.<i>.towers.<t>.<rest>`` for every tower key
    ``model_keys`` has; anything else is kept. A state dict that already has tower keys (or a
    model without towers) comes back unchanged.

    Args:
        state: the checkpoint's state dict.
        model_keys: the keys of the model being loaded (``model.state_dict().keys()``).
    """
    model_keys = set(model_keys)
    if not any(".towers." in k for k in model_keys) or any(".towers." in k for k in state):
        return state
    out = {}
    for key, value in state.items():
        m = _LAYER_KEY.match(key)
        targets = []
        if m:
            prefix, rest = m.groups()
            t = 0
            while f"layers.{prefix}.towers.{t}.{rest}" in model_keys:
                targets.append(f"layers.{prefix}.towers.{t}.{rest}")
                t += 1
        if targets:
            out.update({name: value for name in targets})
        else:
            out[key] = value
    return out
