# Text-to-image sampling for DDPM-trained spans: DDIM / ancestral steps with classifier-free guidance.
from __future__ import annotations

import torch
import torch.nn as nn

from mmgen.models.codecs import VisualCodec, as_codec
from mmgen.models.tokenizers.text import ByteTokenizer
from mmgen.objectives.ddpm import alpha_bars, to_x0_eps
from mmgen.sampling.config import SamplerConfig
from mmgen.sampling.images import prompt_batch
from mmgen.sampling.mode import inference


def ddpm_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps + 1`` timesteps from T down to 0 (evenly spaced, distinct)."""
    ks = torch.linspace(num_timesteps, 0, steps + 1).round().long().tolist()
    return sorted(set(ks), reverse=True)


def generate_images_ddpm(model: nn.Module, tokenizer: ByteTokenizer, captions: list[str],
                         grid_hw: tuple[int, int], codec: VisualCodec | int, cfg: SamplerConfig,
                         device: torch.device | str) -> torch.Tensor:
    """Sample one image per caption from a DDPM-trained model; ``[n, C, H, W]`` in [-1, 1].

    Generalised DDIM (Song et al. 2021) over ``cfg.steps`` of the ``cfg.num_timesteps``
    training timesteps under ``cfg.schedule``: from ``x_T`` ~ N(0, I), each step estimates
    (x0, eps) from the guided output (``cfg.prediction``, as trained) and moves to the next
    timestep; ``cfg.ddim_eta`` 0 is deterministic DDIM, 1 ancestral DDPM. The span is decoded by
    ``codec`` (an int is the pixel codec's patch size). Prompts as :func:`generate_images`.
    """
    codec = as_codec(codec)
    gh, gw = grid_hw
    n, n_patch, dim = len(captions), gh * gw, codec.payload_dim
    grid = (1, gh, gw)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(n, n_patch, dim, generator=gen).to(device)
    guided = cfg.guidance != 1.0
    prompts, batch = prompt_batch(tokenizer, captions, grid, dim, guided, device)
    abars = alpha_bars(cfg.schedule, cfg.num_timesteps).to(device)
    T = cfg.num_timesteps
    ks = ddpm_timesteps(T, cfg.steps)
    with inference(model):
        build_mask = getattr(model, "build_mask", None)
        mask = build_mask(batch) if build_mask is not None else None
        visual = batch.continuous_mask()
        for k, k_next in zip(ks[:-1], ks[1:]):
            x_in = (torch.cat([x, x]) if guided else x).reshape(-1, dim)
            span_t = torch.full((len(prompts),), k / T, device=device)
            out = model(batch, x_in, span_t, mask, heads={"flow": visual})["flow"].float()
            out = out.reshape(len(prompts), n_patch, dim)
            if guided:
                out = out[n:] + cfg.guidance * (out[:n] - out[n:])
            a, a_next = abars[k].float(), abars[k_next].float()
            x0, eps = to_x0_eps(out.reshape(-1, dim), x.reshape(-1, dim),
                                a.expand(n * n_patch), cfg.prediction)
            x0, eps = x0.reshape(x.shape), eps.reshape(x.shape)
            sigma = cfg.ddim_eta * ((1 - a_next) / (1 - a) * (1 - a / a_next)).clamp(min=0).sqrt()
            x = a_next.sqrt() * x0 + (1 - a_next - sigma ** 2).clamp(min=0).sqrt() * eps
            if k_next > 0 and cfg.ddim_eta > 0:
                x = x + sigma * torch.randn(x.shape, generator=gen).to(device)
    images = [codec.decode(xi.float(), grid)[0] for xi in x]
    return torch.stack(images).clamp(-1, 1)
