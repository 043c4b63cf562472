# MAR text-to-image sampling: tokens revealed in a random order, each group drawn by the per-token flow ODE with guidance.
"""MAR's decoding (Li et al. 2024, "Autoregressive Image Generation without Vector
Quantization"), in the unified transformer:

* one random permutation of the span's positions per image (from ``sampler.seed``);
* ``sampler.steps`` iterations (at most one per position); after iteration ``k`` the first
  ``reveal_schedule(n, steps)[k]`` positions of the order are known: MAR's cosine schedule,
  ``n - floor(n cos(pi/2 (k + 1) / steps))``, at least one new position per iteration;
* each iteration runs the trunk once on ``[BOS] caption [BOI] <span>``, known positions clean
  and the others the learned mask embedding (time 0, as in training), then integrates the flow
  ODE of every newly revealed token with the "mar" head (``sampler.mar_steps`` Euler steps from
  t = 1 to 0 on ``time_grid``), conditioned on the trunk's state at the token's position.
  Classifier-free guidance: the null-caption rows run in the same batch and
  ``v = v_u + g (v_c - v_u)`` (``sampler.guidance``); ``sampler.temperature`` scales the initial
  noise of the ODE (1: as trained; lower: less diverse, as MAR's temperature).

The result is decoded through the codec (pixel patches or VAE latents) to ``[n, C, H, W]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from mmgen.models.codecs import VisualCodec, as_codec
from mmgen.models.tokenizers.text import ByteTokenizer
from mmgen.objectives.flow import to_velocity
from mmgen.sampling.config import SamplerConfig
from mmgen.sampling.images import prompt_batch, time_grid
from mmgen.sampling.mode import inference


def reveal_schedule(n: int, steps: int) -> list[int]:
    """Known positions after each iteration: strictly increasing, ending at ``n``; MAR's cosine
    mask schedule, with at least one new position per iteration (so ``min(steps, n)`` of them).

    Args:
        n: positions of the span.
        steps: iterations asked for (``sampler.steps``).
    """
    steps = max(1, min(steps, n))
    known, out = 0, []
    for k in range(steps):
        if k == steps - 1:
            now = n
        else:
            now = n - math.floor(n * math.cos(math.pi / 2 * (k + 1) / steps))
            # one new position now, and one left for each iteration still to come
            now = min(max(now, known + 1), n - (steps - 1 - k))
        out.append(now)
        known = now
    return out


def generate_images_mar(model: nn.Module, tokenizer: ByteTokenizer, captions: list[str],
                        grid_hw: tuple[int, int], codec: VisualCodec | int, cfg: SamplerConfig,
                        device: torch.device | str, record: list | None = None) -> torch.Tensor:
    """Sample one image per caption in MAR order (module docstring); ``[n, C, H, W]`` in [-1, 1].

    Args:
        model: a model with the "mar" head (``objective=mar``), unwrapped.
        tokenizer: the run's tokenizer.
        captions: one per image.
        grid_hw: the span's (h, w) grid under the codec.
        codec: the run's codec (an int: the pixel codec's patch size).
        cfg: ``sampler.*``: steps, mar_steps, guidance, temperature, time_shift, prediction,
            t_eps, seed.
        device: where the model runs.
        record: if given, gets the ``[n, k]`` positions revealed at each iteration, in order.
    """
    codec = as_codec(codec)
    gh, gw = grid_hw
    n, n_patch, patch_dim = len(captions), gh * gw, codec.payload_dim
    grid = (1, gh, gw)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.stack([torch.randperm(n_patch, generator=gen) for _ in range(n)]).to(device)
    guided = cfg.guidance != 1.0
    prompts, batch = prompt_batch(tokenizer, captions, grid, patch_dim, guided, device)
    rows = len(prompts)
    tokens = torch.zeros(n, n_patch, patch_dim, device=device)
    known = torch.zeros(n, n_patch, dtype=torch.bool, device=device)
    times = time_grid(cfg.mar_steps, cfg.time_shift).tolist()
    both = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)  # noqa: E731
    with inference(model):
        # the mask is the same at every iteration; wrapped models without build_mask rebuild it
        build_mask = getattr(model, "build_mask", None)
        mask = build_mask(batch) if build_mask is not None else None
        visual = batch.continuous_mask()
        clean = torch.zeros(len(batch.spans), device=device)
        revealed = 0
        for now in reveal_schedule(n_patch, cfg.steps):
            z = model(batch, both(tokens).reshape(-1, patch_dim), clean, mask, heads={"mar": visual},
                      masked=both(~known).reshape(-1))["mar"]
            new = order[:, revealed:now]                                           # [n, k]
            k = new.shape[1]
            pick = both(new) + torch.arange(rows, device=device)[:, None] * n_patch
            z_new = z[pick.reshape(-1)]                                            # [rows * k, dim]
            x = cfg.temperature * torch.randn(n, k, patch_dim, generator=gen).to(device)
            for t_cur, t_next in zip(times[:-1], times[1:]):
                x_in = both(x).reshape(-1, patch_dim)
                t = torch.full((x_in.shape[0],), t_cur, device=device)
                out = model.run_head("mar", z_new, x_t=x_in, t=t).float()
                v = to_velocity(out, x_in, t, cfg.prediction, cfg.t_eps).reshape(rows, k, patch_dim)
                if guided:
                    v = v[n:] + cfg.guidance * (v[:n] - v[n:])
                x = x + (t_next - t_cur) * v
            tokens.scatter_(1, new[..., None].expand(-1, -1, patch_dim), x)
            known.scatter_(1, new, True)
            if record is not None:
                record.append(new.cpu())
            revealed = now
    images = [codec.decode(xi.float(), grid)[0] for xi in tokens]
    return torch.stack(images).clamp(-1, 1)
