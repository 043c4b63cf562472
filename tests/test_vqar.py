# Discrete-token AR (objective=vq_ar): mask and targets vs brute force, KV-cache sampling vs
# full recomputation, codes in range and decodable, training through the trainer with bitwise resume.
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmgen.batch import CAUSAL, DISCRETE, FULL, IGNORE_INDEX
from mmgen.models.codecs.config import AutoencoderConfig
from mmgen.models.codecs.load import save_codec
from mmgen.models.codecs.vq import ConvVQ, VQCodec
from mmgen.models.tokenizers.text import ByteTokenizer
from mmgen.sampling.config import SamplerConfig

TOK = ByteTokenizer()
K = 32                                   # codebook of the tiny VQ below: vocabulary 264 + 32
VQ_CFG = AutoencoderConfig(base_channels=8, channel_mult=[1, 2, 2], latent_channels=4, codebook_size=K)


@pytest.fixture(scope="module")
def vq_file(tmp_path_factory) -> Path:
    """A tiny random mmgen VQ tokenizer (32x32 px -> 8x8 codes), saved as a frozen codec file;
    its codebook is spread over real encoder outputs so images map to many codes."""
    from tests.test_codec_models import shapes_images

    torch.manual_seed(0)
    m = ConvVQ(VQ_CFG)
    m.init_weights()
    with torch.no_grad():
        rows, _ = m._to_rows(shapes_images(4))
        m.quantizer.embedding.copy_(rows[torch.randperm(rows.shape[0])[:K]])
    return save_codec(m.eval(), tmp_path_factory.mktemp("vq") / "vq.safetensors")


@pytest.fixture(scope="module")
def codec(vq_file) -> VQCodec:
    from mmgen.models.codecs import build_codec

    return build_codec(f"vq:{vq_file}", 1)


def tiny_model(seed: int = 0, **overrides):
    from mmgen.models.config import ModelConfig
    from mmgen.models.transformer import UnifiedTransformer

    torch.manual_seed(seed)
    # a wide init so a random model's logits differ clearly between codes (argmax ties would
    # make the cache-vs-recompute comparison vacuous)
    cfg = ModelConfig(vocab_size=TOK.vocab_size + K, patch_dim=0, heads=["lm"], init_std=0.2,
                      attention="sdpa", **overrides)
    return UnifiedTransformer(cfg).eval()


def vqar_batch(codec):
    """Real data-path documents (mmgen/data/pack.py) under the VQ codec: t2i, dropped-caption
    t2i and i2t, packed two per row."""
    from mmgen.data.decode import Sample
    from mmgen.data.pack import I2T, T2I, BatchPacker, build_document
    from mmgen.data.synthetic.shapes import make_sample

    docs = []
    for i, (task, dropped) in enumerate([(T2I, False), (I2T, False), (T2I, True), (T2I, False)]):
        spec, image = make_sample(i, 0)
        docs.append(build_document(Sample(f"k{i}", "s", image, spec.caption()), task, dropped, TOK, codec))
    packer = BatchPacker(2, 224)
    for d in docs:
        assert packer.add(d)
    return packer.build(TOK.pad, codec.payload_dim)


def test_mask_and_targets_match_brute_force(codec):
    from mmgen.models.attention import build_dense_mask
    from mmgen.objectives.vq_ar import causal_spans, code_targets

    batch = vqar_batch(codec)
    assert (batch.spans.kind == DISCRETE).all() and (batch.spans.attention == FULL).all()
    assert batch.patches.shape == (0, 0)
    ar = causal_spans(batch)
    assert (ar.spans.attention == CAUSAL).all() and (batch.spans.attention == FULL).all()
    B, L = batch.shape
    mask = build_dense_mask(ar)[:, 0]
    doc = batch.document_ids.tolist()
    want = [[[(doc[b][q] >= 0 and doc[b][q] == doc[b][k] and k <= q) or (doc[b][q] < 0 and q == k)
              for k in range(L)] for q in range(L)] for b in range(B)]
    assert mask.tolist() == want
    # code targets: the BOI and every code but the last of each target span predict the next code;
    # codes sit above the text ids, condition spans (i2t) carry none
    targets = code_targets(batch)
    want = torch.full_like(targets, IGNORE_INDEX)
    for s in range(len(batch.spans)):
        row, start, n = (int(batch.spans.row[s]), int(batch.spans.start[s]), int(batch.spans.length[s]))
        codes = batch.tokens[row, start:start + n]
        assert int(codes.min()) >= TOK.vocab_size and int(codes.max()) < TOK.vocab_size + K
        assert int(batch.tokens[row, start - 1]) == TOK.boi and int(batch.tokens[row, start + n]) == TOK.eoi
        if batch.spans.is_target[s]:
            want[row, start - 1:start + n - 1] = codes
    assert torch.equal(targets, want) and (targets != IGNORE_INDEX).sum() == 3 * 64
    # disjoint from the text targets, which are the data pipeline's own
    assert not ((targets != IGNORE_INDEX) & (batch.targets != IGNORE_INDEX)).any()


def test_flop_count_sees_causal_image_spans_and_the_head_at_codes(codec):
    # the trainer counts the objective's model_view: causal attention inside image spans (fewer
    # pairs than FULL) and the lm head at every code target as well as the text targets
    from mmgen.metrics.flops import batch_work
    from mmgen.objectives.vq_ar import VQAutoregressiveObjective, code_targets

    batch = vqar_batch(codec)
    raw, seen = batch_work(batch), batch_work(VQAutoregressiveObjective().model_view(batch))
    assert seen.text_targets == raw.text_targets + int((code_targets(batch) != IGNORE_INDEX).sum())
    assert seen.attention_pairs < raw.attention_pairs
    assert seen.tokens == raw.tokens


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=12, top_p=0.9)])
def test_kv_cache_sampling_equals_full_recomputation(sampling):
    from mmgen.sampling.ar import generate_codes

    model = tiny_model()
    captions = ["a red circle top left", "a small blue square"]
    got = {}
    for cached in (True, False):
        cfg = SamplerConfig(guidance=3.0, seed=7, use_cache=cached, **sampling)
        got[cached] = generate_codes(model, TOK, captions, (1, 4, 4), K, cfg, "cpu")
    assert got[True].shape == (2, 16) and torch.equal(got[True], got[False]), got
    assert len(set(got[True].flatten().tolist())) > 3        # not one code everywhere
    # the cached steps must add the codes' (t, h, w) position code: without it they differ
    plain = model.decode_step
    model.decode_step = lambda tokens, cache, coords=None: plain(tokens, cache)
    cfg = SamplerConfig(guidance=3.0, seed=7, **sampling)
    assert not torch.equal(generate_codes(model, TOK, captions, (1, 4, 4), K, cfg, "cpu"), got[False])


def test_top_k_top_p_and_guidance_rules():
    from mmgen.sampling.ar import choose_codes, filter_logits

    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    p = filter_logits(logits, 1.0, top_k=2)
    assert (p[0, 2:] == 0).all() and p[0, :2].sum() == pytest.approx(1.0)
    soft = logits.softmax(-1)[0]                      # 0.636, 0.234, 0.086, ...
    p = filter_logits(logits, 1.0, top_p=0.8)
    assert (p[0, :2] > 0).all() and (p[0, 2:] == 0).all()
    assert filter_logits(logits, 1.0, top_p=soft[0].item() - 1e-3)[0, 1] == 0   # the top one stays alone
    # guidance over logits: cond row, then null row; g = 2 turns the null row's favourite away
    both = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    gen = torch.Generator().manual_seed(0)
    assert choose_codes(both, 1, slice(0, 3), SamplerConfig(guidance=2.0, temperature=0.0), gen).tolist() == [1]
    assert choose_codes(both[:1], 1, slice(0, 3), SamplerConfig(guidance=1.0, temperature=0.0), gen).tolist() == [1]
    assert choose_codes(both, 1, slice(1, 3), SamplerConfig(guidance=0.0, temperature=0.0), gen).tolist() == [1]
    # sampling draws from the filtered distribution only
    draws = [choose_codes(logits, 1, slice(0, 5), SamplerConfig(top_k=2), gen).item() for _ in range(200)]
    assert set(draws) == {0, 1}


def test_samplers_give_codes_in_range_images_and_captions(codec):
    from mmgen.sampling.registry import SampleContext, get_sampler
    from mmgen.objectives import OBJECTIVES

    assert OBJECTIVES["vq_ar"].samplers == ("ar_t2i", "ar_text")
    model = tiny_model()
    ctx = SampleContext(tokenizer=TOK, image_size=32, codec=codec,
                        cfg=SamplerConfig(guidance=2.0, top_k=8, max_caption_len=6))
    images = get_sampler("ar_t2i")(model, ["a red circle", "a blue square"], ctx)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1 and torch.isfinite(images).all()
    from mmgen.sampling.ar import generate_codes

    codes = generate_codes(model, TOK, ["a red circle"], codec.grid(32), K, ctx.cfg, "cpu")
    assert codes.shape == (1, 64) and 0 <= int(codes.min()) and int(codes.max()) < K
    torch.testing.assert_close(codec.decode(codes[0], (1, 8, 8)).clamp(-1, 1),
                               get_sampler("ar_t2i")(model, ["a red circle"], ctx)[:1])
    # captions: the image's codes as a CAUSAL condition span; cache and recompute agree
    pics = images.detach()
    cached = get_sampler("ar_text")(model, pics, ctx)
    recomputed = get_sampler("ar_text")(model, pics, SampleContext(
        tokenizer=TOK, image_size=32, codec=codec, cfg=SamplerConfig(max_caption_len=6, use_cache=False)))
    assert len(cached) == 2 and cached == recomputed


# -- through the trainer: loss decreases, checkpoint, bitwise resume ------------------------------
def make_trainer(shapes_dir, run_dir, vq_file, extra=()):
    from mmgen.cli.preflight import compose_job
    from mmgen.parallel.dist import DistInfo
    from mmgen.trainer.job import to_yaml
    from mmgen.trainer.trainer import Trainer
    from tests.conftest import data_overrides

    job = compose_job(["objective=vq_ar", f"data.codec=vq:{vq_file}", "data.patch_size=1",
                       f"model.vocab_size={TOK.vocab_size + K}", "data.seq_len=112", "data.batch_size=4",
                       "data.num_workers=0", "optim.lr=3e-3", "optim.warmup_steps=2", "trainer.log_every=1",
                       "trainer.num_threads=1", "metrics.progress=false", "checkpoint.every=100",
                       *data_overrides(shapes_dir), f"run_dir={run_dir}", *extra])
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "config.yaml").write_text(to_yaml(job))
    return Trainer(job, DistInfo())


def records(run: Path) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(("loss/", "optim/"))}
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_vqar_trains_and_resumes_bitwise(shapes_dir, tmp_path, vq_file):
    long = make_trainer(shapes_dir, tmp_path / "long", vq_file, ["trainer.steps=30", "data.t2i_ratio=0.8"])
    assert long.engine.module.head_names == ("lm",) and long.engine.module.embedder_names == ("text", "visual_pos")
    long.train()
    r = records(tmp_path / "long")
    # mean over steps that held a text-to-image target (a 4-row step may hold none: loss 0)
    visual = lambda steps: [r[s]["loss/visual"] for s in steps if r[s]["loss/visual"] > 0]  # noqa: E731
    first, last = visual(range(1, 4)), visual(range(24, 31))
    first, last = sum(first) / len(first), sum(last) / len(last)
    assert first > 5.0 and last < first - 1.0, (first, last)      # ln(296) = 5.7 at random init
    assert r[30]["loss/text"] < r[1]["loss/text"] - 1.0
    assert r[30]["loss/total"] == pytest.approx(r[30]["loss/text"] + r[30]["loss/visual"], rel=1e-6)

    short = ["trainer.steps=4"]
    straight = make_trainer(shapes_dir, tmp_path / "a", vq_file, short)
    straight.train()
    part = make_trainer(shapes_dir, tmp_path / "b", vq_file, short)
    part.train(stop_at=2)
    resumed = make_trainer(shapes_dir, tmp_path / "b", vq_file, short)
    assert resumed.state.step == 2
    resumed.train()
    assert records(tmp_path / "a") == records(tmp_path / "b")
    for (n, p), q in zip(straight.engine.module.state_dict().items(), resumed.engine.module.state_dict().values()):
        assert torch.equal(p, q), n


def test_config_checks(vq_file):
    from mmgen.cli.preflight import compose_job
    from mmgen.errors import ConfigError

    job = compose_job(["experiment=shapes_vqar_cpu", f"data.codec=vq:{vq_file}", "model.vocab_size=296"])
    assert (job.model.patch_dim, job.model.heads, job.objective.name) == (0, ["lm"], "vq_ar")
    with pytest.raises(ConfigError, match="needs >= 296"):
        compose_job(["experiment=shapes_vqar_cpu", f"data.codec=vq:{vq_file}", "model.vocab_size=290"])
    with pytest.raises(ConfigError, match="objective=vq_ar needs a discrete codec"):
        compose_job(["objective=vq_ar"])
    with pytest.raises(ConfigError, match="'flow' head nothing to predict"):
        compose_job([f"data.codec=vq:{vq_file}", "data.patch_size=1", "model.vocab_size=296"])
