# Dense vs sparse on the embedded shapes data at equal active parameters: losses, held-out accuracy, CPU tokens/s.
"""Trains one arm per model family on the same preset (``experiment=shapes_cpu``: same data,
same steps, same seed, same trunk shape), then scores each run with the shapes evaluation
(``mmgen eval shapes``: text-to-image read back from pixels, captioning parsed from text).

Arms (``ARMS``): ``dense`` (the preset), ``moe`` (8 experts top-2, each half the preset's FFN
width), ``mot`` (two modality towers, BAGEL's role split: ``model.block=mot
model.tower_split=role``) and ``motmoe`` (towers whose FFNs are that MoE). Every arm keeps the
preset's ``dim``, ``n_layers`` and heads and the same active FFN width, so a position runs the
same active parameters (+ the router) and the same counted FLOPs in each
(``mmgen/metrics/flops.py``); sparse arms differ in total parameters. Runs use a fixed step count (``trainer.max_minutes=0``), so a loaded
machine changes tokens/s, not the work done.

Reported per arm: total and active parameters (non-embedding), final losses (mean of the last
``--tail`` logged records), median ``perf/tokens_per_s`` after the first logged record, the
shapes scores (generated-image attributes and caption exact match).

Usage:  python bench/dense_vs_sparse.py [--arms dense,mot] [--steps 1200] [--samples 200]
            [--data data/shapes] [overrides...]
Tiny check (seconds): python bench/dense_vs_sparse.py --steps 4 --samples 4 --tail 1 \\
            trainer.log_every=2 data.batch_size=4 model.dim=32 model.n_layers=1 model.ffn_dim=64
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# arm -> overrides on top of the preset; None = not runnable on this branch yet
ARMS: dict[str, list[str] | None] = {
    "dense": [],
    # 8 experts top-2 of half the preset's FFN width (512 / 2): the same active FFN width, so
    # the same active parameters and counted FLOPs per position as dense (+ the router)
    "moe": ["model.block=moe", "model.moe_experts=8", "model.moe_top_k=2", "model.moe_ffn_dim=256"],
    "mot": ["model.block=mot", "model.tower_split=role"],
    # towers whose FFNs are that MoE: one tower's active parameters per position
    "motmoe": ["model.block=motmoe", "model.tower_split=role", "model.moe_experts=8", "model.moe_top_k=2",
               "model.moe_ffn_dim=256"],
}


def sh(cmd: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return r


def param_counts(run: Path) -> tuple[int, int]:
    """(total, active per position) non-embedding parameters of the run's saved model config."""
    import dataclasses

    import yaml

    from mmgen.models import ModelConfig, build_model, num_params
    from mmgen.models.mot import MoTBlock

    raw = yaml.safe_load((run / "config.yaml").read_text())["model"]
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    model = build_model(ModelConfig(**{k: v for k, v in raw.items() if k in names}), device="meta")
    from mmgen.models.moe import MoEFeedForward

    total = num_params(model)
    # a position runs one tower of a tower block: the other towers are not active
    idle = sum(p.numel() for block in model.layers if isinstance(block, MoTBlock)
               for tower in list(block.towers)[1:] for p in tower.parameters())
    # and top_k of an MoE FFN's experts (in the active tower)
    for block in model.layers:
        towers = list(block.towers)[:1] if isinstance(block, MoTBlock) else [block]
        for part in towers:
            for m in part.modules():
                if isinstance(m, MoEFeedForward):
                    per_expert = sum(p.numel() for p in m.experts.parameters()) // m.n_experts
                    idle += (m.n_experts - m.top_k) * per_expert
    return total, total - idle


def run_arm(arm: str, overrides: list[str], a, bin_: Path) -> dict:
    name = f"{a.prefix}_{arm}"
    t0 = time.time()
    sh([str(bin_ / "mmgen-train"), f"experiment={a.experiment}", f"name={name}",
        f"trainer.steps={a.steps}", "trainer.max_minutes=0", "metrics.progress=false",
        "checkpoint.resume=none", f"data.train_shards={a.data}/train", f"data.val_shards={a.data}/val",
        *overrides, *a.overrides])
    train_s = time.time() - t0
    run = ROOT / "runs" / name
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    recs = [r for r in recs if "loss/total" in r]
    tail = recs[-a.tail:]
    losses = {k: statistics.fmean(r[k] for r in tail) for k in ("loss/total", "loss/text", "loss/visual") if k in tail[-1]}
    speeds = [r["perf/tokens_per_s"] for r in recs[1:] if "perf/tokens_per_s" in r] or \
             [r["perf/tokens_per_s"] for r in recs if "perf/tokens_per_s" in r]
    sh([str(bin_ / "mmgen"), "eval", "shapes", str(run), "--num-samples", str(a.samples)])
    scores = json.loads((run / "eval" / "scores.json").read_text())
    total, active = param_counts(run)
    return {"arm": arm, "overrides": overrides, "run": str(run), "steps": recs[-1]["step"],
            "train_seconds": round(train_s, 1), "params_total": total, "params_active": active,
            "losses": losses, "tokens_per_s": statistics.median(speeds) if speeds else float("nan"),
            "image": scores["image"], "caption": scores["caption"]}


def table(rows: list[dict], pending: list[str]) -> str:
    head = ("| arm | params total / active | loss total | text | visual | t2i shape | t2i position | "
            "t2i all | caption exact | tokens/s (CPU) |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        l, img, cap = r["losses"], r["image"], r["caption"]
        lines.append(f"| {r['arm']} | {r['params_total'] / 1e6:.2f}M / {r['params_active'] / 1e6:.2f}M "
                     f"| {l.get('loss/total', float('nan')):.3f} | {l.get('loss/text', float('nan')):.3f} "
                     f"| {l.get('loss/visual', float('nan')):.3f} | {img.get('shape', float('nan')):.2f} "
                     f"| {img.get('position', float('nan')):.2f} | {img.get('all', float('nan')):.2f} "
                     f"| {cap.get('exact', float('nan')):.2f} | {r['tokens_per_s']:.0f} |")
    for arm in pending:
        lines.append(f"| {arm} | pending (block not on this branch) |" + " |" * (head.count("|") - 3))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    p.add_argument("--experiment", default="shapes_cpu")
    p.add_argument("--steps", type=int, default=1200, help="the same step count for every arm")
    p.add_argument("--samples", type=int, default=200, help="held-out prompts and images scored")
    p.add_argument("--tail", type=int, default=3, help="logged records averaged for the final losses")
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--prefix", default="", help="run names: <prefix>_<arm> (default bench_dvs_<time>)")
    p.add_argument("--out", default="bench/results/dense_vs_sparse.json")
    p.add_argument("overrides", nargs="*", help="overrides for every arm, e.g. trainer.num_threads=2")
    a = p.parse_args()
    arms = [x for x in a.arms.split(",") if x]
    unknown = [x for x in arms if x not in ARMS]
    if unknown:
        sys.exit(f"unknown arms {unknown}: choose from {list(ARMS)}")
    a.prefix = a.prefix or f"bench_dvs_{int(time.time())}"
    bin_ = Path(sys.executable).parent
    if not (ROOT / a.data / "val").is_dir():
        sh([str(bin_ / "mmgen"), "data", "make-shapes", "--out", a.data])
    rows, pending = [], []
    for arm in arms:
        if ARMS[arm] is None:
            pending.append(arm)
            continue
        rows.append(run_arm(arm, ARMS[arm], a, bin_))
        print(f"{arm}: done in {rows[-1]['train_seconds']:.0f} s", flush=True)
    md = table(rows, pending)
    print(f"\n{a.experiment}, {a.steps} steps per arm, {a.samples} held-out samples; "
          f"overrides {a.overrides or 'none'}\n")
    print(md)
    out = ROOT / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"experiment": a.experiment, "steps": a.steps, "samples": a.samples,
                               "overrides": a.overrides, "rows": rows, "pending": pending,
                               "table": md}, indent=2))


if __name__ == "__main__":
    main()
