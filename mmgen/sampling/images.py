# Text-to-image and text-to-video sampling: Euler integration of the flow ODE with classifier-free guidance.
from __future__ import annotations

import torch
import torch.nn as nn

from mmgen.batch import IGNORE_INDEX, MultimodalBatch
from mmgen.models.codecs import VisualCodec, as_codec
from mmgen.models.tokenizers.text import ByteTokenizer
from mmgen.objectives.flow import to_velocity
from mmgen.sampling.batching import build_batch, text_to_image_doc, text_to_video_doc
from mmgen.sampling.config import SamplerConfig
from mmgen.sampling.mode import inference


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``[steps + 1]`` times from 1 down to 0, optionally shifted towards high noise."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def prompt_batch(tokenizer: ByteTokenizer, captions: list[str], grid: tuple[int, int, int],
                 patch_dim: int, guided: bool, device, video: bool = False
                 ) -> tuple[list[str], MultimodalBatch]:
    """(prompts, batch) of text-to-image prompts ``[BOS] caption [BOI] <span>``, the
    unconditional ``[BOS] [BOI] <span>`` of every caption after them when ``guided``.

    Args:
        tokenizer: the run's tokenizer.
        captions: one per image.
        grid: the span's (t, gh, gw): t = 1 for an image.
        patch_dim: the codec's payload_dim.
        guided: add the unconditional branch (classifier-free guidance).
        device: where the batch goes.
        video: text-to-video prompts ``[BOS] caption [BOV] <clip>`` (a VIDEO span), as the
            data pipeline lays out clips.
    """
    prompts = captions + [""] * len(captions) if guided else captions
    # the span's patches are placeholders: each step feeds the current x_t as visual_in
    placeholder = torch.zeros(grid[0] * grid[1] * grid[2], patch_dim)
    doc = text_to_video_doc if video else text_to_image_doc
    docs = [doc(tokenizer, p, placeholder, grid, complete=False) for p in prompts]
    batch = build_batch(docs, tokenizer).to(device)
    batch.targets = torch.full_like(batch.targets, IGNORE_INDEX)   # no text logits needed
    return prompts, batch


def generate_images(model: nn.Module, tokenizer: ByteTokenizer, captions: list[str],
                    grid_hw: tuple[int, int], codec: VisualCodec | int, cfg: SamplerConfig,
                    device: torch.device | str) -> torch.Tensor:
    """Sample one image per caption; returns ``[n, C, H, W]`` pixels in [-1, 1].

    The ODE runs in the codec's payload space (``codec.payload_dim`` features per position of a
    ``(1, gh, gw)`` grid) and ``codec.decode`` turns the result into pixels; an int is the
    pixel codec's patch size.

    The conditional document is ``[BOS] caption [BOI] <span>``, the unconditional one
    ``[BOS] [BOI] <span>`` (what caption dropout trains); both branches of every caption go
    through one forward per step, and ``v = v_u + g (v_c - v_u)``.
    """
    codec = as_codec(codec)
    grid = (1, *grid_hw)
    x = _integrate(model, tokenizer, captions, grid, codec, cfg, device, video=False)
    images = [codec.decode(xi.float(), grid)[0] for xi in x]
    return torch.stack(images).clamp(-1, 1)


def generate_videos(model: nn.Module, tokenizer: ByteTokenizer, captions: list[str],
                    grid_thw: tuple[int, int, int], codec: VisualCodec | int, cfg: SamplerConfig,
                    device: torch.device | str) -> torch.Tensor:
    """Sample one clip per caption; returns ``[n, T, C, H, W]`` pixels in [-1, 1].

    :func:`generate_images` over a VIDEO span of grid ``(t, gh, gw)`` (the codec's grid of
    ``t`` frames): prompts ``[BOS] caption [BOV] <clip>`` and ``[BOS] [BOV] <clip>``, one ODE
    over all ``t * gh * gw`` positions (the clip's frames attend to each other, as trained),
    decoded frame by frame by ``codec.decode``.
    """
    codec = as_codec(codec)
    grid = tuple(int(g) for g in grid_thw)
    x = _integrate(model, tokenizer, captions, grid, codec, cfg, device, video=True)
    return torch.stack([codec.decode(xi.float(), grid) for xi in x]).clamp(-1, 1)


def _integrate(model: nn.Module, tokenizer: ByteTokenizer, captions: list[str],
               grid: tuple[int, int, int], codec: VisualCodec, cfg: SamplerConfig,
               device: torch.device | str, video: bool) -> torch.Tensor:
    """Euler steps of the guided flow ODE from noise (t = 1) to data (t = 0) over one span of
    ``grid`` per caption: ``[n, t*gh*gw, payload_dim]`` payload rows."""
    n, n_patch, patch_dim = len(captions), grid[0] * grid[1] * grid[2], codec.payload_dim
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(n, n_patch, patch_dim, generator=gen).to(device)
    guided = cfg.guidance != 1.0
    prompts, batch = prompt_batch(tokenizer, captions, grid, patch_dim, guided, device, video)
    times = time_grid(cfg.steps, cfg.time_shift).tolist()
    with inference(model):
        # the mask is the same at every step; wrapped models without build_mask rebuild it
        build_mask = getattr(model, "build_mask", None)
        mask = build_mask(batch) if build_mask is not None else None
        visual = batch.continuous_mask()
        for t_cur, t_next in zip(times[:-1], times[1:]):
            x_in = (torch.cat([x, x]) if guided else x).reshape(-1, patch_dim)
            span_t = torch.full((len(prompts),), t_cur, device=device)
            out = model(batch, x_in, span_t, mask, heads={"flow": visual})["flow"].float()
            v = to_velocity(out, x_in, span_t.repeat_interleave(n_patch), cfg.prediction, cfg.t_eps)
            v = v.reshape(len(prompts), n_patch, patch_dim)
            if guided:
                v_cond, v_uncond = v[:n], v[n:]
                v = v_uncond + cfg.guidance * (v_cond - v_uncond)
            x = x + (t_next - t_cur) * v
    return x
