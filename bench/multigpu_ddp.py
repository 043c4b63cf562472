# DDP over several GPUs of one host: loss parity with 1 GPU, the data split, weak scaling.
"""Three measurements in one call, each with its baseline measured in the same run:

1. **parity**: the ``small`` flavor (``experiment=shapes_gpu``, bf16), same seed and global
   batch, on 1 GPU with ``trainer.grad_accum=N`` and on N GPUs (torchrun, NCCL). Micro-batch
   ``a`` of rank ``r`` reads data stream ``a * N + r`` and draws noise from (seed, step,
   stream) (mmgen/data/README.md "Streams"), so both runs see the same batches and noise, and
   with ``trainer.deterministic=true`` they differ only in the order of the fp32 gradient sum
   (none for N = 2: a + b is a + b).
   Tolerance. Step 1 starts from identical weights, so its loss may differ only by the fp32
   sum of N per-rank loss sums: <= 1e-6 relative. After that, bf16 autocast turns any
   last-bit difference into flipped roundings (2**-7 relative each), and training amplifies
   them: a trajectory that differs by rounding alone drifts away step by step. How far is
   measured in the same call: two runs of the same 1-GPU job with the default
   (non-deterministic) kernels differ by rounding order only (atomic adds). The N-GPU run
   passes when every 20-step block's mean loss is within ``max(2**-7, 2 x that pair's
   difference)`` of the 1-GPU run's; a control with another data order shows that the
   tolerance separates "same training" from "different training".
2. **split**: N GPUs with ``trainer.record_keys=true`` over several epochs of a small shard
   set: in every complete epoch the sample keys consumed by all ranks, streams and workers are
   disjoint and their union is the whole training split. Then the same run is preempted
   (SIGTERM to every rank, as Slurm's ``--signal`` does) and resumed: the keys of every
   (step, stream) and the losses equal the uninterrupted run's.
3. **scaling**: the ``1b`` flavor (``experiment=gpu_1b``: seq 2048 x 4 rows per GPU, bf16,
   FlexAttention, compiled blocks) on 1, 2, 4, ... N GPUs with a fixed micro-batch per GPU:
   non-padding tokens/s (all GPUs and per GPU), MFU, data-wait fraction, peak memory, and the
   scaling efficiency against 1 GPU (medians of the records after ``--warmup`` steps).

Usage:
    python bench/multigpu_ddp.py --out bench/results/multigpu_ddp_h200x2.json   # all GPUs
    python bench/multigpu_ddp.py --cpu            # 2 CPU processes, gloo, debug flavor, fp32
Exits 1 when a parity or split check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BF16_SPACING = 2.0 ** -7     # relative spacing of bf16 numbers (8 significant bits)
FP32_TOLERANCE = 1e-5


# ---------------------------------------------------------------------------------------------
# running mmgen-train
# ---------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.a = args
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
        if args.cpu:
            self.env["OMP_NUM_THREADS"] = "1"

    def command(self, nproc: int, name: str, overrides: list[str]) -> list[str]:
        head = [sys.executable, "-m", "mmgen.train"]
        if nproc > 1:
            head = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={nproc}", "-m", "mmgen.train"]
        return [*head, f"name={name}", "metrics.progress=false", *overrides]

    def train(self, nproc: int, name: str, overrides: list[str]) -> subprocess.CompletedProcess:
        t0 = time.time()
        r = subprocess.run(self.command(nproc, name, overrides), cwd=self.work, env=self.env,
                           capture_output=True, text=True, timeout=self.a.timeout)
        print(f"  {name}: {nproc} process(es), exit {r.returncode}, {time.time() - t0:.0f} s",
              flush=True)
        if r.returncode:
            raise RuntimeError(f"{name} failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
        return r

    def train_single_concurrently(self, jobs: list[tuple[str, list[str]]], gpus: int) -> None:
        """One-process runs, up to ``gpus`` at a time, each on its own GPU (independent runs:
        only their losses are compared, not their speed). With --cpu the same, on the cores."""
        if gpus < 2:
            for name, overrides in jobs:
                self.train(1, name, overrides)
            return
        pending = list(jobs)
        while pending:
            batch, pending = pending[:gpus], pending[gpus:]
            t0, procs = time.time(), []
            for gpu, (name, overrides) in enumerate(batch):
                env = {**self.env, "CUDA_VISIBLE_DEVICES": str(gpu)}
                procs.append((name, subprocess.Popen(
                    self.command(1, name, overrides), cwd=self.work, env=env,
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
            for name, proc in procs:
                _, err = proc.communicate(timeout=self.a.timeout)
                print(f"  {name}: 1 process, exit {proc.returncode}, {time.time() - t0:.0f} s "
                      f"({len(batch)} side by side)", flush=True)
                if proc.returncode:
                    raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{err[-4000:]}")

    def preempted(self, nproc: int, name: str, overrides: list[str], at_step: int) -> int:
        """Start a run, SIGTERM every rank once ``at_step`` is logged; the step it stopped at."""
        proc = subprocess.Popen(self.command(nproc, name, overrides), cwd=self.work, env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        run = self.run_dir(name)
        t0 = time.time()
        while last_step(run) < at_step:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} ended before the preemption:\n{proc.stderr.read()[-4000:]}")
            if time.time() - t0 > self.a.timeout:
                proc.kill()
                raise RuntimeError(f"{name} made no progress")
            time.sleep(0.2)
        pids = worker_pids(proc.pid) if nproc > 1 else [proc.pid]
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=self.a.timeout)
        stopped = last_step(run)
        print(f"  {name}: preempted at step {stopped} (exit {proc.returncode})", flush=True)
        if not (self.run_dir(name) / "checkpoints" / f"step_{stopped:07d}" / "meta.json").is_file():
            raise RuntimeError(f"{name}: no checkpoint at the preemption step {stopped}:\n{err[-3000:]}")
        return stopped

    def run_dir(self, name: str) -> Path:
        return self.work / "runs" / name

    def make_data(self, name: str, train: int, per_shard: int, image_size: int) -> Path:
        out = self.work / "data" / name
        if not (out / "val").is_dir():
            subprocess.run([sys.executable, "-m", "mmgen.cli.main", "data", "make-shapes",
                            "--out", str(out), "--train", str(train), "--val", "64",
                            "--image-size", str(image_size), "--per-shard", str(per_shard)],
                           check=True, env=self.env, capture_output=True)
        return out


def last_step(run: Path) -> int:
    f = run / "metrics.jsonl"
    lines = f.read_text().splitlines() if f.is_file() else []
    return json.loads(lines[-1])["step"] if lines else 0


def worker_pids(parent: int) -> list[int]:
    """The processes torchrun started (they carry RANK in their environment)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"RANK=" in env:
            out.append(int(pid))
    return out


def records(run: Path) -> dict[int, dict]:
    """step -> metrics record (the later line wins: a resume may log a step twice)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out


def key_records(run: Path) -> dict[tuple[int, int], list]:
    """(step, stream) -> [[source, epoch, key], ...] plus the reader, later lines winning."""
    out = {}
    for f in sorted((run / "data_keys").glob("rank_*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out[rec["step"], rec["stream"]] = {"worker": rec["worker"], "docs": rec["docs"]}
    return out


def shard_keys(train_dir: Path) -> set[str]:
    keys = set()
    for shard in sorted(train_dir.glob("*.tar")):
        with tarfile.open(shard) as t:
            keys.update(m.name.split(".", 1)[0] for m in t.getmembers() if m.isfile())
    return keys


# ---------------------------------------------------------------------------------------------
# the three parts
# ---------------------------------------------------------------------------------------------

def curve_diff(a: dict[int, dict], b: dict[int, dict], key: str = "loss/total") -> dict:
    steps = sorted(set(a) & set(b))
    rel = [abs(a[s][key] - b[s][key]) / abs(a[s][key]) for s in steps]
    tail = steps[-20:]
    mean_a = statistics.fmean(a[s][key] for s in tail)
    mean_b = statistics.fmean(b[s][key] for s in tail)
    worst = max(range(len(steps)), key=rel.__getitem__)
    return {"steps": len(steps), "step1_rel": rel[0], "max_rel": rel[worst],
            "max_rel_step": steps[worst], "mean_rel": statistics.fmean(rel),
            "last20_mean_rel": abs(mean_a - mean_b) / abs(mean_a),
            "final_loss_a": a[steps[-1]][key], "final_loss_b": b[steps[-1]][key]}


BLOCK = 20    # steps per block of the parity comparison


def block_diffs(a: list[float], b: list[float]) -> list[float]:
    """Relative difference of the mean loss of every BLOCK-step block."""
    out = []
    for i in range(0, min(len(a), len(b)) - BLOCK + 1, BLOCK):
        ma, mb = statistics.fmean(a[i:i + BLOCK]), statistics.fmean(b[i:i + BLOCK])
        out.append(abs(ma - mb) / abs(ma))
    return out


def parity(b: Bench, n: int, common: list[str], steps: int, floor: float) -> dict:
    """1 GPU x grad_accum N vs N GPUs, both with deterministic kernels, judged per BLOCK-step
    block against a tolerance calibrated in the same call (module docstring). With one GPU (a
    dry run) everything but the N-GPU run."""
    accum = max(n, 2)
    print(f"parity: {steps} steps, 1 process x grad_accum {accum} vs {n} processes", flush=True)
    base = [*common, f"trainer.steps={steps}", "trainer.log_every=1", "checkpoint.enabled=false"]
    one, det = [f"trainer.grad_accum={accum}"], ["trainer.deterministic=true"]
    runs = {"1x": (1, [*one, *det]),
            "1x_other_data": (1, [*one, *det, "data.seed=1"]),
            "1x_nondet": (1, one), "1x_nondet_repeat": (1, one)}
    if n > 1:
        runs[f"{n}x"] = (n, det)
    b.train_single_concurrently([(f"parity_{k}", [*base, *o]) for k, (m, o) in runs.items()
                                 if m == 1], n)
    for k, (m, o) in runs.items():
        if m > 1:
            b.train(m, f"parity_{k}", [*base, *o])
    curves = {k: records(b.run_dir(f"parity_{k}")) for k in runs}
    loss = {k: [c[s]["loss/total"] for s in sorted(c)] for k, c in curves.items()}
    calibration = block_diffs(loss["1x_nondet"], loss["1x_nondet_repeat"])
    tolerance = [max(floor, 2 * c) for c in calibration]
    # every run against 1x, except the non-deterministic repeat: against its twin
    refs = {k: "1x_nondet" if k == "1x_nondet_repeat" else "1x" for k in runs if k != "1x"}
    out = {"gpus": n, "steps": steps, "grad_accum": accum, "block": BLOCK, "floor": floor,
           "calibration": calibration, "tolerance": tolerance, "loss": loss,
           "diffs": {k: curve_diff(curves[ref], curves[k]) for k, ref in refs.items()},
           "control_blocks": block_diffs(loss["1x"], loss["1x_other_data"])}
    out["control_exceeds"] = any(d > t for d, t in zip(out["control_blocks"], tolerance))
    if n > 1:
        d = out["diffs"][f"{n}x"]
        out["blocks"] = block_diffs(loss["1x"], loss[f"{n}x"])
        out["identical"] = loss["1x"] == loss[f"{n}x"]
        out["pass"] = (d["steps"] == steps and d["step1_rel"] <= 1e-6
                       and all(x <= t for x, t in zip(out["blocks"], tolerance)))
    return out


def epoch_check(keys: dict, all_keys: set[str]) -> dict:
    """Per epoch: keys consumed, duplicates, missing. An epoch is complete once every reader
    (stream, worker) has consumed a sample of a later epoch; a complete epoch must be an exact
    partition of the training split over the readers."""
    by_epoch: dict[int, Counter] = defaultdict(Counter)
    readers: dict[int, set] = defaultdict(set)
    reached: dict[tuple, int] = defaultdict(int)
    for (step, stream), rec in keys.items():
        reader = (stream, rec["worker"])
        for source, epoch, key in rec["docs"]:
            by_epoch[epoch][key] += 1
            readers[epoch].add(reader)
            reached[reader] = max(reached[reader], epoch)
    out = []
    for e in sorted(by_epoch):
        c = by_epoch[e]
        out.append({"epoch": e, "complete": all(r > e for r in reached.values()),
                    "keys": len(c), "duplicates": sum(v - 1 for v in c.values()),
                    "readers": len(readers[e]), "missing": len(all_keys - set(c)),
                    "unknown": len(set(c) - all_keys)})
    return {"epochs": out, "readers": len(reached),
            "pass": sum(x["complete"] for x in out) >= 1 and all(
                x["duplicates"] == 0 and x["missing"] == 0 and x["unknown"] == 0
                for x in out if x["complete"]) and all(x["duplicates"] == 0 for x in out)}


def split(b: Bench, n: int, common: list[str], steps: int) -> dict:
    print(f"split: {steps} steps on {n} processes, then preempted + resumed", flush=True)
    data = b.make_data("split", train=b.a.split_samples, per_shard=b.a.split_samples // 16,
                       image_size=32)
    base = [*common, f"data.train_shards={data}/train", f"data.val_shards={data}/val",
            f"trainer.steps={steps}", "trainer.log_every=1", "trainer.record_keys=true",
            "checkpoint.every=100000", *(["trainer.deterministic=true"] if b.a.deterministic else [])]
    b.train(n, "split_straight", base)
    straight = key_records(b.run_dir("split_straight"))
    check = epoch_check(straight, shard_keys(data / "train"))
    stopped = b.preempted(n, "split_resumed", base, at_step=steps // 3)
    r = b.train(n, "split_resumed", base)
    resumed = key_records(b.run_dir("split_resumed"))
    a, c = records(b.run_dir("split_straight")), records(b.run_dir("split_resumed"))
    exact = b.a.cpu or b.a.deterministic      # bitwise-reproducible kernels: losses must match
    out = {"gpus": n, "steps": steps, "samples": b.a.split_samples, **check,
           "preempted_at": stopped, "resumed": "resumed from" in r.stderr,
           "resume_same_keys": resumed == straight, "resume_same_steps": sorted(a) == sorted(c),
           "resume_loss": curve_diff(a, c), "resume_losses_must_match": exact}
    out["pass"] = (check["pass"] and out["resume_same_keys"] and out["resumed"]
                   and out["resume_same_steps"]
                   and (not exact or out["resume_loss"]["max_rel"] == 0.0))
    return out


def scaling(b: Bench, sizes: list[int], common: list[str], steps: int, warmup: int,
            backends: list[str]) -> dict:
    """Weak scaling per backend; efficiency against the same backend on 1 GPU."""
    print(f"scaling: {steps} steps on {sizes} processes, backends {backends}", flush=True)
    rows = []
    for backend in backends:
        mine = []
        for n in sizes:
            name = f"scaling_{backend}_{n}"
            b.train(n, name, [*common, f"parallel={backend}", f"trainer.steps={steps}",
                              "trainer.log_every=1", "checkpoint.enabled=false"])
            recs = [r for s, r in sorted(records(b.run_dir(name)).items()) if s > warmup]
            med = lambda k: statistics.median(r[k] for r in recs) if k in recs[0] else None
            tps = med("perf/tokens_per_s")
            mine.append({"backend": backend, "gpus": n, "tokens_per_s": tps,
                         "tokens_per_s_per_gpu": tps / n, "mfu": med("perf/mfu"),
                         "data_wait_frac": med("perf/data_wait_frac"),
                         "step_s": med("perf/step_s"),
                         "max_mem_gib": max((r.get("perf/max_mem_gib", 0.0) for r in recs),
                                            default=None),
                         "padding_fraction": recs[-1].get("data/padding_fraction"),
                         "final_loss": recs[-1]["loss/total"]})
        for row in mine:
            row["efficiency"] = row["tokens_per_s_per_gpu"] / mine[0]["tokens_per_s_per_gpu"]
        rows += mine
    return {"steps": steps, "warmup": warmup, "rows": rows}


# ---------------------------------------------------------------------------------------------

def print_tables(res: dict) -> None:
    if "parity" in res:
        p = res["parity"]
        print(f"\nparity ({p['steps']} steps; loss vs 1 GPU x grad_accum {p['grad_accum']}, "
              f"deterministic kernels): per-step relative difference")
        print(f"{'run':28s}{'step 1':>10s}{'max':>10s}{'mean':>10s}{'last 20':>10s}")
        for k, d in p["diffs"].items():
            print(f"{k:28s}{d['step1_rel']:10.2e}{d['max_rel']:10.2e}{d['mean_rel']:10.2e}"
                  f"{d['last20_mean_rel']:10.2e}")
        print(f"relative difference of {p['block']}-step mean losses, block by block")
        rows = [("tolerance", p["tolerance"]), ("1x_other_data (control)", p["control_blocks"])]
        if "blocks" in p:
            rows.insert(1, (f"{p['gpus']}x", p["blocks"]))
        for label, xs in rows:
            print(f"{label:28s}" + "".join(f"{x:9.1e}" for x in xs))
        print(f"control exceeds the tolerance: {p['control_exceeds']}")
        if "pass" in p:
            print(f"parity: {'PASS' if p['pass'] else 'FAIL'} (bitwise identical: {p['identical']})")
    if "split" in res:
        s = res["split"]
        print(f"\ndata split ({s['gpus']} ranks, {s['samples']} samples, {s['steps']} steps)")
        print(f"{'epoch':>6s}{'complete':>10s}{'keys':>8s}{'dupl.':>7s}{'missing':>9s}{'readers':>9s}")
        for e in s["epochs"]:
            print(f"{e['epoch']:6d}{str(e['complete']):>10s}{e['keys']:8d}{e['duplicates']:7d}"
                  f"{e['missing']:9d}{e['readers']:9d}")
        print(f"preempted at step {s['preempted_at']}, resumed: keys identical "
              f"{s['resume_same_keys']}, max relative loss difference "
              f"{s['resume_loss']['max_rel']:.3g} (must be 0: {s['resume_losses_must_match']})")
        print(f"split: {'PASS' if s['pass'] else 'FAIL'}")
    if "scaling" in res:
        print(f"\nweak scaling (medians after step {res['scaling']['warmup']})")
        print(f"{'backend':>8s}{'GPUs':>5s}{'tok/s':>11s}{'tok/s/GPU':>11s}{'eff.':>7s}{'MFU':>7s}"
              f"{'wait':>7s}{'GiB':>7s}")
        for r in res["scaling"]["rows"]:
            mfu = f"{r['mfu']:7.3f}" if r["mfu"] is not None else f"{'-':>7s}"
            mem = f"{r['max_mem_gib']:7.1f}" if r["max_mem_gib"] else f"{'-':>7s}"
            print(f"{r['backend']:>8s}{r['gpus']:5d}{r['tokens_per_s']:11.0f}{r['tokens_per_s_per_gpu']:11.0f}"
                  f"{r['efficiency']:7.3f}{mfu}{r['data_wait_frac']:7.3f}{mem}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=0, help="N (default: every visible GPU)")
    p.add_argument("--cpu", action="store_true",
                   help="2 CPU processes with gloo, debug flavor, fp32 (checks the script)")
    p.add_argument("--parts", default="parity,split,scaling")
    p.add_argument("--deterministic", action="store_true",
                   help="run the split part with trainer.deterministic=true (then the resumed "
                        "run's losses must equal the uninterrupted run's bit for bit)")
    p.add_argument("--parity-steps", type=int, default=200)
    p.add_argument("--split-steps", type=int, default=30)
    p.add_argument("--split-samples", type=int, default=0,
                   help="training samples of the split part (default 1024; 64 with --cpu)")
    p.add_argument("--scaling-steps", type=int, default=30)
    p.add_argument("--scaling-backends", default="ddp",
                   help="comma-separated parallel backends to scale, e.g. ddp,fsdp2")
    p.add_argument("--warmup", type=int, default=10, help="scaling records excluded (compile)")
    p.add_argument("--work", default="runs/bench_multigpu", help="runs and data go here")
    p.add_argument("--timeout", type=int, default=900, help="seconds per training run")
    p.add_argument("--out", default="")
    a = p.parse_args()
    parts = [x for x in a.parts.split(",") if x]
    unknown = set(parts) - {"parity", "split", "scaling"}
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}")
    if a.cpu:
        n = a.gpus or 2
        device = ["trainer.device=cpu", "trainer.precision=fp32", "parallel.dist_backend=gloo",
                  "trainer.num_threads=1"]
        small = ["experiment=smoke", "data.batch_size=4", "data.num_workers=1",
                 "optim.warmup_steps=2", *device]
        big = small
        floor = FP32_TOLERANCE
        what = f"{n} CPU processes (gloo)"
    else:
        import torch

        visible = torch.cuda.device_count()
        n = a.gpus or visible
        if n < 1:
            sys.exit("multigpu_ddp: no GPU visible (use --cpu to check the script on CPUs)")
        if n > visible:
            sys.exit(f"multigpu_ddp: --gpus {n} but {visible} GPU(s) visible")
        small = ["experiment=shapes_gpu", "optim.warmup_steps=20", "trainer.max_minutes=0"]
        big = ["experiment=gpu_1b"]
        floor = BF16_SPACING
        what = f"{n} x {torch.cuda.get_device_name(0)}"
    a.split_samples = a.split_samples or (64 if a.cpu else 1024)
    b = Bench(a)
    shutil.rmtree(b.work / "runs", ignore_errors=True)   # runs of an earlier call would resume
    print(f"multigpu_ddp on {what}", flush=True)
    res: dict = {"device": what, "gpus": n, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    shapes = b.make_data("shapes32", train=4096, per_shard=256, image_size=32)
    data32 = [f"data.train_shards={shapes}/train", f"data.val_shards={shapes}/val"]
    if "parity" in parts:
        res["parity"] = parity(b, n, [*small, *data32], a.parity_steps, floor)
    if "split" in parts:
        res["split"] = split(b, n, small, a.split_steps)
    if "scaling" in parts:
        sizes = [k for k in (1, 2, 4, 8, 16) if k <= n]
        data = data32
        if not a.cpu:
            d = b.make_data("shapes128", train=4096, per_shard=128, image_size=128)
            data = [f"data.train_shards={d}/train", f"data.val_shards={d}/val"]
        res["scaling"] = scaling(b, sizes, [*big, *data], a.scaling_steps, a.warmup,
                                 [x for x in a.scaling_backends.split(",") if x])
    print_tables(res)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
        print(f"wrote {a.out}")
    failed = [k for k in ("parity", "split") if not res.get(k, {}).get("pass", True)]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
