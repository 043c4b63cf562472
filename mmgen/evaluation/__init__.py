# Evaluations behind one registry (EVALUATIONS), fed sub-configs and held-out data, never the job.
"""The scorers (``mmgen.evaluation.shapes``, ``shapes_video``: numpy and Pillow only) import without torch; the
registry and the held-out reader are imported on first use, as in ``mmgen.data``."""
from __future__ import annotations

import importlib

_LAZY = {
    "EvalConfig": "mmgen.evaluation.config",
    "HeldOut": "mmgen.evaluation.held_out",
    "HeldOutSample": "mmgen.evaluation.held_out",
    "held_out_from_data": "mmgen.evaluation.held_out",
    "HeldOutClip": "mmgen.evaluation.held_out",
    "HeldOutClips": "mmgen.evaluation.held_out",
    "held_out_clips_from_data": "mmgen.evaluation.held_out",
    "evaluate_shapes_video": "mmgen.evaluation.shapes_video_eval",
    "print_video_report": "mmgen.evaluation.shapes_video_eval",
    "EVALUATIONS": "mmgen.evaluation.registry",
    "Evaluation": "mmgen.evaluation.registry",
    "get_evaluation": "mmgen.evaluation.registry",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmgen.evaluation' has no attribute {name!r}")
