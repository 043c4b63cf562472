# Objective registry: config name -> objective class (see base.Objective for the protocol).
from __future__ import annotations

from mmgen.objectives.base import Objective, normalise, weighted_total
from mmgen.objectives.config import ObjectiveConfig
from mmgen.objectives.next_token import NextTokenObjective
from mmgen.objectives.transfusion import TransfusionObjective

OBJECTIVES = {
    "transfusion": TransfusionObjective,
    "next_token": NextTokenObjective,
}


def build_objective(cfg: ObjectiveConfig) -> Objective:
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"unknown objective '{cfg.name}' (available: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[cfg.name](cfg)


__all__ = ["OBJECTIVES", "Objective", "ObjectiveConfig", "build_objective", "normalise",
           "weighted_total"]
