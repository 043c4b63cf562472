# Image-to-text and video-to-text sampling: greedy byte decoding conditioned on a clean visual span.
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from mmgen.batch import DISCRETE, FULL, IGNORE_INDEX
from mmgen.models.codecs import VisualCodec, as_codec
from mmgen.models.kv_cache import last_positions
from mmgen.models.tokenizers.base import TextTokenizer, special_ids
from mmgen.sampling.batching import build_batch, image_to_text_doc, video_to_text_doc
from mmgen.sampling.config import SamplerConfig
from mmgen.sampling.mode import inference


def _allowed_tokens(tokenizer: TextTokenizer, vocab: int, device) -> torch.Tensor:
    """``[vocab]`` bool: the ids a caption may hold, the tokenizer's text ids then EOS. Other
    specials (BOI, PAD...) would corrupt the document, and ids above the tokenizer (visual codes
    in a shared vocabulary) are not text; so the byte tokenizer allows its 256 bytes and EOS,
    a ``tokenizer.json`` every id it has that is not one of mmgen's specials."""
    allowed = torch.zeros(vocab, dtype=torch.bool, device=device)
    allowed[:min(tokenizer.vocab_size, vocab)] = True
    allowed[list(special_ids(tokenizer).values())] = False
    allowed[tokenizer.eos] = True
    return allowed


def generate_captions(model: nn.Module, tokenizer: TextTokenizer, images: torch.Tensor,
                      codec: VisualCodec | int, cfg: SamplerConfig, device: torch.device | str,
                      attention: int = FULL) -> list[str]:
    """Greedy captions for ``images`` (``[n, C, H, W]`` in [-1, 1]), or for clips
    (``[n, T, C, H, W]``), each encoded by ``codec`` into a condition span (an int is the pixel
    codec's patch size); a discrete codec's codes go above the text vocabulary, as the data
    pipeline places them. ``attention`` is the span's mode (FULL; CAUSAL for a model trained
    causal over whole documents, ``objective=vq_ar``).

    Context ``[BOS] [BOI] <clean condition span, t = 0> [EOI]`` (a clip: ``[BOS] [BOV]
    <clip> [EOV]``, a VIDEO span of the codec's grid of its T frames, as the data pipeline
    lays clips out); the next byte (or EOS) is the argmax of the logits at the last position,
    over byte tokens and EOS only.

    With ``cfg.use_cache`` (default) the context is run once (``model.prefill``, the full
    hybrid mask, so the image span stays bidirectional) and each step then runs only the new
    token against the per-layer KV cache (``model.decode_step``). ``use_cache=False`` re-runs
    the whole padded sequence every step: the reference the cached path is tested against.
    Both stop when every caption has its EOS or after ``cfg.max_caption_len`` bytes.
    """
    codec = as_codec(codec)
    prefixes = [_prompt(tokenizer, codec, img, attention) for img in images]
    generated: list[list[int]] = [[] for _ in prefixes]
    done = [False] * len(prefixes)

    def accept(next_ids: list[int]) -> bool:
        for i, tok in enumerate(next_ids):
            if not done[i]:
                done[i] = tok == tokenizer.eos
                if not done[i]:
                    generated[i].append(tok)
        return all(done)

    with inference(model):
        if cfg.use_cache:
            if not hasattr(model, "prefill"):
                raise TypeError(f"{type(model).__name__} has no prefill/decode_step for KV-cache "
                                "decoding: set sampler.use_cache=false")
            batch = build_batch(prefixes, tokenizer).to(device)
            clean = torch.zeros(len(batch.spans), device=device)  # condition spans: t = 0
            # blocks compiled for training (trainer.compile) would recompile for every cache
            # length: run them eagerly here, hooks included
            with _eager():
                logits, cache = model.prefill(batch, batch.patches, clean,
                                              max_new_tokens=cfg.max_caption_len)
                for step in range(cfg.max_caption_len):
                    next_ids = _greedy(logits, tokenizer)
                    if accept(next_ids) or step == cfg.max_caption_len - 1:
                        break
                    # finished rows decode their argmax too (ignored): one shape for all
                    logits = model.decode_step(torch.tensor(next_ids, device=device), cache)
        else:
            # one padded length for every step: compiled attention then sees a single shape
            seq_len = max(sum(len(s) for s in p) for p in prefixes) + cfg.max_caption_len
            for _ in range(cfg.max_caption_len):
                if accept(_next_tokens(model, tokenizer, prefixes, generated, seq_len, device)):
                    break
    return [tokenizer.decode(ids) for ids in generated]


def _prompt(tokenizer: TextTokenizer, codec: VisualCodec, pixels: torch.Tensor, attention: int) -> list:
    """The captioning prompt of one image ``[C, H, W]`` or clip ``[T, C, H, W]``."""
    rows, grid = codec.encode(pixels.float().cpu())
    doc = video_to_text_doc if pixels.dim() == 4 else image_to_text_doc
    if codec.kind == DISCRETE:
        return doc(tokenizer, rows.long() + tokenizer.vocab_size, grid, kind=DISCRETE,
                   attention=attention)
    return doc(tokenizer, rows, grid, attention=attention)


def _eager():
    set_stance = getattr(torch.compiler, "set_stance", None)     # torch >= 2.6
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()


def _greedy(logits: torch.Tensor, tokenizer: TextTokenizer) -> list[int]:
    """Argmax of ``[n, vocab]`` logits over the tokens a caption may contain."""
    allowed = _allowed_tokens(tokenizer, logits.shape[-1], logits.device)
    return logits.float().masked_fill(~allowed, float("-inf")).argmax(-1).tolist()


def _next_tokens(model: nn.Module, tokenizer: TextTokenizer, prefixes: list, generated: list,
                 seq_len: int, device) -> list[int]:
    """The full-recompute step: the whole sequence so far, logits at each row's last position."""
    docs = [prefix + ([ids] if ids else []) for prefix, ids in zip(prefixes, generated)]
    batch = build_batch(docs, tokenizer, seq_len)
    last = last_positions(batch.document_ids)
    # the model emits logits only where a target exists: mark each row's last position
    batch.targets = torch.full_like(batch.targets, IGNORE_INDEX)
    batch.targets[torch.arange(len(docs)), last] = tokenizer.pad
    batch = batch.to(device)
    clean = torch.zeros(len(batch.spans), device=device)          # condition spans: t = 0
    out = model(batch, batch.patches, clean, heads={"lm": batch.targets != IGNORE_INDEX})
    return _greedy(out["lm"], tokenizer)
