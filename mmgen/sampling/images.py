# Text-to-image sampling: Euler integration of the flow ODE with classifier-free guidance.
from __future__ import annotations

import torch
import torch.nn as nn

from mmgen.batch import IGNORE_INDEX, MultimodalBatch
from mmgen.models.codecs import VisualCodec, as_codec
from mmgen.models.tokenizers.text import ByteTokenizer
from mmgen.objectives.flow import to_velocity
from mmgen.sampling.batching import build_batch, text_to_image_doc
from mmgen.sampling.config import SamplerConfig
from mmgen.sampling.mode import inference


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``[steps + 1]`` times from 1 down to 0, optionally shifted towards high noise."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def prompt_batch(tokenizer: ByteTokenizer, captions: list[str], grid: tuple[int, int, int],
                 patch_dim: int, guided: bool, device) -> tuple[list[str], MultimodalBatch]:
    """(prompts, batch) of text-to-image prompts ``[BOS] caption [BOI] <span>``, the
    unconditional ``[BOS] [BOI] <span>`` of every caption after them when ``guided``.

    Args:
        tokenizer: the run's tokenizer.
        captions: one per image.
        grid: the span's (1, gh, gw).
        patch_dim: the codec's payload_dim.
        guided: add the unconditional branch (classifier-free guidance).
        device: where the batch goes.
    """
    prompts = captions + [""] * len(captions) if guided else captions
    # the span's patches are placeholders: each step feeds the current x_t as visual_in
    placeholder = torch.zeros(grid[0] * grid[1] * grid[2], patch_dim)
    docs = [text_to_image_doc(tokenizer, p, placeholder, grid, complete=False) for p in prompts]
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
    gh, gw = grid_hw
    n, n_patch, patch_dim = len(captions), gh * gw, codec.payload_dim
    grid = (1, gh, gw)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(n, n_patch, patch_dim, generator=gen).to(device)
    guided = cfg.guidance != 1.0
    prompts, batch = prompt_batch(tokenizer, captions, grid, patch_dim, guided, device)
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
    images = [codec.decode(xi.float(), grid)[0] for xi in x]
    return torch.stack(images).clamp(-1, 1)
