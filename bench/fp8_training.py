# FP8 training (trainer.fp8, torchao Float8Linear) against bf16: step throughput and a loss curve, in one process.
"""Two parts, each with the bf16 arm measured in the same call as the FP8 arms:

* ``throughput``: mmgen's like-for-like step (bench/gpu_throughput.py: the Trainer's
  ``next_batches`` + ``train_step`` on one fixed batch in the h100 baseline's layout, the 1.2B
  ``gpu_1b`` shape with the baseline's block, bf16 autocast, compiled blocks) with
  ``trainer.fp8=none`` and each recipe of ``--recipes``; the same batch, seed and weights in
  every arm. Reports the median step time, tokens/s, counted model TFLOP/s (the same work in
  every arm; MFU against the bf16 peak), peak memory, and ``ratio_tokens_per_s[recipe]`` =
  fp8 tokens/s over bf16 tokens/s.
* ``curve``: ``experiment=shapes_gpu`` (the ``small`` flavor, ~86M, on the real shapes data
  through the loader; generated under ``--data`` when missing) for ``--curve-steps`` steps in
  bf16 and in FP8 (``--curve-recipes``), same seed, so the same batches and noise: both loss
  curves, the means of ``--block``-step blocks and the max / mean relative difference of those
  block means (fp8 vs bf16).

``--tiny --device cpu`` runs both parts at a debug size in seconds with torchao's emulated
float8 (``trainer.fp8_emulate=true``): it checks the script, not the speed
(tests/test_fp8.py).

Usage:
    python bench/fp8_training.py --out bench/results/fp8_training_h200.json        # one H200: ~4-5 min
    python bench/fp8_training.py --parts throughput --recipes tensorwise           # ~2 min
    python bench/fp8_training.py --tiny --device cpu --steps 4 --warmup 1 --curve-steps 6 --block 2
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from gpu_throughput import GPU, MATCH_BASELINE, TINY, baseline_batch, build_fixed_batch_trainer, time_mmgen

CURVE_GPU = ["experiment=shapes_gpu"]
CURVE_TINY = ["experiment=smoke", "data.seq_len=128", "data.batch_size=4", "data.num_workers=0"]


def fp8_overrides(recipe: str, device: str) -> list[str]:
    """The arm's overrides: bf16 is ``trainer.fp8=none``; on a CPU the casts are emulated."""
    if recipe == "bf16":
        return ["trainer.fp8=none"]
    return [f"trainer.fp8={recipe}", *(["trainer.fp8_emulate=true"] if device == "cpu" else [])]


def release() -> None:
    """Drop the last arm's model, compiled graphs and cached blocks before the next one."""
    import torch

    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------- throughput

def baseline_layout(job) -> dict:
    """The layout h100_baseline.py reports for this shape: two images of T/8 positions at T/8
    and T/2 in every row (gpu_throughput.py builds mmgen's batch from it)."""
    t, n = job.data.seq_len, job.data.seq_len // 8
    return {"rows": job.data.batch_size, "length": t, "patch_dim": job.model.patch_dim,
            "image_spans": [[t // 8, t // 8 + n], [t // 2, t // 2 + n]]}


def throughput_arm(a: argparse.Namespace, recipe: str, dist, run_dir: str) -> dict:
    import torch

    from mmgen.cli.preflight import compose_job
    from mmgen.metrics.logger import detect_peak_tflops
    from mmgen.models.tokenizers import build_tokenizer

    job = compose_job([*(TINY if a.tiny else GPU), f"trainer.device={dist.device.type}", "trainer.precision=bf16",
                       f"trainer.steps={a.steps}", "checkpoint.enabled=false", "metrics.progress=false",
                       f"run_dir={run_dir}", f"name=fp8_{recipe}", *fp8_overrides(recipe, dist.device.type),
                       *a.overrides])
    job.model = dataclasses.replace(job.model, n_kv_heads=job.model.n_heads, **MATCH_BASELINE)
    job.validate()
    batch = baseline_batch(baseline_layout(job), job.model.vocab_size, build_tokenizer(job.data.tokenizer))
    if dist.device.type == "cuda":
        batch = batch.pin_memory()
    t0 = time.perf_counter()
    trainer = build_fixed_batch_trainer(job, dist, batch)
    try:
        ours = time_mmgen(trainer, a.steps, a.warmup)
    finally:
        trainer.metrics.close()
    from torchao.float8.float8_linear import Float8Linear

    converted = sum(isinstance(m, Float8Linear) for m in trainer.engine.module.modules())
    del trainer
    step_s, peak = ours["step_s"], a.peak_tflops or detect_peak_tflops(dist.device)
    tflops = ours["flops_per_step"] / step_s / 1e12
    out = {"overrides": fp8_overrides(recipe, dist.device.type), "fp8_linears": converted, "step_s": step_s,
           "tokens_per_s": ours["tokens_per_step"] / step_s, "model_tflops": tflops,
           "mfu_vs_bf16_peak": tflops / peak if peak else None, "flops_per_step": ours["flops_per_step"],
           "steps_timed": ours["steps_timed"], "wall_s": time.perf_counter() - t0, "losses": ours["losses"],
           "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dist.device.type == "cuda" else None}
    release()
    return out


def throughput_part(a: argparse.Namespace, dist) -> dict:
    arms = {}
    for recipe in ["bf16", *a.recipes]:
        with tempfile.TemporaryDirectory(prefix=f"bench_fp8_{recipe}_") as run_dir:
            arms[recipe] = throughput_arm(a, recipe, dist, run_dir)
        r = arms[recipe]
        print(f"throughput {recipe:11s} step {r['step_s']:.4f} s  {r['tokens_per_s']:10.0f} tokens/s  "
              f"{r['model_tflops']:8.2f} TFLOP/s  fp8 linears {r['fp8_linears']}  ({r['wall_s']:.0f} s)", flush=True)
    base = arms["bf16"]
    ratios = {r: arms[r]["tokens_per_s"] / base["tokens_per_s"] for r in a.recipes}
    for r, x in ratios.items():
        print(f"ratio {r} / bf16 tokens/s: {x:.3f}")
    return {"experiment": "tiny" if a.tiny else GPU[0], "steps": a.steps, "warmup": a.warmup, "arms": arms,
            "ratio_tokens_per_s": ratios,
            "same_work": all(arms[r]["flops_per_step"] == base["flops_per_step"] for r in a.recipes)}


# ---------------------------------------------------------------- loss curve

def ensure_data(out: Path, tiny: bool) -> None:
    if not (out / "val").is_dir():
        n_train, n_val = (200, 20) if tiny else (8000, 200)
        subprocess.run([sys.executable, "-m", "mmgen.cli.main", "data", "make-shapes", "--out", str(out),
                        "--train", str(n_train), "--val", str(n_val)], check=True, cwd=ROOT)


def curve_arm(a: argparse.Namespace, recipe: str, dist, run_dir: Path) -> list[float]:
    from mmgen.cli.preflight import compose_job
    from mmgen.trainer.trainer import Trainer

    compile_ = "true" if a.curve_compile and not a.tiny else "false"
    job = compose_job([*(CURVE_TINY if a.tiny else CURVE_GPU), f"trainer.device={dist.device.type}",
                       f"trainer.steps={a.curve_steps}", f"optim.warmup_steps={max(a.curve_steps // 5, 1)}",
                       "trainer.log_every=1", "trainer.max_minutes=0", "trainer.eval_at_end=false",
                       "trainer.sample_every=0", f"trainer.compile={compile_}", "checkpoint.enabled=false",
                       "metrics.progress=false", f"data.train_shards={a.data}/train", f"data.val_shards={a.data}/val",
                       f"run_dir={run_dir}", f"name=fp8_curve_{recipe}", f"trainer.seed={a.seed}",
                       *fp8_overrides(recipe, dist.device.type), *a.curve_overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(job, dist)
    try:
        trainer.train()
    finally:
        trainer.metrics.close()
    del trainer
    release()
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss/total"] for r in recs if "loss/total" in r]


def block_means(curve: list[float], block: int) -> list[float]:
    return [statistics.fmean(curve[i:i + block]) for i in range(0, len(curve) - block + 1, block)]


def compare_curves(ref: list[float], other: list[float], block: int) -> dict:
    """Relative difference of the ``block``-step means of ``other`` against ``ref``."""
    b_ref, b_other = block_means(ref, block), block_means(other, block)
    rel = [abs(o - r) / abs(r) for r, o in zip(b_ref, b_other)]
    return {"max_rel_diff": max(rel), "mean_rel_diff": statistics.fmean(rel), "block_rel_diff": rel,
            "final_block_bf16": b_ref[-1], "final_block": b_other[-1]}


def curve_part(a: argparse.Namespace, dist) -> dict:
    ensure_data(Path(a.data), a.tiny)
    curves, walls = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_fp8_curve_") as tmp:
        for recipe in ["bf16", *a.curve_recipes]:
            t0 = time.perf_counter()
            curves[recipe] = curve_arm(a, recipe, dist, Path(tmp) / recipe)
            walls[recipe] = time.perf_counter() - t0
            print(f"curve {recipe:11s} {len(curves[recipe])} steps, first {curves[recipe][0]:.4f} last "
                  f"{curves[recipe][-1]:.4f} ({walls[recipe]:.0f} s)", flush=True)
    compared = {r: compare_curves(curves["bf16"], curves[r], a.block) for r in a.curve_recipes}
    for r, c in compared.items():
        print(f"curve {r} vs bf16, {a.block}-step block means: max rel diff {c['max_rel_diff']:.4f}, "
              f"mean {c['mean_rel_diff']:.4f}, final block {c['final_block']:.4f} vs {c['final_block_bf16']:.4f}")
    return {"experiment": "tiny" if a.tiny else CURVE_GPU[0], "steps": a.curve_steps, "block": a.block,
            "seed": a.seed, "compile": a.curve_compile and not a.tiny, "curves": curves, "wall_s": walls,
            "block_means": {r: block_means(c, a.block) for r, c in curves.items()}, "vs_bf16": compared}


# ---------------------------------------------------------------- entry

def commit() -> str:
    # the environment first: a copy of the tree on a GPU machine may carry an older .git
    if os.environ.get("MMGEN_COMMIT"):
        return os.environ["MMGEN_COMMIT"]
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return sha or os.environ.get("MMGEN_COMMIT", "unknown")


def environment(dist) -> dict:
    import torch
    import torchao

    name = torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else "cpu"
    return {"device": str(dist.device), "device_name": name, "torch": torch.__version__,
            "torchao": torchao.__version__, "commit": commit()}


def main() -> None:
    p = argparse.ArgumentParser(description="FP8 (torchao float8) training against bf16: throughput and loss curve")
    p.add_argument("--parts", default="throughput,curve", help="comma list of throughput, curve")
    p.add_argument("--recipes", default="tensorwise,rowwise", help="throughput: trainer.fp8 recipes besides bf16")
    p.add_argument("--steps", type=int, default=20, help="throughput: steps per arm (compile included)")
    p.add_argument("--warmup", type=int, default=8, help="throughput: steps not timed (compilation)")
    p.add_argument("--curve-recipes", default="tensorwise", help="curve: trainer.fp8 recipes besides bf16")
    p.add_argument("--curve-steps", type=int, default=300)
    p.add_argument("--curve-compile", action="store_true", help="curve: trainer.compile=true in every arm")
    p.add_argument("--curve-override", dest="curve_overrides", action="append", default=[],
                   help="curve: one more Hydra override for every arm (repeatable)")
    p.add_argument("--block", type=int, default=20, help="curve: steps per block mean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="data/shapes", help="curve: shapes shards (made when missing)")
    p.add_argument("--tiny", action="store_true", help="debug sizes (with --device cpu: emulated float8)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--peak-tflops", type=float, default=0.0, help="for MFU (bf16 peak); 0 = detect")
    p.add_argument("--out", default="")
    p.add_argument("overrides", nargs="*", help="throughput: Hydra overrides for every arm")
    a = p.parse_args()
    a.parts = [x for x in a.parts.split(",") if x]
    a.recipes = [x for x in a.recipes.split(",") if x]
    a.curve_recipes = [x for x in a.curve_recipes.split(",") if x]
    if not set(a.parts) <= {"throughput", "curve"}:
        p.error(f"--parts {','.join(a.parts)}: choose among throughput, curve")
    if a.warmup >= a.steps:
        p.error(f"--warmup {a.warmup} leaves none of --steps {a.steps} to time")
    if a.block > a.curve_steps:
        p.error(f"--block {a.block} is longer than --curve-steps {a.curve_steps}")

    from mmgen.parallel.dist import init_distributed

    dist = init_distributed(a.device)
    result = {**environment(dist), "args": {k: v for k, v in vars(a).items()}}
    t0 = time.perf_counter()
    if "throughput" in a.parts:
        result["throughput"] = throughput_part(a, dist)
    if "curve" in a.parts:
        result["curve"] = curve_part(a, dist)
    result["wall_s"] = time.perf_counter() - t0
    print(f"total {result['wall_s']:.0f} s on {result['device_name']} (torch {result['torch']}, torchao "
          f"{result['torchao']}, commit {result['commit']})")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
