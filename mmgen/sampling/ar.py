# Text-to-image (and -video) by discrete-token AR: codes one at a time, CFG over logits, top-k/top-p, KV cache.
"""The model was trained by ``objective=vq_ar``: documents ``[BOS] caption [BOI] codes [EOI]
[EOS]``, causal everywhere, codes at ``tokenizer.vocab_size + code`` in the shared vocabulary.
Sampling continues the prompt ``[BOS] caption [BOI]`` for the ``t * h * w`` positions of the
codec's grid, in the span's row-major order (the order of training), and decodes the codes
through the codec (``codec.decode``) to pixels.

Each step (:func:`choose_codes`): the "lm" logits are cut to the codebook's slice of the
vocabulary (a span holds codes only; the sampler closes it with EOI itself), classifier-free
guidance mixes the conditional row and the null-caption row ``[BOS] [BOI]`` of every image
(both in one batch, as caption dropout trained them): ``l = l_u + g (l_c - l_u)``; then
temperature (0 = greedy), top-k and top-p (nucleus) filtering, and one uniform draw per image
from ``torch.Generator`` seeded with ``sampler.seed`` on the host, turned into a code by the
inverse CDF, so equal logits give equal codes on any device and in both paths below.

With ``sampler.use_cache`` (default) the prompt runs once (``model.prefill``) and every new code
runs alone against the KV cache (``model.decode_step`` with the code's (t, h, w) coordinates,
so it gets the visual position code it trained with). ``use_cache=False`` is the reference:
every step re-runs the whole sequence, the span filled with the codes so far and placeholders
after them (a CAUSAL span: a position never sees the ones after it), reading the logits at the
last generated position.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mmgen.batch import CAUSAL, DISCRETE, IGNORE_INDEX, IMAGE, VIDEO
from mmgen.documents import grid_coords
from mmgen.models.codecs import VisualCodec
from mmgen.models.tokenizers.text import ByteTokenizer
from mmgen.sampling.batching import VisualSpan, build_batch
from mmgen.sampling.captions import _eager
from mmgen.sampling.config import SamplerConfig
from mmgen.sampling.mode import inference


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """Probabilities ``[n, K]`` from logits ``[n, K]``: temperature, then the ``top_k`` most
    likely (0 = all), then the smallest set whose probability reaches ``top_p`` (the most
    likely always stays). ``temperature`` must be > 0 (0 is greedy: :func:`choose_codes`)."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a code when the ones before it already reach top_p
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def choose_codes(logits: torch.Tensor, n: int, codes: slice, cfg: SamplerConfig,
                 generator: torch.Generator) -> torch.Tensor:
    """``[n]`` code indices (0-based in the codebook) from the "lm" logits of one step.

    Args:
        logits: ``[n, vocab]``, or ``[2n, vocab]`` (conditional rows, then the null-caption
            rows) under guidance.
        n: images.
        codes: the codebook's slice of the vocabulary.
        cfg: guidance, temperature, top_k, top_p.
        generator: host generator of the draws (one uniform per image per step).
    """
    z = logits[:, codes].float()
    if z.shape[0] == 2 * n:
        z = z[n:] + cfg.guidance * (z[:n] - z[n:])
    if cfg.temperature == 0:
        return z.argmax(-1).cpu()
    probs = filter_logits(z, cfg.temperature, cfg.top_k, cfg.top_p).cpu()
    return inverse_cdf(probs, generator)


def inverse_cdf(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``[m]`` indices drawn from the rows of ``probs`` (``[m, K]``, host): one uniform per row
    from ``generator``, turned into an index by the inverse CDF, so equal probabilities give
    equal draws on any device."""
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=probs.dtype)
    cdf = probs.cumsum(-1)
    return (cdf < u * cdf[:, -1:]).sum(-1).clamp(max=probs.shape[-1] - 1)


def generate_codes(model: nn.Module, tokenizer: ByteTokenizer, captions: list[str],
                   grid: tuple[int, int, int], codebook_size: int, cfg: SamplerConfig,
                   device: torch.device | str, video: bool = False) -> torch.Tensor:
    """``[n, t*h*w]`` codes (0-based, in ``[0, codebook_size)``), one row per caption.

    Args:
        model: a model trained by ``objective=vq_ar`` (vocabulary >= text ids + codes).
        tokenizer: the run's tokenizer; codes sit at ``tokenizer.vocab_size + code``.
        captions: one per image.
        grid: the span's (t, h, w) (the codec's grid of one image, or of a clip's t frames).
        codebook_size: codes per position.
        cfg: ``sampler.*`` (guidance, temperature, top_k, top_p, seed, use_cache).
        device: the model's device.
        video: the span is a clip, opened by BOV (``[BOS] caption [BOV]``) as the data
            pipeline lays clips out; its codes come frame after frame.
    """
    n, offset = len(captions), tokenizer.vocab_size
    guided = cfg.guidance != 1.0
    prompts = captions + [""] * n if guided else captions
    open_id = tokenizer.bov if video else tokenizer.boi
    docs = [[[tokenizer.bos] + tokenizer.encode(p) + [open_id]] for p in prompts]
    coords = grid_coords(*grid)
    length, rows = coords.shape[0], len(prompts)
    codes = slice(offset, offset + codebook_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = torch.zeros(n, length, dtype=torch.long)
    with inference(model):
        if cfg.use_cache:
            if not hasattr(model, "prefill"):
                raise TypeError(f"{type(model).__name__} has no prefill/decode_step for KV-cache "
                                "decoding: set sampler.use_cache=false")
            batch = build_batch(docs, tokenizer, patch_dim=0).to(device)
            with _eager():   # as for captions: compiled blocks would recompile per cache length
                logits, cache = model.prefill(batch, max_new_tokens=length)
                for i in range(length):
                    out[:, i] = choose_codes(logits, n, codes, cfg, gen)
                    if i == length - 1:
                        break
                    step = (out[:, i] + offset).repeat(2 if guided else 1).to(device)
                    logits = model.decode_step(step, cache, coords=coords[i].expand(rows, 3).to(device))
        else:
            for i in range(length):
                logits = _full_step(model, tokenizer, docs, out, i, grid, guided, device, video)
                out[:, i] = choose_codes(logits, n, codes, cfg, gen)
    return out


def _full_step(model: nn.Module, tokenizer: ByteTokenizer, docs: list, out: torch.Tensor, i: int,
               grid: tuple[int, int, int], guided: bool, device, video: bool = False) -> torch.Tensor:
    """The reference step: ``[rows, vocab]`` logits predicting code ``i`` from the whole
    sequence (prompt, codes ``< i``, placeholders the causal span hides)."""
    offset = tokenizer.vocab_size
    span_codes = (out + offset).repeat(2 if guided else 1, 1)
    modality = VIDEO if video else IMAGE
    full = [doc + [VisualSpan(c, grid, is_target=True, kind=DISCRETE, attention=CAUSAL,
                              modality=modality)]
            for doc, c in zip(docs, span_codes)]
    batch = build_batch(full, tokenizer)
    at = torch.tensor([len(d[0]) - 1 + i for d in docs])
    batch.targets = torch.full_like(batch.targets, IGNORE_INDEX)
    batch.targets[torch.arange(len(docs)), at] = tokenizer.pad   # the head runs where a target is
    batch = batch.to(device)
    return model(batch, heads={"lm": batch.targets != IGNORE_INDEX})["lm"]


def generate_images_ar(model: nn.Module, tokenizer: ByteTokenizer, captions: list[str],
                       codec: VisualCodec, image_size: int, cfg: SamplerConfig,
                       device: torch.device | str) -> torch.Tensor:
    """``[n, C, H, W]`` pixels in [-1, 1]: :func:`generate_codes` decoded by ``codec``.

    Args:
        codec: the run's discrete codec (``data.codec=vq:`` or a diffusers VQModel).
        image_size: side in pixels; the span grid is ``codec.grid(image_size)``.
        model, tokenizer, captions, cfg, device: as in :func:`generate_codes`.
    """
    if codec.kind != DISCRETE:
        raise ValueError(f"sampler ar_t2i draws VQ codes: data.codec must be a discrete codec, "
                         f"got {codec.name}")
    grid = codec.grid(image_size)
    codes = generate_codes(model, tokenizer, list(captions), grid, int(codec.codebook_size), cfg, device)
    return torch.stack([codec.decode(c, grid)[0] for c in codes]).float().clamp(-1, 1)


def generate_videos_ar(model: nn.Module, tokenizer: ByteTokenizer, captions: list[str],
                       codec: VisualCodec, frame_size: int, frames: int, cfg: SamplerConfig,
                       device: torch.device | str) -> torch.Tensor:
    """``[n, T, C, H, W]`` pixels in [-1, 1]: the codes of a ``frames``-frame clip (grid
    ``codec.grid(frame_size, frames)``, a per-frame codec's codes frame after frame) after
    ``[BOS] caption [BOV]``, decoded by ``codec``; arguments as in :func:`generate_images_ar`."""
    if codec.kind != DISCRETE:
        raise ValueError(f"sampler ar_t2v draws VQ codes: data.codec must be a discrete codec, "
                         f"got {codec.name}")
    grid = codec.grid(frame_size, frames)
    codes = generate_codes(model, tokenizer, list(captions), grid, int(codec.codebook_size), cfg,
                           device, video=True)
    return torch.stack([codec.decode(c, grid) for c in codes]).float().clamp(-1, 1)
