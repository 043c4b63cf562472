# Shapes evaluation of a model: generate images and captions on held-out data and score them.
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from mmgen.trainer.job import JobConfig

log = logging.getLogger(__name__)


def _held_out(job: JobConfig, limit: int) -> list[tuple]:
    from mmgen.data import iter_eval_samples

    shards = job.data.val_shards or job.data.train_shards
    return list(iter_eval_samples(shards, job.data.image_size, limit))


def _device(module) -> torch.device:
    return next(module.parameters()).device


def _autocast(device: torch.device):
    """Samplers run in the model's dtype: bf16 autocast on GPU as in training."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sample_grid(module, tokenizer, job: JobConfig, path: Path, n: int) -> Path:
    """Text-to-image samples for the first ``n`` held-out captions, as a PNG grid."""
    from mmgen.data.patches import to_uint8
    from mmgen.evaluation.shapes import save_grid
    from mmgen.sampling import generate_images

    samples = _held_out(job, n)
    captions = [s[2] for s in samples]
    grid = job.data.image_size // job.data.patch_size
    with _autocast(_device(module)):
        imgs = generate_images(module, tokenizer, captions, (grid, grid), job.data.patch_size,
                               job.sampler, _device(module))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid([to_uint8(im) for im in imgs], captions, path)
    return path


def evaluate_shapes(module, tokenizer, job: JobConfig, out_dir: Path, n: int, batch: int = 50) -> dict:
    """Scores on ``n`` held-out samples; writes ``scores.json`` and ``grid.png`` in out_dir."""
    from mmgen.data.patches import to_unit, to_uint8
    from mmgen.data.synthetic.shapes import ShapeSpec
    from mmgen.evaluation.shapes import save_grid, score_captions, score_images
    from mmgen.sampling import generate_captions, generate_images

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = _held_out(job, n)
    specs = [ShapeSpec.from_json(s[3]) for s in samples]
    captions = [s[2] for s in samples]
    grid = job.data.image_size // job.data.patch_size
    dev = _device(module)
    gen, texts = [], []
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        real = torch.stack([to_unit(s[1]) for s in chunk])
        with _autocast(dev):
            imgs = generate_images(module, tokenizer, captions[i:i + batch], (grid, grid),
                                   job.data.patch_size, job.sampler, dev)
            texts += generate_captions(module, tokenizer, real, job.data.patch_size, job.sampler, dev)
        gen += [to_uint8(im) for im in imgs]
    report = {"num_samples": len(samples),
              "image": score_images(gen, specs),
              "caption": score_captions(texts, specs)}
    grid_path = out_dir / "grid.png"
    save_grid(gen[:64], captions[:64], grid_path)
    report["grid"] = str(grid_path.resolve())
    report["examples"] = [{"prompt": c, "generated_caption": t} for c, t in zip(captions[:8], texts[:8])]
    (out_dir / "scores.json").write_text(json.dumps(report, indent=2))
    return report


def print_report(report: dict) -> None:
    img, cap = report["image"], report["caption"]
    fmt = lambda d: "  ".join(f"{k}={v:.3f}" for k, v in d.items() if isinstance(v, float))
    print(f"shapes eval on {report['num_samples']} held-out samples")
    print(f"  generated images : {fmt(img)}")
    print(f"  generated captions: {fmt(cap)}")
    print(f"  sample grid: {report['grid']}")
