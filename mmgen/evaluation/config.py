# Typed configuration of one evaluation run (built by the trainer layer or `mmgen eval`).
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    """What an evaluation of the registry (``EVALUATIONS``) receives besides the model and the data.

    Args:
        task: the evaluation's registry key, e.g. "shapes".
        num_samples: held-out samples scored.
        batch_size: prompts per sampler call.
        samplers: sampler names (``SAMPLERS``) the evaluation may use, in order of preference:
            the objective's ``samplers``, so only what the run trained is scored.
    """

    task: str = "shapes"
    num_samples: int = 200
    batch_size: int = 50
    samplers: tuple[str, ...] = ("flow_t2i", "text")

    def validate(self) -> "EvalConfig":
        if self.num_samples < 1 or self.batch_size < 1:
            raise ValueError(f"evaluation num_samples ({self.num_samples}) and batch_size "
                             f"({self.batch_size}) must be >= 1")
        return self
