# Step-matched sweep of shapes-benchmark presets: train several arms in parallel, score each.
"""Each arm is a list of overrides on top of ``experiment=shapes_cpu`` trained for its own
``trainer.steps`` (the cosine schedule runs to that step), then scored by ``mmgen eval shapes``
on held-out samples with the run's sampler and with each ``--eval-set`` variant. Arms run as
separate processes, ``--jobs`` at a time (on a GPU host they share the GPU; on CPU give each
its ``trainer.num_threads``). The cost of an arm on 2 CPU cores is measured separately
(``--time-steps``: that many steps, seconds per step after the first 5), because on a GPU the
tiny model is host-bound and its step time says nothing about CPU cost.

Usage: python bench/demo_sweep.py --arms base:trainer.steps=450 p8:data.patch_size=8,... \
           [--seeds 0 1] [--jobs 8] [--samples 200] [--out results.jsonl]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_caption_tokenizer(out_dir: str, vocab_size: int = 400) -> str:
    """A byte-level BPE (Hugging Face ``tokenizers``) trained on every caption the shapes data
    can have, so each caption word is one token and any other text still encodes as bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mmgen.data.synthetic.shapes import all_specs

    captions = sorted({s.caption() for s in all_specs()})
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(captions * 4, trainer=trainer)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(out_dir) / "tokenizer.json"))
    return out_dir


def run(cmd: list[str], log: Path) -> int:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        return subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode


def arm(name: str, overrides: list[str], seed: int, a) -> dict:
    run_name = f"sweep_{name}_s{seed}"
    log = Path(a.logs) / f"{run_name}.log"
    py = sys.executable
    t0 = time.time()
    rc = run([py, "-m", "mmgen.train", "experiment=shapes_cpu", f"name={run_name}", "metrics.progress=false",
              "checkpoint.resume=none", "trainer.max_minutes=0", f"trainer.seed={seed}", f"data.seed={seed}",
              *a.common, *overrides], log)
    out = {"arm": name, "seed": seed, "overrides": overrides, "train_s": round(time.time() - t0, 1), "rc": rc}
    if rc:
        return out
    for label, sets in [("run", [])] + [(s, s.split(",")) for s in a.eval_set]:
        score_dir = ROOT / "runs" / run_name / f"eval_{label.replace('=', '_').replace(',', '_')}"
        cmd = [py, "-m", "mmgen.cli.main", "eval", "shapes", f"runs/{run_name}", "--num-samples", str(a.samples),
               "--out", str(score_dir)]
        for s in sets:
            cmd += ["--set", s]
        if run(cmd, log) == 0 and (score_dir / "scores.json").is_file():
            rep = json.loads((score_dir / "scores.json").read_text())
            out[label] = {k: rep[k] for k in ("image", "caption") if k in rep}
    return out


def time_arm(name: str, overrides: list[str], a) -> dict:
    """Seconds per step on this machine (steps 6..N of one run)."""
    run_name = f"time_{name}"
    log = Path(a.logs) / f"{run_name}.log"
    rc = run([sys.executable, "-m", "mmgen.train", "experiment=shapes_cpu", f"name={run_name}",
              "metrics.progress=false", "checkpoint.resume=none", "trainer.max_minutes=0",
              f"trainer.steps={a.time_steps}", "trainer.log_every=1", *a.common, *overrides,
              f"trainer.steps={a.time_steps}"], log)
    rows = [json.loads(line) for line in (ROOT / "runs" / run_name / "metrics.jsonl").read_text().splitlines()
            if line.strip()] if rc == 0 else []
    vals = [r["perf/step_s"] for r in rows if "perf/step_s" in r][5:]
    return {"arm": name, "rc": rc, "s_per_step": sum(vals) / len(vals) if vals else None}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arms", nargs="+", required=True, help="name:override,override,...")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--eval-set", nargs="*", default=[], help="extra eval variants, e.g. sampler.guidance=3")
    p.add_argument("--common", nargs="*", default=[], help="overrides for every arm")
    p.add_argument("--time-steps", type=int, default=0, help="only time each arm for this many steps")
    p.add_argument("--logs", default="runs/sweep_logs")
    p.add_argument("--out", default="bench/results/demo_sweep.jsonl")
    p.add_argument("--tokenizer", default="", help="write the caption BPE tokenizer to this directory first")
    a = p.parse_args()
    Path(a.logs).mkdir(parents=True, exist_ok=True)
    if a.tokenizer:
        write_caption_tokenizer(a.tokenizer)
    arms = [(s.split(":", 1)[0], [o for o in s.split(":", 1)[1].split(",") if o] if ":" in s else [])
            for s in a.arms]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f, cf.ThreadPoolExecutor(a.jobs) as pool:
        if a.time_steps:
            futures = [pool.submit(time_arm, n, o, a) for n, o in arms]
        else:
            futures = [pool.submit(arm, n, o, s, a) for s in a.seeds for n, o in arms]
        for fut in cf.as_completed(futures):
            r = fut.result()
            print(json.dumps(r), flush=True)
            f.write(json.dumps(r) + "\n")
            f.flush()
    os.sync()


if __name__ == "__main__":
    main()
