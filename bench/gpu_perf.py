# The GPU performance run of one device (issue 17): real step, backends, sparse models, latents, shapes quality.
"""One script, one function per part, one JSON per part
(``<out-dir>/gpu_perf_<part>_<tag>.json``, tag from the device name: ``h200``, ``h100``, ``cpu``).
Every row is a separate ``python -m mmgen.train`` process (a clean process per backend and
compile setting) with a timeout; a row that fails records its one-line error and the script goes
on. Rows read the trainer's own per-step records (``trainer.log_every=1``:
``runs/.../metrics.jsonl``): medians over the steps after ``--warmup``, compile time apart.

Parts (``--parts``, comma-separated; defaults sized for ~2-4 minutes each on one H200):

* ``real``: ``experiment=gpu_1b`` (1.2B, seq 2048 x 4, bf16, FlexAttention, compiled blocks) on
  packed shapes documents from the real loader: tokens/s (non-padding), positions/s, model
  TFLOP/s counted from the batches, MFU, data-wait fraction, peak memory; time to the first
  step and the compile overhead of the warm-up steps reported apart. A second row logs every
  10 steps (``--real-log-every 1,10``): what the per-step records cost.
* ``backends``: the same model and batches under ``parallel=ddp`` (mmgen's own path, the
  reference), ``fsdp2``, ``zero2``, ``zero3``, ``megatron`` (tp=1); ``--backend-modes eager``
  (default: every backend runs uncompiled, the only setting all five accept) and/or
  ``compiled``; each ratio is against ddp with the same compile setting. Refusals are rows
  too (``zero3`` + compile + FlexAttention, ``megatron`` + compile stop at start-up).
* ``sparse``: ``model=moe_8x`` with ``model.moe_experts_impl=grouped`` and ``=loop``, and
  ``model=mot_1b``, on the gpu_1b data and shapes: tokens/s, MFU on active parameters
  (``mmgen.metrics.flops`` counts the routed top-k and one tower), router imbalance, peak memory.
* ``latents``: Transfusion on the latents of an mmgen KL-VAE (initialised, SD-like encoder:
  base 128, mults 1-2-4-4, 2 res blocks, 16x16x4 latents of a 128-px image, saved with
  ``save_codec``) with ``data.encode_on=device`` against latents cached by ``mmgen data
  encode``: same model, steps and images; the share of the step the on-GPU encode costs.
* ``quality``: ``mmgen-train experiment=<preset>`` for ``--quality-minutes`` (trainer.max_minutes),
  then ``mmgen eval shapes --num-samples 200``: scores per attribute and the training wall
  minutes. ``shapes_vqar_gpu`` / ``shapes_latent_gpu`` first train their codec
  (``codec_vq_shapes`` / ``codec_vae_shapes``) unless ``runs/<codec>`` already has a checkpoint.
  ``--quality-curve`` also scores every saved checkpoint (minutes to reach >= 0.95).

A JSON holds the device name, torch version, commit (``$MMGEN_COMMIT``, else
``git rev-parse HEAD``), the command line, and per row its command, overrides, commit and time. Rows
of an earlier call in the same file are kept unless a row of the same label replaces them
(``--fresh`` starts the file anew), so a part split over several device calls lands in one file.

Usage (GPU machine; data is made with ``mmgen data make-shapes`` if missing):
    python bench/gpu_perf.py --parts real
    python bench/gpu_perf.py --parts backends                       # eager rows, ~4 min
    python bench/gpu_perf.py --parts backends --backend-modes compiled
    python bench/gpu_perf.py --parts sparse
    python bench/gpu_perf.py --parts latents
    python bench/gpu_perf.py --parts quality [--presets shapes_vqar_gpu]
    python bench/gpu_perf.py --tiny --parts real,backends,sparse,latents,quality   # CPU, debug sizes
    python bench/gpu_perf.py --dry-run --backend-modes eager,compiled   # validate every GPU row's config
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))   # bench/ is not a package: gpu_throughput, dense_vs_sparse

PARTS = ("real", "backends", "sparse", "latents", "quality")
BACKENDS = ("ddp", "fsdp2", "zero2", "zero3", "megatron")
PRESETS = ("shapes_gpu", "shapes_vqar_gpu", "shapes_latent_gpu")
# preset -> (codec kind, the codec preset that trains it) for the families that need one
PRESET_CODEC = {"shapes_vqar_gpu": ("vq", "codec_vq_shapes"), "shapes_latent_gpu": ("vae", "codec_vae_shapes")}
ATTRIBUTES = ("color", "shape", "size", "position")
GOALS = {"data_wait_frac_max": 0.02, "backend_overhead_max": 0.05, "moe_8x_mfu_min": 0.40, "quality_min": 0.95}

# default steps / warm-up steps of each performance part (compile happens in the warm-up)
STEPS = {"real": (80, 10), "backends": (25, 8), "sparse": (30, 10), "latents": (40, 10)}
TINY_STEPS = {"real": (6, 2), "backends": (4, 1), "sparse": (4, 1), "latents": (4, 1)}

# the GPU base of every performance row: gpu_1b's shapes on the 128-px shapes data
GPU_BASE = ["experiment=gpu_1b"]
# --tiny: the same preset at a debug size that runs on a CPU in seconds
TINY_BASE = ["experiment=gpu_1b", "model=debug", "data.seq_len=256", "data.batch_size=2", "data.image_size=32",
             "data.patch_size=4", "model.attention=sdpa", "trainer.precision=fp32", "trainer.compile=false",
             "data.num_workers=0", "trainer.num_threads=2"]
# the KL-VAE of the latents part (initialised; the encoder's cost does not depend on training)
GPU_VAE = {"base_channels": 128, "channel_mult": [1, 2, 4, 4], "num_res_blocks": 2, "norm_groups": 32,
           "latent_channels": 4}
TINY_VAE = {"base_channels": 16, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "norm_groups": 8,
            "latent_channels": 4}


# ---------------------------------------------------------------- environment and results files

def sh_out(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def commit() -> str:
    # the environment first: a copy of the tree on a GPU machine may carry an older .git
    return os.environ.get("MMGEN_COMMIT") or sh_out(["git", "rev-parse", "HEAD"]) or "unknown"


def device_info(device: str) -> tuple[str, str]:
    """(device name, tag) without a CUDA context in this process (nvidia-smi, else torch)."""
    if device != "cpu":
        name = sh_out(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]).splitlines()
        if not name:
            import torch

            if torch.cuda.is_available():
                name = [torch.cuda.get_device_name(0)]
        if name:
            m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name[0])
            return name[0], (m.group(1).lower() if m else re.sub(r"\W+", "_", name[0]).lower())
    return f"cpu ({os.cpu_count()} cores)", "cpu"


class Results:
    """One part's JSON file, rewritten after every row (a killed call keeps what it measured)."""

    def __init__(self, part: str, a, header: dict):
        self.path = Path(a.out_dir) / f"gpu_perf_{part}_{a.tag}.json"
        self.data = {"part": part, **header, "rows": [], "summary": {}}
        if self.path.is_file() and not a.fresh:
            old = json.loads(self.path.read_text())
            self.data["rows"] = old.get("rows", [])
            self.data["earlier_calls"] = [*old.get("earlier_calls", []),
                                          {k: old.get(k) for k in ("command", "commit", "time")}]

    def add(self, row: dict) -> dict:
        rows = [r for r in self.data["rows"] if r["label"] != row["label"]]
        self.data["rows"] = [*rows, row]
        self.write()
        return row

    def rows(self) -> list[dict]:
        return self.data["rows"]

    def write(self, summary: dict | None = None) -> None:
        if summary is not None:
            self.data["summary"] = summary
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))


# ---------------------------------------------------------------- running one training process

def one_line(text: str) -> str:
    """The line of a failed run's stderr that says why (mmgen's one-line errors first)."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    lines = [l for l in lines if "HYDRA_FULL_ERROR" not in l and not l.startswith("warnings.warn")]
    for pat in (r"\berror: ", r"^\w+(\.\w+)*(Error|Exception)\b", r"(Error|Exception)\b"):
        hit = next((l for l in reversed(lines) if re.search(pat, l)), None)
        if hit:
            return hit[:400]
    return (lines[-1] if lines else "no output")[:400]


def run_process(cmd: list[str], log: Path, timeout: float) -> tuple[float, str]:
    """Run ``cmd`` in its own process group (data workers included), output to ``log``;
    (seconds, one-line error or "" when it exited 0)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            rc = None
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(proc.pid, sig)   # the group this call started (the run and its workers)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
    dt = time.time() - t0
    err = ""
    if rc is None:
        err = f"timed out after {timeout:.0f} s"
    elif rc:
        err = one_line(log.read_text(errors="replace")[-20000:])
    return dt, err


class Runner:
    """Budget, run directories and the train / eval commands shared by every part."""

    def __init__(self, a):
        self.a = a
        self.t0 = time.time()
        self.work = Path(a.work)
        self.runs = self.work / "runs" / "gpu_perf"
        self.py = sys.executable

    def left(self) -> float:
        return self.a.budget - (time.time() - self.t0)

    def timeout(self, want: float | None = None) -> float:
        return min(want or self.a.row_timeout, self.left() - 5)

    def base(self) -> list[str]:
        dev = [] if self.a.device == "auto" else [f"trainer.device={self.a.device}"]
        return [*(TINY_BASE if self.a.tiny else GPU_BASE), *dev]

    def steps(self, part: str) -> tuple[int, int]:
        steps, warmup = (TINY_STEPS if self.a.tiny else STEPS)[part]
        return self.a.steps or steps, self.a.warmup if self.a.warmup >= 0 else warmup

    def train(self, part: str, label: str, overrides: list[str], steps: int, warmup: int,
              timeout: float | None = None, log_every: int = 1) -> dict:
        """One training run (in a fresh run directory); its medians after ``warmup`` steps, and
        the error that stopped it if one did (a timed-out row keeps the steps it logged)."""
        run_dir = self.runs / part / label
        if run_dir.exists():
            shutil.rmtree(run_dir)
        cmd = [self.py, "-m", "mmgen.train", *overrides, f"name=gpu_perf_{part}_{label}", f"run_dir={run_dir}",
               f"trainer.log_every={log_every}", "metrics.progress=false", "checkpoint.resume=none"]
        if steps:
            cmd.append(f"trainer.steps={steps}")
        row = {"label": label, "overrides": overrides, "command": shlex.join(["python", *cmd[1:]]), "run_dir": str(run_dir),
               "commit": COMMIT, "time": now()}
        if self.a.dry_run:
            return {**row, **dry_run(cmd[3:])}
        limit = self.timeout(timeout)
        if limit < 20:
            return {**row, "skipped": f"budget: {max(self.left(), 0):.0f} s left of --budget {self.a.budget:.0f}"}
        launched = time.time()
        dt, err = run_process(cmd, run_dir.parent / f"{label}.log", limit)
        row["wall_s"] = round(dt, 1)
        metrics = run_dir / "metrics.jsonl"
        recs = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()] if metrics.is_file() else []
        recs = [r for r in recs if "perf/step_s" in r]
        if recs:
            row.update(summarize(recs, warmup, launched))
        elif not err:
            row["error"] = "no metrics records"
        if err:
            row["error"] = err
            row["log"] = str(run_dir.parent / f"{label}.log")
        return row

    def evaluate(self, run_dir: Path, num_samples: int, out: Path | None = None, timeout: float | None = None) -> dict:
        """``mmgen eval shapes`` on the run's newest checkpoint (or a view of one)."""
        cmd = [self.py, "-m", "mmgen.cli.main", "eval", "shapes", str(run_dir), "--num-samples", str(num_samples)]
        if out is not None:
            cmd += ["--out", str(out)]
        limit = self.timeout(timeout or self.a.eval_timeout)
        if self.a.dry_run or limit < 20:
            return {"skipped": "dry run" if self.a.dry_run else "budget"}
        out_dir = out or run_dir / "eval"
        dt, err = run_process(cmd, out_dir.parent / f"{out_dir.name}_eval.log", limit)
        if err:
            return {"eval_error": err, "eval_s": round(dt, 1)}
        scores = json.loads((out_dir / "scores.json").read_text())
        img, cap = scores.get("image", {}), scores.get("caption", {})
        attrs = {f"image/{k}": img[k] for k in ATTRIBUTES if k in img}
        attrs.update({f"caption/{k}": cap[k] for k in (*ATTRIBUTES, "exact") if k in cap})
        return {"eval_s": round(dt, 1), "eval_command": shlex.join(["python", *cmd[1:]]), "image": img, "caption": cap,
                "min_score": min(attrs.values()) if attrs else None, "grid": scores.get("grid")}


def dry_run(overrides: list[str]) -> dict:
    """--dry-run: compose and validate the row's configuration as mmgen-train's start-up does."""
    from mmgen.cli.preflight import compose_job
    from mmgen.cli.preflight import one_line as config_error

    try:
        job = compose_job(overrides)
        job.validate()
    except Exception as e:  # noqa: BLE001 - any start-up refusal is the row's result
        return {"skipped": "dry run", "dry_run_error": config_error(e)}
    return {"skipped": "dry run", "dry_run": f"validates: model {job.model.name}, parallel {job.parallel.name}, "
                                              f"compile {job.trainer.compile}"}


def ok(row: dict) -> bool:
    """A row that ran to its end and has medians (the only rows a ratio uses)."""
    return bool(row.get("tokens_per_s")) and not row.get("error") and not row.get("skipped")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def summarize(recs: list[dict], warmup: int, launched: float) -> dict:
    """Medians over the records whose steps all come after ``warmup``; the warm-up apart.

    Each record covers the steps since the previous one (``trainer.log_every``) with
    ``perf/step_s`` their mean, so the window's time is ``step_s * steps``."""
    prev, windows = 0, []
    for r in recs:
        windows.append((prev, r["step"] - prev, r))
        prev = r["step"]
    steady = [r for start, n, r in windows if start >= warmup]
    warm = [(n, r) for start, n, r in windows if start < warmup]
    out: dict = {"steps": recs[-1]["step"], "tokens_seen": recs[-1].get("progress/tokens_seen")}
    n0, r0 = windows[0][1], windows[0][2]
    loop_start = r0["time"] - r0["perf/step_s"] * n0
    out["startup_s"] = round(loop_start - launched, 2)          # process start -> first step begins
    out["train_wall_s"] = round(recs[-1]["time"] - loop_start, 2)
    if n0 == 1:
        out["first_step_s"] = r0["perf/step_s"]
        out["time_to_first_step_s"] = round(r0["time"] - launched, 2)
    losses = [r["loss/total"] for r in recs if "loss/total" in r]
    out.update({"first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
                "losses_finite": all(math.isfinite(x) for x in losses)})
    mems = [r["perf/max_mem_gib"] for r in recs if "perf/max_mem_gib" in r]
    if mems:
        out["max_mem_gib"] = max(mems)
    if "data/padding_fraction" in recs[-1]:
        out["padding_fraction"] = recs[-1]["data/padding_fraction"]
    if not steady:
        out["error"] = out.get("error") or f"no steps after the {warmup} warm-up steps ({recs[-1]['step']} ran)"
        return out
    med = lambda k: statistics.median(r[k] for r in steady) if all(k in r for r in steady) else None
    times = [(r["perf/step_s"] * n) for start, n, r in windows if start >= warmup]
    ns = [n for start, n, r in windows if start >= warmup]
    out.update({"steps_timed": sum(ns), "step_s": med("perf/step_s"), "tokens_per_s": med("perf/tokens_per_s"),
                "positions_per_s": med("perf/positions_per_s"), "model_tflops": med("perf/model_tflops"),
                "mfu": med("perf/mfu"), "data_wait_frac": med("perf/data_wait_frac")})
    # over the whole timed span (hiccups included), not the median step
    span = sum(times)
    out["tokens_per_s_mean"] = sum(r["perf/tokens_per_s"] * t for r, t in zip(steady, times)) / span
    out["data_wait_frac_mean"] = sum(r["perf/data_wait_frac"] * t for r, t in zip(steady, times)) / span
    if warm:
        warm_s = sum(r["perf/step_s"] * n for n, r in warm)
        out["warmup_steps_s"] = round(warm_s, 2)
        out["compile_s"] = round(warm_s - out["step_s"] * sum(n for n, _ in warm), 2)   # warm-up beyond steady steps
    router = router_summary(steady)
    if router:
        out["router"] = router
    return out


def router_summary(steady: list[dict]) -> dict:
    """MoE router stats of the timed records (mmgen.metrics.router keys)."""
    if not any("router/imbalance_max" in r for r in steady):
        return {}
    last = steady[-1]
    layer = lambda what: [v for k, v in last.items() if re.fullmatch(rf"router/L\d+(/T\d+)?/{what}", k)]
    imb, drop, ent = layer("imbalance"), layer("dropped_frac"), layer("entropy")
    return {"imbalance_max_median": statistics.median(r["router/imbalance_max"] for r in steady
                                                      if "router/imbalance_max" in r),
            "imbalance_max_last": last.get("router/imbalance_max"),
            "imbalance_mean_over_layers_last": statistics.fmean(imb) if imb else None,
            "dropped_frac_mean_last": statistics.fmean(drop) if drop else None,
            "entropy_mean_last": statistics.fmean(ent) if ent else None,
            "dead_experts_last": last.get("router/dead_experts")}


def data_overrides(path: str) -> list[str]:
    return [f"data.train_shards={path}/train", f"data.val_shards={path}/val"]


def make_shapes(out: Path, image_size: int, train: int, val: int) -> None:
    if not (out / "val").is_dir():
        subprocess.run([sys.executable, "-m", "mmgen.cli.main", "data", "make-shapes", "--out", str(out),
                        "--image-size", str(image_size), "--train", str(train), "--val", str(val)],
                       check=True, cwd=ROOT, capture_output=True)


def perf_data(r: Runner) -> str:
    """The 128-px shapes set of bench/gpu_throughput.py (GPU), or a small 32-px one (--tiny)."""
    from gpu_throughput import ensure_data

    if r.a.tiny:
        path = r.work / "data" / "shapes32"
        if not r.a.dry_run:
            make_shapes(path, 32, 400, 40)
        return str(path)
    if not r.a.dry_run:
        ensure_data(r.a.data, 128)
    return r.a.data


def fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_rows(rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    print(f"{'row':34s}" + "".join(f"{h:>12s}" for h, _, _ in cols), flush=True)
    for row in rows:
        if not ok(row):
            why = row.get("skipped") or row.get("error") or row.get("eval_error")
            print(f"{row['label']:34s}  {'skipped' if row.get('skipped') else 'failed'}: {why}", flush=True)
            continue
        print(f"{row['label']:34s}" + "".join(f"{fmt(row.get(k), s):>12s}" for _, k, s in cols), flush=True)


PERF_COLS = [("tokens/s", "tokens_per_s", ".0f"), ("positions/s", "positions_per_s", ".0f"),
             ("TFLOP/s", "model_tflops", ".1f"), ("MFU", "mfu", ".3f"), ("wait", "data_wait_frac", ".3f"),
             ("peak GiB", "max_mem_gib", ".1f"), ("1st step s", "first_step_s", ".1f"),
             ("compile s", "compile_s", ".1f")]


# ---------------------------------------------------------------- part 1: the real training step

def part_real(r: Runner, res: Results) -> dict:
    data = perf_data(r)
    steps, warmup = r.steps("real")
    for every in r.a.real_log_every:
        label = "gpu_1b" if every == 1 else f"gpu_1b_log{every}"
        # a record per log_every steps: the warm-up must end on a record boundary
        w = warmup if every == 1 else -(-warmup // every) * every
        row = r.train("real", label, [*r.base(), *data_overrides(data), *r.a.overrides], steps, w, log_every=every)
        if Path(row["run_dir"], "config.yaml").is_file():
            row.update(param_counts(Path(row["run_dir"])))
        res.add(row)
    rows = [x for x in res.rows() if ok(x)]
    summary = {"goal_data_wait_frac_max": GOALS["data_wait_frac_max"],
               "rows": {x["label"]: {k: x.get(k) for k in ("tokens_per_s", "positions_per_s", "model_tflops", "mfu",
                                                           "data_wait_frac", "data_wait_frac_mean", "max_mem_gib",
                                                           "time_to_first_step_s", "compile_s")}
                        for x in rows}}
    for x in rows:
        if x.get("data_wait_frac_mean") is not None:
            summary["rows"][x["label"]]["data_wait_goal_met"] = x["data_wait_frac_mean"] <= GOALS["data_wait_frac_max"]
    print_rows(res.rows(), PERF_COLS)
    return summary


# ---------------------------------------------------------------- part 2: backends on one GPU

def part_backends(r: Runner, res: Results) -> dict:
    data = perf_data(r)
    steps, warmup = r.steps("backends")
    for mode in r.a.backend_modes:
        compile_ = [f"trainer.compile={'false' if mode == 'eager' else 'true'}"]
        # ddp (the reference) first; without it the ratios use a ddp row of an earlier call
        for backend in sorted(r.a.backends, key=lambda b: b != "ddp"):
            extra = ["parallel.tp=1"] if backend == "megatron" else []
            label = f"{backend}_{mode}"
            over = [*r.base(), *data_overrides(data), f"parallel={backend}", *extra, *compile_, *r.a.overrides]
            res.add({**r.train("backends", label, over, steps, warmup), "backend": backend, "mode": mode})
    # ratios against ddp of the same compile setting, every row of the file (earlier calls too)
    rows = res.rows()
    ratios = {}
    for row in rows:
        ref = next((x for x in rows if x.get("backend") == "ddp" and x.get("mode") == row.get("mode") and ok(x)), None)
        if not ok(row) or ref is None:
            ratios[row["label"]] = {"error": row.get("error") or row.get("skipped") or "no ddp reference"}
            continue
        q = {"tokens_per_s": row["tokens_per_s"], "tokens_per_s_ratio_vs_ddp": row["tokens_per_s"] / ref["tokens_per_s"],
             "reference": ref["label"]}
        if row.get("max_mem_gib") and ref.get("max_mem_gib"):
            q["max_mem_gib"] = row["max_mem_gib"]
            q["max_mem_ratio_vs_ddp"] = row["max_mem_gib"] / ref["max_mem_gib"]
        if row.get("first_loss") is not None and ref.get("first_loss") is not None:
            q["first_loss_diff_vs_ddp"] = row["first_loss"] - ref["first_loss"]   # same batches: ~0
        q["overhead_goal_met"] = q["tokens_per_s_ratio_vs_ddp"] >= 1 - GOALS["backend_overhead_max"]
        ratios[row["label"]] = q
    print_rows(rows, [("tokens/s", "tokens_per_s", ".0f"), ("MFU", "mfu", ".3f"), ("peak GiB", "max_mem_gib", ".1f"),
                      ("step s", "step_s", ".4f"), ("1st loss", "first_loss", ".4f")])
    for label, q in ratios.items():
        if "tokens_per_s_ratio_vs_ddp" in q:
            print(f"  {label:32s} tokens/s x{q['tokens_per_s_ratio_vs_ddp']:.3f} of {q['reference']}, "
                  f"memory x{fmt(q.get('max_mem_ratio_vs_ddp'))}")
    return {"goal_overhead_max": GOALS["backend_overhead_max"], "ratios": ratios}


# ---------------------------------------------------------------- part 3: MoE and modality towers

def sparse_rows(tiny: bool) -> list[tuple[str, list[str]]]:
    moe, mot = ("moe_debug", "mot_debug") if tiny else ("moe_8x", "mot_1b")
    # the loop last: the row most likely to compile slowly (host-int expert counts per step)
    return [(f"{moe}_grouped", [f"model={moe}", "model.moe_experts_impl=grouped"]),
            (mot, [f"model={mot}"]),
            (f"{moe}_loop", [f"model={moe}", "model.moe_experts_impl=loop"])]


def param_counts(run_dir: Path) -> dict:
    """Total and active (per position) non-embedding parameters of the run's model."""
    from dense_vs_sparse import param_counts as counts

    try:
        total, active = counts(run_dir)
    except Exception as e:  # noqa: BLE001 - a count that fails must not lose the measured row
        return {"params_error": one_line(repr(e))}
    return {"params_total": total, "params_active": active}


def part_sparse(r: Runner, res: Results) -> dict:
    data = perf_data(r)
    steps, warmup = r.steps("sparse")
    wanted = set(r.a.sparse_rows) if r.a.sparse_rows else None
    compiled = not r.a.tiny and r.a.sparse_mode == "compiled"
    for label, over in sparse_rows(r.a.tiny):
        if wanted and label not in wanted:
            continue
        tries = [(label, over)] if not compiled or r.a.no_eager_fallback else \
            [(label, over), (f"{label}_eager", [*over, "trainer.compile=false"])]
        if r.a.sparse_mode == "eager" and not r.a.tiny:
            tries = [(f"{label}_eager", [*over, "trainer.compile=false"])]
        for name, o in tries:
            row = r.train("sparse", name, [*r.base(), *data_overrides(data), *o, *r.a.overrides], steps, warmup)
            if Path(row["run_dir"], "config.yaml").is_file():
                row.update(param_counts(Path(row["run_dir"])))
            res.add(row)
            if ok(row):
                break   # the compiled row ran: no eager fallback
    rows = {x["label"]: x for x in res.rows()}
    moe = "moe_debug" if r.a.tiny else "moe_8x"
    # grouped against loop under the same compile setting (the compiled pair, else the eager pair)
    pairs = [(rows.get(f"{moe}_grouped", {}), rows.get(f"{moe}_loop", {})),
             (rows.get(f"{moe}_grouped_eager", {}), rows.get(f"{moe}_loop_eager", {}))]
    g, l = next(((g, l) for g, l in pairs if ok(g) and ok(l)), pairs[0])
    summary = {"goal_moe_8x_mfu_min": GOALS["moe_8x_mfu_min"],
               "rows": {k: {f: x.get(f) for f in ("tokens_per_s", "mfu", "model_tflops", "max_mem_gib", "params_total",
                                                  "params_active", "router")} for k, x in rows.items()}}
    if ok(g) and ok(l):
        summary["grouped_over_loop_tokens_per_s"] = g["tokens_per_s"] / l["tokens_per_s"]
        summary["grouped_over_loop_rows"] = [g["label"], l["label"]]
    else:
        summary["grouped_over_loop_tokens_per_s"] = None
        summary["grouped_over_loop_rows"] = "no grouped and loop rows that both ran with the same compile setting"
    if ok(g) and g.get("mfu") is not None and not r.a.tiny:
        summary["moe_8x_grouped_mfu_goal_met"] = g["mfu"] >= GOALS["moe_8x_mfu_min"]
    print_rows(res.rows(), [*PERF_COLS[:4], ("peak GiB", "max_mem_gib", ".1f"), ("compile s", "compile_s", ".1f")])
    for k, x in rows.items():
        if x.get("router"):
            print(f"  {k}: router imbalance (max/mean per expert) median of the worst layer "
                  f"{fmt(x['router']['imbalance_max_median'], '.2f')}, mean over layers "
                  f"{fmt(x['router']['imbalance_mean_over_layers_last'], '.2f')}")
    return summary


# ---------------------------------------------------------------- part 4: latents, on-device encode vs cache

def make_vae(path: Path, shape: dict, image_size: int) -> dict:
    """An initialised mmgen KL-VAE as a codec file (``vae:<file>``); its encoder's size and cost."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmgen.models.codecs.config import AutoencoderConfig
    from mmgen.models.codecs.load import save_codec
    from mmgen.models.codecs.vae import ConvVAE

    torch.manual_seed(0)
    vae = ConvVAE(AutoencoderConfig(**shape))
    vae.init_weights()
    save_codec(vae, path)   # rewritten each call: the file always has this shape
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        z = vae.posterior(torch.zeros(1, 3, image_size, image_size))[0]
    return {"vae_file": str(path), "vae_shape": shape, "image_size": image_size, "latent_shape": list(z.shape[1:]),
            "encoder_params": sum(p.numel() for p in vae.encoder.parameters()),
            "encoder_gflop_per_image": fc.get_total_flops() / 1e9}


def part_latents(r: Runner, res: Results) -> dict:
    tiny = r.a.tiny
    data = Path(perf_data(r))
    steps, warmup = r.steps("latents")
    image_size = 32 if tiny else 128
    work = r.runs / "latents"
    work.mkdir(parents=True, exist_ok=True)
    vae = make_vae(work / ("vae_tiny.safetensors" if tiny else "vae_sdlike.safetensors"),
                   TINY_VAE if tiny else GPU_VAE, image_size)
    codec = f"vae:{vae['vae_file']}"
    # the raw images the two runs read: the first --latent-shards training shards, and val
    train = sorted((data / "train").glob("*.tar"))[: r.a.latent_shards] or \
        [data / "train" / f"shapes-train-{i:06d}.tar" for i in range(r.a.latent_shards)]   # --dry-run: not made
    raw = {"train": "::".join(map(str, train)), "val": str(data / "val")}
    cache = work / "cache"
    dev = "cpu" if r.a.device == "cpu" else "cuda"
    t0 = time.time()
    encode = {"device": dev}
    # encoded anew each call (seconds on a GPU): the cache holds exactly the images the raw run reads
    for split in ("train", "val"):
        if r.a.dry_run:
            continue
        if (cache / split).exists():
            shutil.rmtree(cache / split)
        cmd = [r.py, "-m", "mmgen.cli.main", "data", "encode", raw[split], "--codec", codec, "--image-size",
               str(image_size), "--out", str(cache / split), "--device", dev, "--batch-size", "64"]
        dt, err = run_process(cmd, work / f"encode_{split}.log", r.timeout(r.a.row_timeout))
        encode[f"{split}_command"], encode[f"{split}_s"] = shlex.join(["python", *cmd[1:]]), round(dt, 1)
        if err:
            encode["error"] = err
            break
    encode["wall_s"] = round(time.time() - t0, 1)
    model = [] if tiny else [f"model={r.a.latent_model}"]
    common = [*r.base(), *model, f"data.codec={codec}", "data.patch_size=1", f"data.image_size={image_size}",
              *r.a.overrides]
    rows = {"encode_on_device": [*common, f"data.train_shards={raw['train']}", f"data.val_shards={raw['val']}",
                                 "data.encode_on=device"],
            "cached_latents": [*common, f"data.train_shards={cache}/train", f"data.val_shards={cache}/val"]}
    for label, over in rows.items():
        if label == "cached_latents" and encode.get("error"):
            res.add({"label": label, "overrides": over, "error": f"mmgen data encode failed: {encode['error']}",
                     "commit": COMMIT, "time": now()})
            continue
        res.add(r.train("latents", label, over, steps, warmup))
    res.data["codec"], res.data["encode"] = vae, encode
    d, c = ({x["label"]: x for x in res.rows()}.get(k, {}) for k in rows)
    summary: dict = {"model": "debug" if tiny else r.a.latent_model, "codec": vae}
    if ok(d) and ok(c):
        summary.update({"tokens_per_s_device": d["tokens_per_s"], "tokens_per_s_cached": c["tokens_per_s"],
                        "device_over_cached_tokens_per_s": d["tokens_per_s"] / c["tokens_per_s"],
                        # the step time the encode adds, as a share of the on-device step
                        "encode_share_of_step": (d["step_s"] - c["step_s"]) / d["step_s"],
                        # same documents in the same order: same tokens, (nearly) the same first loss
                        "same_tokens_seen": d.get("tokens_seen") == c.get("tokens_seen"),
                        "first_loss_diff": (d["first_loss"] - c["first_loss"]) if d.get("first_loss") is not None
                        and c.get("first_loss") is not None else None})
    print_rows(res.rows(), PERF_COLS)
    if "encode_share_of_step" in summary:
        print(f"  on-device encode: {100 * summary['encode_share_of_step']:.1f}% of the step "
              f"({vae['encoder_gflop_per_image']:.1f} GFLOP per {image_size}-px image)")
    return summary


# ---------------------------------------------------------------- part 5: shapes quality on the GPU

def has_checkpoint(run: Path) -> bool:
    return any((p / "meta.json").is_file() for p in (run / "checkpoints").glob("step_*"))


def quality_overrides(r: Runner) -> list[str]:
    if not r.a.tiny:
        return [f"trainer.max_minutes={r.a.quality_minutes}"]
    return ["model=debug", "trainer.steps=4", "checkpoint.every=2", "data.batch_size=4", "data.num_workers=0",
            "trainer.device=cpu", "trainer.precision=fp32", "trainer.num_threads=2"]


def train_codec(r: Runner, res: Results, preset: str) -> tuple[str, dict]:
    """The codec the family preset reads (``<kind>:<run dir>``), trained now unless present."""
    kind, codec_preset = PRESET_CODEC[preset]
    # the preset's own codec path (runs/<codec>) on a GPU; --tiny's 4-step codecs stay apart
    run = (r.runs / "codecs" if r.a.tiny else r.work / "runs") / codec_preset
    info: dict = {"codec_preset": codec_preset, "codec_run": str(run)}
    if r.a.dry_run:
        info["codec_reused"] = has_checkpoint(run)
    elif has_checkpoint(run) and not r.a.retrain_codecs:
        info["codec_reused"] = True
    else:
        data = quality_data(r)
        over = [f"experiment={codec_preset}", *data_overrides(data)]
        over += (["trainer.steps=4", "checkpoint.every=4", "data.num_workers=0", "trainer.device=cpu"] if r.a.tiny
                 else [f"trainer.max_minutes={r.a.codec_minutes}", "trainer.num_threads=4"])
        if run.exists():
            shutil.rmtree(run)
        cmd = [r.py, "-m", "mmgen.train", *over, f"run_dir={run}", f"name={codec_preset}", "metrics.progress=false",
               "checkpoint.resume=none"]
        dt, err = run_process(cmd, run.parent / f"{codec_preset}.log", r.timeout())
        info.update({"codec_command": shlex.join(["python", *cmd[1:]]), "codec_wall_s": round(dt, 1), "codec_reused": False})
        if err or not has_checkpoint(run):
            info["codec_error"] = err or "no checkpoint written"
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        recs = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
        if recs:
            info.update({"codec_steps": recs[-1]["step"], "codec_psnr": recs[-1].get("metric/psnr"),
                         "codec_train_minutes": train_minutes(recs)})
            cfg = run / "config.yaml"
            if cfg.is_file():   # the preset's 2,500 steps make a sharp codec; a cut-off run says so here
                import yaml

                info["codec_steps_scheduled"] = yaml.safe_load(cfg.read_text())["trainer"]["steps"]
    return f"{kind}:{run}", info


def train_minutes(recs: list[dict]) -> float | None:
    """Training wall minutes from the records (the first window's start to the last record)."""
    recs = [x for x in recs if "perf/step_s" in x]
    if not recs:
        return None
    start = recs[0]["time"] - recs[0]["perf/step_s"] * recs[0]["step"]
    return (recs[-1]["time"] - start) / 60


def quality_data(r: Runner) -> str:
    path = r.work / "data" / ("shapes32" if r.a.tiny else "shapes")
    if r.a.dry_run:
        pass
    elif r.a.tiny:
        make_shapes(path, 32, 400, 40)
    else:
        make_shapes(path, 32, 20000, 1000)   # mmgen data make-shapes' defaults: what the presets read
    return str(path)


def checkpoint_views(run: Path, view_root: Path) -> list[tuple[int, Path]]:
    """A run directory per saved checkpoint (config.yaml + that one checkpoint, as links), so
    ``mmgen eval shapes`` scores it as the run's newest."""
    views = []
    for ckpt in sorted((run / "checkpoints").glob("step_*")):
        if not (ckpt / "meta.json").is_file():
            continue
        step = int(ckpt.name.split("_")[1])
        view = view_root / ckpt.name
        (view / "checkpoints").mkdir(parents=True, exist_ok=True)
        for src, dst in ((run / "config.yaml", view / "config.yaml"), (ckpt, view / "checkpoints" / ckpt.name)):
            if not dst.exists():
                dst.symlink_to(src.resolve())
        views.append((step, view))
    return views


def part_quality(r: Runner, res: Results) -> dict:
    data = quality_data(r)
    samples = r.a.num_samples if not r.a.tiny else min(r.a.num_samples, 4)
    for preset in r.a.presets:
        over = [f"experiment={preset}", *data_overrides(data), *quality_overrides(r)]
        codec_info: dict = {}
        if preset in PRESET_CODEC:
            codec, codec_info = train_codec(r, res, preset)
            if codec_info.get("codec_error") and not r.a.dry_run:
                res.add({"label": preset, "overrides": over, "error": f"codec: {codec_info['codec_error']}",
                         **codec_info, "commit": COMMIT, "time": now()})
                continue
            over.append(f"data.codec={codec}")
        if r.a.quality_curve:
            over.append("checkpoint.keep_last=100")
        over += r.a.overrides
        row = r.train("quality", preset, over, 0, 0, timeout=r.a.quality_minutes * 60 + 150,
                      log_every=1 if r.a.tiny else 100)
        row.update(codec_info)
        if r.a.dry_run:
            res.add(row)
            continue
        run = Path(row["run_dir"])
        recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()
                if l.strip()] if (run / "metrics.jsonl").is_file() else []
        row["train_minutes"] = train_minutes(recs)
        if has_checkpoint(run):
            row["checkpoint_step"] = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*")
                                         if (p / "meta.json").is_file())
            row.update(r.evaluate(run, samples))
            if r.a.quality_curve:
                by_step = {x["step"]: x for x in recs if "perf/step_s" in x}
                start = recs[0]["time"] - recs[0]["perf/step_s"] * recs[0]["step"] if recs else None
                curve = []
                views = run.parent / f"{preset}_curve"
                if views.exists():
                    shutil.rmtree(views)
                for step, view in checkpoint_views(run, views):
                    ev = r.evaluate(view, samples, out=view / "eval")
                    rec = by_step.get(step)
                    curve.append({"step": step, "minutes": (rec["time"] - start) / 60 if rec and start else None,
                                  **{k: ev.get(k) for k in ("image", "caption", "min_score", "eval_error", "skipped")}})
                row["curve"] = curve
                hit = next((c for c in curve if (c.get("min_score") or 0) >= GOALS["quality_min"]), None)
                row["minutes_to_goal"] = hit["minutes"] if hit else None
        elif "error" not in row:
            row["error"] = "no checkpoint to evaluate"
        res.add(row)
    summary = {"goal_min_score": GOALS["quality_min"], "rows": {}}
    print(f"{'preset':22s}{'steps':>7s}{'train min':>10s}" + "".join(f"{k:>9s}" for k in ATTRIBUTES)
          + f"{'caption':>9s}{'min':>7s}")
    for row in res.rows():
        img, cap = row.get("image") or {}, row.get("caption") or {}
        summary["rows"][row["label"]] = {"steps": row.get("steps"), "train_minutes": row.get("train_minutes"),
                                         "image": img, "caption": cap, "min_score": row.get("min_score"),
                                         "goal_met": (row.get("min_score") or 0) >= GOALS["quality_min"],
                                         "minutes_to_goal": row.get("minutes_to_goal"),
                                         "error": row.get("error") or row.get("eval_error") or row.get("skipped")}
        if not img:
            print(f"{row['label']:22s}  failed: {summary['rows'][row['label']]['error']}")
            continue
        print(f"{row['label']:22s}{row.get('steps', 0):7d}{fmt(row.get('train_minutes'), '.2f'):>10s}"
              + "".join(f"{fmt(img.get(k)):>9s}" for k in ATTRIBUTES)
              + f"{fmt(cap.get('exact')):>9s}{fmt(row.get('min_score')):>7s}")
    return summary


# ---------------------------------------------------------------- main

PART_FNS = {"real": part_real, "backends": part_backends, "sparse": part_sparse, "latents": part_latents,
            "quality": part_quality}
COMMIT = "unknown"


def csv(kind=str):
    return lambda s: [kind(x) for x in s.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="mmgen's GPU performance run (issue 17), one JSON per part")
    p.add_argument("--parts", type=csv(), default=list(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    p.add_argument("--steps", type=int, default=0, help="training steps of the performance rows (0: the part's default)")
    p.add_argument("--warmup", type=int, default=-1, help="steps excluded from the medians (-1: the part's default)")
    p.add_argument("--budget", type=float, default=560, help="seconds for the whole call; rows past it are skipped")
    p.add_argument("--row-timeout", type=float, default=240, help="seconds per training process")
    p.add_argument("--eval-timeout", type=float, default=240, help="seconds per mmgen eval shapes")
    p.add_argument("--tiny", action="store_true", help="debug sizes on a CPU (every part in ~1-2 minutes)")
    p.add_argument("--smoke", action="store_true", help="= --tiny --device cpu")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="trainer.device of every row")
    p.add_argument("--tag", default="", help="results file tag (default: from the device name, e.g. h200)")
    p.add_argument("--out-dir", default="", help="results folder (default bench/results; --tiny: "
                   "<work>/runs/gpu_perf/results)")
    p.add_argument("--work", default="", help="runs/, data/ and codecs go here (default: the repo root)")
    p.add_argument("--data", default="data/shapes128", help="the 128-px shapes set of the performance parts")
    p.add_argument("--fresh", action="store_true", help="drop the rows of earlier calls in the results file")
    p.add_argument("--dry-run", action="store_true", help="compose and validate every row's configuration "
                   "(no data, no training; results under <work>/runs/gpu_perf/dry_run)")
    p.add_argument("--real-log-every", type=csv(int), default=None,
                   help="real: one row per trainer.log_every (default 1,10; --tiny 1,2)")
    p.add_argument("--backends", type=csv(), default=list(BACKENDS))
    p.add_argument("--backend-modes", type=csv(), default=["eager"], help="eager and/or compiled")
    p.add_argument("--sparse-rows", type=csv(), default=[], help="e.g. moe_8x_grouped,mot_1b (default: all)")
    p.add_argument("--sparse-mode", default="compiled", choices=("compiled", "eager"),
                   help="sparse: trainer.compile of the rows (a failed compiled row is retried eager)")
    p.add_argument("--no-eager-fallback", action="store_true", help="sparse: no eager retry of a failed row")
    p.add_argument("--latent-model", default="1b", help="latents: the model flavor")
    p.add_argument("--latent-shards", type=int, default=2, help="latents: training shards (1000 images each) read")
    p.add_argument("--presets", type=csv(), default=["shapes_gpu"], help=f"quality: of {','.join(PRESETS)}")
    p.add_argument("--quality-minutes", type=float, default=3.0, help="quality: trainer.max_minutes per preset")
    p.add_argument("--codec-minutes", type=float, default=2.5, help="quality: trainer.max_minutes of a codec run")
    p.add_argument("--retrain-codecs", action="store_true", help="quality: train the codecs even if present")
    p.add_argument("--quality-curve", action="store_true", help="quality: score every saved checkpoint too")
    p.add_argument("--num-samples", type=int, default=200, help="quality: held-out samples scored")
    p.add_argument("overrides", nargs="*", help="Hydra overrides added to every training row")
    a = p.parse_args(argv)
    if a.smoke:
        a.tiny, a.device = True, "cpu"
    if a.tiny and a.device == "auto":
        a.device = "cpu"
    bad = [x for x in a.parts if x not in PARTS] + [x for x in a.backends if x not in BACKENDS] \
        + [x for x in a.presets if x not in PRESETS] + [x for x in a.backend_modes if x not in ("eager", "compiled")]
    if bad:
        p.error(f"unknown: {', '.join(bad)}")
    a.work = a.work or str(ROOT)
    if not a.out_dir:
        a.out_dir = str(Path(a.work, "runs", "gpu_perf", "dry_run" if a.dry_run else "results")
                        if a.tiny or a.dry_run else ROOT / "bench" / "results")
    a.real_log_every = a.real_log_every or ([1, 2] if a.tiny else [1, 10])
    return a


def main(argv=None) -> None:
    global COMMIT
    a = parse_args(argv)
    os.chdir(ROOT)
    COMMIT = commit()
    device, tag = device_info(a.device)
    a.tag = a.tag or tag
    import torch

    header = {"tag": a.tag, "device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
              "commit": COMMIT, "command": shlex.join([Path(sys.executable).name, *sys.argv]), "time": now(),
              "tiny": a.tiny, "goals": GOALS}
    r = Runner(a)
    for part in a.parts:
        res = Results(part, a, header)
        steps = r.steps(part) if part in STEPS else None
        res.data["settings"] = {"steps": steps[0] if steps else None, "warmup": steps[1] if steps else None,
                                "budget_s": a.budget, "row_timeout_s": a.row_timeout, "overrides": a.overrides}
        print(f"== {part} ({max(r.left(), 0):.0f} s of the budget left)", flush=True)
        try:
            summary = PART_FNS[part](r, res)
        except Exception as e:  # noqa: BLE001 - one part's failure (e.g. its data) must not stop the others
            summary = {"error": one_line(f"{type(e).__name__}: {e}")}
            print(f"  part {part} failed: {summary['error']}", flush=True)
        res.write(summary)
        print(f"   -> {res.path}", flush=True)


if __name__ == "__main__":
    main()
