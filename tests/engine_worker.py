# The engine's layout cases in one torchrun launch: same initial weights, DP-group reductions, meta.json.
"""Run by tests/test_engine.py as
``torchrun --nproc-per-node 2 tests/engine_worker.py --shapes DIR --out DIR``.

Every case builds the real Trainer (the code path of ``mmgen-train``) on both ranks and
records what the test asserts on; rank 0 writes ``OUT/results.json``. One launch, because each
start (plus ``import deepspeed``) costs ~15 s on 2 cores.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmgen.cli.preflight import compose_job  # noqa: E402
from mmgen.parallel.dist import DistInfo, all_reduce_sum, barrier  # noqa: E402
from tests.worker_main import run_cases  # noqa: E402
from tests.goldens.worker import BASE, curve  # noqa: E402

TINY = ["experiment=smoke", "model=debug", "data.seq_len=128", "data.batch_size=4", "data.num_workers=0",
        "trainer.log_every=1", "trainer.num_threads=1", "trainer.precision=fp32", "trainer.device=cpu",
        "metrics.progress=false", "optim.warmup_steps=2", "trainer.seed=1234"]
# tiny test models do not really partition under ZeRO-3 unless every parameter is sharded
ZERO3 = ["parallel=zero3", "parallel.stage3_param_persistence_threshold=0"]


class Cases:
    def __init__(self, shapes: Path, out: Path, dist: DistInfo):
        self.shapes, self.out, self.dist = shapes, out, dist
        self.results: dict = {}

    def trainer(self, name: str, overrides: list[str]):
        from mmgen.trainer.trainer import Trainer

        job = compose_job([*overrides, f"data.train_shards={self.shapes}/train", f"data.val_shards={self.shapes}/val",
                           f"run_dir={self.out / name}", f"name={name}"])
        if self.dist.is_main:
            Path(job.run_dir).mkdir(parents=True, exist_ok=True)
        barrier()
        return Trainer(job, self.dist)

    def record(self, name: str, **values) -> None:
        self.results.setdefault(name, {}).update(values)

    # -- cases --------------------------------------------------------------------------
    def init(self) -> None:
        """The initial weights of DDP, FSDP2 (with activation checkpointing and compile applied
        before the sharding) and ZeRO-3, gathered at step 0, against one process's."""
        from mmgen.models import build_model

        layouts = {"ddp": ["parallel=ddp"],
                   "fsdp2": ["parallel=fsdp2", "parallel.activation_checkpointing=torch", "trainer.compile=true"],
                   "zero3": ZERO3}
        full = {}
        for name, extra in layouts.items():
            t = self.trainer(f"init_{name}", [*TINY, *extra, "checkpoint.enabled=false"])
            full[name] = t.engine.model_state_dict()  # collective: gathers the shards onto rank 0
            local = sum(_local_numel(p) for p in t.engine.module.parameters())
            total = sum(getattr(p, "ds_numel", p.numel()) for p in t.engine.module.parameters())
            blocks = t.engine.module.layers
            self.record("init", **{f"{name}_local_fraction": local / total,
                                   f"{name}_compiled": all(getattr(b, "_compiled_call_impl", None) is not None
                                                           for b in blocks),
                                   f"{name}_checkpointed": all(getattr(b, "_mmgen_checkpointing", None) == "torch"
                                                               for b in blocks)})
            job = t.job
            del t
        if self.dist.is_main:
            torch.manual_seed(job.trainer.seed)
            single = build_model(job.model, device="cpu").state_dict()  # one process, no backend
            for name, state in full.items():
                self.record("init", **{f"{name}_keys_equal": state.keys() == single.keys(),
                                       f"{name}_equal": all(torch.equal(state[k], single[k]) for k in single)})
            # a different seed gives different weights: the comparison can fail
            torch.manual_seed(job.trainer.seed + 1)
            other = build_model(job.model, device="cpu").state_dict()
            self.record("init", other_seed_equal=all(torch.equal(other[k], single[k]) for k in single))
        barrier()

    def dp_subgroup(self) -> None:
        """Two ranks that are one data-parallel rank (the data-parallel side of TP=2): both read
        stream 0, and counts and losses are summed over the data-parallel group only, so the
        curve is the one-process golden (a sum over all ranks would double the denominators)."""
        from mmgen.parallel import ParallelDims

        layout = ParallelDims(world_size=2, rank=self.dist.rank, dp=1, tp=2)
        original = ParallelDims.from_config
        # ParallelConfig has no tp field yet (the megatron issue adds it): hand the trainer the
        # layout such a config will give
        ParallelDims.from_config = classmethod(lambda cls, cfg, world, rank: layout)
        try:
            t = self.trainer("dp1_tp2", [*BASE, "data.num_workers=0"])
            t.train()
        finally:
            ParallelDims.from_config = original
        e = t.engine
        group_sum = float(all_reduce_sum(torch.ones(()), e.dp_group))
        world_sum = float(all_reduce_sum(torch.ones(())))
        mine = {"dp_rank": e.dp_rank, "dp_size": e.dp_size, "group_sum": group_sum, "world_sum": world_sum,
                "stream0": t.stream(0), "wrapped": type(e.model).__name__}
        every = [None, None]
        tdist.all_gather_object(every, mine)
        self.record("dp_subgroup", **{f"rank{r}": v for r, v in enumerate(every)})
        weights = torch.cat([p.detach().flatten() for p in e.module.parameters()])
        gathered = [torch.empty_like(weights) for _ in range(2)]
        tdist.all_gather(gathered, weights)
        if self.dist.is_main:
            self.record("dp_subgroup", curve=curve(self.out / "dp1_tp2" / "metrics.jsonl"),
                        ranks_equal=torch.equal(gathered[0], gathered[1]))
        barrier()

    def meta_export(self) -> None:
        """meta.json names the layout; export reads the backend from it (and, for checkpoints
        from before that field, from the files), giving the engine's weights bit for bit."""
        from mmgen.checkpoint.export import consolidated_state_dict

        for name, extra in {"ddp": ["parallel=ddp"], "fsdp2": ["parallel=fsdp2"], "zero2": ["parallel=zero2"],
                            "zero3": ZERO3}.items():
            t = self.trainer(f"meta_{name}", [*TINY, *extra, "trainer.steps=2", "checkpoint.every=2"])
            t.train()
            engine_state = t.engine.model_state_dict()
            if self.dist.is_main:
                ckpt = self.out / f"meta_{name}" / "checkpoints" / "step_0000002"
                meta = json.loads((ckpt / "meta.json").read_text())
                exported = consolidated_state_dict(ckpt)
                # the same checkpoint as an older mmgen wrote it: no layout fields in meta.json
                old = self.out / f"meta_{name}_old" / "step_0000002"
                shutil.copytree(ckpt, old)
                (old / "meta.json").write_text(json.dumps({k: meta[k] for k in ("step", "world_size", "time")}))
                legacy = consolidated_state_dict(old)
                self.record(f"meta_{name}", meta={k: meta.get(k) for k in ("backend", "parallel", "world_size")},
                            versions=meta.get("versions", {}),
                            export_equal=_equal(exported, engine_state), legacy_export_equal=_equal(legacy, engine_state))
            barrier()
            del t


    def moe_zero3(self) -> None:
        """An MoE model under ZeRO-3 trains like DDP (the router's outputs are a NamedTuple,
        so ZeRO-3's hooks gather its weight again in the backward)."""
        for name, extra in {"moe_ddp": ["parallel=ddp"], "moe_zero3": ZERO3}.items():
            t = self.trainer(name, [*TINY, "model=moe_debug", *extra, "trainer.steps=3", "checkpoint.every=100"])
            t.train()
            if self.dist.is_main:
                self.record("moe_zero3", **{name: curve(self.out / name / "metrics.jsonl")})
            barrier()
            del t


def _local_numel(p: torch.Tensor) -> int:  # (numel of a DTensor is its global size)
    """Elements this rank stores of a parameter: a DTensor's local shard, a ZeRO-3 partition."""
    if hasattr(p, "to_local"):
        return p.to_local().numel()
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.numel()
    return p.numel()


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


ORDER = ["init", "dp_subgroup", "meta_export", "moe_zero3"]


def main() -> None:
    run_cases(Cases, ORDER)


if __name__ == "__main__":
    main()
