# MAR (Li et al. 2024): masked visual tokens, a per-token MLP diffusion head on the trunk's state, text next-token loss.
"""Autoregressive image generation without vector quantisation, in one transformer with text:

* masking: every continuous **target** span (its ``visual_loss_mask`` positions: condition
  images are never masked) masks a share ``r`` of its positions, ``r`` drawn per span from
  MAR's truncated normal (mean 1.0, std 0.25, on ``[objective.mar_mask_min, 1]``), at least
  one; which positions is a uniform random order per span (:func:`sample_mar`);
* the trunk sees clean tokens at unmasked positions and the learned mask embedding
  (``mask_embed``, built with the "mar" head) at masked ones, every span's time 0; attention
  is the span table's: FULL inside visual spans (MAR's bidirectional encoder-decoder), and
  whether later text sees a target span is its ``visible_after`` column, untouched, as for
  Transfusion targets;
* the "mar" head (``mmgen/models/heads.py``): at each masked position, ``objective.mar_draws``
  (K) noise draws of the flow-matching pair (``x_t = (1 - t) x0 + t noise``, ``t`` from
  ``objective.time_sampling`` as in flow.py, one per draw); the trunk runs once and the MLP
  denoiser K times with the hidden state repeated, velocity MSE in ``objective.prediction``'s
  parameterisation (flow.py's ``to_velocity``);
* "text": next-token cross-entropy at text targets (captions of image-to-text documents,
  BOI / EOI / EOS of the others), as Transfusion.

Normalisation. The number of masked positions is random, and the trainer takes every loss's
global count from :meth:`MARObjective.local_counts` on the host *before* it seeds the
objective's generator (per micro-batch, from (seed, step, stream)): ``local_counts`` sees the
batch only, so it cannot know how many positions ``__call__`` will mask. So "visual" is a
mean **per target span**: each span's loss is the mean over its masked positions and the K
draws, and the spans' sum is divided by the global count of continuous target spans (a count
of the batch alone). With one mask ratio per batch and equal-sized images (MAR's training
setup) this is exactly MAR's mean over masked tokens; here each span draws its own ratio.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from mmgen.batch import CONTINUOUS, MultimodalBatch
from mmgen.objectives.base import (aux_losses, normalise, per_source_counts, per_source_losses,
                                   position_count)
from mmgen.objectives.config import ObjectiveConfig
from mmgen.objectives.flow import sample_times, to_velocity, visual_loss_mask
from mmgen.objectives.next_token import (next_token_loss_sum, text_counts, text_per_source,
                                         text_source_counts)
from mmgen.sequence_shard import shard_of

# MAR's mask-ratio distribution: a normal of mean 1.0 and std 0.25, truncated to [min, 1]
MASK_MEAN, MASK_STD = 1.0, 0.25


@dataclass
class MARSample:
    """Everything random about one micro-batch's MAR loss, on the batch's device. Shapes: N
    continuous rows, S spans, M masked rows, K draws (rows ``k * M + i``: draw k of masked row i)."""

    masked: torch.Tensor    # [N] bool, continuous rows the trunk sees as the mask embedding
    rows: torch.Tensor      # [M] long, their indices among the continuous rows
    weight: torch.Tensor    # [M] 1 / (K * masked rows of the span): sums to 1 per span and draws
    x0: torch.Tensor        # [K*M, patch_dim] clean tokens, repeated per draw
    noise: torch.Tensor     # [K*M, patch_dim]
    t: torch.Tensor         # [K*M] flow time per draw
    x_t: torch.Tensor       # [K*M, patch_dim] the denoiser's input


def span_candidates(batch: MultimodalBatch) -> torch.Tensor:
    """``[S]`` long: positions of each span that may be masked (continuous target positions,
    ``visual_loss_mask``); 0 for condition and discrete spans."""
    span_ids = batch.span_ids[visual_loss_mask(batch)]
    return torch.bincount(span_ids, minlength=len(batch.spans))[: len(batch.spans)]


def mask_ratios(n: int, low: float, generator: torch.Generator) -> torch.Tensor:
    """``[n]`` mask ratios from MAR's truncated normal on ``[low, 1]`` (inverse CDF of one
    uniform each, on the generator's device)."""
    u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
    a = torch.special.ndtr(torch.tensor((low - MASK_MEAN) / MASK_STD, dtype=torch.float64))
    b = torch.special.ndtr(torch.tensor((1.0 - MASK_MEAN) / MASK_STD, dtype=torch.float64))
    r = MASK_MEAN + MASK_STD * torch.special.ndtri(a + u * (b - a))
    return r.clamp(low, 1.0)


def expected_masked(n: torch.Tensor, low: float) -> torch.Tensor:
    """``[S]`` float64: the expected number of positions :func:`sample_mask` masks in a span of
    ``n`` candidates, ``E[min(max(ceil(r n), 1), n)]`` for ``r`` from :func:`mask_ratios`'
    truncated normal on ``[low, 1]``: exactly, as ``sum_{j=0}^{n-1} P(r > j / n)`` (``m >= k``
    iff ``r n > k - 1``; ``r > 0`` almost surely, so the >= 1 clamp only matters at ``low = 0``
    where it changes nothing) with the truncated normal's CDF. For the FLOP count of the
    denoiser (``mmgen/metrics/flops.py``), which must be known before the mask is drawn.

    Args:
        n: ``[S]`` long, candidate positions per span (0: nothing masked).
        low: ``objective.mar_mask_min``.
    """
    n = n.cpu().to(torch.float64)
    size = int(n.max()) if n.numel() else 0
    if size == 0:
        return torch.zeros_like(n)
    if low >= 1.0:
        return n.clone()                  # r = 1: every candidate
    j = torch.arange(size, dtype=torch.float64)
    x = j[None, :] / n.clamp(min=1)[:, None]                               # [S, size]
    cdf = lambda v: torch.special.ndtr((v - MASK_MEAN) / MASK_STD)          # noqa: E731
    a, b = cdf(torch.tensor(low, dtype=torch.float64)), cdf(torch.tensor(1.0, dtype=torch.float64))
    below = ((cdf(x) - a) / (b - a)).clamp(0.0, 1.0)                       # P(r <= j / n)
    return ((1.0 - below) * (j[None, :] < n[:, None])).sum(1)


def sample_mask(batch: MultimodalBatch, low: float, generator: torch.Generator) -> torch.Tensor:
    """``[N]`` bool over the continuous rows: per target span, ``ceil(r * n)`` of its ``n``
    candidate positions (at least 1), the first ones of a uniform random order of them.
    Draws: ``[S]`` ratios, then ``[N]`` uniform scores (one per continuous row)."""
    device = batch.span_ids.device
    cont = batch.rows("continuous")
    span_of = batch.span_ids.flatten()[cont]                              # [N]
    candidate = visual_loss_mask(batch).flatten()[cont]                   # [N]
    n_cand = span_candidates(batch)
    ratio = mask_ratios(len(batch.spans), low, generator).to(device)
    n_mask = torch.minimum(torch.ceil(ratio * n_cand).long().clamp(min=1), n_cand)
    score = torch.rand(cont.shape[0], generator=generator, device=generator.device,
                       dtype=torch.float64).to(device)
    # rank of every row inside its span (candidates first, in score order): sort by
    # (span, score), non-candidates pushed behind with a score of 2
    key = span_of.double() * 4 + torch.where(candidate, score, torch.full_like(score, 2.0))
    order = torch.argsort(key)
    counts = torch.bincount(span_of, minlength=len(batch.spans))
    start = torch.cumsum(counts, 0) - counts                              # [S] first sorted slot
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=device) - start[span_of[order]]
    return candidate & (rank < n_mask[span_of])


def sample_mar(batch: MultimodalBatch, cfg: ObjectiveConfig, generator: torch.Generator) -> MARSample:
    """Draw the masks, then per masked row and draw a time and noise. Draws happen on the
    generator's device, in this order: mask ratios, mask scores, times ``[K*M]``, noise
    ``[K*M, patch_dim]``."""
    device = batch.patches.device
    masked = sample_mask(batch, cfg.mar_mask_min, generator).to(device)
    rows = masked.nonzero().squeeze(1)          # the masked count decides the draws' shapes
    span_of = batch.span_ids.flatten()[batch.rows("continuous")][rows]
    n_masked = torch.bincount(span_of, minlength=len(batch.spans))
    k = cfg.mar_draws
    weight = 1.0 / (k * n_masked[span_of].float())
    x0 = batch.patches.float()[rows].repeat(k, 1)
    t = sample_times(x0.shape[0], cfg, generator).to(device)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(device)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
    return MARSample(masked=masked, rows=rows, weight=weight, x0=x0, noise=noise, t=t, x_t=x_t)


def target_spans(batch: MultimodalBatch) -> torch.Tensor:
    """``[S]`` bool: spans that carry a "visual" loss (continuous, with a candidate position)."""
    return (span_candidates(batch) > 0) & (batch.spans.kind == CONTINUOUS).to(batch.span_ids.device)


def span_sources(batch: MultimodalBatch, sources: tuple[str, ...]) -> torch.Tensor:
    """``[S]`` long: each span's index in ``sources`` (its document's), -1 for none."""
    per_position = batch.document_sources(sources)
    return per_position[batch.spans.row.to(per_position.device), batch.spans.start.to(per_position.device)]


class MARObjective:
    """Losses "text" (cross-entropy per text target) and "visual" (the per-token denoiser's
    velocity MSE at masked positions, a mean per target span): module docstring. Heads "lm"
    and "mar"; samplers ``mar_t2i`` (MAR order, guided per-token flow ODE) and ``text``."""

    loss_names = ("text", "visual")
    heads = ("lm", "mar")
    samplers = ("mar_t2i", "text")   # mmgen.sampling.SAMPLERS
    video_samplers = ("text_v2t",)    # captions of clips; no MAR text-to-video sampler yet
    codec_kind = CONTINUOUS          # pixels or VAE latents: the start-up check refuses a VQ codec
    sources: tuple[str, ...] = ()

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg.validate()

    def model_view(self, batch: MultimodalBatch):
        """What the model does on ``batch``, for the trainer's FLOP count: the batch's own
        counts (``mmgen.metrics.flops.batch_work``: the trunk, ``patch_in`` and the "lm" head
        at text targets) plus the denoiser's rows, ``mar_draws`` per masked position. The mask
        is drawn in :meth:`__call__`, after the count, so the masked positions are their
        expected number per target span (:func:`expected_masked`, exact for the ratio law).
        Returns a ``BatchWork``."""
        from mmgen.metrics.flops import batch_work

        masked = expected_masked(span_candidates(batch), self.cfg.mar_mask_min).sum()
        return dataclasses.replace(batch_work(batch), denoiser_rows=float(self.cfg.mar_draws * masked))

    def local_counts(self, batch: MultimodalBatch) -> dict[str, torch.Tensor]:
        spans = target_spans(batch)
        counts = {"text": text_counts(batch), "visual": spans.sum(), **position_count(batch)}
        if self.sources:
            counts.update(text_source_counts(self.sources, batch))
            counts.update(per_source_counts("visual", self.sources, spans,
                                            span_sources(batch, self.sources)))
        return counts

    def __call__(self, model: nn.Module, batch: MultimodalBatch,
                 denominators: dict[str, torch.Tensor],
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        if shard_of(batch) is not None:
            # a span's mask order is drawn over the whole span, which a sequence slice cuts
            raise ValueError("objective=mar does not run under context parallelism yet (parallel.cp=1)")
        return self.losses(model, batch, sample_mar(batch, self.cfg, generator), denominators)

    def losses(self, model: nn.Module, batch: MultimodalBatch, sample: MARSample,
               denominators: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The losses for a given draw of masks, times and noise (split out for exact tests)."""
        positions = batch.rows("continuous")[sample.rows]
        clean = torch.zeros(len(batch.spans), device=batch.patches.device)
        out = model(batch, batch.patches, clean,
                    heads={"lm": batch.rows("text"), "mar": positions}, masked=sample.masked,
                    head_inputs={"mar": {"x_t": sample.x_t, "t": sample.t}})
        v_pred = to_velocity(out["mar"].float(), sample.x_t, sample.t, self.cfg.prediction, self.cfg.t_eps)
        per_draw = (v_pred - (sample.noise - sample.x0)).square().mean(dim=-1)       # [K*M]
        weighted = per_draw * sample.weight.repeat(self.cfg.mar_draws)
        losses = {"text": normalise(next_token_loss_sum(out["lm"], batch), denominators["text"]),
                  "visual": normalise(weighted.sum(), denominators["visual"])}
        losses.update(aux_losses(out["aux"], batch, denominators, self.loss_names))
        if self.sources:
            losses.update(text_per_source(self.sources, out["lm"], batch, denominators))
            # per masked row: its share of its span's mean (summed per source = per-span means)
            per_row = weighted.view(self.cfg.mar_draws, -1).sum(0)
            source = batch.document_sources(self.sources).flatten()[positions]
            losses.update(per_source_losses("visual", self.sources, per_row, source, denominators))
        return losses
