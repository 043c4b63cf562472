# The trainer's sampling and evaluation hooks, built once from the job (the loop calls after_step).
"""This is the one place that reads the job config for sampling and evaluation: it resolves the
run's facts into a :class:`SampleContext`, its held-out data into a :class:`HeldOut` (the pair
sources' ``val_shards``, ``data.sources`` included) and its objective's ``samplers``, and hands
only those to the samplers and the evaluation registry. ``mmgen sample`` / ``mmgen eval`` build
the same objects with the same functions.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from mmgen.errors import ConfigError
from mmgen.trainer.job import JobConfig
from mmgen.data.patches import to_uint8, to_unit
from mmgen.evaluation.config import EvalConfig
from mmgen.evaluation.held_out import HeldOut, HeldOutSample, held_out_from_data
from mmgen.evaluation.registry import get_evaluation
from mmgen.evaluation.shapes import save_grid
from mmgen.models.tokenizers.text import ByteTokenizer
from mmgen.objectives import OBJECTIVES
from mmgen.sampling.registry import CAPTION, RECONSTRUCTION, TEXT_TO_IMAGE, SampleContext, get_sampler

log = logging.getLogger(__name__)


def objective_samplers(objective: str) -> tuple[str, ...]:
    """The sampler names an objective declares (its ``samplers``), each checked against ``SAMPLERS``.

    Args:
        objective: a key of ``OBJECTIVES`` (``objective.name``).

    Raises:
        ConfigError: an unknown objective, or a sampler name missing from ``SAMPLERS``.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective '{objective}' (available: {', '.join(OBJECTIVES)})")
    names = tuple(getattr(OBJECTIVES[objective], "samplers", ()))
    try:
        for name in names:
            get_sampler(name)
    except ValueError as e:
        raise ConfigError(f"objective={objective}: {e}") from e
    return names


def build_sample_context(job: JobConfig, tokenizer: ByteTokenizer) -> SampleContext:
    """The run's sampling facts: image and patch size, tokenizer, ``sampler.*``, precision.

    Args:
        job: the resolved job.
        tokenizer: the run's tokenizer (built once by the caller).
    """
    return SampleContext(tokenizer=tokenizer, image_size=job.data.image_size,
                         codec=job.data.visual_codec(), cfg=job.sampler,
                         precision=job.trainer.precision)


def build_held_out(job: JobConfig) -> HeldOut:
    """The run's held-out pair shards (``held_out_from_data``).

    Args:
        job: the resolved job; only ``job.data`` is read.

    Raises:
        ConfigError: the data has no pair source to read held-out samples from.
    """
    try:
        return held_out_from_data(job.data)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def build_eval_config(job: JobConfig, num_samples: int | None = None,
                      task: str | None = None) -> EvalConfig:
    """``trainer.eval_task`` on ``trainer.eval_samples`` samples, with the objective's samplers.

    Args:
        job: the resolved job.
        num_samples: overrides ``trainer.eval_samples`` (``mmgen eval --num-samples``).
        task: overrides ``trainer.eval_task`` (the ``mmgen eval`` subcommand).
    """
    cfg = EvalConfig(task=task or job.trainer.eval_task,
                     num_samples=num_samples or job.trainer.eval_samples,
                     samplers=objective_samplers(job.objective.name))
    try:
        get_evaluation(cfg.task)
        return cfg.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from e


def evaluate(model: nn.Module, ctx: SampleContext, held_out: HeldOut, cfg: EvalConfig,
             out_dir: Path) -> dict:
    """Run evaluation ``cfg.task`` of the registry and print its report.

    Args:
        model: the plain (unsharded) model.
        ctx, held_out, cfg: from the ``build_*`` functions of this module.
        out_dir: where the evaluation writes (``scores.json`` ...).
    """
    evaluation = get_evaluation(cfg.task)
    report = evaluation.run(model, ctx, held_out, cfg, Path(out_dir))
    evaluation.print_report(report)
    return report


class Hooks:
    """Periodic samples (``trainer.sample_every``) and the end-of-run evaluation of one run.

    Args:
        ctx: the run's sampling facts.
        held_out: the run's held-out data; None when the run neither samples nor evaluates.
        samplers: the objective's sampler names; every one draws at each sample step.
        sample_every: steps between samples (0: never).
        num_samples: held-out prompts per sample step (the same ones every time).
        eval_cfg: the end-of-run evaluation; None when ``trainer.eval_at_end`` is off.
        out_dir: samples go to ``out_dir/step_XXXXXXX[_<task>].png`` + ``step_XXXXXXX.json``.
    """

    def __init__(self, ctx: SampleContext, held_out: HeldOut | None, samplers: tuple[str, ...],
                 sample_every: int, num_samples: int, eval_cfg: EvalConfig | None, out_dir: Path):
        self.ctx, self.held_out, self.samplers = ctx, held_out, samplers
        self.sample_every, self.num_samples = sample_every, num_samples
        self.eval_cfg, self.out_dir = eval_cfg, Path(out_dir)
        self._prompts: list[HeldOutSample] | None = None

    def prompts(self) -> list[HeldOutSample]:
        """The held-out samples every sample step draws from (read once)."""
        if self._prompts is None:
            self._prompts = self.held_out.read(self.num_samples)
        return self._prompts

    def after_step(self, step: int, model: nn.Module) -> dict[str, Path]:
        """Every ``sample_every`` steps, each sampler's captioned grid; returns task -> PNG path
        (empty on other steps). Call on one rank: it needs the whole model.

        Args:
            step: the optimizer step just finished.
            model: the plain (unsharded) model.
        """
        if not (self.sample_every and step % self.sample_every == 0 and self.samplers):
            return {}
        samples = self.prompts()
        records = [{"source": s.source, "key": s.key, "caption": s.caption} for s in samples]
        paths = {}
        for name in self.samplers:
            sampler = get_sampler(name)
            if sampler.task == RECONSTRUCTION:   # pairs: input, then its reconstruction
                recon = sampler(model, torch.stack([to_unit(s.image) for s in samples]), self.ctx)
                grid = [im for s, r in zip(samples, recon) for im in (s.image, to_uint8(r))]
                labels = [lab for s in samples for lab in (s.caption, "reconstruction")]
            elif sampler.reads == CAPTION:
                images = sampler(model, [s.caption for s in samples], self.ctx)
                grid, labels = [to_uint8(im) for im in images], [s.caption for s in samples]
            else:
                texts = sampler(model, torch.stack([to_unit(s.image) for s in samples]), self.ctx)
                grid, labels = [s.image for s in samples], texts
                for rec, text in zip(records, texts):
                    rec[sampler.task] = text
            # the text-to-image grid keeps v1's file name (dashboards and scripts read it)
            suffix = "" if sampler.task == TEXT_TO_IMAGE else f"_{sampler.task}"
            paths[sampler.task] = self.out_dir / f"step_{step:07d}{suffix}.png"
            paths[sampler.task].parent.mkdir(parents=True, exist_ok=True)
            save_grid(grid, labels, paths[sampler.task])
        (self.out_dir / f"step_{step:07d}.json").write_text(
            json.dumps({"step": step, "samplers": list(self.samplers), "samples": records}, indent=1))
        return paths

    def at_end(self, model: nn.Module, out_dir: Path) -> dict | None:
        """The end-of-run evaluation (``trainer.eval_at_end``); None when it is off.

        Args:
            model: the plain (unsharded) model.
            out_dir: where the evaluation writes (``runs/<name>/eval``).
        """
        if self.eval_cfg is None:
            return None
        return evaluate(model, self.ctx, self.held_out, self.eval_cfg, out_dir)


def build_hooks(job: JobConfig, tokenizer: ByteTokenizer) -> Hooks:
    """The run's hooks; a config they cannot serve (no held-out pair source, an unknown sampler
    or evaluation, held-out shards that do not exist) fails here, before training starts.

    Args:
        job: the resolved job.
        tokenizer: the run's tokenizer.
    """
    t = job.trainer
    samplers = objective_samplers(job.objective.name)
    eval_cfg = build_eval_config(job) if t.eval_at_end else None
    held_out = build_held_out(job) if (t.sample_every or eval_cfg) else None
    if held_out is not None:
        held_out.check()
    return Hooks(build_sample_context(job, tokenizer), held_out, samplers, t.sample_every,
                 t.num_samples, eval_cfg, Path(job.run_dir) / "samples")
