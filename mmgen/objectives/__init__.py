# Objective registry: config name -> objective class (see base.Objective for the protocol).
from __future__ import annotations

from mmgen.objectives.base import Objective, aux_losses, normalise, weighted_total
from mmgen.objectives.config import ObjectiveConfig
from mmgen.objectives.next_token import NextTokenObjective
from mmgen.objectives.reconstruction import VAEObjective, VQObjective
from mmgen.objectives.transfusion import TransfusionObjective

OBJECTIVES = {
    "transfusion": TransfusionObjective,
    "next_token": NextTokenObjective,
    "vae": VAEObjective,   # train mmgen's codecs (model.family vae / vq)
    "vq": VQObjective,
}


def build_objective(cfg: ObjectiveConfig) -> Objective:
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"unknown objective '{cfg.name}' (available: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[cfg.name](cfg)


def objective_heads(name: str) -> list[str]:
    """The model heads objective ``name`` runs: what ``model.heads`` resolves to in a job."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective '{name}' (available: {', '.join(OBJECTIVES)})")
    return list(OBJECTIVES[name].heads)


def objective_family(name: str) -> str:
    """The ``model.family`` objective ``name`` trains ("transformer" unless it says otherwise)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective '{name}' (available: {', '.join(OBJECTIVES)})")
    return getattr(OBJECTIVES[name], "family", "") or "transformer"


__all__ = ["OBJECTIVES", "Objective", "ObjectiveConfig", "aux_losses", "build_objective",
           "normalise", "objective_family", "objective_heads", "weighted_total"]
