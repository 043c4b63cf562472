# DDPM on continuous visual spans (an alternative to flow matching): schedules, noising, eps/v/x losses.
"""Discrete-time diffusion (Ho et al. 2020): timestep ``k`` in 1..T per target span,
``x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps``; condition spans stay clean (``k = 0``,
``abar_0 = 1``). The model sees the time as ``k / T`` in (0, 1], the range flow matching uses,
so the timestep embedder and the attention rules are shared. The network predicts
``objective.prediction``: "eps", "v" (``sqrt(abar) eps - sqrt(1 - abar) x0``) or "x" (x0); the
loss is the mean squared error of that target per position (DDPM's "simple" loss), normalised
like every loss by the global count of target positions. The sampler is ``ddpm_t2i``
(``mmgen/sampling/ddpm.py``: DDIM steps, ``sampler.ddim_eta`` = 1 gives ancestral DDPM).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from mmgen.batch import MultimodalBatch
from mmgen.objectives.base import aux_losses, draw_patch_noise, normalise, position_count
from mmgen.objectives.config import ObjectiveConfig
from mmgen.objectives.flow import visual_counts, visual_loss_mask
from mmgen.objectives.next_token import next_token_loss_sum, text_counts


def alpha_bars(schedule: str, num_timesteps: int) -> torch.Tensor:
    """``[T + 1]`` float64 cumulative signal levels ``abar_k``, ``abar_0 = 1`` (clean).

    Args:
        schedule: "cosine" (Nichol & Dhariwal 2021, s = 0.008, betas capped at 0.999) or
            "linear" (betas from 1e-4 to 0.02, Ho et al. 2020, for T = 1000 and scaled to T).
        num_timesteps: T.
    """
    T = num_timesteps
    if schedule == "linear":
        scale = 1000.0 / T
        betas = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    elif schedule == "cosine":
        f = lambda k: math.cos((k / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - f(k + 1) / f(k), 0.999) for k in range(T)], dtype=torch.float64)
    else:
        raise ValueError(f"unknown DDPM schedule '{schedule}' (cosine, linear)")
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


def to_x0_eps(out: torch.Tensor, x_k: torch.Tensor, abar: torch.Tensor, prediction: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) estimates from a network output at ``x_k``; ``abar``: ``[N]`` per row."""
    a = abar[:, None].to(out.dtype)
    sa, sb = a.sqrt(), (1 - a).sqrt()
    if prediction == "eps":
        return (x_k - sb * out) / sa, out
    if prediction == "x":
        return out, (x_k - sa * out) / sb.clamp(min=1e-8)
    if prediction == "v":
        return sa * x_k - sb * out, sb * x_k + sa * out
    raise ValueError(f"unknown prediction type '{prediction}'")


@dataclass
class DDPMSample:
    """The random draw of one micro-batch (N continuous positions, S spans)."""

    x0: torch.Tensor        # [N, D]
    noise: torch.Tensor     # [N, D]
    span_t: torch.Tensor    # [S] k / T (0 for condition spans): the model's time input
    abar: torch.Tensor      # [N]
    x_t: torch.Tensor       # [N, D]
    is_loss: torch.Tensor   # [N] bool


def sample_ddpm(batch: MultimodalBatch, cfg: ObjectiveConfig, abars: torch.Tensor,
                generator: torch.Generator) -> DDPMSample:
    """Timesteps and noise for ``batch``, drawn on ``generator``'s device (as flow's)."""
    device = batch.patches.device
    x0 = batch.patches.float()
    T = cfg.num_timesteps
    k = torch.randint(1, T + 1, (len(batch.spans),), generator=generator, device=generator.device).to(device)
    noise = draw_patch_noise(batch, x0, generator).to(device)
    k = torch.where(batch.spans.is_target.to(device), k, torch.zeros_like(k))
    cont = batch.rows("continuous")   # indices, not a bool mask: no device sync
    abar = abars.to(device)[k][batch.span_ids.flatten()[cont]].float()
    x_t = abar.sqrt()[:, None] * x0 + (1 - abar).sqrt()[:, None] * noise
    return DDPMSample(x0=x0, noise=noise, span_t=k.float() / T, abar=abar, x_t=x_t,
                      is_loss=visual_loss_mask(batch).flatten()[cont])


def ddpm_target(sample: DDPMSample, prediction: str) -> torch.Tensor:
    if prediction == "eps":
        return sample.noise
    if prediction == "x":
        return sample.x0
    a = sample.abar[:, None]
    return a.sqrt() * sample.noise - (1 - a).sqrt() * sample.x0       # v


class TransfusionDDPMObjective:
    """Transfusion with DDPM instead of flow matching: losses "text" (cross-entropy) and
    "visual" (MSE of the eps / v / x target per target position), one forward for both."""

    loss_names = ("text", "visual")
    heads = ("lm", "flow")            # the per-position visual head ("flow") predicts the target
    samplers = ("ddpm_t2i", "text")
    video_samplers = ("text_v2t",)    # no DDPM text-to-video sampler yet

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg.validate()
        self.abars = alpha_bars(cfg.schedule, cfg.num_timesteps)

    def local_counts(self, batch: MultimodalBatch) -> dict[str, torch.Tensor]:
        return {"text": text_counts(batch), "visual": visual_counts(batch), **position_count(batch)}

    def __call__(self, model: nn.Module, batch: MultimodalBatch,
                 denominators: dict[str, torch.Tensor],
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        sample = sample_ddpm(batch, self.cfg, self.abars, generator)
        out = model(batch, sample.x_t, sample.span_t,
                    heads={"lm": batch.rows("text"), "flow": batch.rows("continuous")})
        text = next_token_loss_sum(out["lm"], batch)
        err = (out["flow"].float() - ddpm_target(sample, self.cfg.prediction)).square().mean(-1)
        losses = {"text": normalise(text, denominators["text"]),
                  "visual": normalise((err * sample.is_loss).sum(), denominators["visual"])}
        return {**losses, **aux_losses(out["aux"], batch, denominators, self.loss_names)}
