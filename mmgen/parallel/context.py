# Context (sequence) parallelism without Transformer Engine: DeepSpeed-Ulysses all-to-all over heads.
"""``parallel.cp=N parallel.cp_impl=ulysses`` with ``parallel=ddp`` or ``fsdp2``.

What runs where (docs/sequence_parallel.md):

* data: the ``cp`` ranks of one data-parallel rank read the same rows (the loader is per
  ``dims.dp_rank``) and draw the same noise (seeded by the data stream); the engine cuts each
  micro-batch into ``cp`` contiguous slices of ``L / cp`` positions (``mmgen/sequence_shard.py``)
  and each rank keeps its own. Embedders, blocks (norms, FFN, MoE routing), heads and losses
  run on the slice only.
* attention: each block's queries/keys/values ``[B, H, L/cp, D]`` are exchanged by one
  all-to-all per tensor into ``[B, H/cp, L, D]`` (every position, a ``1/cp`` share of the
  heads), attention runs with the whole sequence's segment-table mask (SDPA with a boolean
  mask on CPU, FlexAttention on CUDA; every rank compiles the mask of all positions), and one
  more all-to-all brings the output back to ``[B, H, L/cp, D]``. Key/value heads split the same
  way when ``cp`` divides their number; otherwise (GQA with ``n_kv_heads < cp``, e.g. one KV
  head) each is first repeated just enough times that the copies split evenly and every rank
  still holds the KV head of each of its query heads (:func:`kv_repeats`).
* losses: each rank's loss is its positions' sum over the *global* count (counted on the whole
  batch, summed over data-parallel peers, as without cp); summing the ranks' losses gives the
  unsharded loss, so the engine sums the logged loss over the cp group, and gradients are
  summed over data x context-parallel peers (DDP's group / FSDP2's mesh is ``dp_cp``).

The all-to-alls are autograd functions whose backward is the opposite all-to-all.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from mmgen.batch import MultimodalBatch
from mmgen.sequence_shard import slice_batch


# ---------------------------------------------------------------- the all-to-alls

def _seq_to_heads(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """``[B, H, L/cp, D]`` (this rank's positions, all heads) -> ``[B, H/cp, L, D]`` (all
    positions, this rank's share of the heads)."""
    b, h, lc, d = x.shape
    # chunk j of the heads goes to rank j; what arrives from rank j is its slice of positions
    send = x.reshape(b, size, h // size, lc, d).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // size, size * lc, d)


def _heads_to_seq(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """The inverse of :func:`_seq_to_heads`: ``[B, H/cp, L, D]`` -> ``[B, H, L/cp, D]``."""
    b, hc, length, d = x.shape
    lc = length // size
    send = x.reshape(b, hc, size, lc, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape(b, size * hc, lc, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        return _seq_to_heads(x, group, size)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group, ctx.size), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        return _heads_to_seq(x, group, size)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group, ctx.size), None, None


def kv_repeats(n_heads: int, n_kv_heads: int, cp: int) -> int:
    """How many copies of each key/value head the all-to-all needs: 1 when ``cp`` divides
    ``n_kv_heads``; else the fewest copies ``r`` with ``cp | n_kv_heads * r`` that keep whole
    query groups per rank (``r`` divides the group size ``n_heads / n_kv_heads``)."""
    if n_kv_heads % cp == 0:
        return 1
    group = n_heads // n_kv_heads
    r = cp // math.gcd(n_kv_heads, cp)
    return r if group % r == 0 else group   # group: every query head its own copy


class UlyssesExchange:
    """The ``exchange(q, k, v, attend_fn)`` of one context-parallel group (see the module
    docstring); ``attend_fn`` is ``mmgen.models.attention.attend`` bound to the whole mask.

    Args:
        group: the context-parallel process group.
        size: its number of ranks.
    """

    def __init__(self, group, size: int):
        self.group, self.size = group, size

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 attend_fn: Callable) -> torch.Tensor:
        n_heads, n_kv = q.shape[1], k.shape[1]
        if n_heads % self.size:
            raise ValueError(f"{n_heads} attention heads do not split over parallel.cp={self.size} ranks")
        reps = kv_repeats(n_heads, n_kv, self.size)
        if reps > 1:
            # copies next to their original: head j of the repeated keys serves the query
            # heads of original head j // reps, which stays true after the split
            k, v = k.repeat_interleave(reps, dim=1), v.repeat_interleave(reps, dim=1)
        q, k, v = (_SeqToHeads.apply(t, self.group, self.size) for t in (q, k, v))
        return _HeadsToSeq.apply(attend_fn(q, k, v), self.group, self.size)


# ---------------------------------------------------------------- the engine's side

class ContextParallel:
    """This rank's place in its context-parallel group: cuts micro-batches, sums losses.

    Args:
        dims: the run's ParallelDims (``cp > 1``).
        device_type: "cpu" or "cuda" (which mesh).
    """

    def __init__(self, dims, device_type: str):
        self.rank, self.size = dims.cp_rank, dims.cp
        self.group = dims.cp_group(device_type)
        self.exchange = UlyssesExchange(self.group, self.size)

    def shard(self, batch: MultimodalBatch) -> MultimodalBatch:
        """This rank's slice of the whole micro-batch ``batch``."""
        return slice_batch(batch, self.rank, self.size, self.exchange)

    def sum_losses(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each loss summed over the group: a rank's loss covers its positions only."""
        keys = sorted(sums)
        flat = torch.stack([torch.as_tensor(sums[k]).float().reshape(()) for k in keys])
        dist.all_reduce(flat, group=self.group)
        return {k: flat[i] for i, k in enumerate(keys)}


def check_model(cfg, model, seq_len: int) -> None:
    """Start-up checks of ``parallel.cp`` against the architecture; ValueError, one line.

    Args:
        cfg: the ParallelConfig (``cp > 1``).
        model: the ModelConfig.
        seq_len: ``data.seq_len``.
    """
    if seq_len % cfg.cp:
        raise ValueError(f"data.seq_len={seq_len} is not divisible by the context-parallel degree "
                         f"parallel.cp={cfg.cp}: every rank keeps seq_len / cp positions of each row")
    if model.n_heads % cfg.cp:
        raise ValueError(f"model.n_heads={model.n_heads} is not divisible by parallel.cp={cfg.cp}: Ulysses "
                         f"splits the attention heads over the context-parallel ranks")
