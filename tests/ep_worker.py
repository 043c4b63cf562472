# Expert-parallel cases (EP=2 vs EP=1) in one torchrun launch: outputs, input and expert gradients.
"""Run by tests/test_ep.py as ``torchrun --nproc-per-node 2 tests/ep_worker.py --out DIR``; rank 0
writes ``OUT/results.json`` with the largest differences per case."""
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results, failed = {}, None
    try:
        for name, kw in CASES.items():
            r = run_case(name, kw, rank, world)
            gathered = [None] * world
            dist.all_gather_object(gathered, r)
            results[name] = gathered
    except Exception:
        failed = traceback.format_exc()
        print(f"rank {rank}: {failed}", file=sys.stderr, flush=True)
    if rank == 0:
        Path(a.out, "results.json").write_text(json.dumps({"cases": results, "_failed": failed}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
