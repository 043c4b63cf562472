# State-dict adapter: the plain model's weights <-> one megatron rank's (fused QKV, gated fc1, TP/PP shards).
"""Every plain-model tensor is either replicated on the tensor-parallel ranks that hold it or
split along one axis (:func:`split_axis`): query/key/value and gate/up rows (axis 0: heads and
FFN units), output and down-projection columns (axis 1). A megatron rank of tensor-parallel
rank ``r`` holds chunk ``r`` of each split tensor, with two fusions megatron's layout uses:

* ``attention.linear_qkv`` = per local query group ``g``: its query heads, its key head, its
  value head (megatron's grouped QKV layout), built from chunk ``r`` of ``wq``, ``wk``, ``wv``;
  with ``qkv_bias`` (Qwen2) its bias is the same grouping of the ``wq``/``wk``/``wv`` biases;
* ``feed_forward.linear_fc1`` = ``[w1 chunk r; w3 chunk r]`` (gate then up, per rank).

MoE layers (``model=moe*``): the router and shared experts keep their plain keys and are
replicated; the routed experts ``feed_forward.experts.w{1,2,3}`` ``[E, ...]`` are cut along
the expert axis over the expert-parallel ranks (:data:`EXPERT_AXIS`; never over TP).

``wo`` -> ``attention.linear_proj`` and ``w2`` -> ``feed_forward.linear_fc2`` keep their
chunk as it is. Pipeline stage ``p`` holds blocks ``layer_ids`` under local indices (its
``layers.<j>`` is plain ``layers.<layer_ids[j]>``), the embedders on the first stage and the
norm and heads on the last. The checkpoint stores plain keys and the plain layout
(:func:`plain_shards`), so it is independent of TP and PP.
"""
from __future__ import annotations

import re

import torch

from mmgen.models.config import ModelConfig

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
ROW_SPLIT = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
             "feed_forward.w1.weight", "feed_forward.w3.weight")
# q/k/v biases (model.qkv_bias): split with their heads, fused into linear_qkv's bias
QKV_BIAS = ("attention.wq.bias", "attention.wk.bias", "attention.wv.bias")
COL_SPLIT = ("attention.wo.weight", "feed_forward.w2.weight")
EXPERTS = ("feed_forward.experts.w1", "feed_forward.experts.w2", "feed_forward.experts.w3")
EXPERT_AXIS = "ep"   # plain_shards' axis of an expert weight: dim 0, cut over expert-parallel ranks
RENAMED = {"attention.wo.weight": "attention.linear_proj.weight", "feed_forward.w2.weight": "feed_forward.linear_fc2.weight"}


def split_axis(key: str) -> int | None:
    """The axis a plain key is split on across tensor-parallel ranks (None: replicated)."""
    m = _LAYER.match(key)
    if m is None:
        return None
    rest = m.group(2)
    return 0 if rest in ROW_SPLIT or rest in QKV_BIAS else 1 if rest in COL_SPLIT else None


def _chunk(t: torch.Tensor, axis: int | None, tp: int, rank: int) -> torch.Tensor:
    return t if axis is None else t.chunk(tp, dim=axis)[rank]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Chunks of ``wq``/``wk``/``wv`` (rows of whole heads) -> megatron's grouped ``linear_qkv``."""
    hd, per = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    groups = k.shape[0] // hd
    q = q.view(groups, per * hd, -1)
    return torch.cat([q, k.view(groups, hd, -1), v.view(groups, hd, -1)], dim=1).reshape(-1, q.shape[-1])


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    hd, per = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    groups = qkv.shape[0] // ((per + 2) * hd)
    g = qkv.view(groups, (per + 2) * hd, -1)
    dim = qkv.shape[-1]
    return (g[:, : per * hd].reshape(-1, dim), g[:, per * hd: (per + 1) * hd].reshape(-1, dim),
            g[:, (per + 1) * hd:].reshape(-1, dim))


def is_expert(key: str) -> bool:
    """A routed-expert weight of an MoE layer (split over EP ranks, replicated over TP)."""
    m = _LAYER.match(key)
    return m is not None and m.group(2) in EXPERTS


def to_megatron(plain: dict[str, torch.Tensor], cfg: ModelConfig, tp: int, tp_rank: int,
                layer_ids: range, first: bool, last: bool, ep: int = 1, ep_rank: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of one megatron rank, cut from a full plain state dict.

    Args:
        plain: the plain model's ``state_dict()`` (every key).
        cfg: the architecture.
        tp, tp_rank: tensor-parallel degree and this rank's index.
        layer_ids: global indices of this pipeline stage's blocks.
        first, last: whether this stage holds the embedders / the norm and heads.
        ep, ep_rank: expert-parallel degree and this rank's index (MoE layers).
    """
    out: dict[str, torch.Tensor] = {}
    local = {g: j for j, g in enumerate(layer_ids)}
    for key, value in plain.items():
        m = _LAYER.match(key)
        if m is None:
            if key.startswith("norm.") or _is_head(key, cfg):
                keep = last
            else:
                keep = first
            if keep:
                out[key] = value
            continue
        layer = int(m.group(1))
        if layer not in local:
            continue
        prefix, rest = f"layers.{local[layer]}.", m.group(2)
        if rest in ROW_SPLIT or rest in QKV_BIAS:
            continue  # fused below
        if rest in EXPERTS:
            out[prefix + rest] = value.chunk(ep, dim=0)[ep_rank]
            continue
        out[prefix + RENAMED.get(rest, rest)] = _chunk(value, split_axis(key), tp, tp_rank)
    for layer, j in local.items():
        p = f"layers.{layer}."
        q, k, v = (_chunk(plain[p + r], 0, tp, tp_rank) for r in ROW_SPLIT[:3])
        out[f"layers.{j}.attention.linear_qkv.weight"] = fuse_qkv(q, k, v, cfg)
        if p + ROW_SPLIT[3] in plain:   # a dense FFN (an MoE layer has router and experts instead)
            w1, w3 = (_chunk(plain[p + r], 0, tp, tp_rank) for r in ROW_SPLIT[3:])
            out[f"layers.{j}.feed_forward.linear_fc1.weight"] = torch.cat([w1, w3], dim=0)
        if p + QKV_BIAS[0] in plain:
            # a bias is a one-column weight for the grouping
            q, k, v = (_chunk(plain[p + r], 0, tp, tp_rank)[:, None] for r in QKV_BIAS)
            out[f"layers.{j}.attention.linear_qkv.bias"] = fuse_qkv(q, k, v, cfg)[:, 0]
    return out


def _is_head(key: str, cfg: ModelConfig) -> bool:
    # heads' modules (mmgen.models.heads): "output" (untied LM head) and "visual_out" (flow head)
    return key.split(".")[0] in ("output", "visual_out")


def plain_shards(local: dict[str, torch.Tensor], cfg: ModelConfig,
                 layer_ids: range) -> dict[str, tuple[torch.Tensor, int | None]]:
    """One megatron rank's weights as plain keys: ``plain key -> (this rank's chunk, split axis)``
    (the inverse of :func:`to_megatron` for one rank; chunks are new tensors where a fusion
    is undone, views otherwise)."""
    out: dict[str, tuple[torch.Tensor, int | None]] = {}
    back = {v: k for k, v in RENAMED.items()}
    for key, value in local.items():
        if not isinstance(value, torch.Tensor):   # megatron linears' `_extra_state` (None)
            continue
        m = _LAYER.match(key)
        if m is None:
            out[key] = (value, None)
            continue
        prefix, rest = f"layers.{layer_ids[int(m.group(1))]}.", m.group(2)
        if rest == "attention.linear_qkv.weight":
            for name, part in zip(ROW_SPLIT[:3], split_qkv(value, cfg)):
                out[prefix + name] = (part, 0)
        elif rest == "attention.linear_qkv.bias":
            for name, part in zip(QKV_BIAS, split_qkv(value[:, None], cfg)):
                out[prefix + name] = (part[:, 0].contiguous(), 0)
        elif rest == "feed_forward.linear_fc1.weight":
            w1, w3 = value.chunk(2, dim=0)
            out[prefix + ROW_SPLIT[3]], out[prefix + ROW_SPLIT[4]] = (w1, 0), (w3, 0)
        elif rest in EXPERTS:
            out[prefix + rest] = (value, EXPERT_AXIS)
        else:
            name = back.get(rest, rest)
            out[prefix + name] = (value, split_axis(prefix + name))
    return out


def merge_ranks(ranks: list[dict[str, tuple[torch.Tensor, int | str | None]]], tp: int,
                ep_ranks: list[int] | None = None, ep: int = 1) -> dict[str, torch.Tensor]:
    """Full plain state dict from every rank's :func:`plain_shards`, listed in global rank order
    (``rank = (pp_i * dp + dp_i) * tp + tp_i``; without experts only ranks of data-parallel
    index 0 are needed).

    Args:
        ranks: each rank's shards.
        tp: tensor-parallel degree.
        ep_ranks: each listed rank's expert-parallel index (MoE; None: no expert weights).
        ep: expert-parallel degree.
    """
    pieces: dict[str, list] = {}
    axes: dict[str, int | str | None] = {}
    for i, shards in enumerate(ranks):
        tp_rank = i % tp
        for key, (value, axis) in shards.items():
            axes[key] = axis
            if axis == EXPERT_AXIS:
                pieces.setdefault(key, [None] * ep)[ep_ranks[i] if ep_ranks else 0] = value
                continue
            slot = pieces.setdefault(key, [None] * tp)
            slot[tp_rank] = value
    out = {}
    for key, parts in pieces.items():
        axis = axes[key]
        if axis == EXPERT_AXIS:
            axis = 0
        out[key] = parts[0] if axis is None else torch.cat(parts, dim=axis)
    return out
