# The megatron backend's 2-rank cases in one torchrun launch: TP/SP/PP parity, checkpoints, export.
"""Run by tests/test_megatron.py as
``torchrun --nproc-per-node 2 tests/megatron_worker.py --shapes DIR --out DIR``.

Each case trains through the real Trainer (the code path of ``mmgen-train``). TP=2, TP=2+SP and
PP=2 on 2 ranks are one data-parallel rank, so they read the one-process data stream and must
reproduce tests/goldens/single.json. One launch: ``import megatron.core`` costs 8-14 s a process.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmgen.cli.preflight import compose_job  # noqa: E402
from mmgen.parallel.dist import DistInfo, barrier, init_distributed  # noqa: E402
from tests.goldens.worker import BASE, curve  # noqa: E402

MEGATRON = ["parallel=megatron"]


class Cases:
    def __init__(self, shapes: Path, out: Path, dist: DistInfo):
        self.shapes, self.out, self.dist = shapes, out, dist
        self.results: dict = {}

    def trainer(self, name: str, overrides: list[str]):
        from mmgen.trainer.trainer import Trainer

        job = compose_job([*BASE, "data.num_workers=0", *overrides, f"data.train_shards={self.shapes}/train",
                           f"data.val_shards={self.shapes}/val", f"run_dir={self.out / name}", f"name={name}"])
        if self.dist.is_main:
            Path(job.run_dir).mkdir(parents=True, exist_ok=True)
        barrier()
        return Trainer(job, self.dist)

    def record(self, name: str, **values) -> None:
        self.results.setdefault(name, {}).update(values)

    def train_curve(self, name: str, overrides: list[str]):
        t = self.trainer(name, overrides)
        t.train()
        if self.dist.is_main:
            self.record(name, curve=curve(self.out / name / "metrics.jsonl"))
        barrier()
        return t

    # -- cases --------------------------------------------------------------------------
    def tp2(self) -> None:
        """TP=2 (dp=1): the one-process golden, 20 steps."""
        t = self.train_curve("tp2", [*MEGATRON, "parallel.tp=2"])
        self.record("tp2", dims=t.engine.dims.degrees(),
                    local_qkv_rows=t.engine.stage.layers[0].attention.linear_qkv.weight.shape[0])

    def tp2_sp(self) -> None:
        self.train_curve("tp2_sp", [*MEGATRON, "parallel.tp=2", "parallel.sequence_parallel=true"])

    def pp2(self) -> None:
        """PP=2 with 2 micro-batches per step (1F1B), against the grad_accum=2 golden."""
        t = self.train_curve("pp2", [*MEGATRON, "parallel.pp=2", "trainer.grad_accum=2"])
        self.record("pp2", layer_ids=[list(t.engine.stage.layer_ids)], first=t.engine.stage.first)


ORDER = ["tp2", "tp2_sp", "pp2"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default=",".join(ORDER))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    dist = init_distributed("cpu", "gloo", 5.0)
    cases = Cases(args.shapes, args.out, dist)
    timings, failed = {}, None
    for name in [c for c in ORDER if c in args.only.split(",")]:
        t0 = time.time()
        try:
            getattr(cases, name)()
        except Exception:  # noqa: BLE001 - reported to the test, which fails with the traceback
            failed = f"case {name} on rank {dist.rank}:\n{traceback.format_exc()}"
            print(failed, file=sys.stderr, flush=True)
            break
        timings[name] = round(time.time() - t0, 2)
    if dist.is_main:
        cases.results["_timings"] = timings
        cases.results["_failed"] = failed
        (args.out / "results.json").write_text(json.dumps(cases.results, indent=1))
    if failed:
        os._exit(1)  # the other rank may wait in a collective forever


if __name__ == "__main__":
    main()
