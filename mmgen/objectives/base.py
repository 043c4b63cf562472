# The objective protocol (batch -> named, globally normalised losses) and the weighted total.
"""An objective owns everything between the batch and the losses: noise, timestep sampling,
the model's inputs (clean, noised, masked), which heads run at which positions, and the
per-loss reductions. The model only maps inputs to outputs: one call
``out = model(batch, visual_in, span_t, heads={"lm": positions, ...})`` (through the backend's
wrapper, so always ``model(...)``, never a method of it), returning each requested head's
output at its positions and ``out["aux"]``, the trunk's auxiliary losses (MoE balance, z-loss),
which the objective adds to its own with :func:`aux_losses`. The model is built with exactly
the heads in :attr:`Objective.heads` (``model.heads``), so no parameter goes without a
gradient (DDP's default reducer requires that).

Normalisation (STYLE habit 8): each loss is ``sum over this micro-batch's valid positions /
denominators[name]``, where the trainer passes the *global* number of valid positions (summed
over micro-batches and ranks from :meth:`Objective.local_counts`). Summing the returned losses
over micro-batches and ranks then gives the same value however the batch is split.
Auxiliary losses are one mean per micro-batch over its non-padding positions; weighting each by
the micro-batch's share of the step's non-padding positions (the count :data:`POSITIONS`, which
every objective's ``local_counts`` includes through :func:`position_count`) makes the same sum
their position-weighted mean.

Per-source losses (DESIGN.md contract 8): when a run mixes several data sources, the trainer
gives the objective the run's source names (``build_objective(cfg, sources)``) and each loss
``name`` is also returned as ``"<name>/<source>"``: the same per-position loss summed over that
source's positions only, divided by the global count of that source's valid positions
(``local_counts`` then holds ``"<name>/<source>"`` counts, reduced with the others). They are
detached diagnostics: :func:`weighted_total` leaves every name with a "/" out, and the main
losses are computed exactly as without them (same ops, same bits).
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn

from mmgen.batch import MultimodalBatch
from mmgen.sequence_shard import shard_of


POSITIONS = "positions"


class Objective(Protocol):
    """Attributes:
        loss_names: the losses it returns besides the trunk's auxiliary ones.
        heads: the model heads it runs (``mmgen.models.heads.HEADS`` names); a training job
            builds the model with exactly these (``model.heads``).
        video_samplers (optional): the ``SAMPLERS`` names that draw and read clips
            (``mmgen eval shapes --video``); an objective without it has none.
    """

    loss_names: tuple[str, ...]
    heads: tuple[str, ...]
    samplers: tuple[str, ...]   # names in mmgen.sampling.SAMPLERS (samples and evaluations)
    sources: tuple[str, ...]    # the run's data sources for per-source losses; () = none

    def local_counts(self, batch: MultimodalBatch) -> dict[str, torch.Tensor]:
        """Valid positions per loss name in this micro-batch, and ``POSITIONS`` (non-padding
        positions, for the auxiliary losses); 0-dim long tensors, ready for an all-reduce."""
        ...

    def __call__(self, model: nn.Module, batch: MultimodalBatch,
                 denominators: dict[str, torch.Tensor],
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Named losses, each = local sum / ``denominators[name]``; 0 when the sum is empty.
        ``generator`` is the only source of randomness (exact resume)."""
        ...


def normalise(loss_sum: torch.Tensor, denominator: torch.Tensor | int | float) -> torch.Tensor:
    """``loss_sum / denominator``; a zero denominator means an empty (zero, still
    graph-connected) sum, so clamping it to 1 returns 0 instead of NaN."""
    denom = torch.as_tensor(denominator, device=loss_sum.device).to(torch.float32)
    return loss_sum.float() / denom.clamp(min=1.0)


def draw_patch_noise(batch: MultimodalBatch, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise like ``x0`` (``[N, D]``, the batch's continuous rows), on the
    generator's device. A context-parallel slice draws the whole batch's noise and keeps its
    own rows (``mmgen/sequence_shard.py``), so every position gets the number one process
    would give it."""
    shard = shard_of(batch)
    if shard is None:
        return torch.randn(x0.shape, generator=generator, device=generator.device)
    full = torch.randn((shard.full.patches.shape[0], *x0.shape[1:]), generator=generator, device=generator.device)
    return full[shard.patch_rows.to(full.device)]


def position_count(batch: MultimodalBatch) -> dict[str, torch.Tensor]:
    """``{POSITIONS: non-padding positions}``, the count behind the auxiliary losses."""
    return {POSITIONS: (batch.document_ids >= 0).sum()}


def aux_losses(aux: dict[str, torch.Tensor], batch: MultimodalBatch,
               denominators: dict[str, torch.Tensor],
               taken: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The trunk's auxiliary losses (``model(...)["aux"]``) as named losses.

    Each is a mean over this micro-batch's non-padding positions (MoE balance, z-loss), so
    ``mean * local positions / global positions`` summed over micro-batches and ranks is the
    step's position-weighted mean, like every other loss.

    Args:
        aux: name -> scalar, as the trunk returns it (empty for dense blocks).
        batch: the micro-batch the model ran on.
        denominators: the step's global counts; must hold ``POSITIONS``.
        taken: the objective's own loss names, which an auxiliary loss may not reuse.
    """
    if not aux:
        return {}
    clash = sorted(set(aux) & set(taken))
    if clash:
        raise ValueError(f"auxiliary loss name(s) {clash} clash with the objective's losses")
    local = position_count(batch)[POSITIONS]
    return {name: normalise(value * local, denominators[POSITIONS]) for name, value in aux.items()}


def per_source_name(loss: str, source: str) -> str:
    """The key of loss ``loss`` restricted to data source ``source`` (logged ``loss/<loss>/<source>``)."""
    return f"{loss}/{source}"


def is_per_source(name: str, losses: dict) -> bool:
    """Whether ``name`` is the per-source view ``"<loss>/<source>"`` of another loss in ``losses``."""
    head, sep, _ = name.partition("/")
    return bool(sep) and head in losses


def per_source_counts(name: str, sources: tuple[str, ...], where: torch.Tensor,
                      source_index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Valid positions of loss ``name`` per source: ``{"<name>/<source>": count}``.

    Args:
        name: the loss name.
        sources: the run's source names (empty: no per-source counts).
        where: ``[...]`` bool, the loss's valid positions.
        source_index: same shape, index into ``sources`` per position (-1: none).
    """
    if not sources:
        return {}
    sel = source_index[where]
    counts = torch.bincount(sel[sel >= 0], minlength=len(sources))
    return {per_source_name(name, s): counts[i] for i, s in enumerate(sources)}


def per_source_losses(name: str, sources: tuple[str, ...], values: torch.Tensor,
                      source_index: torch.Tensor, denominators: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    """Loss ``name`` split by source, each normalised by that source's global count; detached.

    Args:
        name: the loss name.
        sources: the run's source names (empty: returns {}).
        values: ``[M]`` per-position loss at the loss's valid positions (0 where not counted).
        source_index: ``[M]`` index into ``sources`` of each of those positions (-1: none).
        denominators: the step's global counts, holding ``"<name>/<source>"``.
    """
    if not sources:
        return {}
    with torch.no_grad():
        values = values.detach().float()
        keep = source_index >= 0
        sums = torch.zeros(len(sources), dtype=torch.float32, device=values.device)
        sums.index_add_(0, source_index.clamp(min=0), torch.where(keep, values, torch.zeros_like(values)))
        return {per_source_name(name, s): normalise(sums[i], denominators[per_source_name(name, s)])
                for i, s in enumerate(sources)}


def weighted_total(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """``sum(weights[name] * loss)``; every loss needs a weight, so a misspelt weight key
    cannot silently leave a loss out. Per-source diagnostics (``"<name>/<source>"``) are not
    part of the total."""
    main = {n: v for n, v in losses.items() if not is_per_source(n, losses)}
    missing = sorted(set(main) - set(weights))
    if missing:
        raise KeyError(f"no weight for loss(es) {missing}; weights given: {sorted(weights)}")
    return sum(weights[name] * loss for name, loss in main.items())
