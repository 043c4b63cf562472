# The moving-shapes evaluation: draw clips for held-out captions and captions for held-out clips, score both.
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn

from mmgen.data.patches import to_uint8, to_unit
from mmgen.evaluation.config import EvalConfig
from mmgen.evaluation.held_out import HeldOutClips
from mmgen.evaluation.shapes_video import (SPEC_FIELDS, motion_spec, save_clip_grid, score_clips,
                                           score_motion_captions)
from mmgen.sampling.registry import CAPTION, VIDEO, SampleContext, get_sampler

GRID_CLIPS = 16   # clips shown in grid.png


def _first_reading(names, reads: str) -> str | None:
    return next((n for n in names if get_sampler(n).reads == reads), None)


def evaluate_shapes_video(model: nn.Module, ctx: SampleContext, held_out: HeldOutClips,
                          cfg: EvalConfig, out_dir: Path) -> dict:
    """Scores on ``cfg.num_samples`` held-out clips; writes ``scores.json`` and ``grid.png``.

    Clips come from the first of ``cfg.samplers`` that reads captions (a text-to-video
    sampler; scored under "video"), captions from the first that reads clips (under
    "caption"). The clips drawn have the held-out clips' frame count and frame size (``ctx`` is
    given those), so both directions are scored on the clips the run trained on.

    Args:
        model: the plain (unsharded) model.
        ctx: the run's sampling facts.
        held_out: the held-out clips (their ``.json`` holds each MotionSpec).
        cfg: sample count, batch size and the video samplers (an objective's ``video_samplers``).
        out_dir: created if missing.
    """
    t2v, v2t = _first_reading(cfg.samplers, CAPTION), _first_reading(cfg.samplers, VIDEO)
    if t2v is None and v2t is None:
        raise ValueError(f"video shapes evaluation: none of the samplers {list(cfg.samplers)} "
                         "reads captions or clips")
    ctx = dataclasses.replace(ctx, image_size=held_out.frame_size, frames=held_out.frames)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = held_out.read(cfg.num_samples)
    specs = [_spec(s) for s in samples]
    captions = [s.caption for s in samples]
    generated, texts = [], []
    for i in range(0, len(samples), cfg.batch_size):
        chunk = samples[i:i + cfg.batch_size]
        if t2v is not None:
            clips = get_sampler(t2v)(model, captions[i:i + cfg.batch_size], ctx)
            generated += [[to_uint8(f) for f in clip] for clip in clips]
        if v2t is not None:
            prompts = torch.stack([torch.stack([to_unit(f) for f in s.frames]) for s in chunk])
            texts += get_sampler(v2t)(model, prompts, ctx)
    report: dict = {"num_samples": len(samples), "frames": held_out.frames,
                    "frame_size": held_out.frame_size}
    if t2v is not None:
        report["video"] = score_clips(generated, specs)
    if v2t is not None:
        report["caption"] = score_motion_captions(texts, specs)
    # generated clips under their prompts, or the held-out clips under their generated captions
    grid_path = out_dir / "grid.png"
    if t2v is not None:
        save_clip_grid(generated[:GRID_CLIPS], captions[:GRID_CLIPS], grid_path)
    else:
        save_clip_grid([s.frames for s in samples[:GRID_CLIPS]], texts[:GRID_CLIPS], grid_path)
    report["grid"] = str(grid_path.resolve())
    if v2t is not None:
        report["examples"] = [{"prompt": c, "generated_caption": t}
                              for c, t in zip(captions[:8], texts[:8])]
    (out_dir / "scores.json").write_text(json.dumps(report, indent=2))
    return report


def print_video_report(report: dict) -> None:
    """The video report on stdout."""
    fmt = lambda d: "  ".join(f"{k}={v:.3f}" for k, v in d.items() if isinstance(v, float))  # noqa: E731
    print(f"video shapes eval on {report['num_samples']} held-out clips "
          f"({report['frames']} frames of {report['frame_size']} px)")
    if "video" in report:
        print(f"  generated clips   : {fmt(report['video'])}")
    if "caption" in report:
        print(f"  generated captions: {fmt(report['caption'])}")
    print(f"  sample grid: {report['grid']}")


def _spec(sample):
    """The clip's motion, read from its json; other clips cannot be scored from pixels: one
    line naming the sample."""
    missing = [k for k in SPEC_FIELDS if k not in (sample.info or {})]
    if missing:
        raise ValueError(f"video shapes evaluation: held-out clip '{sample.key}' has no {missing[0]!r} in its "
                         "json: `mmgen eval shapes --video` scores the embedded moving shapes "
                         "(mmgen data make-shapes-video) only")
    return motion_spec(sample.info)
