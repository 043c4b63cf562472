# Weighted sample-level mixing of sources, with its own seeded generator saved in checkpoints.
"""Each logical worker draws, before every document, which source provides it: source ``s``
with probability ``weights[s]``. The draws come from a NumPy PCG64 generator owned by the
worker (never Python's global ``random``, which webdataset's ``RandomMix`` uses), seeded from
``(seed, rank, world_size, worker, resplits)``; its ``bit_generator.state`` is part of the loader
state, taken before the draw of the first document not in an emitted batch, so a resumed run
draws the same sources in the same order.

Mixing is per document, not per shard: every batch is a mixture, and a source's share of the
documents converges to its weight (binomial noise: with ``n`` documents the share of a source of
weight ``w`` has standard deviation ``sqrt(w (1 - w) / n)``).
"""
from __future__ import annotations

import bisect
import copy

import numpy as np


class Mixer:
    """Chooses a source per document. With one source it draws nothing (state stays None), so a
    single-source run is independent of the mixing machinery."""

    def __init__(self, weights: dict[str, float], seed_parts: tuple[int, ...],
                 state: dict | None = None):
        self.names = [n for n, w in weights.items() if w > 0]   # a 0-weight source is never read
        total = sum(weights[n] for n in self.names)
        cum, acc = [], 0.0
        for n in self.names:
            acc += weights[n] / total
            cum.append(acc)
        cum[-1] = 1.0
        self.cum = cum
        self.rng = None
        if len(self.names) > 1:
            self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
                [int(p) for p in seed_parts])))
            if state is not None:
                self.rng.bit_generator.state = copy.deepcopy(state)

    def state(self) -> dict | None:
        """The generator's state (plain ints and strings), None for one source."""
        return None if self.rng is None else self.rng.bit_generator.state

    def choose(self) -> str:
        if self.rng is None:
            return self.names[0]
        return self.names[min(bisect.bisect_right(self.cum, self.rng.random()), len(self.names) - 1)]
