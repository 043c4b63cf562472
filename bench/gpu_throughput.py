# GPU throughput of mmgen's trainer against the plain-PyTorch reference step, in one run.
"""Two modes, each running the reference baseline (bench/baselines/h100_baseline.py: a
torch.compile'd 1.2B Transfusion-style step, seq 2048 x 4; provenance in its header) and mmgen
in the same call.

* default: ``mmgen-train experiment=gpu_1b`` (same model shape, real shapes data through the
  WebDataset pipeline, packed documents, FlexAttention with the hybrid mask, bf16). mmgen's step
  does other work than the baseline's (short documents, logits only at text targets), so its
  tokens/s ratio is not "same work"; its counted ``perf/model_tflops`` and MFU are.
* ``--like-for-like``: mmgen's real training step (the Trainer's ``next_batches`` and
  ``train_step``: model, objective, engine backward and optimizer step) on one fixed batch with
  the baseline's layout (one document per row covering the row, the baseline's two image spans
  as flow targets, a text target at every text position), and the baseline's model shape
  (no qk-norm, no GQA, no learned visual positions, same patch width). The model FLOPs of both
  are counted by ``mmgen.metrics.flops`` on that batch (the baseline's from the layout it
  reports), so the ratio means "same work, same device". ``--tiny --device cpu`` runs it on a
  debug-sized shape (seq 128) in seconds, for a test.

Usage:
    python bench/gpu_throughput.py --steps 40 [overrides...]          # on a GPU machine
    python bench/gpu_throughput.py --like-for-like --steps 30 [--out result.json]
    python bench/gpu_throughput.py --like-for-like --tiny --device cpu --steps 6
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "bench" / "baselines" / "h100_baseline.py"

# the baseline's block: full multi-head attention, no qk-norm, 1-D RoPE only, an untied head
MATCH_BASELINE = {"qk_norm": False, "visual_pos": "none", "tie_embeddings": False}
TINY = ["data.seq_len=128", "data.batch_size=2", "trainer.compile=false"]
GPU = ["experiment=gpu_1b"]


def run_baseline(path: str, args: list[str] = ()) -> dict:
    out = subprocess.run([sys.executable, path, *args], capture_output=True, text=True, timeout=900, check=False)
    line = next((l for l in out.stdout.splitlines() if l.startswith("SUMMARY ")), None)
    if line is None:
        raise RuntimeError(f"baseline printed no SUMMARY:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(line[len("SUMMARY "):])


# ---------------------------------------------------------------- default mode: the real data path

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
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if r.returncode:
        raise RuntimeError(f"mmgen-train failed:\n{r.stderr[-4000:]}")
    recs = [json.loads(l) for l in (ROOT / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in recs if r["step"] > warmup]
    med = lambda k: statistics.median(r[k] for r in steady)
    return {"steps": len(recs), "wall_s": round(time.time() - t0, 1),
            "tokens_per_s": med("perf/tokens_per_s"), "positions_per_s": med("perf/positions_per_s"),
            "model_tflops": med("perf/model_tflops"), "mfu": med("perf/mfu"),
            "step_s": med("perf/step_s"), "data_wait_frac": med("perf/data_wait_frac"),
            "max_mem_gib": max(r["perf/max_mem_gib"] for r in recs),
            "padding_fraction": recs[-1].get("data/padding_fraction"),
            "final_loss": recs[-1]["loss/total"], "first_loss": recs[0]["loss/total"]}


def data_path_mode(a: argparse.Namespace) -> dict:
    ensure_data(a.data, 128)
    base = run_baseline(a.baseline)
    print("baseline", json.dumps(base), flush=True)
    ours = run_mmgen(a.steps, a.overrides, a.data, a.warmup)
    ref = base.get("compiled_flex_transfusion_mask") or base.get("compiled_sdpa_causal")
    result = {"baseline": base, "mmgen_1b": ours,
              "ratio_tokens_per_s_vs_compiled_flex": ours["tokens_per_s"] / ref["tokens_per_s"]}
    print(f"{'':28s}{'tokens/s':>12s}{'positions/s':>12s}{'MFU':>8s}{'mem GiB':>9s}")
    for name in ("eager_sdpa_causal", "compiled_sdpa_causal", "compiled_flex_transfusion_mask"):
        if name in base:
            b = base[name]
            print(f"baseline {name:19s}{b['tokens_per_s']:12.0f}{b['tokens_per_s']:12.0f}"
                  f"{b['mfu_vs_989']:8.3f}{b['max_mem_GiB']:9.1f}   (MFU: the baseline's PaLM estimate)")
    print(f"{'mmgen gpu_1b':28s}{ours['tokens_per_s']:12.0f}{ours['positions_per_s']:12.0f}"
          f"{ours['mfu']:8.3f}{ours['max_mem_gib']:9.1f}   (MFU: counted from the batches)")
    print(f"ratio mmgen / compiled flex baseline: tokens/s {result['ratio_tokens_per_s_vs_compiled_flex']:.3f} "
          "(not the same work: see --like-for-like)")
    return result


# ---------------------------------------------------------------- like-for-like mode

def baseline_batch(layout: dict, vocab_size: int, tokenizer, seed: int = 0):
    """mmgen's batch for the baseline's layout: per row one document covering the whole row, the
    baseline's image spans as continuous flow targets, random text elsewhere, and a next-token
    target at every text position (the baseline predicts from every position; mmgen's text head
    runs at text positions, so the ones before a span predict its placeholder id and the last
    one predicts EOS)."""
    import torch

    from mmgen.batch import IGNORE_INDEX, TEXT
    from mmgen.sampling.batching import VisualSpan, pack_rows

    gen = torch.Generator().manual_seed(seed)
    length, patch_dim = layout["length"], layout["patch_dim"]
    text = lambda n: torch.randint(0, vocab_size, (n,), generator=gen).tolist()
    rows = []
    for _ in range(layout["rows"]):
        doc, pos = [], 0
        for s0, s1 in layout["image_spans"]:
            n = s1 - s0
            side = max(h for h in range(1, math.isqrt(n) + 1) if n % h == 0)
            doc += [text(s0 - pos), VisualSpan(torch.rand(n, patch_dim, generator=gen) * 2 - 1,
                                               (1, side, n // side), is_target=True)]
            pos = s1
        rows.append([doc + [text(length - pos)]])
    batch = pack_rows(rows, tokenizer, length)
    following = torch.cat([batch.tokens[:, 1:], torch.full_like(batch.tokens[:, :1], tokenizer.eos)], 1)
    batch.targets = torch.where(batch.modality == TEXT, following, IGNORE_INDEX)
    return batch


def build_fixed_batch_trainer(job, dist, batch):
    """The real Trainer whose data source is one fixed batch instead of shards."""
    from mmgen.trainer.trainer import Trainer

    class FixedBatchTrainer(Trainer):
        def build_data(self) -> None:
            self.loader = None
            self.data_iter = itertools.repeat(batch)
            self.key_log = None
            self.device_encoder = None   # pixel patches: nothing to encode before the step

    return FixedBatchTrainer(job, dist)


def queued_step(trainer) -> tuple[float, dict, list[dict]]:
    """One step as the training loop takes it: next_batches, the step queued (launch_step), the
    host reading the queued results every ``trainer.sync_every`` steps. Returns next_batches'
    wait and work, and the results read now (empty between reads)."""
    step_input, wait, work = trainer.next_batches()
    trainer.pending.append(trainer.launch_step(step_input))
    trainer.state.step += 1
    read = trainer.read_pending() if trainer.state.step % trainer.sync_every == 0 else []
    return wait, work, read


def time_mmgen(trainer, steps: int, warmup: int) -> dict:
    """Time of the trainer's own step (next_batches + launch_step, the host reading the results
    every ``trainer.sync_every`` steps as the training loop does) over the steps after
    ``warmup``, between two device synchronisations; and the trainer's perf record of them."""
    import torch

    from mmgen.trainer.trainer import add_to_window, new_window

    cuda = trainer.dist.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize()) if cuda else (lambda: None)

    def run(n: int) -> tuple[list[dict], list[tuple[float, dict]], float]:
        read, host = [], []
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            wait, work, now = queued_step(trainer)
            host.append((wait, work))
            read += now
        read += trainer.read_pending()
        sync()
        return read, host, time.perf_counter() - t0

    warm, _, _ = run(warmup)
    timed, host, elapsed = run(steps - warmup)
    n = len(timed)
    window = new_window()
    for stats, (wait, work) in zip(timed, host):
        window = add_to_window(window, stats["_tokens"], elapsed / n, wait, work)
    return {"step_s": elapsed / n, "steps_timed": n, "sync_every": trainer.sync_every,
            "flops_per_step": window["flops"] / n, "tokens_per_step": window["tokens"] / n,
            "positions_per_step": window["positions"] / n,
            "losses": [s["loss/total"] for s in warm + timed], "trainer_perf": trainer.perf_stats(window)}


def rates(flops: float, tokens: float, positions: float, step_s: float, peak: float) -> dict:
    tflops = flops / step_s / 1e12
    return {"step_s": step_s, "tokens_per_s": tokens / step_s, "positions_per_s": positions / step_s,
            "flops_per_step": flops, "model_tflops": tflops, "mfu": tflops / peak if peak else None}


def like_for_like_mode(a: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_like_for_like_") as run_dir:
        return _like_for_like(a, run_dir)


def _like_for_like(a: argparse.Namespace, run_dir: str) -> dict:
    import torch

    from mmgen.cli.preflight import compose_job
    from mmgen.metrics.logger import detect_peak_tflops
    from mmgen.models import num_params
    from mmgen.models.tokenizers import build_tokenizer
    from mmgen.parallel.dist import init_distributed

    job = compose_job([*(TINY if a.tiny else GPU), f"trainer.device={a.device}", "trainer.precision=bf16",
                       f"trainer.steps={a.steps}", "checkpoint.enabled=false", "metrics.progress=false",
                       f"run_dir={run_dir}", "name=like_for_like", *a.overrides])
    job.model = dataclasses.replace(job.model, n_kv_heads=job.model.n_heads, **MATCH_BASELINE)
    job.validate()
    m = job.model
    shape = {"d": m.dim, "L": m.n_layers, "h": m.n_heads, "ffn": m.ffn_dim, "vocab": m.vocab_size,
             "T": job.data.seq_len, "B": job.data.batch_size, "patch_dim": m.patch_dim}
    device = "cuda" if a.device == "auto" and torch.cuda.is_available() else a.device
    device = "cpu" if device == "auto" else device
    runs = a.baseline_runs or ("eager_sdpa_transfusion_mask,eager_sdpa_causal" if device == "cpu"
                               else "compiled_flex_transfusion_mask,compiled_sdpa_causal")
    base = run_baseline(a.baseline, ["--device", device, "--shape", json.dumps(shape), "--runs", runs,
                                     "--no-ceilings", "--iters", str(max(a.steps - a.warmup, 1)),
                                     "--warm", str(max(a.warmup - 2, 1))])
    ref = next((n for n in runs.split(",") if base.get(n, {}).get("layout", {}).get("mask") == "transfusion"), None)
    if ref is None:
        raise RuntimeError(f"no baseline run with the Transfusion mask among {runs} (ran: {', '.join(base)})")

    tokenizer = build_tokenizer(job.data.tokenizer)
    batch = baseline_batch(base[ref]["layout"], m.vocab_size, tokenizer)
    dist = init_distributed(job.trainer.device)
    if dist.device.type == "cuda":
        batch = batch.pin_memory()  # as the loader's batches are (data.pin_memory): async copy
    trainer = build_fixed_batch_trainer(job, dist, batch)
    try:
        ours = time_mmgen(trainer, a.steps, a.warmup)
    finally:
        trainer.metrics.close()
    peak = a.peak_tflops or detect_peak_tflops(dist.device)
    mmgen = {**rates(ours["flops_per_step"], ours["tokens_per_step"], ours["positions_per_step"],
                     ours["step_s"], peak),
             "num_params": num_params(trainer.engine.module), "trainer_perf": ours["trainer_perf"],
             "losses": ours["losses"]}

    baselines = {name: count_baseline(r, m, tokenizer, peak) for name, r in base.items()}
    b = baselines[ref]
    result = {"mode": "like_for_like", "device": str(dist.device), "shape": shape, "peak_tflops": peak,
              "model": dataclasses.asdict(m), "mmgen": mmgen, "baseline": baselines, "reference": ref,
              "same_work": mmgen["flops_per_step"] == b["flops_per_step"],
              "ratio_tokens_per_s": mmgen["tokens_per_s"] / b["tokens_per_s"],
              "ratio_model_tflops": mmgen["model_tflops"] / b["model_tflops"]}
    print_like_for_like(result)
    return result


def count_baseline(r: dict, cfg, tokenizer, peak: float) -> dict:
    """A baseline run's rates, its work counted by mmgen.metrics.flops on the equivalent batch
    of the layout it reports, with its own mask (causal runs have no bidirectional image pairs)."""
    from mmgen.metrics.flops import attention_pairs, batch_work, training_flops

    layout = r["layout"]
    equivalent = baseline_batch(layout, cfg.vocab_size, tokenizer)
    work = batch_work(equivalent)
    if layout["mask"] == "causal":
        no_spans = equivalent.span_ids.new_full(equivalent.span_ids.shape, -1)
        work = dataclasses.replace(work, attention_pairs=attention_pairs(equivalent.document_ids, no_spans))
    return {**rates(training_flops(cfg, work), work.tokens, work.positions, r["step_s"], peak),
            "params": r["params"], "layout": layout, "max_mem_gib": r["max_mem_GiB"]}


def print_like_for_like(result: dict) -> None:
    mmgen, baselines, ref = result["mmgen"], result["baseline"], result["reference"]
    print(f"{'':40s}{'step s':>9s}{'tokens/s':>11s}{'positions/s':>12s}{'TFLOP/s':>9s}{'MFU':>7s}{'GFLOP/step':>12s}")
    for name, row in [*((f"baseline {n}", r) for n, r in baselines.items()), ("mmgen (Trainer step)", mmgen)]:
        mfu = f"{row['mfu']:7.3f}" if row["mfu"] is not None else f"{'-':>7s}"
        print(f"{name:40s}{row['step_s']:9.4f}{row['tokens_per_s']:11.0f}{row['positions_per_s']:12.0f}"
              f"{row['model_tflops']:9.3f}{mfu}{row['flops_per_step'] / 1e9:12.3f}")
    print(f"ratio mmgen / baseline {ref}: tokens/s {result['ratio_tokens_per_s']:.3f}, "
          f"model TFLOP/s {result['ratio_model_tflops']:.3f} (same counted work: {result['same_work']})")


def main() -> None:
    p = argparse.ArgumentParser(description="mmgen's training step against the plain-PyTorch baseline")
    p.add_argument("--baseline", default=str(BASELINE))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10, help="steps excluded (compilation)")
    p.add_argument("--data", default="data/shapes128")
    p.add_argument("--out", default="")
    p.add_argument("--like-for-like", action="store_true",
                   help="mmgen's step on the baseline's batch layout and model shape")
    p.add_argument("--tiny", action="store_true", help="like-for-like at a debug size (seq 128)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="like-for-like only")
    p.add_argument("--baseline-runs", default="", help="like-for-like: the baseline's --runs")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="for MFU; 0 = detect (none on a CPU)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    if (a.tiny or a.device != "auto" or a.baseline_runs) and not a.like_for_like:
        p.error("--tiny, --device and --baseline-runs go with --like-for-like")
    if a.like_for_like and a.warmup >= a.steps:
        p.error(f"--warmup {a.warmup} leaves none of --steps {a.steps} to time")
    result = like_for_like_mode(a) if a.like_for_like else data_path_mode(a)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
