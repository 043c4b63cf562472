# The `mmgen` command: data, sample, eval, export (training is `mmgen-train`).
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mmgen.cli.data import add_data_commands

TRUST_HELP = ("unpickle checkpoint files that need it (DeepSpeed shards naming unknown classes, mmgen v1 "
              "checkpoints): unpickling can run code, use only for checkpoints from someone you trust")


def _load_run(run: str, overrides: list[str] | None = None, trust: bool = False):
    """Rebuild the job config and the plain model (newest checkpoint) of a run directory
    (``trust``: let checkpoint files that need pickle be unpickled, docs/checkpoints.md)."""
    import torch
    from omegaconf import OmegaConf

    from mmgen.checkpoint.export import find_checkpoint, load_model_weights
    from mmgen.cli.preflight import register_resolvers
    from mmgen.trainer.job import JobConfig
    from mmgen.models import build_model

    register_resolvers()
    cfg_file = Path(run) / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no config.yaml)")
    cfg = OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.load(cfg_file),
                          OmegaConf.from_dotlist(overrides or []))
    job = OmegaConf.to_object(cfg)
    job.validate()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(job.model).to(device)
    ckpt = find_checkpoint(run)
    load_model_weights(model, ckpt, trust=trust)
    model.eval()
    return job, model, ckpt


def cmd_sample(a) -> None:
    """Draw with the run's objective's samplers (mmgen.sampling.SAMPLERS), as the trainer does."""
    import numpy as np
    import torch
    from mmgen.data.patches import to_uint8, to_unit
    from mmgen.evaluation.shapes import save_grid
    from mmgen.models.tokenizers import build_tokenizer
    from mmgen.sampling import CAPTION, IMAGE, get_sampler, sampler_reading
    from mmgen.trainer.hooks import build_sample_context, objective_samplers

    if not a.prompt and not a.image:
        raise ValueError("mmgen sample: nothing to do: give --prompt TEXT (text to image) and/or --image FILE "
                         "(image to text)")
    for path in a.image or []:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--image {path}: no such file")
    job, model, ckpt = _load_run(a.run, a.set, trust=a.trust)
    ctx = build_sample_context(job, build_tokenizer(job.data.tokenizer))
    names, owner = objective_samplers(job.objective.name), f"objective={job.objective.name}"
    if a.prompt:
        imgs = get_sampler(sampler_reading(names, CAPTION, owner))(model, a.prompt, ctx)
        out = Path(a.out)
        save_grid([to_uint8(i) for i in imgs], a.prompt, out)
        print(f"{len(imgs)} images from {ckpt} -> {out.resolve()}")
    if a.image:
        side = (job.data.image_size,) * 2
        imgs = torch.stack([to_unit(np.asarray(_open_image(p).resize(side))) for p in a.image])
        texts = get_sampler(sampler_reading(names, IMAGE, owner))(model, imgs, ctx)
        for path, text in zip(a.image, texts):
            print(f"{path}: {text}")


def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--image {path}: not a readable image ({type(e).__name__})") from e


def cmd_eval(a) -> None:
    """Evaluation ``a.eval_command`` of the registry (mmgen.evaluation.EVALUATIONS) on the run's
    held-out data, with the objective's samplers: what ``trainer.eval_at_end`` runs. ``--video``:
    the moving-shapes clips instead (:func:`_eval_video`); ``--shards``: held-out shards other
    than the run's."""
    from mmgen.evaluation.held_out import HeldOut
    from mmgen.models.tokenizers import build_tokenizer
    from mmgen.trainer.hooks import build_eval_config, build_held_out, build_sample_context, evaluate

    job, model, _ = _load_run(a.run, a.set)
    ctx = build_sample_context(job, build_tokenizer(job.data.tokenizer))
    out_dir = Path(a.out or Path(a.run) / ("eval_video" if a.video else "eval"))
    if a.video:
        return _eval_video(a, job, model, ctx, out_dir)
    cfg = build_eval_config(job, num_samples=a.num_samples, task=a.eval_command)
    held_out = HeldOut((("shards", a.shards),), job.data.image_size) if a.shards else build_held_out(job)
    evaluate(model, ctx, held_out, cfg, out_dir)


def _eval_video(a, job, model, ctx, out_dir: Path) -> None:
    """``mmgen eval shapes --video``: the objective's ``video_samplers`` draw clips for the
    captions of held-out clips (the run's video sources' ``val_shards``, or ``--shards``) and
    caption the clips; scored from pixels (mmgen/evaluation/shapes_video.py)."""
    from mmgen.evaluation.config import EvalConfig
    from mmgen.evaluation.held_out import HeldOutClips, held_out_clips_from_data
    from mmgen.evaluation.shapes_video_eval import evaluate_shapes_video, print_video_report
    from mmgen.objectives import OBJECTIVES
    from mmgen.sampling import get_sampler

    names = tuple(getattr(OBJECTIVES[job.objective.name], "video_samplers", ()))
    for name in names:
        get_sampler(name)
    if not names:
        raise ValueError(f"objective={job.objective.name} has no video samplers: --video needs one "
                         "that draws or captions clips (e.g. objective=transfusion)")
    cfg = EvalConfig(task="shapes_video", num_samples=a.num_samples or job.trainer.eval_samples,
                     samplers=names).validate()
    data = job.data
    held_out = (HeldOutClips((("shards", a.shards),), data.frame_size, data.video_frames, data.video_fps)
                if a.shards else held_out_clips_from_data(data))
    held_out.check()
    print_video_report(evaluate_shapes_video(model, ctx, held_out, cfg, out_dir))


def cmd_export(a) -> None:
    if a.format == "hf":
        return _export_hf(a)
    from mmgen.checkpoint.export import export_safetensors

    out = export_safetensors(a.run, a.out, trust=a.trust)
    print(f"exported {out.resolve()}")


def _export_hf(a) -> None:
    """``--format hf``: the run's config (model shape, tokenizer) and newest checkpoint's weights
    as a Hugging Face directory (mmgen/checkpoint/hf_export.py)."""
    from omegaconf import OmegaConf

    from mmgen.checkpoint.export import consolidated_state_dict, find_checkpoint
    from mmgen.checkpoint.hf_export import export_hf
    from mmgen.cli.preflight import register_resolvers
    from mmgen.trainer.job import JobConfig

    register_resolvers()
    cfg_file = Path(a.run) / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{a.run} is not a run directory (no config.yaml): --format hf needs the run's config")
    job = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.load(cfg_file)))
    ckpt = find_checkpoint(a.run)
    state = consolidated_state_dict(ckpt, trust=a.trust)
    out = export_hf(state, job.model, a.out, tokenizer=job.data.tokenizer,
                    max_shard_bytes=int(a.max_shard_mb * 2**20), source=str(ckpt))
    print(f"exported {ckpt} -> {out.resolve()} (Hugging Face {json_type(out)})")


def json_type(out: Path) -> str:
    import json

    return json.loads((out / "config.json").read_text())["model_type"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmgen", description="mmgen tools (training: mmgen-train)")
    sub = p.add_subparsers(dest="command", required=True)

    add_data_commands(sub)

    sp = sub.add_parser("sample", help="generate images from captions and/or captions from images")
    sp.add_argument("run", help="run directory (newest checkpoint) or checkpoint directory's run")
    sp.add_argument("--prompt", action="append", help="caption to draw (repeatable)")
    sp.add_argument("--image", action="append", help="image file to caption (repeatable)")
    sp.add_argument("--out", default="samples.png")
    sp.add_argument("--set", action="append", default=[], help="config override, e.g. sampler.guidance=5")
    sp.add_argument("--trust", action="store_true", help=TRUST_HELP)
    sp.set_defaults(func=cmd_sample)

    ev = sub.add_parser("eval", help="evaluate a run").add_subparsers(dest="eval_command", required=True)
    es = ev.add_parser("shapes", help="score generated images and captions on held-out shapes")
    es.add_argument("run")
    es.add_argument("--num-samples", type=int, default=200)
    es.add_argument("--out", default="", help="default: RUN/eval (RUN/eval_video with --video)")
    es.add_argument("--video", action="store_true",
                    help="score text->video and video->text on held-out moving-shapes clips "
                         "(the run's video sources' val_shards; data.video_frames at data.video_fps)")
    es.add_argument("--shards", default="",
                    help="held-out shards to read instead of the run's (clips with --video)")
    es.add_argument("--set", action="append", default=[], help="config override, e.g. sampler.steps=50")
    es.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export", help="consolidate a checkpoint into one safetensors file")
    ex.add_argument("run", help="run or checkpoint directory")
    ex.add_argument("--out", required=True)
    ex.add_argument("--format", choices=("safetensors", "hf"), default="safetensors",
                    help="safetensors: one file of mmgen's weights; hf: a Hugging Face directory (docs/pretrained.md)")
    ex.add_argument("--max-shard-mb", type=float, default=5120, help="--format hf: largest safetensors file (MiB)")
    ex.add_argument("--trust", action="store_true", help=TRUST_HELP)
    ex.set_defaults(func=cmd_export)

    from mmgen.metrics.report import cmd_report  # matplotlib is imported only when it draws

    rp = sub.add_parser("report", help="draw loss/throughput/LR/grad-norm curves from metrics.jsonl (PNG)")
    rp.add_argument("run", help="run directory")
    rp.add_argument("--out", default="", help="PNG file (default: RUN/report.png)")
    rp.set_defaults(func=cmd_report)
    return p


from mmgen.errors import ShardUnavailable  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, ShardUnavailable) as e:   # a remote shard after retries
        print(f"mmgen: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
