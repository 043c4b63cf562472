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


# ---------------------------------------------------------------- tower initialisation

def test_copy_init_and_dense_state_expansion():
    model = _model(dataclasses.replace(MOT, tower_init="copy"))
    for block in model.layers:
        for a, b in zip(block.towers[0].parameters(), block.towers[1].parameters()):
            assert torch.equal(a, b)
    dense = _model(DENSE).state_dict()
    expanded = expand_dense_state(dense, model.state_dict().keys())
    assert set(expanded) == set(model.state_dict())
    assert expanded["layers.1.towers.1.feed_forward.w2.weight"] is dense["layers.1.feed_forward.w2.weight"]
    assert expand_dense_state(expanded, model.state_dict().keys()) is expanded   # tower keys: as is


def _job_batch(patch_dim: int):
    g = torch.Generator().manual_seed(5)
    docs = [text_to_image_doc(TOK, "a red circle", torch.rand(4, patch_dim, generator=g) * 2 - 1, (1, 2, 2)),
            image_to_text_doc(TOK, torch.rand(4, patch_dim, generator=g) * 2 - 1, (1, 2, 2), "a blue square")]
    return build_batch(docs, TOK)


def test_dense_checkpoint_starts_mot_and_frozen_text_tower_stays(shapes_dir, tmp_path):
    """checkpoint.init_from=<dense run> into model=mot_debug: the dense function at step 0;
    with model.freeze_text_tower the optimizer holds no text-tower parameter and training
    leaves them at the dense weights while the generation tower moves."""
    from tests.test_trainer import make_trainer

    dense = make_trainer(shapes_dir, tmp_path / "dense", ["trainer.steps=2", "checkpoint.every=2"])
    dense.train()
    mot = make_trainer(shapes_dir, tmp_path / "mot", [
        "model=mot_debug", "model.freeze_text_tower=true", f"checkpoint.init_from={tmp_path / 'dense'}",
        "trainer.steps=3", "checkpoint.every=100"])
    d, m = dense.engine.module, mot.engine.module
    batch = _job_batch(mot.job.model.patch_dim)
    t = torch.full((len(batch.spans),), 0.5)
    with torch.no_grad():
        a, b = d(batch, span_t=t), m(batch, span_t=t)
    for head in ("lm", "flow"):
        # the same weights on row subsets: equal up to matmul rounding over other row counts
        assert (a[head] - b[head]).abs().max() <= 1e-5 * a[head].abs().max(), head
    text = {n: p.clone() for n, p in m.named_parameters() if ".towers.0." in n}
    gen = {n: p.clone() for n, p in m.named_parameters() if ".towers.1." in n}
    assert text and all(not p.requires_grad for p in m.layers[0].towers[0].parameters())
    held = {id(p) for group in mot.engine.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in held for blk in m.layers for p in blk.towers[0].parameters())
    mot.train()
    after = dict(m.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in text.items())
    assert all(torch.equal(after[n], d.state_dict()[n.replace(".towers.0", "")]) for n in text)
    assert any(not torch.equal(after[n], p) for n, p in gen.items())


def test_mot_flavor_trains_resumes_bitwise_and_exports(shapes_dir, tmp_path):
    from mmgen.checkpoint.export import export_safetensors, load_model_weights
    from tests.test_trainer import losses, make_trainer, stopped_and_resumed

    extra = ["model=mot_debug", "trainer.steps=4", "checkpoint.every=100"]
    straight = make_trainer(shapes_dir, tmp_path / "a", extra)
    straight.train()
    resumed = stopped_and_resumed(shapes_dir, tmp_path / "b", extra, 2)
    resumed.train()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == list(range(1, 5)) and a == b
    for (n, p), q in zip(straight.engine.module.named_parameters(), resumed.engine.module.parameters()):
        assert torch.equal(p, q), n
    out = export_safetensors(tmp_path / "b", tmp_path / "mot.safetensors")
    fresh = build_model(resumed.job.model)
    load_model_weights(fresh, out)
    batch = _job_batch(resumed.job.model.patch_dim)
    with torch.no_grad():
        assert torch.equal(fresh(batch)["lm"], resumed.engine.module(batch)["lm"])


def test_activation_checkpointing_keeps_tower_gradients():
    from mmgen.parallel.activation_checkpointing import apply_activation_checkpointing

    batch = _job_batch(MOT.patch_dim)
    grads = []
    for mode in ("none", "torch"):
        model = _model(MOT)
        assert apply_activation_checkpointing(model, mode) == (0 if mode == "none" else MOT.n_layers)
        out = model(batch, span_t=torch.full((len(batch.spans),), 0.5))
        (out["lm"].square().mean() + out["flow"].square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])   # recompute = same ops


def test_fsdp2_two_processes_with_checkpointing_and_frozen_text_tower(shapes_dir, tmp_path):
    from tests.conftest import BIN, data_overrides, run_cli
    from tests.test_trainer import TINY, losses

    r = run_cli([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "mmgen.train",
                 *TINY, *data_overrides(shapes_dir), "name=fsdp_mot", "model=mot_debug", "parallel=fsdp2",
                 "parallel.activation_checkpointing=torch", "model.freeze_text_tower=true",
                 "trainer.steps=3", "checkpoint.every=3"], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = losses(tmp_path / "runs" / "fsdp_mot")
    assert sorted(got) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v["loss/total"])) for v in got.values())
    assert "returned a view tensor" not in r.stderr


class _ScaledFFN(torch.nn.Module):
    """An FFN with an aux loss (the shape of an MoE FFN's contract: [1, n, dim] -> (y, aux))."""

    def __init__(self, cfg):
        super().__init__()
        self.proj = torch.nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x):
        assert x.dim() == 3 and x.shape[0] == 1
        y = self.proj(x)
        return y, {"ffn_square": y.square().sum()}

    def init_weights(self, std, out_std):
        torch.nn.init.normal_(self.proj.weight, std=std)


class _AuxTowerBlock(MoTBlock):
    build_ffn = staticmethod(_ScaledFFN)


def test_pluggable_tower_ffn_reports_aux_losses():
    """MoT x MoE's seam: a block subclass swaps each tower's FFN; aux losses sum over towers."""
    torch.manual_seed(0)
    block = _AuxTowerBlock(MOT)
    block.init_weights(0.05, 0.05)
    batch = _job_batch(MOT.patch_dim)
    routing = TowerRouting.from_ids(tower_ids(batch, "role"))
    x = torch.randn(*batch.shape, MOT.dim)
    rope = rope_cos_sin(batch.positions, MOT.head_dim, MOT.rope_theta)
    seen = []
    for tower in block.towers:
        tower.feed_forward.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[1], out[1])))
    out, aux = block(x, rope, build_dense_mask(batch), None, routing)
    assert isinstance(block.towers[1].feed_forward, _ScaledFFN) and out.shape == x.shape
    # each tower's FFN ran once on its own rows; the block's aux is the sum of theirs
    assert [n for n, _ in seen] == list(routing.counts) and min(routing.counts) > 0
    assert aux.keys() == {"ffn_square"}
    assert torch.equal(aux["ffn_square"], seen[0][1]["ffn_square"] + seen[1][1]["ffn_square"])


def test_a_tower_position_costs_one_towers_flops():
    from mmgen.metrics.flops import training_flops
    from mmgen.models import num_params

    batch = _job_batch(MOT.patch_dim)
    assert training_flops(MOT, batch) == training_flops(DENSE, batch)
    # towers add parameters, not work: the blocks hold twice the dense block's weights
    dense, mot = _model(DENSE), _model(MOT)
    trunk = lambda m: sum(p.numel() for p in m.layers.parameters())
    assert trunk(mot) == 2 * trunk(dense) and num_params(mot) - num_params(dense) == trunk(dense)
