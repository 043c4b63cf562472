# Trains the golden cases (20 fp32 CPU steps of the debug flavor) and writes their loss curves.
"""Run by tests/test_goldens.py, and by hand to re-record (see tests/goldens/README.md):

    python tests/goldens/worker.py --cases single,accum2 --shapes DIR --out DIR
    torchrun --standalone --nproc-per-node 2 tests/goldens/worker.py --cases ddp,zero2,fsdp2 ...

Every case trains through the real Trainer (the code path of ``mmgen-train``) on the shapes
shards the test makes with a fixed seed. Rank 0 writes ``OUT/<case>.json``: per step the
losses, grad norm and LR as floats and as exact hex strings (``float.hex``), so a comparison
can tell bit-identical from merely close.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mmgen.cli.preflight import compose_job  # noqa: E402
from mmgen.parallel.dist import barrier, init_distributed  # noqa: E402

# fp32 on CPU, one thread: deterministic, so a run is bit-identical to its golden on one machine
BASE = ["experiment=smoke", "model=debug", "data.seq_len=128", "data.batch_size=4", "data.num_workers=0",
        "trainer.steps=20", "trainer.log_every=1", "trainer.num_threads=1", "trainer.precision=fp32",
        "trainer.device=cpu", "metrics.progress=false", "optim.warmup_steps=5", "checkpoint.enabled=false",
        "trainer.seed=1234"]
CASES = {
    # name: (world size, overrides)
    "single": (1, []),
    "accum2": (1, ["trainer.grad_accum=2"]),
    "ddp": (2, []),
    "zero2": (2, ["parallel=zero2"]),
    "fsdp2": (2, ["parallel=fsdp2"]),
    "megatron": (2, ["parallel=megatron"]),   # TP=1 x DP=2: megatron DDP, optimizer, schedule
}
KEYS = ("loss/text", "loss/visual", "loss/total", "optim/grad_norm", "optim/lr")


def curve(metrics: Path) -> list[dict]:
    out = []
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if "loss/total" not in rec:
            continue
        vals = {k: float(rec[k]) for k in KEYS if k in rec}
        out.append({"step": rec["step"], **vals, "hex": {k: v.hex() for k, v in vals.items()}})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", required=True)
    p.add_argument("--shapes", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    dist = init_distributed("cpu", "gloo", 5.0)
    from mmgen.trainer.trainer import Trainer

    out = Path(a.out)
    for name in a.cases.split(","):
        world, extra = CASES[name]
        if world != dist.world_size:
            raise SystemExit(f"case {name} needs {world} process(es), launched with {dist.world_size}")
        run_dir = out / "runs" / name
        job = compose_job([*BASE, *extra, f"data.train_shards={a.shapes}/train",
                           f"data.val_shards={a.shapes}/val", f"run_dir={run_dir}", f"name=golden_{name}"])
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        Trainer(job, dist).train()
        barrier()
        if dist.is_main:
            (out / f"{name}.json").write_text(json.dumps(
                {"case": name, "world_size": world, "overrides": extra, "curve": curve(run_dir / "metrics.jsonl")},
                indent=1))
        barrier()


if __name__ == "__main__":
    main()
