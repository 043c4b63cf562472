# Reconstruction objectives that train mmgen's own codecs (model.family vae / vq) through the trainer.
"""The codec is "the model" and these are "the objective": the data pipeline delivers its usual
packed batches with pixel-patch spans (``data.codec=pixels``); every continuous span (target or
condition, image or video frame) is turned back into pixels and reconstructed. Captions are
ignored. Losses are per-frame means, summed and divided by the step's global frame count
(``frames``), like every other mmgen loss (STYLE habit 8).

Metrics (``metric_names``: PSNR, and for VQ codebook usage and perplexity) come back with the
losses, detached; the trainer logs them as ``metric/<name>`` and leaves them out of the total.
Usage and perplexity are per micro-batch, weighted by its share of the step's frames.

Perceptual or adversarial terms would join :meth:`ReconstructionObjective.extra_losses` as more
named losses with their own weights (off by default: a discriminator needs its own optimizer,
which the trainer does not have yet).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from mmgen.batch import CONTINUOUS, MultimodalBatch
from mmgen.models.codecs.pixel import unpatchify
from mmgen.objectives.base import normalise, position_count
from mmgen.objectives.config import ObjectiveConfig

FRAMES = "frames"
# pixels span [-1, 1]: peak-to-peak 2, so PSNR = 10 log10(4 / MSE); the floor keeps a perfect
# reconstruction finite
PSNR_PEAK_SQ, MSE_FLOOR = 4.0, 1e-10


def batch_frames(batch: MultimodalBatch, channels: int = 3) -> torch.Tensor:
    """Every continuous span's pixels as frames ``[F, C, H, W]`` in span-table order (a clip
    gives its T frames in time order). The payload must be pixel patches (``data.codec=pixels``)."""
    spans = batch.spans
    cont = (spans.kind == CONTINUOUS).nonzero().flatten().tolist()
    dim = batch.patches.shape[1] if batch.patches.dim() == 2 else 0
    p = math.isqrt(max(dim // channels, 0))
    if cont and p * p * channels != dim:
        raise ValueError(f"reconstruction objective: payload rows of width {dim} are not "
                         f"{channels}-channel pixel patches (train codecs on data.codec=pixels)")
    frames, offset = [], 0
    # patches rows are the continuous spans in row-major order of the [B, L] grid
    order = sorted(cont, key=lambda i: (int(spans.row[i]), int(spans.start[i])))
    for i in order:
        t, gh, gw = (int(g) for g in spans.grid[i])
        rows = batch.patches[offset: offset + t * gh * gw]
        offset += t * gh * gw
        for f in rows.reshape(t, gh * gw, dim):
            frames.append(unpatchify(f, gh, gw, p, channels))
    if not frames:
        return batch.patches.new_zeros((0, channels, 1, 1))
    return torch.stack(frames).float()


def frame_count(batch: MultimodalBatch) -> torch.Tensor:
    """Frames the objective reconstructs in ``batch`` (continuous spans' grid t, summed)."""
    cont = batch.spans.kind == CONTINUOUS
    return batch.spans.grid[:, 0][cont].sum()


def psnr(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[N]`` PSNR in dB of each reconstruction (clamped to [-1, 1]) against its target."""
    mse = (recon.detach().float().clamp(-1, 1) - target.float()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(PSNR_PEAK_SQ / mse.clamp(min=MSE_FLOOR))


class ReconstructionObjective:
    """Shared part: frames from the batch, the model's forward, reconstruction loss and PSNR.

    Args:
        cfg: ``objective.*``; ``recon_loss`` picks "l1" or "l2".
    """

    family = ""                  # the model.family it trains (checked by the job)
    loss_names: tuple[str, ...] = ("recon",)
    metric_names: tuple[str, ...] = ("psnr",)
    heads: tuple[str, ...] = ()
    samplers = ("reconstruct",)  # mmgen.sampling.SAMPLERS: input | reconstruction grids

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg.validate()
        missing = [n for n in self.loss_names if n not in cfg.weights]
        if missing:
            raise ValueError(f"objective={cfg.name} needs objective.weights for {missing} "
                             f"(given: {sorted(cfg.weights)})")

    def local_counts(self, batch: MultimodalBatch) -> dict[str, torch.Tensor]:
        return {FRAMES: frame_count(batch), **position_count(batch)}

    def __call__(self, model: nn.Module, batch: MultimodalBatch,
                 denominators: dict[str, torch.Tensor],
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        x = batch_frames(batch)
        out = model(x, generator=generator)
        err = out["recon"].float() - x
        per_frame = (err.abs() if self.cfg.recon_loss == "l1" else err.square()).flatten(1).mean(1)
        denom = denominators[FRAMES]
        losses = {"recon": normalise(per_frame.sum(), denom),
                  "psnr": normalise(psnr(out["recon"], x).sum(), denom)}
        return {**losses, **self.extra_losses(out, x, denom)}

    def extra_losses(self, out: dict[str, torch.Tensor], x: torch.Tensor,
                     denom: torch.Tensor) -> dict[str, torch.Tensor]:
        """The family's own losses and metrics from the model's outputs."""
        return {}


class VAEObjective(ReconstructionObjective):
    """``recon`` + ``kl`` (KL to N(0, I) per latent element, weighted by ``weights.kl``)."""

    family = "vae"
    loss_names = ("recon", "kl")

    def extra_losses(self, out, x, denom):
        return {"kl": normalise(out["kl"].sum(), denom)}


class VQObjective(ReconstructionObjective):
    """``recon`` + ``commit`` (encoder pulled to its codes) + ``codebook`` (codes pulled to the
    encoder under straight-through updates; 0 under EMA); metrics codebook ``usage`` (fraction
    of codes used in the micro-batch) and ``perplexity`` (exp of the code entropy)."""

    family = "vq"
    loss_names = ("recon", "commit", "codebook")
    metric_names = ("psnr", "usage", "perplexity")

    def extra_losses(self, out, x, denom):
        counts = out["counts"].detach().float()
        share = x.shape[0] / denom.clamp(min=1).float()   # this micro-batch's share of the frames
        prob = counts / counts.sum().clamp(min=1)
        entropy = -(prob * prob.clamp(min=1e-12).log()).sum()
        return {"commit": normalise(out["commit"].sum(), denom),
                "codebook": normalise(out["codebook"].sum(), denom),
                "usage": (counts > 0).float().mean() * share, "perplexity": entropy.exp() * share}
