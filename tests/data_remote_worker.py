# One torchrun launch (2 ranks, gloo) of every remote-data case: local vs HTTP vs S3, resume, faults.
"""argv: a JSON list of cases and an output folder. A case is
``{"name", "pattern", "workers", "batches", "resume_at"?, "resume_pattern"?, "remote"?}``:
the rank reads ``batches`` batches with an all-reduce per batch (a training step's collective),
recording every batch's (epoch, key) list; with ``resume_at`` it also saves the state after that
many batches, builds a new loader on ``resume_pattern`` and reads the rest from the state.
Each rank writes ``<out>/<name>_rank<r>.json``."""
from __future__ import annotations

import json
import logging
import os
import sys

import torch
import torch.distributed as dist

from mmgen.data import DataConfig, build_dataloader
from mmgen.data.config import RemoteConfig
from mmgen.models.tokenizers.text import ByteTokenizer

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def loader_for(pattern: str, case: dict, rank: int, world: int):
    cfg = DataConfig(train_shards=pattern, batch_size=2, seq_len=128, num_workers=case["workers"],
                     remote=RemoteConfig(**case.get("remote", {})))
    return build_dataloader(cfg, ByteTokenizer(), rank, world)


def read(loader, n: int) -> list:
    out, it = [], iter(loader)
    for _ in range(n):
        batch = next(it)
        t = torch.ones(1)
        dist.all_reduce(t)                 # a rank that hung would stall the other here
        assert int(t) == dist.get_world_size()
        out.append([[e, k] for e, k in zip(batch.meta["epoch"], batch.meta["key"])])
    return out


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cases, out_dir = json.loads(sys.argv[1]), sys.argv[2]
    for case in cases:
        loader = loader_for(case["pattern"], case, rank, world)
        result = {"batches": read(loader, case["batches"])}
        result["stats"] = loader.stats()
        if "resume_at" in case:
            first = loader_for(case["pattern"], case, rank, world)
            head = read(first, case["resume_at"])
            state = json.loads(json.dumps(first.state_dict()))   # as a checkpoint stores it
            again = loader_for(case["resume_pattern"], case, rank, world)
            again.load_state_dict(state)
            result["resumed"] = head + read(again, case["batches"] - case["resume_at"])
        dist.barrier()
        with open(os.path.join(out_dir, f"{case['name']}_rank{rank}.json"), "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
