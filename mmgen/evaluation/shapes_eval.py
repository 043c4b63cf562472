# The shapes evaluation: draw images for held-out captions and captions for held-out images, score both.
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from mmgen.data.patches import to_uint8, to_unit
from mmgen.data.synthetic.shapes import ShapeSpec
from mmgen.evaluation.config import EvalConfig
from mmgen.evaluation.held_out import HeldOut
from mmgen.evaluation.shapes import save_grid, score_captions, score_images
from mmgen.sampling.registry import CAPTION, IMAGE, SampleContext, get_sampler


def _first_reading(names, reads: str) -> str | None:
    return next((n for n in names if get_sampler(n).reads == reads), None)


def evaluate_shapes(model: nn.Module, ctx: SampleContext, held_out: HeldOut, cfg: EvalConfig,
                    out_dir: Path) -> dict:
    """Scores on ``cfg.num_samples`` held-out samples; writes ``scores.json`` and ``grid.png``.

    Images come from the first of ``cfg.samplers`` that reads captions (scored under "image"),
    captions from the first that reads images (under "caption"); a run whose objective has
    only one kind of sampler gets only that score.

    Args:
        model: the plain (unsharded) model.
        ctx: the run's sampling facts.
        held_out: where the held-out shapes samples are (their ``.json`` holds each ShapeSpec).
        cfg: sample count, batch size and the samplers to use.
        out_dir: created if missing.
    """
    t2i, i2t = _first_reading(cfg.samplers, CAPTION), _first_reading(cfg.samplers, IMAGE)
    if t2i is None and i2t is None:
        raise ValueError(f"shapes evaluation: none of the samplers {list(cfg.samplers)} reads "
                         "captions or images")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = held_out.read(cfg.num_samples)
    specs = [_spec(s) for s in samples]
    captions = [s.caption for s in samples]
    generated, texts = [], []
    for i in range(0, len(samples), cfg.batch_size):
        chunk = samples[i:i + cfg.batch_size]
        if t2i is not None:
            images = get_sampler(t2i)(model, captions[i:i + cfg.batch_size], ctx)
            generated += [to_uint8(im) for im in images]
        if i2t is not None:
            texts += get_sampler(i2t)(model, torch.stack([to_unit(s.image) for s in chunk]), ctx)
    report: dict = {"num_samples": len(samples)}
    if t2i is not None:
        report["image"] = score_images(generated, specs)
    if i2t is not None:
        report["caption"] = score_captions(texts, specs)
    # the grid shows generated images under their prompts, or real images under their captions
    grid_path = out_dir / "grid.png"
    if t2i is not None:
        save_grid(generated[:64], captions[:64], grid_path)
    else:
        save_grid([s.image for s in samples[:64]], texts[:64], grid_path)
    report["grid"] = str(grid_path.resolve())
    if i2t is not None:
        report["examples"] = [{"prompt": c, "generated_caption": t}
                              for c, t in zip(captions[:8], texts[:8])]
    (out_dir / "scores.json").write_text(json.dumps(report, indent=2))
    return report


def print_report(report: dict) -> None:
    """The shapes report on stdout (the Makefile demo and bench/shapes_quality.py show it)."""
    fmt = lambda d: "  ".join(f"{k}={v:.3f}" for k, v in d.items() if isinstance(v, float))  # noqa: E731
    print(f"shapes eval on {report['num_samples']} held-out samples")
    if "image" in report:
        print(f"  generated images : {fmt(report['image'])}")
    if "caption" in report:
        print(f"  generated captions: {fmt(report['caption'])}")
    print(f"  sample grid: {report['grid']}")


SPEC_FIELDS = ("shape", "color", "size", "row", "col")


def _spec(sample) -> ShapeSpec:
    """The sample's drawn shape, read from its json; other data (real photos) cannot be scored
    from pixels: one line naming the sample instead of a KeyError."""
    missing = [k for k in SPEC_FIELDS if k not in (sample.info or {})]
    if missing:
        raise ValueError(f"shapes evaluation: held-out sample '{sample.key}' has no {missing[0]!r} in its json: "
                         "`mmgen eval shapes` scores the embedded shapes data (mmgen data make-shapes) only")
    return ShapeSpec.from_json(sample.info)
