# Text-to-image by masked discrete diffusion: MaskGIT parallel decoding with a confidence schedule and CFG.
"""The model was trained by ``objective=masked_vq``: documents ``[BOS] caption [BOI] codes [EOI]
[EOS]`` with some codes of the target span replaced by the mask token (``tokenizer.vocab_size +
codebook_size``, the first id above the codes), FULL attention inside the span. Decoding
(Chang et al. 2022, MaskGIT) starts from the prompt ``[BOS] caption [BOI]`` and a span of
``t * h * w`` mask tokens, and for ``sampler.steps`` iterations:

1. one forward over the whole sequence; the "lm" logits at every span position, cut to the
   codebook's slice; classifier-free guidance over them, the conditional rows and the
   null-caption rows ``[BOS] [BOI] <span>`` (the same partly decoded span) in one batch:
   ``l = l_u + g (l_c - l_u)``;
2. a code drawn at every still-masked position (temperature, top-k, top-p:
   :func:`mmgen.sampling.ar.filter_logits`, one uniform per position from the host generator
   seeded with ``sampler.seed``; temperature 0 = argmax) and its confidence, the log of its
   probability under the distribution it was drawn from, plus Gumbel noise scaled by
   ``sampler.mask_temperature * (1 - (step + 1) / steps)`` (MaskGIT's annealed choice noise);
3. the positions fixed so far keep their codes (infinite confidence); of the others, the
   :func:`unmask_schedule` number stay masked (the least confident), the rest are fixed with
   the code just drawn. The number still masked follows ``floor(n cos(pi/2 (step + 1) / steps))``,
   at least one position fixed per step and all of them at the last step, so every position is
   fixed exactly once and never changes after.

The codes are decoded through the codec (``codec.decode``) to pixels.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from mmgen.batch import DISCRETE, FULL
from mmgen.models.codecs import VisualCodec
from mmgen.models.tokenizers.text import ByteTokenizer
from mmgen.sampling.ar import filter_logits, inverse_cdf
from mmgen.sampling.batching import VisualSpan, build_batch
from mmgen.sampling.config import SamplerConfig
from mmgen.sampling.mode import inference


def unmask_schedule(n: int, steps: int) -> list[int]:
    """Positions still masked after each of ``steps`` steps, for a span of ``n`` positions:
    ``floor(n cos(pi/2 (s + 1) / steps))``, kept between one fewer than before (at least one
    position fixed per step, while more than one is masked) and 1 (at least one left for the
    last step), and 0 after the last step.

    Args:
        n: positions of the span (>= 1).
        steps: decoding iterations (>= 1).
    """
    left, out = n, []
    for s in range(steps):
        if s == steps - 1:
            left = 0
        else:
            left = max(1, min(left - 1, math.floor(n * math.cos(0.5 * math.pi * (s + 1) / steps))))
        out.append(left)
    return out


def _draw(z: torch.Tensor, cfg: SamplerConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes ``[m]``, their probabilities ``[m]``) drawn from guided code logits ``z`` ``[m, K]``."""
    if cfg.temperature == 0:
        probs = z.softmax(-1).cpu()
        codes = probs.argmax(-1)
    else:
        probs = filter_logits(z, cfg.temperature, cfg.top_k, cfg.top_p).cpu()
        codes = inverse_cdf(probs, generator)
    return codes, probs.gather(1, codes[:, None])[:, 0]


def _gumbel(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    return -torch.log(-torch.log(u.clamp(min=tiny, max=1 - 1e-7)))


def generate_codes_maskgit(model: nn.Module, tokenizer: ByteTokenizer, captions: list[str],
                           grid: tuple[int, int, int], codebook_size: int, cfg: SamplerConfig,
                           device: torch.device | str, trace: list | None = None) -> torch.Tensor:
    """``[n, t*h*w]`` codes (0-based, in ``[0, codebook_size)``), one row per caption, by MaskGIT
    decoding (module docstring).

    Args:
        model: a model trained by ``objective=masked_vq`` (vocabulary > text ids + codes).
        tokenizer: the run's tokenizer; codes sit at ``tokenizer.vocab_size + code``, the mask
            token right above them.
        captions: one per image.
        grid: the span's (t, h, w) (the codec's grid of one image).
        codebook_size: codes per position.
        cfg: ``sampler.*`` (steps, guidance, temperature, top_k, top_p, mask_temperature, seed).
        device: the model's device.
        trace: if a list, gets ``(masked [n, N] bool, codes [n, N] long)`` after every step
            (host copies), to check the decoding order.
    """
    n, offset = len(captions), tokenizer.vocab_size
    mask_id = offset + codebook_size
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if vocab is not None and vocab <= mask_id:
        raise ValueError(f"sampler maskgit_t2i: model.vocab_size={vocab} has no mask token id {mask_id} "
                         f"({offset} text ids + {codebook_size} codes): was it trained by objective=masked_vq?")
    guided = cfg.guidance != 1.0
    prompts = captions + [""] * n if guided else captions
    length = grid[0] * grid[1] * grid[2]
    span = torch.full((length,), mask_id, dtype=torch.long)
    docs = [[[tokenizer.bos] + tokenizer.encode(p) + [tokenizer.boi],
             VisualSpan(span, grid, is_target=True, kind=DISCRETE, attention=FULL)] for p in prompts]
    batch = build_batch(docs, tokenizer, patch_dim=0).to(device)
    at = batch.span_ids >= 0                   # [rows, L]: length positions per row, in span order
    codes_slice = slice(offset, offset + codebook_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    codes = torch.zeros(n, length, dtype=torch.long)
    masked = torch.ones(n, length, dtype=torch.bool)
    with inference(model):
        for step, left in enumerate(unmask_schedule(length, cfg.steps)):
            current = torch.where(masked, mask_id, codes + offset).repeat(2 if guided else 1, 1)
            batch.tokens[at] = current.flatten().to(device)
            logits = model(batch, heads={"lm": at})["lm"].view(len(prompts), length, -1)
            z = logits[..., codes_slice].float()
            if guided:
                z = z[n:] + cfg.guidance * (z[:n] - z[n:])
            drawn, prob = _draw(z.reshape(n * length, -1), cfg, gen)
            drawn, prob = drawn.view(n, length), prob.view(n, length)
            noise = cfg.mask_temperature * (1.0 - (step + 1) / cfg.steps)
            confidence = prob.clamp(min=torch.finfo(prob.dtype).tiny).log()
            if noise > 0:
                confidence = confidence + noise * _gumbel((n, length), gen)
            confidence = torch.where(masked, confidence, float("inf"))   # fixed codes stay fixed
            still = torch.zeros_like(masked)
            if left:
                still.scatter_(1, confidence.topk(left, dim=-1, largest=False).indices, True)
            codes = torch.where(masked & ~still, drawn, codes)
            masked = still
            if trace is not None:
                trace.append((masked.clone(), codes.clone()))
    return codes


def generate_images_maskgit(model: nn.Module, tokenizer: ByteTokenizer, captions: list[str],
                            codec: VisualCodec, image_size: int, cfg: SamplerConfig,
                            device: torch.device | str) -> torch.Tensor:
    """``[n, C, H, W]`` pixels in [-1, 1]: :func:`generate_codes_maskgit` decoded by ``codec``.

    Args:
        codec: the run's discrete codec (``data.codec=vq:`` or a diffusers VQModel).
        image_size: side in pixels; the span grid is ``codec.grid(image_size)``.
        model, tokenizer, captions, cfg, device: as in :func:`generate_codes_maskgit`.
    """
    if codec.kind != DISCRETE:
        raise ValueError(f"sampler maskgit_t2i draws VQ codes: data.codec must be a discrete codec, "
                         f"got {codec.name}")
    grid = codec.grid(image_size)
    codes = generate_codes_maskgit(model, tokenizer, list(captions), grid, int(codec.codebook_size),
                                   cfg, device)
    return torch.stack([codec.decode(c, grid)[0] for c in codes]).float().clamp(-1, 1)
