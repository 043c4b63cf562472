# Model families at equal training FLOPs on the embedded shapes data: parameters, FLOPs, held-out accuracy, sampling cost.
"""Trains one arm per model family of issue 19 on the shapes benchmark for the **same training
FLOPs**, counted the way the trainer counts them (``mmgen/metrics/flops.py``, through each
objective's ``model_view``), then scores each run with ``mmgen eval shapes``.

Arms (``ARMS``; each a shapes preset, same trunk, rows, sequence, optimizer):

* ``transfusion`` — Transfusion on pixel patches (``experiment=shapes_cpu``, flow matching);
* ``transfusion_latent`` — Transfusion on the latents of mmgen's KL-VAE (``shapes_latent_cpu``);
* ``ddpm`` — Transfusion with DDPM instead of flow (``shapes_cpu objective=transfusion_ddpm``):
  the objective group's DDPM (eps-prediction, cosine schedule, T = 1000; shapes_cpu's
  x-prediction was tuned for flow, so it is set back to eps), DDIM sampling (``ddpm_t2i``,
  ``sampler.ddim_eta=0``) with shapes_cpu's 20 steps and guidance 2, the flow arm's sampler budget;
* ``vq_ar`` — discrete-token AR, Chameleon-style (``shapes_vqar_cpu``, VQ codes);
* ``maskgit`` — masked discrete diffusion, Show-o / MaskGIT (``shapes_maskgit_cpu``);
* ``mar`` — per-token MLP diffusion head, MAR / Harmon (``shapes_mar_cpu``, pixels).

The budget. Per arm the job is composed as ``mmgen-train`` composes it
(``mmgen.cli.preflight.compose_job``), its training loader is built and ``--flop-batches``
micro-batches are read; each goes through ``objective.model_view`` and ``training_flops`` as in
the trainer's ``next_batches``, and their mean x ``trainer.grad_accum`` is the arm's FLOPs per
step. The arm then trains ``steps = round(budget / per_step)`` steps (``trainer.steps``, so
its LR schedule runs to the end; ``trainer.max_minutes=0``, so a loaded machine changes the
time, not the work). The budget is ``--flops`` or ``--reference-steps K`` x the per-step FLOPs
of the ``transfusion`` arm (shapes_cpu). The training FLOPs reported are what the run did: the
trainer's logged windows (``perf/model_tflops x perf/step_s x steps in the window``, i.e. the
sum of its per-step counts). For ``mar`` the denoiser's share of the count is an expectation
(the mask is drawn inside the objective; ``mmgen/metrics/flops.py``). The codecs (the VQ
tokenizer and the KL-VAE) are trained first if their run directories are missing
(``experiment=codec_vq_shapes`` / ``codec_vae_shapes``, ~12 min each on 2 cores); their time
is reported apart and their FLOPs are **not** part of any arm's budget (a frozen codec's
encoding is data preparation here, as for a pretrained tokenizer).

Per arm: parameters (all of the model: embeddings, trunk, heads; the heads' share apart),
training steps and FLOPs, the held-out text-to-image accuracy (colour, shape, size, position,
read back from pixels) and caption exact match (``mmgen eval shapes --num-samples N``), and
the sampling cost of one image: FLOPs (``torch.utils.flop_counter.FlopCounterMode`` around
one text-to-image sampler call on ``--cost-batch`` prompts, divided by the batch; classifier-
free guidance's null rows included; attention (SDPA) is counted over its full ``L x L`` mask,
not the allowed pairs, and the codec's decoder is included) and seconds (one timed call
without the counter, divided by the batch), and samples/s of the whole eval (held-out images
drawn + images captioned, over the eval's wall time).

Before training, every arm is timed for ``--time-steps`` steps (median step time after the
first two) and sampled once, and the expected time of the bench is printed.

The claim tested (Transfusion, Zhou et al. 2024): at equal compute, continuous diffusion on
images beats discrete-token AR (Chameleon-style) for image generation. Here: the mean of the
four text-to-image attribute accuracies of the Transfusion arm on latents (the paper's
setting; the pixel arm if latents were not run) against ``vq_ar``'s; "agrees" if it is higher
by more than two standard errors (``sqrt(p (1 - p) / n)`` per arm, n held-out samples),
"contradicts" if lower by as much, else "inconclusive".

Usage:  python bench/families.py [--arms transfusion,vq_ar,...] [--reference-steps 500 | --flops F]
            [--samples 200] [--threads 2] [--out bench/results/families.json] [overrides...]
Plan only (compose, count, time; no full training): add ``--plan-only``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# arm -> (family, experiment, overrides, codec it needs or None, image representation)
ARMS: dict[str, tuple[str, str, list[str], str | None, str]] = {
    "transfusion": ("Transfusion (flow)", "shapes_cpu", [], None, "continuous"),
    "transfusion_latent": ("Transfusion on VAE latents (flow)", "shapes_latent_cpu", [], "vae", "continuous"),
    "ddpm": ("Transfusion (DDPM)", "shapes_cpu",
             ["objective=transfusion_ddpm", "objective.prediction=eps", "sampler.ddim_eta=0.0"], None, "continuous"),
    "vq_ar": ("Discrete-token AR (Chameleon)", "shapes_vqar_cpu", [], "vq", "discrete"),
    "maskgit": ("Masked discrete diffusion (MaskGIT)", "shapes_maskgit_cpu", [], "vq", "discrete"),
    "mar": ("Per-token diffusion head (MAR)", "shapes_mar_cpu", [], None, "continuous"),
}
CODECS = {"vq": ("codec_vq_shapes", "vq:runs/codec_vq_shapes"), "vae": ("codec_vae_shapes", "vae:runs/codec_vae_shapes")}
ATTRIBUTES = ("color", "shape", "size", "position")
CLAIM = ("Transfusion (Zhou et al. 2024): at equal compute, continuous diffusion on images beats "
         "discrete-token AR (Chameleon-style) for image generation")


def commit() -> str:
    # the environment first: a copy of the tree on another machine may carry an older .git
    if os.environ.get("MMGEN_COMMIT"):
        return os.environ["MMGEN_COMMIT"]
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return sha or "unknown"


def sh(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` in the repository root, output appended to ``log``; exits with the log's tail
    on failure. Returns the wall time."""
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"failed ({rc}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return time.time() - t0


# ---------------------------------------------------------------- the arms' configurations

def arm_overrides(arm: str, a) -> list[str]:
    """Everything after ``experiment=`` for this arm: its own overrides, its codec, the common
    ones (data, threads, the command line's)."""
    _, _, own, codec, _ = ARMS[arm]
    codec_over = [f"data.codec={a.codec[codec]}"] if codec else []
    return [*own, *codec_over, f"data.train_shards={a.data}/train", f"data.val_shards={a.data}/val",
            f"trainer.num_threads={a.threads}", *a.overrides]


def per_step_flops(arm: str, a) -> dict:
    """The arm's job as ``mmgen-train`` composes it; its training FLOPs per optimizer step
    (mean over ``--flop-batches`` micro-batches of its real loader, each through the
    objective's ``model_view`` as in ``Trainer.next_batches``) and its parameter counts."""
    import torch

    from mmgen.cli.preflight import compose_job
    from mmgen.data import build_dataloader
    from mmgen.metrics.flops import training_flops, unit_costs
    from mmgen.models import build_model
    from mmgen.models.heads import HEADS
    from mmgen.models.tokenizers import build_tokenizer
    from mmgen.objectives import build_objective

    job = compose_job([f"experiment={ARMS[arm][1]}", *arm_overrides(arm, a)])
    objective = build_objective(job.objective)
    view = getattr(objective, "model_view", None)
    loader = build_dataloader(job.data, build_tokenizer(job.data.tokenizer), 0, 1, split="train",
                              grad_accum=job.trainer.grad_accum, unit_costs=unit_costs(job.model))
    it = iter(loader)
    counts = []
    for _ in range(a.flop_batches):
        b = next(it)
        counts.append(training_flops(job.model, view(b) if view else b))
    del it, loader
    with torch.device("meta"):
        model = build_model(job.model)
    total = sum(p.numel() for p in model.parameters())
    head_modules = {m for h in model.cfg.heads for m in HEADS[h].build(model.cfg)}
    heads = sum(p.numel() for name in head_modules for p in getattr(model, name).parameters())
    return {"per_step": statistics.fmean(counts) * job.trainer.grad_accum,
            "per_batch_min": min(counts), "per_batch_max": max(counts),
            "params_total": total, "params_heads": heads, "heads": list(model.cfg.heads),
            "objective": job.objective.name, "preset_steps": job.trainer.steps}


def train_cmd(arm: str, name: str, steps: int, a, extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "mmgen.train", f"experiment={ARMS[arm][1]}", f"name={name}",
            f"run_dir={a.runs / name}", *arm_overrides(arm, a), f"trainer.steps={steps}", "trainer.max_minutes=0",
            "metrics.progress=false", "checkpoint.resume=none", "trainer.eval_at_end=false",
            "trainer.sample_every=0", *extra]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def logged_flops(recs: list[dict]) -> tuple[int, float]:
    """(steps, training FLOPs) the trainer counted: each logged window's model FLOPs
    (``perf/model_tflops`` x its total step time ``perf/step_s`` x its steps), summed."""
    total, prev = 0.0, 0
    for r in recs:
        if "perf/model_tflops" in r:
            total += r["perf/model_tflops"] * 1e12 * r["perf/step_s"] * (r["step"] - prev)
            prev = r["step"]
    return prev, total


# ---------------------------------------------------------------- sampling cost

def sdpa_full_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of one fused SDPA call over its full ``L_q x L_k`` score matrix, whatever its mask:
    QK^T and AV, ``2 b h L_q L_k (d + d_v)``, every query head (GQA's shared keys included).
    PyTorch's counter has no formula for the CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``)."""
    b, h, lq, d = query_shape
    return 2 * b * h * lq * key_shape[-2] * (d + value_shape[-1])


def sampling_cost(run: Path, batch: int, threads: int) -> dict:
    """FLOPs and seconds per image of the run's text-to-image sampler (the first of its
    objective's samplers that reads captions) on ``batch`` held-out prompts, and seconds per
    caption of its image-to-text sampler on as many held-out images."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmgen.cli.main import _load_run
    from mmgen.data.patches import to_unit
    from mmgen.models.tokenizers import build_tokenizer
    from mmgen.sampling import CAPTION, IMAGE, get_sampler
    from mmgen.trainer.hooks import build_held_out, build_sample_context, objective_samplers

    torch.set_num_threads(threads)
    job, model, _ = _load_run(str(run))
    ctx = build_sample_context(job, build_tokenizer(job.data.tokenizer))
    names = objective_samplers(job.objective.name)
    t2i = next(n for n in names if get_sampler(n).reads == CAPTION)
    i2t = next((n for n in names if get_sampler(n).reads == IMAGE), None)
    held = build_held_out(job).read(batch)
    prompts = [s.caption for s in held]
    with torch.no_grad():
        cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        with FlopCounterMode(display=False, custom_mapping={cpu_sdpa: sdpa_full_flops}) as counter:
            get_sampler(t2i)(model, prompts, ctx)
        t0 = time.perf_counter()
        get_sampler(t2i)(model, prompts, ctx)
        image_s = (time.perf_counter() - t0) / len(prompts)
        caption_s = None
        if i2t is not None:
            t0 = time.perf_counter()
            get_sampler(i2t)(model, torch.stack([to_unit(s.image) for s in held]), ctx)
            caption_s = (time.perf_counter() - t0) / len(held)
    return {"sampler": t2i, "flops_per_image": counter.get_total_flops() / len(prompts),
            "seconds_per_image": image_s, "caption_sampler": i2t, "seconds_per_caption": caption_s,
            "batch": len(prompts)}


# ---------------------------------------------------------------- one arm

def probe(arm: str, a, log: Path) -> dict:
    """A few steps of the arm (its step time on this machine) and one sampling batch of that
    checkpoint: for the expected time of the bench."""
    name = f"{a.prefix}_{arm}_probe"
    sh(train_cmd(arm, name, a.time_steps, a, ["trainer.log_every=1"]), log)
    times = [r["perf/step_s"] for r in records(a.runs / name) if "perf/step_s" in r]
    step_s = statistics.median(times[2:] or times)
    return {"step_s": step_s, **sampling_cost(a.runs / name, a.cost_batch, a.threads)}


def run_arm(arm: str, steps: int, budget: float, plan: dict, a, log: Path) -> dict:
    family, experiment, own, codec, kind = ARMS[arm]
    name = f"{a.prefix}_{arm}"
    run = a.runs / name
    train_s = sh(train_cmd(arm, name, steps, a), log)
    done, flops = logged_flops(records(run))
    t0 = time.time()
    sh([sys.executable, "-m", "mmgen.cli.main", "eval", "shapes", str(run), "--num-samples",
        str(a.samples), "--out", str(run / "eval")], log)
    eval_s = time.time() - t0
    scores = json.loads((run / "eval" / "scores.json").read_text())
    img, cap = scores.get("image", {}), scores.get("caption", {})
    drawn = img.get("n", 0) + cap.get("n", 0)
    cost = sampling_cost(run, a.cost_batch, a.threads)
    return {"arm": arm, "family": family, "experiment": experiment, "overrides": own,
            "codec": a.codec[codec] if codec else "pixels", "representation": kind,
            "objective": plan["objective"], "heads": plan["heads"], "run": str(run),
            "params_total": plan["params_total"], "params_heads": plan["params_heads"],
            "flops_per_step": plan["per_step"], "steps": done, "steps_planned": steps,
            "training_flops": flops, "budget_flops": budget, "train_seconds": round(train_s, 1),
            "image": img, "caption": cap, "t2i_mean": t2i_mean(img),
            "sampling": cost, "eval_seconds": round(eval_s, 1),
            "samples_per_s": drawn / eval_s if eval_s > 0 else float("nan")}


def t2i_mean(img: dict) -> float:
    vals = [img[k] for k in ATTRIBUTES if k in img]
    return sum(vals) / len(vals) if vals else float("nan")


# ---------------------------------------------------------------- report

def verdict(rows: list[dict], n: int) -> str:
    """Whether this run's numbers agree with the claim (module docstring), from the numbers."""
    by = {r["arm"]: r for r in rows}
    cont = by.get("transfusion_latent") or by.get("transfusion")
    if cont is None or "vq_ar" not in by:
        return "not tested: needs the vq_ar arm and a Transfusion arm (transfusion_latent or transfusion)"
    p, q = cont["t2i_mean"], by["vq_ar"]["t2i_mean"]
    if math.isnan(p) or math.isnan(q):
        return "not tested: a text-to-image score is missing"
    se = math.sqrt(p * (1 - p) / max(n, 1) + q * (1 - q) / max(n, 1))
    diff = p - q
    if diff > 2 * se:
        word = "agrees"
    elif diff < -2 * se:
        word = "contradicts the claim"
    else:
        word = "inconclusive (within two standard errors)"
    return (f"{word}: {cont['arm']} t2i mean {p:.3f} vs vq_ar {q:.3f} (difference {diff:+.3f}, "
            f"2 s.e. {2 * se:.3f}, n={n}) at {cont['training_flops'] / 1e12:.3g} vs "
            f"{by['vq_ar']['training_flops'] / 1e12:.3g} training TFLOPs")


def fmt(x, spec=".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(rows: list[dict]) -> str:
    head = ("| family | params (heads) | steps | training TFLOPs | t2i colour | shape | size | position "
            "| caption exact | sampling GFLOPs / image | s / image | samples/s |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        img, cap, s = r["image"], r["caption"], r["sampling"]
        lines.append(f"| {r['family']} | {r['params_total'] / 1e6:.2f}M ({r['params_heads'] / 1e6:.2f}M) "
                     f"| {r['steps']} | {r['training_flops'] / 1e12:.3g} | {fmt(img.get('color'))} "
                     f"| {fmt(img.get('shape'))} | {fmt(img.get('size'))} | {fmt(img.get('position'))} "
                     f"| {fmt(cap.get('exact'))} | {s['flops_per_image'] / 1e9:.3g} | {s['seconds_per_image']:.3f} "
                     f"| {fmt(r['samples_per_s'], '.1f')} |")
    return "\n".join(lines)


def ensure_codecs(arms: list[str], a, log: Path) -> dict:
    """Train the default codecs the arms need when their run directory has no checkpoint;
    returns the seconds each took (0 if it was there)."""
    from mmgen.checkpoint.export import find_checkpoint

    spent = {}
    for key in sorted({ARMS[arm][3] for arm in arms} - {None}):
        experiment, default = CODECS[key]
        if a.codec[key] != default:
            continue        # a codec given on the command line is used as it is
        run = ROOT / "runs" / experiment
        try:
            find_checkpoint(str(run))
            spent[experiment] = 0.0
            continue
        except (FileNotFoundError, ValueError):
            pass
        print(f"training the codec {experiment} (runs/{experiment} has no checkpoint; not part of the budget) ...",
              flush=True)
        spent[experiment] = round(sh([sys.executable, "-m", "mmgen.train", f"experiment={experiment}",
                                      f"data.train_shards={a.data}/train", f"data.val_shards={a.data}/val",
                                      f"trainer.num_threads={a.threads}", "metrics.progress=false",
                                      "checkpoint.resume=none", *a.codec_overrides], log), 1)
        print(f"  {experiment}: {spent[experiment] / 60:.1f} min", flush=True)
    return spent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--flops", type=float, default=0.0, help="training FLOPs per arm")
    budget.add_argument("--reference-steps", type=int, default=500,
                        help="budget = this many steps of the transfusion arm (shapes_cpu)")
    p.add_argument("--samples", type=int, default=200, help="held-out prompts and images scored per arm")
    p.add_argument("--threads", type=int, default=2, help="trainer.num_threads of every run (and of sampling)")
    p.add_argument("--flop-batches", type=int, default=8, help="micro-batches read to count FLOPs per step")
    p.add_argument("--time-steps", type=int, default=6,
                   help="steps of each arm timed first for the expected time (0: skip)")
    p.add_argument("--cost-batch", type=int, default=8, help="prompts of the sampling-cost call")
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--vq-codec", default=CODECS["vq"][1], help="data.codec of the VQ arms")
    p.add_argument("--vae-codec", default=CODECS["vae"][1], help="data.codec of the latent arm")
    p.add_argument("--codec-overrides", nargs="*", default=[], help="extra overrides of codec training")
    p.add_argument("--runs", default="runs", help="directory of the arms' run directories")
    p.add_argument("--prefix", default="", help="run names <prefix>_<arm> (default bench_families_<time>)")
    p.add_argument("--logs", default="", help="log file (default runs/<prefix>.log)")
    p.add_argument("--plan-only", action="store_true", help="count, time and print the plan; train nothing else")
    p.add_argument("--out", default="bench/results/families.json")
    p.add_argument("overrides", nargs="*", help="overrides for every arm, e.g. model.n_layers=2")
    a = p.parse_args()
    arms = [x for x in a.arms.split(",") if x]
    unknown = [x for x in arms if x not in ARMS]
    if unknown:
        sys.exit(f"unknown arms {unknown}: choose from {list(ARMS)}")
    a.codec = {"vq": a.vq_codec, "vae": a.vae_codec}
    a.prefix = a.prefix or f"bench_families_{int(time.time())}"
    a.runs = (ROOT / a.runs).resolve()
    a.runs.mkdir(parents=True, exist_ok=True)
    log = Path(a.logs) if a.logs else a.runs / f"{a.prefix}.log"
    t_start = time.time()
    if not (ROOT / a.data / "val").is_dir():
        sh([sys.executable, "-m", "mmgen.cli.main", "data", "make-shapes", "--out", a.data], log)
    codec_s = ensure_codecs(arms, a, log)

    plans = {arm: per_step_flops(arm, a) for arm in arms}
    if a.flops:
        budget, basis = a.flops, f"--flops {a.flops:.4g}"
    else:
        ref = plans["transfusion"]["per_step"] if "transfusion" in plans else per_step_flops("transfusion", a)["per_step"]
        budget, basis = a.reference_steps * ref, f"{a.reference_steps} steps of shapes_cpu"
    steps = {arm: max(1, round(budget / plans[arm]["per_step"])) for arm in arms}
    print(f"budget {budget / 1e12:.4g} training TFLOPs per arm ({basis}); log {log}", flush=True)
    probes = {arm: probe(arm, a, log) for arm in arms} if a.time_steps else {}
    expected = 0.0
    for arm in arms:
        line = f"  {arm:19s} {plans[arm]['per_step'] / 1e9:9.2f} GFLOPs/step -> {steps[arm]:5d} steps"
        if arm in probes:
            pr = probes[arm]
            eval_s = a.samples * (pr["seconds_per_image"] + (pr["seconds_per_caption"] or 0.0))
            arm_s = steps[arm] * pr["step_s"] + eval_s + 30   # + process start-ups and checkpoints
            expected += arm_s
            line += (f" x {pr['step_s']:.2f} s + eval ~{eval_s / 60:.1f} min = ~{arm_s / 60:.1f} min")
        print(line, flush=True)
    if probes:
        print(f"expected time of the arms: ~{expected / 60:.0f} min on this machine (codecs apart)", flush=True)
    if a.plan_only:
        return

    rows = []
    for arm in arms:
        rows.append(run_arm(arm, steps[arm], budget, plans[arm], a, log))
        r = rows[-1]
        print(f"{arm}: {r['steps']} steps, {r['training_flops'] / 1e12:.4g} TFLOPs in {r['train_seconds'] / 60:.1f} min, "
              f"eval {r['eval_seconds'] / 60:.1f} min", flush=True)
    md = table(rows)
    claim = verdict(rows, a.samples)
    print(f"\nequal training FLOPs per arm: {budget / 1e12:.4g} TFLOPs ({basis}); {a.samples} held-out samples; "
          f"{a.threads} threads; overrides {a.overrides or 'none'}; codec training not in the budget "
          f"({', '.join(f'{k} {v / 60:.1f} min' for k, v in codec_s.items()) or 'no codec'})\n")
    print(md)
    print(f"\nclaim: {CLAIM}\nthis run: {claim}")
    out = ROOT / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "commit": commit(), "command": " ".join(sys.argv), "budget_flops": budget, "budget_basis": basis,
        "samples": a.samples, "threads": a.threads, "overrides": a.overrides, "codec_train_seconds": codec_s,
        "expected_seconds": round(expected, 1) if probes else None,
        "probes": probes, "rows": rows, "claim": CLAIM, "verdict": claim, "table": md,
        "total_seconds": round(time.time() - t_start, 1)}, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
