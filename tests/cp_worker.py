# Context (Ulysses) parallelism's 2-rank cases in one torchrun launch: attention parity, training parity.
"""Run by tests/test_context_parallel.py as
``torchrun --nproc-per-node 2 tests/cp_worker.py --shapes DIR --out DIR``.

* ``attention``: the Ulysses exchange around ``attend`` against unsharded ``attend`` on the same
  fp32 tensors with a packed segment-table mask (documents, FULL and CAUSAL spans, a hidden
  span, padding), forward and gradients of q/k/v, for 4 query heads with 4, 2 and 1 KV heads
  (the last replicates KV heads: 1 < cp);
* ``ddp_cp2`` / ``fsdp2_cp2``: the debug flavor trained through the real Trainer at cp=2
  (dp=1: one data stream) against the one-process curve tests/goldens/single.json.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmgen.cli.preflight import compose_job  # noqa: E402
from mmgen.parallel.dist import DistInfo, barrier  # noqa: E402
from tests.worker_main import run_cases  # noqa: E402
from tests.goldens.worker import BASE, curve  # noqa: E402


def packed_layout(batch: int, length: int):
    """A segment table's mask inputs: two packed documents per row, a FULL visual span crossing
    the middle of the row (so across the two ranks' slices), a CAUSAL span, a span hidden from
    later positions, and padding at the end."""
    from mmgen.models.attention import MaskLayout

    doc = torch.full((batch, length), -1, dtype=torch.long)
    span = torch.full((batch, length), -1, dtype=torch.long)
    full = torch.zeros(batch, length, dtype=torch.bool)
    hidden = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        cut, end = length // 2 + 3 + b, length - 5 - b
        doc[b, :cut], doc[b, cut:end] = 0, 1
        s0 = slice(length // 2 - 6, length // 2 + 2)        # FULL, crosses the slice boundary
        span[b, s0], full[b, s0] = 3 * b, True
        s1 = slice(5, 11)                                   # CAUSAL, hidden from what follows
        span[b, s1], hidden[b, s1] = 3 * b + 1, True
        s2 = slice(cut + 2, cut + 9)                         # FULL, in the second document
        span[b, s2], full[b, s2] = 3 * b + 2, True
    return MaskLayout(doc, span, full, hidden)


class Cases:
    def __init__(self, shapes: Path, out: Path, dist: DistInfo):
        self.shapes, self.out, self.dist = shapes, out, dist
        self.results: dict = {}

    def record(self, name: str, **values) -> None:
        self.results.setdefault(name, {}).update(values)

    def attention(self) -> None:
        import torch.distributed as tdist

        from mmgen.models.attention import attend, build_dense_mask
        from mmgen.parallel.context import UlyssesExchange

        cp, rank = self.dist.world_size, self.dist.rank
        exchange = UlyssesExchange(None, cp)
        b, length, d, heads = 2, 64, 8, 4
        cols = slice(rank * length // cp, (rank + 1) * length // cp)
        mask = build_dense_mask(packed_layout(b, length))
        worst = {}
        for n_kv in (4, 2, 1):
            g = torch.Generator().manual_seed(7 + n_kv)      # the same tensors on both ranks
            q = torch.randn(b, heads, length, d, generator=g)
            k, v = (torch.randn(b, n_kv, length, d, generator=g) for _ in range(2))
            w = torch.randn(b, heads, length, d, generator=g)   # a loss that weighs every output
            ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
            ref = attend(*ref_in, mask)
            (ref * w).sum().backward()
            loc_in = [t[:, :, cols].clone().requires_grad_() for t in (q, k, v)]
            out = exchange(*loc_in, functools.partial(attend, mask=mask))
            # each rank back-propagates its own positions' share; the all-to-all's backward
            # returns the other rank's share of the keys/values' gradient
            (out * w[:, :, cols]).sum().backward()
            errs = [(out - ref[:, :, cols]).abs().max()]
            errs += [(a.grad - r.grad[:, :, cols]).abs().max() for a, r in zip(loc_in, ref_in)]
            err = torch.stack(errs)
            tdist.all_reduce(err, op=tdist.ReduceOp.MAX)
            worst[str(n_kv)] = [float(e) for e in err.detach()]      # out, dq, dk, dv
        self.record("attention", worst=worst)

    def train_curve(self, name: str, overrides: list[str]) -> None:
        from mmgen.trainer.trainer import Trainer

        run_dir = self.out / name
        job = compose_job([*BASE, *overrides, f"data.train_shards={self.shapes}/train",
                           f"data.val_shards={self.shapes}/val", f"run_dir={run_dir}", f"name={name}"])
        if self.dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        t = Trainer(job, self.dist)
        t.train()
        if self.dist.is_main:
            self.record(name, curve=curve(run_dir / "metrics.jsonl"), dims=t.engine.dims.degrees(),
                        ddp_wrapped=type(t.engine.model).__name__)
        barrier()

    def ddp_cp2(self) -> None:
        self.train_curve("ddp_cp2", ["parallel=ddp", "parallel.cp=2"])

    def fsdp2_cp2(self) -> None:
        self.train_curve("fsdp2_cp2", ["parallel=fsdp2", "parallel.cp=2", "trainer.steps=5"])


ORDER = ["attention", "ddp_cp2", "fsdp2_cp2"]


def main() -> None:
    run_cases(Cases, ORDER)


if __name__ == "__main__":
    main()
