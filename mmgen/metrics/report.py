# `mmgen report RUN_DIR`: loss, throughput, LR and grad-norm curves from metrics.jsonl as a PNG.
"""For users without W&B: reads the run's ``metrics.jsonl`` (the same records W&B gets) and
draws four panels with matplotlib's Agg backend (no display needed). A resumed run may have
logged a step twice (after its last checkpoint, before the restart): the later record wins,
and each restart is marked with a dotted line where the step count went back."""
from __future__ import annotations

import json
import math
from pathlib import Path

PANELS = [  # (title, key prefixes or keys, log scale)
    ("loss", ("loss/",), True),
    ("throughput (tokens/s)", ("perf/tokens_per_s",), False),
    ("learning rate", ("optim/lr",), False),
    ("grad norm", ("optim/grad_norm",), True),
]
# MoE runs also get <report>_router.png: the per-expert load heat map of the last record


def read_metrics(path: Path) -> tuple[dict[int, dict], list[int]]:
    """Records by step (last one wins) and the steps at which a restart resumed."""
    by_step: dict[int, dict] = {}
    restarts: list[int] = []
    last = None
    lines = [(n, l) for n, l in enumerate(path.read_text().splitlines(), 1) if l.strip()]
    for i, (n, line) in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1 and i > 0:
                break  # a torn last line: the writer was killed mid-record
            raise ValueError(f"{path}:{n} is not a JSON record") from None
        step = rec.get("step") if isinstance(rec, dict) else None
        if not isinstance(step, int):
            raise ValueError(f"{path}:{n} has no integer 'step'")
        if last is not None and step <= last:
            restarts.append(step)
        by_step[step] = rec
        last = step
    if not by_step:
        raise ValueError(f"{path} has no records yet")
    return dict(sorted(by_step.items())), restarts


def series(by_step: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for step, rec in by_step.items():
        v = rec.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(step)
            ys.append(float(v))
    return xs, ys


def summary(by_step: dict[int, dict]) -> dict:
    last_step = max(by_step)
    rec = by_step[last_step]
    _, tps = series(by_step, "perf/tokens_per_s")
    return {"steps": last_step, "records": len(by_step),
            "loss/total": rec.get("loss/total"),
            "median_tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None}


def draw_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the curves of ``run_dir/metrics.jsonl`` to ``out`` (default run_dir/report.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl (is it a run directory?)")
    by_step, restarts = read_metrics(path)
    keys = sorted({k for rec in by_step.values() for k in rec})
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    for ax, (title, wanted, log) in zip(axes.flat, PANELS):
        drawn = 0
        for key in [k for k in keys if any(k == w or (w.endswith("/") and k.startswith(w)) for w in wanted)]:
            xs, ys = series(by_step, key)
            if xs:
                ax.plot(xs, ys, label=key, marker="." if len(xs) < 30 else None, linewidth=1.2)
                drawn += 1
        if drawn and log and all(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
            ax.set_yscale("log")
        for step in restarts:
            ax.axvline(step, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if drawn > 1:
            ax.legend(fontsize=8)
        elif not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    s = summary(by_step)
    loss = f"{s['loss/total']:.4g}" if isinstance(s["loss/total"], float) else "n/a"
    fig.suptitle(f"{run_dir.resolve().name}: {s['steps']} steps, last loss/total {loss}"
                 + (f", {len(restarts)} restart(s)" if restarts else ""))
    out = Path(out) if out else run_dir / "report.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    draw_router_report(by_step, out)
    return out


def draw_router_report(by_step: dict[int, dict], out: Path) -> Path | None:
    """MoE runs: the last logged per-expert load (``router/L<i>/load/e<j>``) as a heat map next
    to the report (``<out stem>_router.png``); None for a run without router metrics."""
    from mmgen.metrics.router import draw_heatmap, loads_from_record

    for step in sorted(by_step, reverse=True):
        found = loads_from_record(by_step[step])
        if found is not None:
            layers, shares = found
            return draw_heatmap(shares, layers, out.with_name(f"{out.stem}_router.png"),
                                f"expert load at step {step}")
    return None


def cmd_report(a) -> None:
    """``mmgen report RUN_DIR [--out x.png]``."""
    out = draw_report(a.run, a.out or None)
    s = summary(read_metrics(Path(a.run) / "metrics.jsonl")[0])
    tps = f"{s['median_tokens_per_s']:.4g}" if s["median_tokens_per_s"] is not None else "n/a"
    print(f"{s['steps']} steps ({s['records']} records), last loss/total {s['loss/total']}, "
          f"median tokens/s {tps} -> {out.resolve()}")
