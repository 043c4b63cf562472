# Rectified-flow matching on continuous visual spans: time sampling, noising, velocity loss.
"""Convention: ``x_t = (1 - t) x0 + t noise``; t = 0 is data, t = 1 is noise; the velocity
``v = dx_t/dt = noise - x0``. Target spans get a sampled t per span; condition spans are
passed clean with t = 0 (which the formula turns into x_t = x0 without a special case).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmgen.batch import MultimodalBatch
from mmgen.objectives.base import draw_patch_noise
from mmgen.objectives.config import ObjectiveConfig


@dataclass
class FlowSample:
    """Everything random about one micro-batch's flow loss, on the batch's device.

    Shapes: N continuous visual positions (row-major), S spans."""

    x0: torch.Tensor        # [N, patch_dim] clean patches
    noise: torch.Tensor     # [N, patch_dim]
    span_t: torch.Tensor    # [S] flow time per span (0 for condition spans)
    t: torch.Tensor         # [N] flow time per position
    x_t: torch.Tensor       # [N, patch_dim] model input
    is_loss: torch.Tensor   # [N] bool, positions that carry the visual loss


def visual_loss_mask(batch: MultimodalBatch) -> torch.Tensor:
    """``[B, L]`` bool: continuous positions of target spans (narrowed by
    ``batch.loss_masks["visual"]`` when the pipeline provides one)."""
    mask = batch.loss_masks.get("visual")
    if mask is None:
        mask = batch.target_visual_mask()
    return mask & batch.continuous_mask()


def visual_counts(batch: MultimodalBatch) -> torch.Tensor:
    return visual_loss_mask(batch).sum()


def sample_times(n: int, cfg: ObjectiveConfig, generator: torch.Generator) -> torch.Tensor:
    """``[n]`` times in (0, 1), drawn on ``generator``'s device."""
    device = generator.device
    if cfg.time_sampling == "uniform":
        return torch.rand(n, generator=generator, device=device)
    z = torch.randn(n, generator=generator, device=device)
    return torch.sigmoid(cfg.logit_mean + cfg.logit_std * z)


def sample_flow(batch: MultimodalBatch, cfg: ObjectiveConfig,
                generator: torch.Generator) -> FlowSample:
    """Draw times and noise for ``batch``. Draws happen on the generator's device (a CPU
    generator gives the same numbers on any accelerator) and are then moved to the batch."""
    device = batch.patches.device
    x0 = batch.patches.float()
    span_t = sample_times(len(batch.spans), cfg, generator).to(device)
    noise = draw_patch_noise(batch, x0, generator).to(device)
    span_t = torch.where(batch.spans.is_target.to(device), span_t, torch.zeros_like(span_t))
    cont = batch.rows("continuous")   # indices, not a bool mask: no device sync
    t = span_t[batch.span_ids.flatten()[cont]]
    x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
    return FlowSample(x0=x0, noise=noise, span_t=span_t, t=t, x_t=x_t,
                      is_loss=visual_loss_mask(batch).flatten()[cont])


def to_velocity(out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str,
                t_eps: float) -> torch.Tensor:
    """Convert a network output (``prediction`` = "v", "x" or "eps") at ``x_t``, time ``t``
    (``[N]``) into a velocity; divisors are floored at ``t_eps`` near the singular end."""
    t = t[:, None].to(out.dtype)
    if prediction == "v":
        return out
    if prediction == "x":        # x_t = x0 + t v
        return (x_t - out) / t.clamp(min=t_eps)
    if prediction == "eps":      # x_t = noise - (1 - t) v
        return (out - x_t) / (1 - t).clamp(min=t_eps)
    raise ValueError(f"unknown prediction type '{prediction}'")


def flow_loss_sum(out: torch.Tensor, sample: FlowSample, cfg: ObjectiveConfig,
                  per_position_out: list | None = None) -> torch.Tensor:
    """Velocity MSE per position (mean over patch features), summed over loss positions.

    Args:
        out: the flow head's rows (every continuous position, row-major).
        sample: the draw of times and noise.
        cfg: the objective config (prediction type, ``t_eps``).
        per_position_out: if given, the ``[N]`` masked per-position losses are appended to it
            (for per-source losses; the sum is computed the same way either way).
    """
    v_pred = to_velocity(out.float(), sample.x_t, sample.t, cfg.prediction, cfg.t_eps)
    per_position = (v_pred - (sample.noise - sample.x0)).square().mean(dim=-1)
    masked = per_position * sample.is_loss
    if per_position_out is not None:
        per_position_out.append(masked.detach())
    return masked.sum()
