# MAR (objective=mar): masks vs brute force, the mask embedding, K draws by hand, the MAR sampler,
# no new parameter without the head, loss decrease, and training through the trainer with bitwise resume.
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from mmgen.batch import CONTINUOUS
from mmgen.models import build_model
from mmgen.models.config import ModelConfig
from mmgen.models.tokenizers.text import ByteTokenizer
from mmgen.objectives import ObjectiveConfig, build_objective, weighted_total
from mmgen.objectives.mar import (MASK_MEAN, MASK_STD, MARSample, mask_ratios, sample_mar,
                                  sample_mask)
from mmgen.sampling.batching import image_to_text_doc, pack_rows, text_to_image_doc
from mmgen.sampling.config import SamplerConfig

TOK = ByteTokenizer()
CFG = ModelConfig(heads=["lm", "mar"], mar_width=32, mar_depth=2, attention="sdpa")


def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(dataclasses.replace(CFG, **overrides))


def mar_batch(seed: int = 0):
    """Three rows: t2i + i2t, i2t + t2i, and a row with two t2i documents of different sizes."""
    gen = torch.Generator().manual_seed(seed)
    img = lambda g: torch.rand(g[1] * g[2], CFG.patch_dim, generator=gen) * 2 - 1  # noqa: E731
    rows = [[text_to_image_doc(TOK, "red circle", img((1, 2, 3)), (1, 2, 3)),
             image_to_text_doc(TOK, img((1, 2, 2)), (1, 2, 2), "blue")],
            [image_to_text_doc(TOK, img((1, 3, 2)), (1, 3, 2), "green square"),
             text_to_image_doc(TOK, "dot", img((1, 2, 2)), (1, 2, 2))],
            [text_to_image_doc(TOK, "a", img((1, 4, 4)), (1, 4, 4)),
             text_to_image_doc(TOK, "", img((1, 1, 3)), (1, 1, 3))]]
    return pack_rows(rows, TOK, 64)


def span_rows(batch) -> list[torch.Tensor]:
    """Per span, its indices among the continuous rows (empty for non-continuous spans)."""
    span_of = batch.span_ids.flatten()[batch.rows("continuous")]
    return [(span_of == s).nonzero().squeeze(1) for s in range(len(batch.spans))]


# -- masks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("low", [0.7, 0.0, 1.0])
def test_masks_match_brute_force(low):
    """Only target continuous spans are masked, ceil(r * n) >= 1 positions each, the ones with the
    smallest scores of the draw (recomputed here span by span from the same generator)."""
    batch = mar_batch()
    spans = span_rows(batch)
    for seed in range(20):
        masked = sample_mask(batch, low, torch.Generator().manual_seed(seed))
        gen = torch.Generator().manual_seed(seed)
        ratios = mask_ratios(len(batch.spans), low, gen)
        scores = torch.rand(batch.patches.shape[0], generator=gen, dtype=torch.float64)
        assert bool(((ratios >= low) & (ratios <= 1)).all())
        want = torch.zeros_like(masked)
        for s, rows in enumerate(spans):
            if not bool(batch.spans.is_target[s]):
                assert not masked[rows].any(), "a condition image was masked"
                continue
            n = len(rows)
            k = max(1, math.ceil(float(ratios[s]) * n))
            want[rows[torch.argsort(scores[rows])[:k]]] = True
            assert 1 <= int(masked[rows].sum()) <= n
        assert torch.equal(masked, want)
        if low == 1.0:
            assert torch.equal(masked, batch.target_visual_mask().flatten()[batch.rows("continuous")])


def test_mask_ratios_follow_the_truncated_normal():
    r = mask_ratios(20000, 0.7, torch.Generator().manual_seed(0))
    assert float(r.min()) >= 0.7 and float(r.max()) <= 1.0
    # the mean of N(1, 0.25) truncated to [0.7, 1]: 1 - s (phi(b) - phi(a)) / (Phi(b) - Phi(a))
    a, b = (0.7 - MASK_MEAN) / MASK_STD, 0.0
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    mean = MASK_MEAN - MASK_STD * (phi(b) - phi(a)) / (Phi(b) - Phi(a))
    assert abs(float(r.mean()) - mean) < 0.005


def test_mask_embedding_exactly_at_masked_positions():
    """The trunk's inputs against a position-by-position reference: text ids embedded, clean
    continuous rows projected plus their span's time, masked rows the mask vector; the position
    code at every visual position."""
    model = tiny_model()
    batch = mar_batch()
    masked = sample_mask(batch, 0.7, torch.Generator().manual_seed(3))
    span_t = torch.rand(len(batch.spans))
    got = model.embed(batch, batch.patches, span_t, masked)
    row_of = {int(p): i for i, p in enumerate(batch.rows("continuous"))}
    B, L = batch.shape
    with torch.no_grad():
        for b in range(B):
            for i in range(L):
                s = int(batch.span_ids[b, i])
                if s < 0:
                    want = model.tok_embeddings.weight[batch.tokens[b, i]]
                else:
                    r = row_of[b * L + i]
                    if masked[r]:
                        want = model.mask_embed.weight
                    else:
                        want = model.patch_in(batch.patches[r]) + model.t_embedder(span_t[s:s + 1])[0]
                    want = want + model.visual_pos(batch.coords[b, i])
                torch.testing.assert_close(got[b, i], want, rtol=1e-5, atol=1e-6)
    # nothing masked: the inputs of the same weights without the mask embedder
    plain = model.embed(batch, batch.patches, span_t)
    assert torch.equal(plain, model.embed(batch, batch.patches, span_t, torch.zeros_like(masked)))
    assert not torch.equal(plain, got)
    with pytest.raises(ValueError, match="mask embedding"):
        build_model(ModelConfig())(batch, masked=masked)


def test_a_model_without_the_mar_head_has_no_new_parameter():
    """The mask embedding and the denoiser exist only with the "mar" head: a Transfusion model's
    state dict is the mar model's minus exactly those, plus the flow head."""
    torch.manual_seed(0)
    default, mar = build_model(ModelConfig()), tiny_model()
    assert default.embedder_names == ("text", "visual", "visual_pos")
    keys = list(default.state_dict())
    assert not [k for k in keys if k.startswith(("mask_embed", "mar_head"))]
    new = [k for k in mar.state_dict() if k.startswith(("mask_embed.", "mar_head."))]
    assert "mask_embed.weight" in new and "mar_head.out.weight" in new
    assert [k for k in mar.state_dict() if k not in new] == [k for k in keys if not k.startswith("visual_out.")]
    # the denoiser starts at 0 (zero output layer), as the flow head does
    z = torch.randn(5, CFG.dim)
    assert torch.equal(mar.run_head("mar", z, x_t=torch.randn(10, CFG.patch_dim), t=torch.rand(10)),
                       torch.zeros(10, CFG.patch_dim))
    assert torch.equal(mar.run_head("mar", z), z)          # no inputs: the conditioning itself


# -- losses -----------------------------------------------------------------------------------
def counts(objective, batch):
    return {k: v.clamp(min=1) for k, v in objective.local_counts(batch).items()}


def perturb(model, seed=1):
    """Non-zero denoiser output weights (zero at init, which would make every prediction 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.mar_head.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def test_k_draws_are_the_mean_of_single_draws_by_hand():
    """The visual loss with K draws equals the mean over draws of the per-span masked velocity
    MSE computed here from the trunk's state and the denoiser; the trunk runs once."""
    model = perturb(tiny_model())
    batch = mar_batch()
    objective = build_objective(ObjectiveConfig(name="mar", mar_draws=3, prediction="v"))
    denominators = counts(objective, batch)
    assert int(denominators["visual"]) == int(batch.spans.is_target.sum()) == 4
    sample = sample_mar(batch, objective.cfg, torch.Generator().manual_seed(0))
    calls = []
    hook = model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    losses = objective.losses(model, batch, sample, denominators)
    hook.remove()
    assert len(calls) == 1
    M = sample.rows.shape[0]
    positions = batch.rows("continuous")[sample.rows]
    zeros = torch.zeros(len(batch.spans))
    z = model(batch, batch.patches, zeros, heads={"mar": positions}, masked=sample.masked)["mar"]
    span_of = batch.span_ids.flatten()[positions]
    per_draw = []
    for k in range(3):
        sl = slice(k * M, (k + 1) * M)
        x_t, t, noise, x0 = sample.x_t[sl], sample.t[sl], sample.noise[sl], sample.x0[sl]
        assert torch.equal(x0, batch.patches[sample.rows])
        torch.testing.assert_close(x_t, (1 - t[:, None]) * x0 + t[:, None] * noise)
        err = (model.mar_head(x_t, t, z) - (noise - x0)).square().mean(-1)
        per_span = [err[span_of == s].mean() for s in span_of.unique()]
        per_draw.append(torch.stack(per_span).sum() / 4)
    torch.testing.assert_close(losses["visual"], torch.stack(per_draw).mean(), rtol=1e-5, atol=0)
    # and the single-draw objective on draw 0 alone gives that draw's loss
    one = build_objective(ObjectiveConfig(name="mar", mar_draws=1, prediction="v"))
    first = MARSample(sample.masked, sample.rows, sample.weight * 3, sample.x0[:M], sample.noise[:M],
                      sample.t[:M], sample.x_t[:M])
    torch.testing.assert_close(one.losses(model, batch, first, denominators)["visual"], per_draw[0],
                               rtol=1e-5, atol=0)
    assert torch.equal(losses["text"], one.losses(model, batch, first, denominators)["text"])


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = tiny_model()
    batch = mar_batch()
    objective = build_objective(ObjectiveConfig(name="mar"))
    denominators = counts(objective, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def evaluate():
        with torch.no_grad():
            return objective(model, batch, denominators, torch.Generator().manual_seed(123))

    before = evaluate()
    for step in range(40):
        losses = objective(model, batch, denominators, torch.Generator().manual_seed(step))
        opt.zero_grad()
        weighted_total(losses, {"text": 1.0, "visual": 1.0}).backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None]
            assert missing == [], missing          # every parameter of lm + mar gets a gradient
        opt.step()
    after = evaluate()
    assert float(after["visual"]) < 0.8 * float(before["visual"]), (before, after)
    assert float(after["text"]) < float(before["text"]) - 1.0, (before, after)


# -- sampling ---------------------------------------------------------------------------------
def test_reveal_schedule():
    from mmgen.sampling.mar import reveal_schedule

    for n in (1, 2, 5, 16, 64):
        for steps in (1, 3, 8, 16, 100):
            s = reveal_schedule(n, steps)
            assert len(s) == min(n, steps) and s[-1] == n
            assert all(b > a for a, b in zip([0, *s], s))
    # MAR's cosine: few tokens first, more later
    s = reveal_schedule(64, 8)
    assert s[0] == 64 - math.floor(64 * math.cos(math.pi / 16)) and s[0] < s[-1] - s[-2]


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_sampler_reveals_every_position_once(guidance):
    """Every position is drawn exactly once, in the seed's random order; at each iteration the
    trunk sees exactly the positions not yet drawn as masked; images are finite, in [-1, 1]."""
    from mmgen.sampling.mar import generate_images_mar, reveal_schedule

    model = perturb(tiny_model())
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["masked"].clone()), with_kwargs=True)
    cfg = SamplerConfig(steps=5, mar_steps=4, guidance=guidance, seed=7)
    record = []
    images = generate_images_mar(model, TOK, ["red circle", "blue square"], (3, 4), 4, cfg, "cpu", record)
    assert images.shape == (2, 3, 12, 16) and bool(torch.isfinite(images).all())
    assert float(images.min()) >= -1 and float(images.max()) <= 1
    drawn = torch.cat(record, dim=1)
    assert [r.shape[1] for r in record] == [b - a for a, b in zip([0, *reveal_schedule(12, 5)], reveal_schedule(12, 5))]
    for row in drawn:
        assert sorted(row.tolist()) == list(range(12))
    rows = 4 if guidance != 1.0 else 2
    assert len(seen) == 5
    for i, m in enumerate(seen):
        m = m.view(rows, 12)
        done = drawn[:, :sum(r.shape[1] for r in record[:i])]
        want = torch.ones(2, 12, dtype=torch.bool)
        want.scatter_(1, done, False)
        assert torch.equal(m[:2], want) and torch.equal(m[-2:], want)
    # the same seed draws the same images
    again = generate_images_mar(model, TOK, ["red circle", "blue square"], (3, 4), 4, cfg, "cpu")
    assert torch.equal(images, again)


def test_registered_samplers_on_a_vae_codec(tmp_path):
    """mar_t2i decodes VAE latents (an mmgen KL-VAE file); the caption sampler reads a clean image."""
    from mmgen.models.codecs import build_codec
    from mmgen.models.codecs.config import AutoencoderConfig
    from mmgen.models.codecs.load import save_codec
    from mmgen.models.codecs.vae import ConvVAE
    from mmgen.objectives import OBJECTIVES
    from mmgen.sampling import SampleContext, get_sampler

    torch.manual_seed(0)
    vae = ConvVAE(AutoencoderConfig(base_channels=8, channel_mult=[1, 2], latent_channels=4))
    vae.init_weights()
    codec = build_codec(f"vae:{save_codec(vae.eval(), tmp_path / 'vae.safetensors')}", 1)
    model = perturb(tiny_model(patch_dim=codec.payload_dim))
    ctx = SampleContext(tokenizer=TOK, image_size=16, codec=codec,
                        cfg=SamplerConfig(steps=4, mar_steps=3, max_caption_len=4))
    t2i, i2t = OBJECTIVES["mar"].samplers
    images = get_sampler(t2i)(model, ["red circle", "dot"], ctx)
    assert images.shape == (2, 3, 16, 16) and float(images.abs().max()) <= 1
    captions = get_sampler(i2t)(model, images, ctx)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


# -- through the trainer: bitwise resume, config checks ----------------------------------------
def make_trainer(shapes_dir, run_dir, extra=()):
    from mmgen.cli.preflight import compose_job
    from mmgen.parallel.dist import DistInfo
    from mmgen.trainer.job import to_yaml
    from mmgen.trainer.trainer import Trainer
    from tests.conftest import data_overrides

    job = compose_job(["objective=mar", "model.mar_width=32", "model.mar_depth=2", "objective.mar_draws=2",
                       "data.seq_len=112", "data.batch_size=4", "data.num_workers=0", "optim.lr=3e-3",
                       "optim.warmup_steps=2", "trainer.log_every=1", "trainer.num_threads=1",
                       "metrics.progress=false", "checkpoint.every=100", *data_overrides(shapes_dir),
                       f"run_dir={run_dir}", *extra])
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "config.yaml").write_text(to_yaml(job))
    return Trainer(job, DistInfo())


def records(run: Path) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(("loss/", "optim/"))}
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_mar_trains_and_resumes_bitwise(shapes_dir, tmp_path):
    short = ["trainer.steps=4"]
    straight = make_trainer(shapes_dir, tmp_path / "a", short)
    assert straight.engine.module.head_names == ("lm", "mar")
    assert straight.engine.module.embedder_names == ("text", "visual", "mar_mask", "visual_pos")
    straight.train()
    part = make_trainer(shapes_dir, tmp_path / "b", short)
    part.train(stop_at=2)
    resumed = make_trainer(shapes_dir, tmp_path / "b", short)
    assert resumed.state.step == 2
    resumed.train()
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert sorted(a) == [1, 2, 3, 4] and a == b
    assert all(r["loss/visual"] > 0 for r in a.values())
    for (n, p), q in zip(straight.engine.module.state_dict().items(), resumed.engine.module.state_dict().values()):
        assert torch.equal(p, q), n


def test_config_checks():
    from mmgen.cli.preflight import compose_job
    from mmgen.errors import ConfigError

    job = compose_job(["experiment=shapes_mar_cpu"])
    assert (job.model.heads, job.objective.name, job.data.codec) == (["lm", "mar"], "mar", "pixels")
    assert job.sampler.prediction == job.objective.prediction == "x"
    with pytest.raises(ConfigError, match="objective.mar_draws must be >= 1"):
        compose_job(["objective=mar", "objective.mar_draws=0"])
    with pytest.raises(ConfigError, match="model.mar_width"):
        compose_job(["objective=mar", "model.mar_width=0"])
    with pytest.raises(ConfigError, match=r"runs head\(s\) \['mar'\]"):
        compose_job(["objective=mar", "model.heads=[lm,flow]", "parallel.find_unused_parameters=true"])
    with pytest.raises(ConfigError, match="mar_mask_min"):
        compose_job(["objective=mar", "objective.mar_mask_min=1.5"])
    assert CONTINUOUS == build_objective(ObjectiveConfig(name="mar")).codec_kind
