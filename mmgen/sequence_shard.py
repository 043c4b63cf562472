# A context-parallel rank's slice of a packed batch: its positions, plus what it needs of the whole.
"""Under context (sequence) parallelism (``parallel.cp > 1``; mmgen/parallel/context.py) the
``cp`` ranks of one data-parallel rank read the same rows, and each keeps one contiguous slice
of ``L / cp`` positions of every row. :func:`slice_batch` cuts that slice out of a batch: every
``[B, L]`` field, the ``patches`` rows of the continuous positions inside it, and the span table
whole (span ids index it, and each span's flow time is drawn once per span). Positions and
coords are the global ones, so RoPE and visual position codes need nothing special.

Two things cannot be derived from the slice alone, so the sliced batch carries a
:class:`SequenceShard` in ``meta[SEQUENCE_SHARD]``:

* the whole batch, from which the model compiles the attention mask over all ``L`` positions
  (the segment table spans slices: a visual span or a document may cross a slice boundary);
* ``patch_rows`` (which rows of the whole batch's ``patches`` this slice holds), so an
  objective draws its noise for the whole batch and keeps its rows: every rank sees the numbers
  one process would draw, and the loss equals the unsharded one;
* ``exchange(q, k, v, attend_fn)``: the communication around attention (the Ulysses
  all-to-all), injected by the parallel layer so the model files import no torch.distributed.

This file sits beside ``mmgen/batch.py`` (torch only), below models and objectives.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from mmgen.batch import MultimodalBatch

SEQUENCE_SHARD = "sequence_shard"

# exchange(q, k, v, attend_fn) -> out: q ``[B, H, L/cp, D]``, k/v ``[B, H_kv, L/cp, D]`` in,
# attend_fn run on whole-sequence tensors, out ``[B, H, L/cp, D]``
Exchange = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Callable], torch.Tensor]


@dataclass
class SequenceShard:
    """What a sliced batch knows of the whole (module docstring).

    Args:
        rank, size: this slice's index and the number of slices (``cp``).
        full: the whole batch the slice was cut from.
        patch_rows: ``[N_local]`` long, rows of ``full.patches`` inside this slice (row-major).
        exchange: the attention communication of the context-parallel group.
    """

    rank: int
    size: int
    full: MultimodalBatch
    patch_rows: torch.Tensor
    exchange: Exchange


def shard_of(batch: MultimodalBatch) -> SequenceShard | None:
    """The batch's :class:`SequenceShard`, or None for a whole batch."""
    return batch.meta.get(SEQUENCE_SHARD)


def slice_batch(batch: MultimodalBatch, rank: int, size: int, exchange: Exchange) -> MultimodalBatch:
    """Slice ``rank`` of ``size`` of every row of ``batch`` (contiguous positions).

    Args:
        batch: the whole micro-batch (the same on every rank of the group).
        rank, size: the slice and the number of slices; ``size`` divides the row length.
        exchange: see :class:`SequenceShard`.
    """
    length = batch.shape[1]
    if length % size:
        raise ValueError(f"a row of {length} positions does not split into {size} equal slices")
    step = length // size
    cols = slice(rank * step, (rank + 1) * step)
    cont = batch.continuous_mask()
    row_of = torch.full(cont.shape, -1, dtype=torch.long, device=cont.device)
    row_of[cont] = torch.arange(int(cont.sum()), device=cont.device)
    patch_rows = row_of[:, cols][cont[:, cols]]
    cut = lambda t: t[:, cols]   # noqa: E731
    shard = SequenceShard(rank, size, batch, patch_rows, exchange)
    return replace(batch, tokens=cut(batch.tokens), targets=cut(batch.targets), positions=cut(batch.positions),
                   modality=cut(batch.modality), document_ids=cut(batch.document_ids),
                   span_ids=cut(batch.span_ids), coords=cut(batch.coords),
                   patches=batch.patches[patch_rows],
                   loss_masks={k: cut(v) for k, v in batch.loss_masks.items()},
                   meta={**batch.meta, SEQUENCE_SHARD: shard})
