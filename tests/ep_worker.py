# Expert-parallel cases (EP=2 vs EP=1) in one torchrun launch: the layer, then the trainer under DDP and FSDP2.
"""Run by tests/test_ep.py as ``torchrun --nproc-per-node 2 tests/ep_worker.py --out DIR
[--shapes DIR]``; rank 0 writes ``OUT/results.json``: the layer cases' largest differences and,
with ``--shapes``, per trainer case (moe_debug through the real Trainer, ``parallel.ep``=1 and 2
under ddp and fsdp2) its loss curve, the resumed run's curve and weights, and the export."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmgen.models import ModelConfig  # noqa: E402
from mmgen.models.moe import MoEFeedForward  # noqa: E402
from mmgen.parallel.ep import apply_expert_parallel, expert_param_names, reduce_expert_grads  # noqa: E402

BASE = ModelConfig(dim=16, n_heads=2, n_kv_heads=1, ffn_dim=24, block="moe", moe_experts=4, moe_top_k=2,
                   moe_ffn_dim=32)
CASES = {
    "dropless_loop": dict(moe_experts_impl="loop"),
    "dropless_grouped_sigmoid_shared": dict(moe_experts_impl="grouped", moe_score="sigmoid", moe_shared_experts=1),
    "capacity_grouped": dict(moe_experts_impl="grouped", moe_capacity_factor=0.75),
    "skewed_one_rank_gets_nothing": dict(moe_experts_impl="loop", moe_top_k=1),
}


def run_case(name: str, kw: dict, rank: int, world: int) -> dict:
    cfg = dataclasses.replace(BASE, **kw)
    torch.manual_seed(0)                  # the same weights on every rank
    ref = MoEFeedForward(cfg)
    ref.init_weights(0.3, 0.3)
    if name.startswith("skewed"):         # every token to experts 0/1: rank 1's experts get no rows
        with torch.no_grad():
            ref.router.weight.zero_()
            ref.router.weight[0, 0] = 10.0
    ep = copy.deepcopy(ref)
    apply_expert_parallel(ep, None)
    gen = torch.Generator().manual_seed(100 + rank)   # each rank its own tokens
    x = torch.randn(37 + 5 * rank, 16, generator=gen)
    if name.startswith("skewed"):
        x[:, 0] = 1.0
    g = torch.randn(x.shape, generator=gen)
    # EP=1: each rank runs all experts on its own tokens; the true expert gradient sums the ranks
    x1 = x.clone().requires_grad_(True)
    y1, _ = ref(x1)
    (y1 * g).sum().backward()
    # EP=2, as under DDP: the local loss scaled by the data-parallel size, then reduced
    x2 = x.clone().requires_grad_(True)
    y2, _ = ep(x2)
    ((y2 * g).sum() * world).backward()
    reduce_expert_grads(ep, world)
    out = {"y": float((y2 - y1).detach().abs().max()), "x_grad": float((x2.grad / world - x1.grad).abs().max()),
           "expert_params": expert_param_names(ep)}
    lo, hi = rank * 2, rank * 2 + 2
    worst = 0.0
    for pname in ("w1", "w3", "w2"):
        full = getattr(ref.experts, pname).grad.clone()
        dist.all_reduce(full)
        diff = (getattr(ep.experts, pname).grad - full[lo:hi]).abs().max() / full.abs().max().clamp(min=1e-30)
        worst = max(worst, float(diff))
    out["expert_grad_rel"] = worst
    out["scale"] = float(y1.detach().abs().max())
    return out


# the trainer cases: moe_debug, fp32 on one thread per rank (deterministic), 4 steps
TRAIN = ["experiment=smoke", "model=moe_debug", "data.seq_len=128", "data.batch_size=4", "data.num_workers=0",
         "trainer.steps=4", "trainer.log_every=1", "trainer.num_threads=1", "trainer.precision=fp32",
         "trainer.device=cpu", "metrics.progress=false", "optim.warmup_steps=2", "trainer.seed=1234",
         "checkpoint.every=2", "optim.grad_clip=0.05"]   # a clip that binds: the norm must count each expert once


def run_trainers(shapes: Path, out: Path, rank: int, backends=("ddp", "fsdp2", "zero2")) -> dict:
    from mmgen.checkpoint.export import export_safetensors
    from mmgen.cli.preflight import compose_job
    from mmgen.parallel.dist import DistInfo, barrier
    from mmgen.trainer.trainer import Trainer

    info = DistInfo(rank=rank, world_size=dist.get_world_size(), local_rank=rank)

    def trainer(name: str, extra: list[str]):
        job = compose_job([*TRAIN, f"data.train_shards={shapes}/train", f"data.val_shards={shapes}/val",
                           f"run_dir={out / name}", f"name={name}", *extra])
        if rank == 0:
            Path(job.run_dir).mkdir(parents=True, exist_ok=True)
        barrier()
        return Trainer(job, info)

    def curve(name: str) -> list[dict]:
        recs = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k.startswith(("loss/", "optim/grad_norm"))} | {"step": r["step"]}
                for r in recs if "loss/total" in r]

    res: dict = {}
    for backend in backends:
        for ep in (1, 2):
            name = f"{backend}_ep{ep}"
            t = trainer(name, [f"parallel={backend}", f"parallel.ep={ep}"])
            t.train()
            state = t.engine.model_state_dict()     # collective: experts gathered
            res[name] = {"curve": curve(name), "expert_shape": list(t.engine.module.layers[0].feed_forward
                                                                     .experts.w1.shape)}
            if ep == 1:
                continue
            # interrupted at step 2 (checkpoint), restarted: bitwise the uninterrupted run
            again = f"{name}_resume"
            trainer(again, [f"parallel={backend}", f"parallel.ep={ep}"]).train(stop_at=2)
            r = trainer(again, [f"parallel={backend}", f"parallel.ep={ep}"])
            res[name]["resumed_at"] = r.state.step
            r.train()
            rstate = r.engine.model_state_dict()
            res[name]["resume_curve"] = curve(again)
            res[name]["resume_weights_equal"] = rank != 0 or (state.keys() == rstate.keys() and all(
                torch.equal(state[k], rstate[k]) for k in state))
            # resume at another EP degree (ep=1) from the step-2 checkpoint: the same weights
            # (torch backends; DeepSpeed's shards resume on their own layout only)
            ck = out / again / "checkpoints" / "step_0000002"
            x = None if backend.startswith("zero") else trainer(
                f"{name}_resume_ep1", [f"parallel={backend}", "parallel.ep=1", f"checkpoint.resume={ck}"])
            xstate = x.engine.model_state_dict() if x is not None else None
            if rank == 0 and x is not None:
                from mmgen.checkpoint.export import consolidated_state_dict

                ref = consolidated_state_dict(ck)
                res[name]["resume_at_ep1_equal"] = x.state.step == 2 and all(torch.equal(ref[k], xstate[k]) for k in ref)
            # export: one safetensors file holding every expert, equal to the engine's weights
            target = out / f"{name}.safetensors"
            if rank == 0:
                export_safetensors(out / name, target)
            barrier()
            if rank == 0:
                from safetensors.torch import load_file

                exported = load_file(str(target))
                # (a ZeRO engine's weights are its parameters; the export adds the buffers)
                same_keys = state.keys() <= exported.keys() if backend.startswith("zero") else \
                    exported.keys() == state.keys()
                res[name]["export_equal"] = same_keys and all(torch.equal(exported[k], state[k]) for k in state)
                res[name]["export_w1_shape"] = list(exported["layers.0.feed_forward.experts.w1"].shape)
            # another EP degree from this checkpoint: init_from (ep=1) holds the same weights
            f = trainer(f"{name}_to_ep1", [f"parallel={backend}", "parallel.ep=1",
                                           f"checkpoint.init_from={out / name}"])
            fstate = f.engine.model_state_dict()
            res[name]["init_from_ep1_equal"] = rank != 0 or all(torch.equal(fstate[k], state[k]) for k in state)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="")
    ap.add_argument("--backends", default="ddp,fsdp2,zero2")   # trainer cases (a subset when debugging)
    ap.add_argument("--no-layer", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results, failed = {}, None
    try:
        for name, kw in ({} if a.no_layer else CASES).items():
            r = run_case(name, kw, rank, world)
            gathered = [None] * world
            dist.all_gather_object(gathered, r)
            results[name] = gathered
        if a.shapes:
            results["train"] = run_trainers(Path(a.shapes), Path(a.out), rank, tuple(a.backends.split(",")))
    except Exception:
        failed = traceback.format_exc()
        print(f"rank {rank}: {failed}", file=sys.stderr, flush=True)
    if rank == 0:
        Path(a.out, "results.json").write_text(json.dumps({"cases": results, "_failed": failed}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
