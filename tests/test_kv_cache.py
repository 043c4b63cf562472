# KV-cache decoding (prefill + decode_step) against the full recompute of the same sequence.
import dataclasses

import pytest
import torch

from mmgen.batch import IGNORE_INDEX
from mmgen.models import FLAVORS, build_model
from mmgen.models.tokenizers.text import ByteTokenizer
from mmgen.sampling import (SamplerConfig, build_batch, generate_captions, image_to_text_doc,
                            pack_rows, text_to_image_doc)

TOK = ByteTokenizer()
CFG = FLAVORS["debug"]


def _model(**overrides):
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(CFG, **overrides))
    torch.nn.init.normal_(model.visual_out.weight, std=0.1)   # non-zero visual head
    return model.eval()


def _prompts(gen: torch.Generator) -> list:
    """Three image-to-text documents of different lengths: different grids and captions
    already under way, so the rows of a batch are padded differently."""
    def img(g):
        return torch.rand(g[1] * g[2], CFG.patch_dim, generator=gen) * 2 - 1
    prompts = [image_to_text_doc(TOK, img((1, 2, 2)), (1, 2, 2)),
               image_to_text_doc(TOK, img((1, 3, 2)), (1, 3, 2)),
               image_to_text_doc(TOK, img((1, 2, 3)), (1, 2, 3))]
    progress = [[], list(b"a red"), list(b"xy")]
    return [p + ([ids] if ids else []) for p, ids in zip(prompts, progress)]


def _full_last_logits(model, docs: list, seq_len: int | None = None) -> torch.Tensor:
    """``[B, vocab]`` logits at each row's last position, from the plain forward."""
    batch = build_batch(docs, TOK, seq_len)
    last = (batch.document_ids >= 0).sum(dim=1) - 1
    batch.targets = torch.full_like(batch.targets, IGNORE_INDEX)
    batch.targets[torch.arange(len(docs)), last] = TOK.pad
    return model(batch)["lm"]


def _append(docs: list, tokens: list[int]) -> list:
    out = []
    for doc, tok in zip(docs, tokens):
        if isinstance(doc[-1], list) and doc[-1][0] != TOK.bos:   # a caption under way
            out.append(doc[:-1] + [doc[-1] + [tok]])
        else:
            out.append(doc + [[tok]])
    return out


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 1}, {"n_kv_heads": 4},
                                       {"qk_norm": False, "tie_embeddings": True,
                                        "visual_pos": "none"}])
def test_decode_steps_match_full_recompute(overrides):
    model = _model(**overrides)
    docs = _prompts(torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    steps = 6
    with torch.no_grad():
        batch = build_batch(docs, TOK)
        assert len(set((batch.document_ids >= 0).sum(1).tolist())) == 3   # 3 different lengths
        logits, cache = model.prefill(batch, max_new_tokens=steps)
        torch.testing.assert_close(logits, _full_last_logits(model, docs), atol=1e-5, rtol=0)
        for _ in range(steps):
            tokens = torch.randint(0, TOK.num_bytes, (3,), generator=gen)
            docs = _append(docs, tokens.tolist())
            logits = model.decode_step(tokens, cache)
            # the reference is padded further than the cache: padding must not matter either
            full = _full_last_logits(model, docs, seq_len=batch.shape[1] + steps + 3)
            torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="KV cache full"):
            model.decode_step(tokens, cache)


def test_multi_token_decode_and_packed_prefix():
    """Several tokens per decode step (causal among themselves), and a row whose prefix packs
    an earlier document: the new tokens must see only the last document of their row."""
    model = _model()
    gen = torch.Generator().manual_seed(3)
    patches = torch.rand(4, CFG.patch_dim, generator=gen) * 2 - 1
    other = text_to_image_doc(TOK, "dot", patches, (1, 2, 2))
    prompt = image_to_text_doc(TOK, patches, (1, 2, 2))
    new = list(b"blue")
    with torch.no_grad():
        batch = pack_rows([[other, prompt], [prompt]], TOK)
        logits, cache = model.prefill(batch, max_new_tokens=len(new))
        step = model.decode_step(torch.tensor([new, new]), cache)           # [2, 4, vocab]
        # both rows continue the same document: the packed row must give the same logits
        torch.testing.assert_close(step[0], step[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)
        full = build_batch([prompt + [new]], TOK)
        n_prompt = sum(len(s) for s in prompt)
        targets = torch.full_like(full.targets, IGNORE_INDEX)
        targets[0, n_prompt:] = TOK.pad
        full.targets = targets
        torch.testing.assert_close(step[1], model(full)["lm"], atol=1e-5, rtol=0)


def _reference_forward(model, batch) -> dict:
    """The training forward written out as it was before the cache existed (blocks and
    attention inlined), from the model's own submodules."""
    from mmgen.models.attention import attend
    from mmgen.models.layers import apply_rope, rope_cos_sin
    cfg = model.cfg
    span_t = torch.zeros(len(batch.spans))
    mask = model.build_mask(batch)
    x = model.embed(batch, batch.patches, span_t)
    rope = rope_cos_sin(batch.positions, cfg.head_dim, cfg.rope_theta)
    for block in model.layers:
        att, h = block.attention, block.attention_norm(x)
        b, length, _ = h.shape
        q = att.wq(h).view(b, length, att.n_heads, att.head_dim).transpose(1, 2)
        k = att.wk(h).view(b, length, att.n_kv_heads, att.head_dim).transpose(1, 2)
        v = att.wv(h).view(b, length, att.n_kv_heads, att.head_dim).transpose(1, 2)
        if att.q_norm is not None:
            q, k = att.q_norm(q), att.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attend(q, k, v, mask)
        x = x + att.wo(out.transpose(1, 2).reshape(b, length, -1))
        x = x + block.feed_forward(block.ffn_norm(x))
    h = model.norm(x)
    return {"lm": model.output(h[batch.targets != IGNORE_INDEX]),
            "flow": model.visual_out(h[batch.continuous_mask()]), "aux": {}}


def test_training_forward_unchanged():
    """forward() (no cache) computes exactly what it did before the cache was added, with
    gradients, and is not affected by a prefill run before it (the cache lives in the
    returned object, not in the model)."""
    model = _model().train()
    docs = _prompts(torch.Generator().manual_seed(4))
    batch = build_batch([d + [[TOK.eos]] for d in docs], TOK)
    before = model(batch)
    reference = _reference_forward(model, batch)
    with torch.no_grad():
        model.prefill(build_batch(docs, TOK), max_new_tokens=2)
    after = model(batch)
    assert before["aux"] == reference["aux"] == after["aux"] == {}
    for key in ("lm", "flow"):
        assert torch.equal(before[key], reference[key]), key
        assert torch.equal(before[key], after[key]), key
    before["lm"].sum().backward()
    assert model.layers[0].attention.wk.weight.grad is not None


@pytest.mark.parametrize("seed", [0, 1])
def test_generate_captions_with_and_without_cache(seed):
    # a larger init than the default: captions then depend on the image
    model = _model(init_std=0.2)
    model.train()
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    cached = generate_captions(model, TOK, images, 4, SamplerConfig(max_caption_len=12), "cpu")
    full = generate_captions(model, TOK, images, 4,
                             SamplerConfig(max_caption_len=12, use_cache=False), "cpu")
    assert cached == full and len(set(cached)) >= 3
    assert model.training                      # inference() restored the mode
    assert all(len(s) <= 12 for s in cached)


def test_generate_captions_cache_stops_at_eos():
    """Rows that end (EOS) at different steps: both paths stop each one at the same place."""
    model = _model(init_std=0.2)
    with torch.no_grad():
        model.output.weight[TOK.eos] *= 3.0           # EOS after a few bytes, per image
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lengths = set()
    for max_len in (1, 5, 30):
        cached = generate_captions(model, TOK, images, 4, SamplerConfig(max_caption_len=max_len),
                                   "cpu")
        full = generate_captions(model, TOK, images, 4,
                                 SamplerConfig(max_caption_len=max_len, use_cache=False), "cpu")
        assert cached == full
        lengths |= {len(s.encode("utf-8", "surrogateescape")) for s in cached}
    assert len(lengths) >= 4                          # rows stopped at different steps


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_steps_match_full_recompute_on_gpu_with_flex_prefill():
    """On CUDA the prefill and the full recompute use FlexAttention (block mask), the decode
    steps SDPA: the same numbers within fp32 kernel differences."""
    model = _model().cuda()
    docs = _prompts(torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)

    def full(docs):
        ref = build_batch(docs, TOK)
        last = (ref.document_ids >= 0).sum(dim=1) - 1
        ref.targets = torch.full_like(ref.targets, IGNORE_INDEX)
        ref.targets[torch.arange(len(docs)), last] = TOK.pad
        return model(ref.to("cuda"))["lm"]

    with torch.no_grad():
        batch = build_batch(docs, TOK).to("cuda")
        assert type(model.build_mask(batch)).__name__ == "BlockMask"
        logits, cache = model.prefill(batch, max_new_tokens=4)
        torch.testing.assert_close(logits, full(docs), atol=1e-4, rtol=1e-4)
        for _ in range(4):
            tokens = torch.randint(0, TOK.num_bytes, (3,), generator=gen)
            docs = _append(docs, tokens.tolist())
            logits = model.decode_step(tokens.cuda(), cache)
            torch.testing.assert_close(logits, full(docs), atol=1e-4, rtol=1e-4)


def test_decoding_never_sees_a_span_hidden_from_later_positions():
    """A span with ``visible_after=False`` (span table) is hidden from the tokens decoded after
    it, as the mask hides it from later positions in the full forward: the cache agrees with
    the full recompute, and the hidden span's content no longer reaches the new tokens."""
    model = _model()

    def hide(batch):
        batch.spans.visible_after = torch.zeros(len(batch.spans), dtype=torch.bool)
        return batch

    def full_last(docs, seq_len):
        batch = hide(build_batch(docs, TOK, seq_len))
        last = (batch.document_ids >= 0).sum(dim=1) - 1
        batch.targets = torch.full_like(batch.targets, IGNORE_INDEX)
        batch.targets[torch.arange(len(docs)), last] = TOK.pad
        return model(batch)["lm"]

    gen = torch.Generator().manual_seed(3)
    docs = _prompts(gen)
    with torch.no_grad():
        batch = hide(build_batch(docs, TOK))
        _, cache = model.prefill(batch, max_new_tokens=2)
        tokens = torch.randint(0, TOK.num_bytes, (3,), generator=gen)
        logits = model.decode_step(tokens, cache)
        docs2 = _append(docs, tokens.tolist())
        torch.testing.assert_close(logits, full_last(docs2, batch.shape[1] + 4), atol=1e-5, rtol=0)
        # other image content, same hidden span: the decoded token's logits do not change
        other = build_batch(_prompts(torch.Generator().manual_seed(4)), TOK)
        other.tokens, other.positions = batch.tokens, batch.positions
        hide(other)
        _, cache2 = model.prefill(other, max_new_tokens=2)
        torch.testing.assert_close(model.decode_step(tokens, cache2), logits, atol=1e-5, rtol=0)
