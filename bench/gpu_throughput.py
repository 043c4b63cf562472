# GPU throughput of mmgen's trainer against the plain-PyTorch reference step, in one run.
"""Runs the reference baseline (../shared/bench/h100_baseline.py: a torch.compile'd 1.2B
Transfusion-style step, seq 2048 x 4) and then ``mmgen-train experiment=gpu_1b`` (same model
shape, real shapes data through the WebDataset pipeline, FlexAttention with the hybrid mask,
bf16), and prints tokens/s, MFU and peak memory of both plus their ratio.

Usage (on a GPU machine):
    python bench/gpu_throughput.py --baseline path/to/h100_baseline.py --steps 40 [overrides...]
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


def run_baseline(path: str) -> dict:
    out = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=900)
    line = next((l for l in out.stdout.splitlines() if l.startswith("SUMMARY ")), None)
    if line is None:
        raise RuntimeError(f"baseline printed no SUMMARY:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(line[len("SUMMARY "):])


def ensure_data(out: str, image_size: int) -> None:
    if not Path(out, "val").is_dir():
        subprocess.run([sys.executable, "-m", "mmgen.cli.main", "data", "make-shapes", "--out", out,
                        "--train", "8000", "--val", "200", "--image-size", str(image_size)], check=True)


def run_mmgen(steps: int, overrides: list[str], data: str, warmup: int) -> dict:
    name = f"bench_gpu_1b_{int(time.time())}"
    cmd = [sys.executable, "-m", "mmgen.train", "experiment=gpu_1b", f"name={name}",
           f"trainer.steps={steps}", "trainer.log_every=1", "metrics.progress=false",
           f"data.train_shards={data}/train", f"data.val_shards={data}/val", *overrides]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"mmgen-train failed:\n{r.stderr[-4000:]}")
    recs = [json.loads(l) for l in (ROOT / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in recs if r["step"] > warmup]
    med = lambda k: statistics.median(r[k] for r in steady)
    return {"steps": len(recs), "wall_s": round(time.time() - t0, 1),
            "tokens_per_s": med("perf/tokens_per_s"), "mfu": med("perf/mfu"),
            "step_s": med("perf/step_s"), "data_wait_frac": med("perf/data_wait_frac"),
            "max_mem_gib": max(r["perf/max_mem_gib"] for r in recs),
            "padding_fraction": recs[-1].get("data/padding_fraction"),
            "final_loss": recs[-1]["loss/total"], "first_loss": recs[0]["loss/total"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--baseline", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10, help="steps excluded (compilation)")
    p.add_argument("--data", default="data/shapes128")
    p.add_argument("--out", default="")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    ensure_data(a.data, 128)
    base = run_baseline(a.baseline)
    print("baseline", json.dumps(base), flush=True)
    ours = run_mmgen(a.steps, a.overrides, a.data, a.warmup)
    ref = base.get("compiled_flex_transfusion_mask") or base.get("compiled_sdpa_causal")
    result = {"baseline": base, "mmgen_1b": ours,
              "ratio_tokens_per_s_vs_compiled_flex": ours["tokens_per_s"] / ref["tokens_per_s"],
              "ratio_mfu_vs_compiled_flex": ours["mfu"] / ref["mfu_vs_989"]}
    print(f"{'':28s}{'tokens/s':>12s}{'MFU':>8s}{'mem GiB':>9s}")
    for name in ("eager_sdpa_causal", "compiled_sdpa_causal", "compiled_flex_transfusion_mask"):
        if name in base:
            b = base[name]
            print(f"baseline {name:19s}{b['tokens_per_s']:12.0f}{b['mfu_vs_989']:8.3f}{b['max_mem_GiB']:9.1f}")
    print(f"{'mmgen gpu_1b (non-pad tok)':28s}{ours['tokens_per_s']:12.0f}{ours['mfu']:8.3f}{ours['max_mem_gib']:9.1f}")
    print(f"ratio mmgen / compiled flex baseline: tokens/s {result['ratio_tokens_per_s_vs_compiled_flex']:.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
