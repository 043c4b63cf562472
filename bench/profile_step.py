# Where the time of mmgen's like-for-like training step goes: a profile-based breakdown.
"""Builds the same fixed-batch trainer as ``bench/gpu_throughput.py --like-for-like`` (mmgen's
real ``next_batches`` + ``train_step`` on the baseline's batch layout and model shape), warms
it up (compilation), then:

* times ``--steps`` steps as the training loop takes them (the host reads the results every
  ``trainer.sync_every`` steps), between two synchronisations;
* profiles ``--profile-steps`` steps with ``torch.profiler`` and sums GPU kernel time by
  category (GEMMs, attention, the optimizer, cross-entropy, copies, other kernels) and the GPU
  idle time (the step's wall time not covered by any kernel): what the 1.25x goal of the
  GPU performance issue has to take from;
* times the host's phases (next_batches and its FLOP count, the objective's forward, the
  trunk, the mask, backward, the optimizer step, the reads) over ``--steps`` more steps;
* on CUDA, runs one more step under ``torch.cuda.set_sync_debug_mode("warn")`` and records the
  Python stack of every host synchronisation (a sync stops the host from queueing the next
  kernels, so the GPU idles while the host catches up).

Usage:
    python bench/profile_step.py [--steps 20 --warmup 8 --profile-steps 3] [--out r.json] [overrides...]
    python bench/profile_step.py --tiny --device cpu --steps 3 --warmup 1   # a CPU check
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_throughput as gt  # noqa: E402  (bench/ is not a package)

# substrings of kernel names, first match wins (lower case)
CATEGORIES = (
    ("optimizer", ("adam", "multi_tensor", "foreach", "_amp_", "norm_kernel", "lpnorm")),
    ("attention", ("flex", "flash", "attention", "sdpa", "fmha", "triton_tem_fused")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "cublas", "matmul", "_mm_", "addmm")),
    ("cross_entropy", ("log_softmax", "nll_loss", "cross_entropy", "softmax")),
    ("copy", ("memcpy", "memset", "copy_")),
)


def category(name: str) -> str:
    n = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in n for k in keys):
            return cat
    return "other"


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by ``intervals`` (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def build_trainer(a: argparse.Namespace, run_dir: str):
    from mmgen.cli.preflight import compose_job
    from mmgen.models.tokenizers import build_tokenizer
    from mmgen.parallel.dist import init_distributed

    job = compose_job([*(gt.TINY if a.tiny else gt.GPU), f"trainer.device={a.device}", "trainer.precision=bf16",
                       f"trainer.steps={a.steps + a.warmup + a.profile_steps + 2}", "checkpoint.enabled=false",
                       "metrics.progress=false", f"run_dir={run_dir}", "name=profile_step", *a.overrides])
    job.model = dataclasses.replace(job.model, n_kv_heads=job.model.n_heads, **gt.MATCH_BASELINE)
    job.validate()
    m = job.model
    T, B = job.data.seq_len, job.data.batch_size
    layout = {"rows": B, "length": T, "image_spans": [[T // 8, T // 4], [T // 2, T // 2 + T // 8]],
              "patch_dim": m.patch_dim, "mask": "transfusion"}
    batch = gt.baseline_batch(layout, m.vocab_size, build_tokenizer(job.data.tokenizer))
    dist = init_distributed(job.trainer.device)
    if dist.device.type == "cuda":
        batch = batch.pin_memory()
    return gt.build_fixed_batch_trainer(job, dist, batch), dist


def one_step(trainer, host: list | None = None) -> None:
    """One step as the training loop takes it (gpu_throughput.queued_step); ``host`` collects
    next_batches' host seconds."""
    wait, _, _ = gt.queued_step(trainer)
    if host is not None:
        host.append(wait)


def profile(trainer, dist, n: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    cuda = dist.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch_profile(activities=acts) as prof:
        for _ in range(n):
            one_step(trainer)
        trainer.read_pending()
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    by_cat, by_name, spans = collections.Counter(), collections.Counter(), []
    for ev in prof.events():
        is_kernel = ev.device_type == torch.autograd.DeviceType.CUDA if cuda else False
        if not is_kernel:
            continue
        dur = ev.time_range.end - ev.time_range.start   # microseconds
        by_cat[category(ev.name)] += dur
        by_name[ev.name[:90]] += dur
        spans.append((ev.time_range.start, ev.time_range.end))
    busy = union_length(spans) / 1e6
    out = {"steps": n, "wall_s_per_step": wall / n, "gpu_busy_s_per_step": busy / n,
           "gpu_idle_frac": (1 - busy / wall) if cuda and wall > 0 else None,
           "kernel_s_per_step": {k: v / 1e6 / n for k, v in by_cat.most_common()},
           "top_kernels_s_per_step": {k: v / 1e6 / n for k, v in by_name.most_common(25)}}
    # host side: operators' and CUDA runtime calls' self time (launches, copies, syncs)
    table = prof.key_averages()
    out["top_cpu_ops_s_per_step"] = {e.key: e.self_cpu_time_total / 1e6 / n for e in
                                     sorted(table, key=lambda e: -e.self_cpu_time_total)[:30]}
    out["cpu_op_calls_per_step"] = {e.key: e.count / n for e in
                                    sorted(table, key=lambda e: -e.count)[:15]}
    return out


class HostTimes:
    """Host seconds spent inside a few phases of the step (wrapped, no device sync): where the
    host's time per step goes when it, not the GPU, sets the pace."""

    def __init__(self, trainer):
        import mmgen.trainer.trainer as trainer_module

        self.total = collections.Counter()
        self.restore = []
        engine, model = trainer.engine, trainer.engine.module
        self.wrap(trainer, "next_batches")
        self.wrap(trainer, "read_pending")
        self.wrap(trainer_module, "training_flops")
        self.wrap(engine, "backward")
        self.wrap(engine, "step_on_device" if trainer.sync_every > 1 else "step", "optimizer_step")
        self.wrap(model, "build_mask")
        self.wrap(model, "embed")
        self.wrap(model, "trunk", "trunk_forward")
        objective = trainer.objective
        timer = self

        class Timed:
            def __getattr__(self, name):
                return getattr(objective, name)

            def __call__(self, *args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return objective(*args, **kwargs)
                finally:
                    timer.total["objective_forward"] += time.perf_counter() - t0

        trainer.objective = Timed()
        self.restore.append(lambda: setattr(trainer, "objective", objective))

    def wrap(self, owner, name: str, label: str = "") -> None:
        fn = getattr(owner, name)
        label = label or name

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[label] += time.perf_counter() - t0

        if isinstance(owner, type(sys)):   # a module-level function
            setattr(owner, name, timed)
            self.restore.append(lambda: setattr(owner, name, fn))
        else:
            owner.__dict__[name] = timed
            self.restore.append(lambda: owner.__dict__.pop(name, None))

    def per_step(self, steps: int) -> dict:
        for undo in self.restore:
            undo()
        return {k: v / steps for k, v in self.total.most_common()}


def sync_sites(trainer) -> list[dict]:
    """Python stacks of the host synchronisations of one step (CUDA only), most frequent first."""
    import torch

    sites = collections.Counter()
    original = warnings.showwarning

    def record(message, category_, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return original(message, category_, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "mmgen" in f.filename or "bench" in f.filename]
        sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            one_step(trainer)
            trainer.read_pending()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = original
    return [{"site": s, "count": c} for s, c in sites.most_common()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", default="")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    import torch

    with tempfile.TemporaryDirectory(prefix="profile_step_") as run_dir:
        trainer, dist = build_trainer(a, run_dir)
        cuda = dist.device.type == "cuda"
        t0 = time.perf_counter()
        for _ in range(a.warmup):
            one_step(trainer)
        if cuda:
            torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0
        host = []
        trainer.read_pending()
        t = time.perf_counter()
        for _ in range(a.steps):
            one_step(trainer, host)
        trainer.read_pending()
        if cuda:
            torch.cuda.synchronize()
        step_s = (time.perf_counter() - t) / a.steps
        phases = HostTimes(trainer)
        t = time.perf_counter()
        for _ in range(a.steps):
            one_step(trainer)
        trainer.read_pending()
        if cuda:
            torch.cuda.synchronize()
        phase_step_s = (time.perf_counter() - t) / a.steps
        host_phases = phases.per_step(a.steps)
        result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                  "overrides": a.overrides, "warmup_s": warm_s, "sync_every": trainer.sync_every, "step_s": step_s,
                  "host_phases_s_per_step": host_phases, "loadavg": os.getloadavg(),
                  "threads": torch.get_num_threads(), "step_s_with_phase_timers": phase_step_s,
                  "next_batches_s_median": sorted(host)[len(host) // 2],
                  "profile": profile(trainer, dist, a.profile_steps),
                  "sync_sites": sync_sites(trainer) if cuda else None}
        trainer.metrics.close()
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
