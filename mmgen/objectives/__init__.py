# Objective registry: config name -> objective class (see base.Objective for the protocol).
from __future__ import annotations

from mmgen.objectives.base import Objective, aux_losses, normalise, weighted_total
from mmgen.objectives.config import ObjectiveConfig
from mmgen.objectives.ddpm import TransfusionDDPMObjective
from mmgen.objectives.masked_vq import MaskedVQObjective
from mmgen.objectives.mar import MARObjective
from mmgen.objectives.next_token import NextTokenObjective
from mmgen.objectives.reconstruction import VAEObjective, VQObjective
from mmgen.objectives.transfusion import TransfusionObjective
from mmgen.objectives.vq_ar import VQAutoregressiveObjective

OBJECTIVES = {
    "transfusion": TransfusionObjective,
    "next_token": NextTokenObjective,
    "transfusion_ddpm": TransfusionDDPMObjective,
    "vae": VAEObjective,   # train mmgen's codecs (model.family vae / vq)
    "vq": VQObjective,
    "vq_ar": VQAutoregressiveObjective,   # discrete-token AR on VQ codes (data.codec=vq:/diffusers:)
    "masked_vq": MaskedVQObjective,       # masked discrete diffusion on VQ codes (Show-o / MaskGIT)
    "mar": MARObjective,   # per-token MLP diffusion head on masked tokens (MAR / Harmon)
}


def build_objective(cfg: ObjectiveConfig, sources: tuple[str, ...] = ()) -> Objective:
    """The objective ``cfg.name``.

    Args:
        cfg: the objective config.
        sources: the run's data source names; with two or more, every loss is also returned
            per source (``"<loss>/<source>"``, base.py). One source would only repeat the loss.
    """
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"unknown objective '{cfg.name}' (available: {', '.join(OBJECTIVES)})")
    objective = OBJECTIVES[cfg.name](cfg)
    objective.sources = tuple(sources) if len(sources) > 1 else ()
    return objective


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
