# Accumulation streams: a rank with grad_accum A reads A data streams, one per micro-batch.
"""Micro-batch ``a`` of rank ``r`` (of ``W`` ranks) reads stream ``a * W + r`` of ``W * A``
streams, so the global batches depend on ``W * A`` only (README.md "Streams"). Each stream is a
``MultimodalLoader`` (mmgen/data/loader.py) laid out as that rank of a ``W * A``-rank job.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterator

from mmgen.batch import MultimodalBatch
from mmgen.data.resume import STATE_VERSION
from mmgen.data.stats import loader_stats


def stream_index(rank: int, world_size: int, micro: int) -> int:
    """The data stream of micro-batch ``micro`` of an optimizer step on ``rank``."""
    return micro * world_size + rank


class AccumLoader:
    """The loader of one rank when ``grad_accum`` > 1: micro-batch ``a`` of every optimizer step
    comes from data stream ``a * world_size + rank`` of ``world_size * grad_accum`` streams, each
    a ``MultimodalLoader`` of its own (README.md "Streams"). The streams depend only on the
    global batch layout, so 1 rank x ``grad_accum`` N and N ranks x 1 train on the same global
    batches. Each stream runs ``num_workers`` DataLoader workers of its own.
    """

    def __init__(self, loaders: list, rank: int, world_size: int):  # of MultimodalLoader (loader.py)
        self.loaders, self.rank, self.world_size = loaders, rank, world_size
        self.sources = loaders[0].sources
        self._next = 0       # the stream whose batch is due next (0 at every step boundary)

    def __iter__(self) -> Iterator[MultimodalBatch]:
        iters = [iter(loader) for loader in self.loaders]
        while True:
            batch = next(iters[self._next])
            self._next = (self._next + 1) % len(self.loaders)
            yield batch

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "grad_accum": len(self.loaders), "next": self._next,
                "streams": [loader.state_dict() for loader in self.loaders]}

    def same_layout(self, state: dict | None) -> bool:
        streams = (state or {}).get("streams")
        return (streams is not None and len(streams) == len(self.loaders)
                and all(l.same_layout(s) for l, s in zip(self.loaders, streams)))

    def load_state_dict(self, state: dict) -> None:
        """This rank's own state (same layout), or ``{"ranks": [...]}``: every old rank's state,
        from any layout (re-split per stream)."""
        if "ranks" in state:
            for loader in self.loaders:
                loader.load_state_dict(state)
            self._next = 0
            return
        if not self.same_layout(state):
            raise ValueError(f"data: cannot resume: the state is not from {len(self.loaders)} "
                             f"accumulation streams of rank {self.rank} of {self.world_size}; a "
                             f"layout change needs every old rank's state: "
                             f"load_state_dict({{'ranks': [...]}})")
        for loader, st in zip(self.loaders, state["streams"]):
            loader.load_state_dict(st)
        self._next = int(state.get("next", 0))

    def stats(self) -> dict:
        totals: Counter[str] = Counter()
        for loader in self.loaders:
            totals.update(loader._totals)
        return loader_stats(self.sources, [w for l in self.loaders for w in l._workers], totals,
                            sum(l._batches for l in self.loaders))
