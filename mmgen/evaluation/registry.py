# The evaluation registry: task name -> how to score a model on held-out data and how to show it.
"""Every evaluation is called as ``run(model, ctx, held_out, cfg, out_dir) -> report`` with the
run's sampling facts (:class:`~mmgen.sampling.registry.SampleContext`), its held-out data
(:class:`~mmgen.evaluation.held_out.HeldOut`) and an :class:`~mmgen.evaluation.config.EvalConfig`,
never the job config; ``print_report(report)`` writes the human-readable summary.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.nn as nn

from mmgen.evaluation.config import EvalConfig
from mmgen.evaluation.held_out import HeldOut
from mmgen.evaluation.shapes_eval import evaluate_shapes, print_report
from mmgen.sampling.registry import SampleContext


@dataclass(frozen=True)
class Evaluation:
    run: Callable[[nn.Module, SampleContext, HeldOut, EvalConfig, Path], dict]
    print_report: Callable[[dict], None]


EVALUATIONS: dict[str, Evaluation] = {
    "shapes": Evaluation(evaluate_shapes, print_report),
}


def get_evaluation(task: str) -> Evaluation:
    """``EVALUATIONS[task]``, or a one-line ValueError naming the registered tasks.

    Args:
        task: a registry key, e.g. ``trainer.eval_task`` or the ``mmgen eval`` subcommand.
    """
    if task not in EVALUATIONS:
        raise ValueError(f"unknown evaluation '{task}' (registered: {', '.join(EVALUATIONS)})")
    return EVALUATIONS[task]
