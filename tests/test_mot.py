# Modality towers (block mot): tower ids from the span table, the gather/scatter permutation, KV cache, init.
import dataclasses

import pytest
import torch

from mmgen.models import FLAVORS, build_model, check_registered
from mmgen.models.attention import build_dense_mask
from mmgen.models.layers import apply_rope, rope_cos_sin
from mmgen.models.attention import attend
from mmgen.models.mot import MoTBlock, TowerRouting, expand_dense_state, tower_ids
from mmgen.models.tokenizers.text import ByteTokenizer
from mmgen.sampling import SamplerConfig, build_batch, generate_captions, image_to_text_doc, text_to_image_doc

TOK = ByteTokenizer()
DENSE = FLAVORS["debug"]
MOT = dataclasses.replace(DENSE, block="mot", tower_split="role")


def _docs(seed: int = 0) -> list:
    """A text-to-image document (target span) and an image-to-text one (condition span)."""
    g = torch.Generator().manual_seed(seed)
    return [text_to_image_doc(TOK, "a red circle", torch.rand(4, DENSE.patch_dim, generator=g) * 2 - 1, (1, 2, 2)),
            image_to_text_doc(TOK, torch.rand(6, DENSE.patch_dim, generator=g) * 2 - 1, (1, 2, 3))
            + [list(b"a blue")]]


def _model(cfg, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    torch.nn.init.normal_(model.visual_out.weight, std=0.1)   # a non-zero visual head
    return model


# ---------------------------------------------------------------- tower ids from the span table

def test_tower_ids_follow_the_span_table():
    batch = build_batch(_docs(), TOK, 40)
    target = batch.target_visual_mask()
    visual = batch.span_ids >= 0
    assert target.any() and (visual & ~target).any()        # one target span, one condition span
    role, modality = tower_ids(batch, "role"), tower_ids(batch, "modality")
    # role (BAGEL): only the span being generated uses the generation tower
    assert torch.equal(role, target.long())
    # modality: every visual position uses the visual tower, condition spans included
    assert torch.equal(modality, visual.long())
    assert (role[batch.document_ids < 0] == 0).all()          # padding: text tower


def test_config_pairs_tower_block_with_split():
    with pytest.raises(ValueError, match="tower_split"):
        check_registered(dataclasses.replace(DENSE, block="mot"))
    with pytest.raises(ValueError, match="tower_split"):
        check_registered(dataclasses.replace(DENSE, tower_split="role"))
    with pytest.raises(ValueError, match="tower_split="):
        dataclasses.replace(DENSE, tower_split="per_token").validate()
    with pytest.raises(ValueError, match="freeze_text_tower"):
        dataclasses.replace(DENSE, freeze_text_tower=True).validate()


# ---------------------------------------------------------------- gather / scatter

def test_routing_is_an_exact_permutation():
    towers = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]])
    r = TowerRouting.from_ids(towers)
    assert r.counts == (5, 5)
    x = torch.randn(2, 5, 3)
    rows = r.gather(x)
    assert torch.equal(r.scatter(rows), x)                    # bitwise
    t0, t1 = r.split(rows)
    assert torch.equal(t0, x[towers == 0]) and torch.equal(t1, x[towers == 1])   # row-major inside a tower
    only_text = TowerRouting.text((2, 3), "cpu")
    assert only_text.counts == (6, 0) and only_text.split(torch.zeros(6, 1))[1].shape == (0, 1)


def _per_token_reference(block: MoTBlock, x, towers, rope, mask):
    """The block computed one position at a time, each with its own tower's weights."""
    b, length, _ = x.shape
    hq, hkv, d = block.n_heads, block.n_kv_heads, block.head_dim
    qkv = torch.stack([torch.stack([block.towers[int(towers[i, j])].qkv(x[i, j][None])[0]
                                    for j in range(length)]) for i in range(b)])
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q = apply_rope(q.reshape(b, length, hq, d).transpose(1, 2), *rope)
    k = apply_rope(k.reshape(b, length, hkv, d).transpose(1, 2), *rope)
    v = v.reshape(b, length, hkv, d).transpose(1, 2)
    attn = attend(q, k, v, mask).transpose(1, 2).reshape(b, length, -1)
    return torch.stack([torch.stack([block.towers[int(towers[i, j])].post(x[i, j][None], attn[i, j][None])[0][0]
                                     for j in range(length)]) for i in range(b)])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_block_equals_per_token_reference(dtype, tol):
    """Equal up to the rounding of matmuls over one row versus a block of rows (the kernels
    sum in other orders): max |diff| <= tol * max |output|, tol 1e-13 in fp64 (so no
    position took another tower's weights or row) and 1e-5 in fp32 (~100 ulp after two
    residual branches of 64-wide sums)."""
    torch.manual_seed(0)
    block = MoTBlock(MOT).to(dtype)
    block.init_weights(0.2, 0.2)    # towers drawn independently, large enough to matter
    batch = build_batch(_docs(), TOK, 24)
    towers = tower_ids(batch, "role")
    x = torch.randn(*batch.shape, MOT.dim, dtype=dtype)
    rope = rope_cos_sin(batch.positions, MOT.head_dim, MOT.rope_theta)
    mask = build_dense_mask(batch)
    got = block(x, rope, mask, None, TowerRouting.from_ids(towers))
    ref = _per_token_reference(block, x, towers, rope, mask)
    assert got.dtype == dtype
    assert (got - ref).abs().max() <= tol * ref.abs().max()
    # the towers really differ: sending every position to the text tower changes the output
    other = block(x, rope, mask, None, TowerRouting.from_ids(torch.zeros_like(towers)))
    assert (other - got)[towers == 1].abs().max() > 1e-3


def test_every_tower_gets_a_gradient_even_without_tokens():
    model = _model(MOT)
    batch = build_batch([_docs()[1]], TOK)        # captioning only: no generation tokens
    assert tower_ids(batch, "role").sum() == 0
    model(batch)["lm"].sum().backward()
    gen = model.layers[0].towers[1].attention.wq.weight.grad
    assert gen is not None and torch.equal(gen, torch.zeros_like(gen))   # DDP needs a grad
    assert model.layers[0].towers[0].attention.wq.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- KV cache decoding

@pytest.mark.parametrize("split", ["role", "modality"])
def test_cached_captions_match_full_recompute(split):
    """prefill routes the prompt by its span table; decode_step puts new text on the text tower."""
    model = _model(dataclasses.replace(MOT, tower_split=split)).eval()
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    common = dict(max_caption_len=6)
    cached = generate_captions(model, TOK, images, 4, SamplerConfig(use_cache=True, **common), "cpu")
    full = generate_captions(model, TOK, images, 4, SamplerConfig(use_cache=False, **common), "cpu")
    assert cached == full
    # and the logits themselves: prefill + one decode step against the whole sequence
    prompt = [image_to_text_doc(TOK, torch.rand(4, MOT.patch_dim, generator=g) * 2 - 1, (1, 2, 2))]
    with torch.no_grad():
        _, cache = model.prefill(build_batch(prompt, TOK), max_new_tokens=2)
        step = model.decode_step(torch.tensor([ord("a")]), cache)
        longer = build_batch([prompt[0] + [[ord("a")]]], TOK)
        longer.targets.fill_(-100)
        longer.targets[0, -1] = 0
        ref = model(longer)["lm"]
    torch.testing.assert_close(step, ref, rtol=0, atol=1e-5)
