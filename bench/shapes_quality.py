# Quality benchmark on the embedded shapes data: train for a fixed budget, score held-out samples.
"""Trains ``experiment=shapes_cpu`` (or another preset) for a fixed wall-clock budget, then
generates images for held-out prompts and captions for held-out images and scores them by
reading colour, shape, size and position back from pixels (mmgen/evaluation/shapes.py).

Reference points measured in the same run: the scorer on the real held-out images (its
ceiling, ~1.0) and chance level for each attribute.

Usage:  python bench/shapes_quality.py [--minutes 12] [--experiment shapes_cpu] [overrides...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHANCE = {"color": 1 / 6, "shape": 1 / 3, "size": 1 / 2, "position": 1 / 9}


def sh(cmd: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return r


def real_image_ceiling(val: str, image_size: int, n: int) -> dict:
    """The scorer on the real held-out images, read as the shapes evaluation reads them."""
    from mmgen.data.synthetic.shapes import ShapeSpec
    from mmgen.evaluation import HeldOut
    from mmgen.evaluation.shapes import score_images

    samples = HeldOut((("val", val),), image_size).read(n)
    return score_images([s.image for s in samples], [ShapeSpec.from_json(s.info) for s in samples])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--experiment", default="shapes_cpu")
    p.add_argument("--minutes", type=float, default=12.0, help="training wall-clock budget")
    p.add_argument("--samples", type=int, default=300, help="held-out prompts and images scored")
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--name", default="")
    p.add_argument("--out", default="bench/results/shapes_quality.json")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    bin_ = Path(sys.executable).parent
    if not (ROOT / a.data / "val").is_dir():
        sh([str(bin_ / "mmgen"), "data", "make-shapes", "--out", a.data])
    name = a.name or f"bench_{a.experiment}_{int(time.time())}"
    t0 = time.time()
    sh([str(bin_ / "mmgen-train"), f"experiment={a.experiment}", f"name={name}",
        f"trainer.max_minutes={a.minutes}", "metrics.progress=false", "checkpoint.resume=none",
        f"data.train_shards={a.data}/train", f"data.val_shards={a.data}/val", *a.overrides])
    train_s = time.time() - t0
    run = ROOT / "runs" / name
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    sh([str(bin_ / "mmgen"), "eval", "shapes", str(run), "--num-samples", str(a.samples)])
    report = json.loads((run / "eval" / "scores.json").read_text())
    import yaml

    image_size = yaml.safe_load((run / "config.yaml").read_text())["data"]["image_size"]
    ceiling = real_image_ceiling(f"{a.data}/val", image_size, a.samples)
    img, cap = report["image"], report["caption"]
    print(f"{a.experiment}: {recs[-1]['step']} steps in {train_s / 60:.1f} min "
          f"(final loss text {recs[-1]['loss/text']:.3f}, visual {recs[-1]['loss/visual']:.3f})")
    print(f"{'attribute':10s}{'generated':>10s}{'real imgs':>10s}{'chance':>8s}{'gen/real':>9s}{'caption':>9s}")
    for k in ("color", "shape", "size", "position"):
        print(f"{k:10s}{img[k]:10.3f}{ceiling[k]:10.3f}{CHANCE[k]:8.3f}{img[k] / max(ceiling[k], 1e-9):9.3f}"
              f"{cap.get(k, float('nan')):9.3f}")
    print(f"caption exact match {cap['exact']:.3f}; all attributes right in generated images {img.get('all', float('nan')):.3f}")
    print(f"sample grid: {report['grid']}")
    out = {"experiment": a.experiment, "overrides": a.overrides, "minutes_budget": a.minutes,
           "steps": recs[-1]["step"], "train_seconds": round(train_s, 1), "image": img,
           "caption": cap, "real_image_ceiling": ceiling, "chance": CHANCE, "grid": report["grid"]}
    Path(ROOT / a.out).parent.mkdir(parents=True, exist_ok=True)
    (ROOT / a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
