# Masked discrete diffusion (objective=masked_vq, sampler maskgit_t2i): mask schedule and counts, the
# attention mask vs brute force, exact losses, loss decrease, MaskGIT decoding order and guidance,
# training through the trainer with bitwise resume and `mmgen eval shapes`, config errors.
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mmgen.batch import DISCRETE, FULL, IGNORE_INDEX, MASKED
from mmgen.objectives.config import ObjectiveConfig
from mmgen.sampling.batching import VisualSpan, pack_rows
from mmgen.sampling.config import SamplerConfig
from tests.test_vqar import TOK, K, codec, records, vq_file, vqar_batch  # noqa: F401  (fixtures)

MASK_ID = TOK.vocab_size + K            # the first id above the codes
VOCAB = MASK_ID + 1


def objective(schedule: str = "cosine"):
    from mmgen.objectives.masked_vq import MaskedVQObjective

    return MaskedVQObjective(ObjectiveConfig(name="masked_vq", mask_id=MASK_ID, mask_schedule=schedule))


def tiny_model(seed: int = 0, **overrides):
    from mmgen.models.config import ModelConfig
    from mmgen.models.transformer import UnifiedTransformer

    torch.manual_seed(seed)
    cfg = ModelConfig(**{"vocab_size": VOCAB, "patch_dim": 0, "heads": ["lm"], "init_std": 0.2,
                         "attention": "sdpa", **overrides})
    return UnifiedTransformer(cfg)


def span_of(batch, s: int) -> tuple[int, slice]:
    start, n = int(batch.spans.start[s]), int(batch.spans.length[s])
    return int(batch.spans.row[s]), slice(start, start + n)


# -- the mask: schedule, counts, positions ---------------------------------------------------------
def test_mask_ratio_schedules():
    from mmgen.objectives.masked_vq import mask_ratio

    u = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert mask_ratio(u, "cosine").tolist() == pytest.approx([1.0, math.cos(math.pi / 4), 0.0], abs=1e-12)
    assert mask_ratio(u, "linear").tolist() == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="'square' not in"):
        mask_ratio(u, "square")


def test_mask_counts_and_positions(codec):
    from mmgen.objectives.masked_vq import draw_mask, mask_counts, masked_spans

    batch = masked_spans(vqar_batch(codec))     # t2i, i2t, dropped-caption t2i, t2i
    target = batch.spans.is_target
    assert target.tolist() == [True, False, True, True]
    assert (batch.spans.objective == torch.where(target, MASKED, 0)).all()
    assert (batch.spans.attention == FULL).all() and batch.spans.visible_after.tolist() == (~target).tolist()
    counts = mask_counts(batch, "cosine")
    n = batch.spans.length
    assert ((counts >= 1) & (counts <= n))[target].all() and (counts[~target] == 0).all()
    masks = [draw_mask(batch, counts, torch.Generator().manual_seed(seed)) for seed in (0, 1)]
    for masked in masks:
        # only codes of target spans, exactly counts[s] of each, condition images never
        assert not (masked & (batch.span_ids < 0)).any()
        for s in range(len(batch.spans)):
            row, sl = span_of(batch, s)
            assert int(masked[row, sl].sum()) == int(counts[s])
    assert not torch.equal(masks[0], masks[1])          # the generator picks the positions
    assert torch.equal(draw_mask(batch, counts, torch.Generator().manual_seed(0)), masks[0])
    # local_counts counts exactly the positions the loss uses
    assert int(objective().local_counts(vqar_batch(codec))["visual"]) == int(masks[0].sum()) == int(counts.sum())


def test_mask_counts_follow_the_schedule_and_the_document(codec):
    from mmgen.objectives.masked_vq import mask_counts

    batch = vqar_batch(codec)
    docs = len(batch.meta["key"])
    target = batch.spans.is_target
    n = float(batch.spans.length[0])
    ratios = {"cosine": [], "linear": []}
    for schedule, got in ratios.items():
        for epoch in range(150):
            batch.meta["epoch"] = [epoch] * docs
            got += (mask_counts(batch, schedule)[target].double() / n).tolist()
    # E[cos(pi/2 u)] = 2/pi, E[1 - u] = 1/2 (ceil adds < 1/64); both reach near 0 and near 1
    assert sum(ratios["cosine"]) / len(ratios["cosine"]) == pytest.approx(2 / math.pi, abs=0.04)
    assert sum(ratios["linear"]) / len(ratios["linear"]) == pytest.approx(0.5, abs=0.04)
    for got in ratios.values():
        assert min(got) < 0.1 and max(got) > 0.95 and min(got) >= 1 / n
    # a document's count follows the document (source, key, epoch), not its slot in the batch
    batch.meta["epoch"] = [3] * docs
    first = dict(zip(batch.document_ids[batch.spans.row, batch.spans.start].tolist(), mask_counts(batch, "cosine")))
    moved = vqar_batch(codec)
    moved.meta["epoch"] = [3] * docs
    k0, k1, k2, k3 = moved.meta["key"]                     # documents 0 and 3: text-to-image both
    moved.meta["key"] = [k3, k1, k2, k0]                  # their keys swapped
    again = dict(zip(moved.document_ids[moved.spans.row, moved.spans.start].tolist(), mask_counts(moved, "cosine")))
    keys = batch.meta["key"]
    assert {keys[d]: c for d, c in first.items()} == {moved.meta["key"][d]: c for d, c in again.items()}


# -- attention: a packed row with text, a target image and a condition image ------------------------
def test_attention_mask_matches_brute_force():
    from mmgen.models.attention import build_dense_mask
    from mmgen.objectives.masked_vq import masked_spans

    codes = lambda n, s: torch.arange(n) % K + TOK.vocab_size + s  # noqa: E731
    interleaved = [[TOK.bos, 65, 66, TOK.boi], VisualSpan(codes(4, 0), (1, 2, 2), is_target=True, kind=DISCRETE),
                   [TOK.eoi, 67, TOK.boi], VisualSpan(codes(4, 1), (1, 2, 2), is_target=False, kind=DISCRETE),
                   [TOK.eoi, 68, TOK.eos]]
    caption = [[TOK.bos, 70, 71, TOK.eos]]
    raw = pack_rows([[interleaved, caption], [caption]], TOK, seq_len=24)
    batch = masked_spans(raw)
    got = build_dense_mask(batch)[:, 0]
    # from first principles: documents, then per position "what it is"
    doc = raw.document_ids.tolist()
    kinds = []     # per row: None (text/padding), ("target", span) or ("cond", span)
    for b in range(2):
        row = [None] * 24
        for s in range(len(raw.spans)):
            if int(raw.spans.row[s]) == b:
                r, sl = span_of(raw, s)
                for i in range(sl.start, sl.stop):
                    row[i] = ("target" if raw.spans.is_target[s] else "cond", s)
        kinds.append(row)
    assert [k for k in kinds[0] if k] == [("target", 0)] * 4 + [("cond", 1)] * 4

    def allowed(b, q, k):
        if doc[b][q] < 0:
            return q == k                      # padding sees itself only
        if doc[b][k] != doc[b][q]:
            return False
        kq, kk = kinds[b][q], kinds[b][k]
        if kq is not None and kq == kk:
            return True                        # both spans FULL inside
        if kk is not None and kk[0] == "target":
            return False                       # a masked target is hidden from everything else
        return k <= q                          # causal otherwise (text, condition image)

    want = [[[allowed(b, q, k) for k in range(24)] for q in range(24)] for b in range(2)]
    assert got.tolist() == want
    # and the model is fed exactly this: the visible-after rule changed only for the target
    assert not torch.equal(build_dense_mask(raw), build_dense_mask(batch))


# -- losses -------------------------------------------------------------------------------------------
def test_losses_are_masked_code_cross_entropy(codec):
    import torch.nn.functional as F

    from mmgen.objectives.masked_vq import draw_mask, mask_counts, masked_spans

    obj, model = objective(), tiny_model()
    raw = vqar_batch(codec)
    counts = obj.local_counts(raw)
    denominators = {k: v.clamp(min=1) for k, v in counts.items()}
    seen = {}
    plain = model.forward

    def spy(batch, *a, **kw):
        seen["tokens"] = batch.tokens.clone()
        return plain(batch, *a, **kw)

    model.forward = spy
    losses = obj(model, raw, denominators, torch.Generator().manual_seed(5))
    batch = masked_spans(raw)
    masked = draw_mask(batch, mask_counts(batch, "cosine"), torch.Generator().manual_seed(5))
    # the input: the mask token exactly at the masked codes, the batch unchanged elsewhere
    assert torch.equal(seen["tokens"], torch.where(masked, MASK_ID, raw.tokens))
    assert torch.equal(raw.tokens, vqar_batch(codec).tokens)          # the objective copies
    model.forward = plain
    inputs = dataclasses.replace(batch, tokens=seen["tokens"])
    with torch.no_grad():
        logits = model(inputs, heads={"lm": torch.ones_like(masked)})["lm"].view(*masked.shape, -1)
    visual = F.cross_entropy(logits[masked], raw.tokens[masked], reduction="sum") / int(masked.sum())
    is_text = raw.targets != IGNORE_INDEX
    text = F.cross_entropy(logits[is_text], raw.targets[is_text], reduction="sum") / int(is_text.sum())
    torch.testing.assert_close(losses["visual"].detach(), visual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["text"].detach(), text, rtol=1e-5, atol=1e-6)
    assert int(counts["visual"]) == int(masked.sum()) and int(counts["text"]) == int(is_text.sum())


def test_loss_decreases_on_a_fixed_batch(codec):
    obj, model = objective(), tiny_model()
    model.train()
    batch = vqar_batch(codec)
    denominators = {k: v.clamp(min=1) for k, v in obj.local_counts(batch).items()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    visual, text = [], []
    for step in range(30):
        losses = obj(model, batch, denominators, torch.Generator().manual_seed(step))
        opt.zero_grad()
        (losses["text"] + losses["visual"]).backward()
        opt.step()
        visual.append(float(losses["visual"].detach()))
        text.append(float(losses["text"].detach()))
    first, last = sum(visual[:5]) / 5, sum(visual[-5:]) / 5
    assert first > 4.0 and last < first - 1.0, (first, last)       # ln(297) = 5.7 at random init
    assert text[-1] < text[0] - 1.0


def test_flop_view_counts_hidden_targets_and_the_head_at_masked_codes(codec):
    from mmgen.metrics.flops import batch_work

    obj = objective()
    batch = vqar_batch(codec)
    raw, seen = batch_work(batch), batch_work(obj.model_view(batch))
    assert seen.text_targets == raw.text_targets + int(obj.local_counts(batch)["visual"])
    assert seen.attention_pairs < raw.attention_pairs and seen.tokens == raw.tokens


# -- MaskGIT decoding -----------------------------------------------------------------------------------
def test_unmask_schedule():
    from mmgen.sampling.maskgit import unmask_schedule

    s = unmask_schedule(64, 12)
    assert s[-1] == 0 and all(a > b for a, b in zip([64] + s, s))     # at least one fixed per step
    assert s[:3] == [math.floor(64 * math.cos(math.pi / 2 * t / 12)) for t in (1, 2, 3)]
    assert unmask_schedule(3, 6) == [2, 1, 1, 1, 1, 0] and unmask_schedule(5, 1) == [0]


@pytest.mark.parametrize("sampling", [dict(temperature=1.0, top_k=12, top_p=0.9, mask_temperature=4.5),
                                      dict(temperature=0.0, mask_temperature=0.0)])
def test_maskgit_fixes_every_position_exactly_once(sampling):
    from mmgen.sampling.maskgit import generate_codes_maskgit, unmask_schedule

    model = tiny_model().eval()
    cfg = SamplerConfig(steps=6, guidance=3.0, seed=3, **sampling)
    trace: list = []
    codes = generate_codes_maskgit(model, TOK, ["a red circle", "a small blue square"], (1, 4, 4), K, cfg,
                                   "cpu", trace=trace)
    assert codes.shape == (2, 16) and 0 <= int(codes.min()) and int(codes.max()) < K
    assert len(trace) == 6 and not trace[-1][0].any()
    fixed_at = torch.full((2, 16), -1)
    before = torch.ones(2, 16, dtype=torch.bool)
    for step, (masked, now) in enumerate(trace):
        assert not (masked & ~before).any()             # never masked again once fixed
        fixed_at[before & ~masked] = step
        assert (masked.sum(1) == unmask_schedule(16, 6)[step]).all()
        assert torch.equal(now[~masked], codes[~masked])   # a fixed code never changes
        before = masked
    assert (fixed_at >= 0).all()                        # every position fixed, each exactly once
    again = generate_codes_maskgit(model, TOK, ["a red circle", "a small blue square"], (1, 4, 4), K, cfg, "cpu")
    assert torch.equal(again, codes)                    # seeded
    assert len(set(codes.flatten().tolist())) > 3


def test_guidance_mixes_conditional_and_null_rows():
    from mmgen.sampling.maskgit import generate_codes_maskgit

    model = tiny_model().eval()
    greedy = dict(steps=4, temperature=0.0, mask_temperature=0.0)
    run = lambda caps, g: generate_codes_maskgit(model, TOK, caps, (1, 4, 4), K,  # noqa: E731
                                                 SamplerConfig(guidance=g, **greedy), "cpu")
    caps = ["a red circle top left", "a big green triangle"]
    # g = 0 keeps the null-caption rows only, g = 1 the conditional ones (no null rows run)
    assert torch.equal(run(caps, 0.0), run(["", ""], 1.0))
    guided, cond = run(caps, 3.0), run(caps, 1.0)
    assert guided.shape == (2, 16) and not torch.equal(guided, cond)


def test_samplers_draw_decodable_images_and_captions(codec):
    from mmgen.objectives import OBJECTIVES
    from mmgen.sampling.registry import SampleContext, get_sampler

    assert OBJECTIVES["masked_vq"].samplers == ("maskgit_t2i", "text")
    model = tiny_model().eval()
    ctx = SampleContext(tokenizer=TOK, image_size=32, codec=codec,
                        cfg=SamplerConfig(steps=4, guidance=2.0, top_k=8, max_caption_len=6))
    images = get_sampler("maskgit_t2i")(model, ["a red circle", "a blue square"], ctx)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1 and torch.isfinite(images).all()
    captions = get_sampler("text")(model, images, ctx)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    with pytest.raises(ValueError, match="no mask token id"):
        get_sampler("maskgit_t2i")(tiny_model(vocab_size=MASK_ID).eval(), ["x"], ctx)


# -- through the trainer: bitwise resume, eval shapes; config errors ---------------------------------
def make_trainer(shapes_dir, run_dir, vq_file, extra=()):
    from tests.test_vqar import make_trainer as vqar_trainer

    return vqar_trainer(shapes_dir, run_dir, vq_file, ["objective=masked_vq", f"model.vocab_size={VOCAB}", *extra])


def test_masked_vq_resumes_bitwise_and_evaluates(shapes_dir, tmp_path, vq_file):
    short = ["trainer.steps=4", "data.t2i_ratio=0.8", "sampler.steps=3"]
    straight = make_trainer(shapes_dir, tmp_path / "a", vq_file, short)
    assert type(straight.objective).__name__ == "MaskedVQObjective" and straight.objective.cfg.mask_id == MASK_ID
    straight.train()
    r = records(tmp_path / "a")
    assert all(r[s]["loss/visual"] > 0 for s in range(1, 5))
    assert r[4]["loss/total"] == pytest.approx(r[4]["loss/text"] + r[4]["loss/visual"], rel=1e-6)
    part = make_trainer(shapes_dir, tmp_path / "b", vq_file, short)
    part.train(stop_at=2)
    resumed = make_trainer(shapes_dir, tmp_path / "b", vq_file, short)
    assert resumed.state.step == 2
    resumed.train()
    assert records(tmp_path / "a") == records(tmp_path / "b")
    for (n, p), q in zip(straight.engine.module.state_dict().items(), resumed.engine.module.state_dict().values()):
        assert torch.equal(p, q), n
    # `mmgen eval shapes` on the run: the objective's samplers draw and caption held-out prompts
    import json

    from mmgen.cli.main import main

    main(["eval", "shapes", str(tmp_path / "a"), "--num-samples", "4", "--out", str(tmp_path / "ev")])
    scores = json.loads((tmp_path / "ev" / "scores.json").read_text())
    assert scores["num_samples"] == 4 and 0 <= scores["image"]["color"] <= 1


def test_config_checks(vq_file):
    from mmgen.cli.preflight import compose_job
    from mmgen.errors import ConfigError

    base = ["experiment=shapes_maskgit_cpu", f"data.codec=vq:{vq_file}"]
    job = compose_job([*base, f"model.vocab_size={VOCAB}"])
    assert (job.objective.name, job.objective.mask_id, job.model.heads, job.model.patch_dim) == ("masked_vq", MASK_ID, ["lm"], 0)
    # the same trunk, rows, sequence, steps and optimizer as the discrete-token AR preset
    ar = compose_job(["experiment=shapes_vqar_cpu", f"data.codec=vq:{vq_file}", f"model.vocab_size={VOCAB}"])
    same = lambda c: dataclasses.replace(c, name="", vocab_size=0) if hasattr(c, "vocab_size") else c  # noqa: E731
    assert same(job.model) == same(ar.model)
    assert (job.data, job.trainer, job.optim) == (ar.data, ar.trainer, ar.optim)
    for override, needle in [(f"model.vocab_size={MASK_ID}", f"mask token \\(needs >= {VOCAB}\\)"),
                             ("objective.mask_schedule=square", "objective.mask_schedule='square' not in"),
                             ("objective.mask_text=true", "mask_text=true .* not implemented"),
                             (f"objective.mask_id={MASK_ID - 1}", f"must be the first id above .*: {MASK_ID}")]:
        with pytest.raises(ConfigError, match=needle) as e:
            compose_job([*base, f"model.vocab_size={VOCAB}", override])
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="objective=masked_vq needs a discrete codec"):
        compose_job(["objective=masked_vq"])
    with pytest.raises(ValueError, match="needs objective.mask_id"):
        from mmgen.objectives.masked_vq import MaskedVQObjective

        MaskedVQObjective(ObjectiveConfig(name="masked_vq"))
