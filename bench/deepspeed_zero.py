# Throughput and peak memory of DeepSpeed ZeRO-2/3 against plain DDP, same model, same data.
"""Trains ``experiment=gpu_1b`` (the 1.2B flavor, bf16, seq 2048 x 4, FlexAttention, compiled
blocks) for a few dozen steps under each backend in turn (one process, one GPU), reads
``perf/tokens_per_s`` (median over the steps after the compile warm-up) and ``perf/max_mem_gib``
from each run's metrics.jsonl, and prints them with their ratio to the plain path.

On one GPU ZeRO shards nothing: what this measures is what the DeepSpeed engine costs or saves
on the same device (bf16 parameters and gradients with fp32 master weights, bucketed
reductions, ZeRO-3's gather/release around each module).

Usage (GPU machine; data made with `mmgen data make-shapes` if missing):
    python bench/deepspeed_zero.py --steps 30 --out results.json [overrides...]
    python bench/deepspeed_zero.py --smoke   # tiny CPU check of this script itself
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


def ensure_data(out: str, image_size: int, train: int, val: int) -> None:
    if not Path(out, "val").is_dir():
        subprocess.run([sys.executable, "-m", "mmgen.cli.main", "data", "make-shapes", "--out", out,
                        "--image-size", str(image_size), "--train", str(train), "--val", str(val)],
                       check=True, cwd=ROOT)


def run_backend(backend: str, args, overrides: list[str], timeout: float) -> dict:
    """One training run; returns its medians, or the error that stopped it."""
    name = f"bench_ds_{backend}_{int(time.time())}"
    cmd = [sys.executable, "-m", "mmgen.train", f"experiment={args.experiment}", f"name={name}",
           f"parallel={backend}", f"trainer.steps={args.steps}", "trainer.log_every=1", "metrics.progress=false",
           f"data.train_shards={args.data}/train", f"data.val_shards={args.data}/val", *overrides]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
        err = r.stderr[-3000:] if r.returncode else ""
    except subprocess.TimeoutExpired as e:
        err = f"timed out after {timeout:.0f} s: {(e.stderr or b'')[-2000:]!r}"
    out = {"backend": backend, "overrides": overrides, "wall_s": round(time.time() - t0, 1)}
    metrics = ROOT / "runs" / name / "metrics.jsonl"
    recs = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.is_file() else []
    steady = [x for x in recs if x["step"] > args.warmup]
    if err or not steady:
        return {**out, "error": err or f"no steps after warm-up ({len(recs)} records)"}
    med = lambda k: statistics.median(x[k] for x in steady if k in x)  # noqa: E731
    out.update({"steps": len(recs), "tokens_per_s": med("perf/tokens_per_s"), "step_s": med("perf/step_s"),
                "first_loss": recs[0]["loss/total"], "final_loss": recs[-1]["loss/total"]})
    if "perf/mfu" in steady[0]:
        out["mfu"] = med("perf/mfu")
    if "perf/max_mem_gib" in recs[-1]:
        out["max_mem_gib"] = max(x["perf/max_mem_gib"] for x in recs)
    return out


def report(results: list[dict]) -> dict:
    base = next((r for r in results if r["backend"] == "ddp" and "error" not in r
                 and "trainer.compile=false" not in r["overrides"]), None)
    eager = next((r for r in results if r["backend"] == "ddp" and "error" not in r
                  and "trainer.compile=false" in r["overrides"]), None)
    print(f"{'backend':26s}{'tokens/s':>11s}{'ratio':>8s}{'peak GiB':>10s}{'ratio':>8s}{'loss 1->N':>16s}")
    rows = {}
    for r in results:
        label = r["backend"] + (" (eager)" if "trainer.compile=false" in r["overrides"] else "")
        if "error" in r:
            print(f"{label:26s}  failed: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}")
            continue
        ref = eager if "trainer.compile=false" in r["overrides"] else base
        tps = r["tokens_per_s"] / ref["tokens_per_s"] if ref else float("nan")
        mem = (r.get("max_mem_gib", float("nan")) / ref["max_mem_gib"]
               if ref and ref.get("max_mem_gib") else float("nan"))
        rows[label] = {"tokens_per_s_ratio": tps, "max_mem_ratio": mem}
        print(f"{label:26s}{r['tokens_per_s']:11.0f}{tps:8.3f}{r.get('max_mem_gib', float('nan')):10.1f}"
              f"{mem:8.3f}{r['first_loss']:8.3f}->{r['final_loss']:.3f}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backends", default="ddp,zero2,zero3")
    p.add_argument("--experiment", default="gpu_1b")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10, help="steps excluded from the medians (compilation)")
    p.add_argument("--data", default="data/shapes128")
    p.add_argument("--timeout", type=float, default=180, help="seconds per training run")
    p.add_argument("--budget", type=float, default=420, help="seconds for everything; eager fallbacks need it")
    p.add_argument("--out", default="")
    p.add_argument("--smoke", action="store_true", help="CPU check of this script: debug model, 4 steps")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    t0 = time.time()
    if a.smoke:
        a.experiment, a.steps, a.warmup = "smoke", 4, 1
        a.data = "data/shapes32" if a.data == "data/shapes128" else a.data
        a.overrides = ["data.num_workers=0", "checkpoint.enabled=false", *a.overrides]
        ensure_data(a.data, 32, 200, 20)
    else:
        ensure_data(a.data, 128, 4000, 100)
    results = []
    for backend in a.backends.split(","):
        results.append(run_backend(backend, a, a.overrides, a.timeout))
        print(json.dumps(results[-1]), flush=True)
    # torch.compile over ZeRO-3's parameter hooks may fail: measure it eager, against eager DDP
    failed = [r["backend"] for r in results if "error" in r]
    if failed and not a.smoke and time.time() - t0 + 2 * 90 < a.budget:
        for backend in ["ddp", *failed]:
            results.append(run_backend(backend, a, [*a.overrides, "trainer.compile=false"], a.timeout))
            print(json.dumps(results[-1]), flush=True)
    rows = report(results)
    if a.out:
        Path(a.out).write_text(json.dumps({"runs": results, "ratios": rows}, indent=1))


if __name__ == "__main__":
    main()
