# Pretrained Hugging Face backbones: config and weights in, logits equal, tokenizer ids equal, train, export back.
"""Tiny random Llama (llama3 RoPE scaling), Qwen2 (q/k/v biases, tied head) and Qwen3 (qk-norm,
head_dim * n_heads != dim) models made with transformers and saved with save_pretrained (sharded
files with an index), no download. Tolerance of the fp32 logit comparisons: 1e-5 absolute
(measured: <= 4e-7 on these models)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import BIN, ROOT, data_overrides, run_cli
from tests.hf_assets import TEXT, make_hf_model

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

KINDS = ("llama", "qwen2", "qwen3")
ATOL = 1e-5


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    root = tmp_path_factory.mktemp("hf")
    return {k: (root / k, make_hf_model(root / k, k, sharded=(k != "qwen2"))) for k in KINDS}


def _job(hf: Path, shapes: Path | None = None, extra: list[str] = ()):
    from mmgen.cli.preflight import compose_job

    data = data_overrides(shapes) if shapes else []
    return compose_job(["experiment=smoke", f"model=hf:{hf}", f"data.tokenizer=hf:{hf}", *data, *extra])


def _mmgen_logits(model, tok, ids: list[int]) -> torch.Tensor:
    from mmgen.sampling.batching import build_batch

    b = build_batch([[ids]], tok, patch_dim=model.cfg.patch_dim)
    with torch.no_grad():
        return model(b, heads={"lm": b.document_ids >= 0})["lm"]


@pytest.mark.parametrize("kind", KINDS)
def test_text_logits_equal_transformers(hf_dirs, kind):
    from mmgen.models import build_model
    from mmgen.models.tokenizers import build_tokenizer
    from mmgen.parallel.pretrained import pretrained_init

    hf, ref = hf_dirs[kind]
    job = _job(hf)
    m = job.model
    assert m.from_hf == str(hf) and m.name == f"hf-{kind}"
    assert (m.qk_norm, m.qkv_bias) == (kind == "qwen3", kind == "qwen2")
    assert m.tie_embeddings == (kind == "qwen2") and m.head_dim == (32 if kind == "qwen3" else 16)
    assert m.rope_scaling == ("llama3" if kind == "llama" else "none")
    tok = build_tokenizer(job.data.tokenizer)
    assert m.vocab_size == tok.vocab_size >= 320
    with torch.device("meta"):
        model = build_model(m)
    init = pretrained_init(model, str(hf), seed=0)
    model.to_empty(device="cpu")
    init(model)
    ids = tok.encode(TEXT)[:100] + list(range(300, 320))  # also the untrained rows of the HF table
    ours = _mmgen_logits(model.eval(), tok, ids)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    assert ours.shape == (len(ids), m.vocab_size)
    torch.testing.assert_close(ours[:, :320], theirs, atol=ATOL, rtol=0)
    # the specials' new rows start at the mean pretrained row
    rows = model.tok_embeddings.weight
    assert torch.allclose(rows[320:], rows[:320].mean(0).expand(rows.shape[0] - 320, -1), atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_tokenizer_ids_equal_transformers(hf_dirs, family):
    from transformers import AutoTokenizer

    from mmgen.models.tokenizers import SPECIAL_NAMES, TextTokenizer, build_tokenizer, special_ids

    hf = hf_dirs[family][0]
    tok = build_tokenizer(f"hf:{hf}")
    assert isinstance(tok, TextTokenizer)
    theirs = AutoTokenizer.from_pretrained(hf)
    for text in (TEXT, "a red circle", "  spaces\n\nand lines  ", ""):
        assert tok.encode(text) == theirs(text, add_special_tokens=False).input_ids
        assert tok.decode(tok.encode(text)) == text
    ids = special_ids(tok)
    assert len(set(ids.values())) == len(SPECIAL_NAMES)        # distinct, though Qwen's eos is also its pad
    if family == "qwen2":   # mapped where Qwen has the token, new ids above the 320 model rows otherwise
        assert ids["eos"] == theirs.convert_tokens_to_ids("<|endoftext|>")
        assert ids["boi"] == theirs.convert_tokens_to_ids("<|vision_start|>")
        assert ids["visual"] == theirs.convert_tokens_to_ids("<|image_pad|>")
        assert sorted(tok.appended.values()) == list(range(320, tok.vocab_size)) and tok.vocab_size == 324
    else:                   # Llama 3: its own bos/eos, then reserved tokens; nothing appended
        assert ids["bos"] == theirs.convert_tokens_to_ids("<|begin_of_text|>")
        assert ids["boi"] == theirs.convert_tokens_to_ids("<|reserved_special_token_1|>")
        assert tok.vocab_size == 320 and not tok.appended
    assert tok.decode([ids["bos"], *tok.encode("ok"), ids["eos"], 322]) == "ok"


def test_unsupported_configs_fail_in_one_line(tmp_path, hf_dirs):
    from mmgen.errors import ConfigError
    from mmgen.models.hf.config import hf_model_fields

    base = json.loads((hf_dirs["qwen2"][0] / "config.json").read_text())
    cases = [({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
             ({"use_sliding_window": True, "sliding_window": 64}, "sliding_window=64 is not supported"),
             ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window=4096 is not supported"),
             ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "RoPE type 'yarn'"),
             ({"hidden_act": "gelu"}, "hidden_act='gelu'")]
    for i, (change, message) in enumerate(cases):
        d = tmp_path / str(i)
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(ValueError, match=message):
            hf_model_fields(d)
    # a mistral without a window is a llama
    d = tmp_path / "mistral"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**base, "model_type": "mistral", "sliding_window": None}))
    assert hf_model_fields(d)["qkv_bias"] is False
    # weights that do not fit: the key and both shapes, or the missing / unexpected names
    from safetensors.torch import save_file

    from mmgen.models import build_model
    from mmgen.parallel.pretrained import pretrained_init

    m = _job(hf_dirs["qwen2"][0]).model
    with torch.device("meta"):
        model = build_model(m)
    src = hf_dirs["qwen2"][0]
    for name, edit, message in [
            ("shape", lambda s: s.update({"model.norm.weight": torch.ones(65)}),
             r"model.norm.weight has shape \[65\], mmgen's norm.weight needs \[64\]"),
            ("missing", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"),
             "missing 1 tensor.*model.layers.1.mlp.up_proj.weight"),
            ("unexpected", lambda s: s.update({"model.layers.2.mlp.up_proj.weight": torch.ones(1)}),
             "1 unexpected tensor.*model.layers.2.mlp.up_proj.weight")]:
        from safetensors.torch import load_file

        d = tmp_path / name
        d.mkdir()
        state = load_file(str(src / "model.safetensors"))
        edit(state)
        save_file(state, str(d / "model.safetensors"))
        (d / "config.json").write_text((src / "config.json").read_text())
        with pytest.raises(ConfigError, match=message):
            pretrained_init(model, str(d), seed=0)


def test_train_from_hf_then_export_back(hf_dirs, shapes_dir, tmp_path):
    """mmgen-train from the Qwen3 directory (model, tokenizer and weights), then
    ``mmgen export --format hf``: transformers loads it and its logits equal mmgen's."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from mmgen.models import build_model
    from mmgen.checkpoint.export import load_model_weights
    from mmgen.models.tokenizers import build_tokenizer

    hf = hf_dirs["qwen3"][0]
    r = run_cli([str(BIN / "mmgen-train"), "experiment=smoke", f"model=hf:{hf}", f"data.tokenizer=hf:{hf}",
                 f"checkpoint.init_from=hf:{hf}", *data_overrides(shapes_dir), "trainer.steps=3", "trainer.log_every=1",
                 "trainer.device=cpu", "trainer.num_threads=1", "metrics.progress=false", "name=q3",
                 f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "initialised fresh: patch_in, t_embedder, visual_pos, visual_out, tok_embeddings rows 320:324" in r.stderr
    losses = [json.loads(line)["loss/total"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss/total" in line]
    assert len(losses) == 3 and all(l == l and l < 20 for l in losses)
    out = tmp_path / "exported"
    r = run_cli([str(BIN / "mmgen"), "export", str(tmp_path / "run"), "--format", "hf", "--out", str(out),
                 "--max-shard-mb", "0.05"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    held = {}
    for f in sorted(out.glob("model-*.safetensors")):
        with safe_open(str(f), "pt") as h:
            held.update({k: f.name for k in h.keys()})
    assert index == held and len(set(held.values())) > 1        # no ghost keys, every file indexed
    with safe_open(str(out / "mmgen_multimodal.safetensors"), "pt") as h:
        assert {k.split(".")[0] for k in h.keys()} == {"patch_in", "t_embedder", "visual_pos", "visual_out"}
    assert (out / "tokenizer.json").is_file()
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    from omegaconf import OmegaConf

    from mmgen.trainer.job import JobConfig

    job = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig),
                                              OmegaConf.load(tmp_path / "run" / "config.yaml")))
    ours = build_model(job.model)
    load_model_weights(ours, tmp_path / "run")
    tok = build_tokenizer(job.data.tokenizer)
    ids = [tok.bos, *tok.encode("a red circle on a blue square"), tok.boi, 321]
    with torch.no_grad():
        torch.testing.assert_close(_mmgen_logits(ours.eval(), tok, ids), theirs(torch.tensor([ids])).logits[0],
                                   atol=ATOL, rtol=0)


def test_init_under_ddp_fsdp2_zero3_two_ranks(hf_dirs, shapes_dir, tmp_path):
    """Each rank's shard (FSDP2 rows, ZeRO-3 flat partition) equals the HF file's slice; the fresh
    parts are equal under every layout; each engine steps from the loaded weights."""
    out = tmp_path / "w"
    out.mkdir()
    r = run_cli([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(ROOT / "tests" / "hf_worker.py"),
                 "--hf", str(hf_dirs["qwen3"][0]), "--shapes", str(shapes_dir), "--out", str(out)],
                cwd=out, timeout=600, env={"DS_ACCELERATOR": "cpu"})
    res = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    assert res.get("_failed") is None and r.returncode == 0, res.get("_failed") or r.stderr[-3000:]
    for layout, want in (("ddp", 1.0), ("fsdp2", 0.5), ("zero3", 0.5), ("fsdp2_motmoe", 0.5), ("zero3_motmoe", 0.5)):
        for rank in res[layout]:
            # dense: 2 layers x 11 + 3; towers: 2 layers x 2 towers x 11 + 3 (experts included)
            assert rank["bad"] == [] and rank["checked"] == (47 if layout.endswith("motmoe") else 25), layout
            assert abs(rank["local_fraction"] - want) < 0.05     # really sharded
            # routers' balancing biases start at zero (to_empty leaves buffers unset)
            assert len(rank["buffers"]) == (4 if layout.endswith("motmoe") else 0)
            assert all(v == [0.0, 0.0] for v in rank["buffers"].values())
            if layout != "zero3_motmoe":   # loaded only (hf_worker.NO_STEP says why)
                assert rank["loss"] == rank["loss"] and rank["loss"] < 20
    assert all(res["fresh_equal"].values()) and "visual_out.weight" in res["fresh_keys"]["ddp"]
    # fresh under towers x experts: the routers
    assert "layers.1.towers.1.feed_forward.router.weight" in res["fresh_keys"]["zero3_motmoe"]


# ---------------------------------------------------------------- sparse trunks from a dense HF LLM

def _init_from_hf(job, hf: Path):
    from mmgen.models import build_model
    from mmgen.parallel.pretrained import pretrained_init

    with torch.device("meta"):
        model = build_model(job.model)
    init = pretrained_init(model, str(hf), seed=0)
    model.to_empty(device="cpu")
    init(model)
    return model.eval(), init.source


def _hidden(model, batch, span_t):
    """Trunk hidden states ``[B, L, dim]`` (every position, visual ones included)."""
    with torch.no_grad():
        x = model.embed(batch, batch.patches, span_t)
        return model.trunk(x, model.rope(batch.positions), model.build_mask(batch), routing=model.route(batch))[0]


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_mot_towers_start_as_the_hf_text_tower(hf_dirs, kind):
    """model=hf:<dir> model.block=mot (BAGEL): every tower is the HF layer, so text logits equal
    the HF model's and a visual target position (generation tower) has the dense model's state."""
    from mmgen.models.tokenizers import build_tokenizer
    from mmgen.sampling.batching import text_to_image_doc

    hf, ref = hf_dirs[kind]
    mot, source = _init_from_hf(_job(hf, extra=["model.block=mot", "model.tower_split=role"]), hf)
    dense, _ = _init_from_hf(_job(hf), hf)
    assert source.map.towers == 2 * sum(k.startswith("layers.") for k, _ in dense.named_parameters())
    assert "tower" not in source.fresh_summary()
    for block, dblock in zip(mot.layers, dense.layers):
        for tower in block.towers:
            for (name, p), (dname, q) in zip(tower.named_parameters(), dblock.named_parameters()):
                assert name == dname and torch.equal(p, q), name
    tok = build_tokenizer(f"hf:{hf}")
    ids = tok.encode(TEXT)[:80]
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_mmgen_logits(mot, tok, ids)[:, :320], theirs, atol=ATOL, rtol=0)
    # a text-to-image document: its target span runs on the generation tower
    from mmgen.sampling.batching import build_batch

    g = torch.Generator().manual_seed(1)
    doc = text_to_image_doc(tok, "a red circle", torch.rand(4, mot.cfg.patch_dim, generator=g) * 2 - 1, (1, 2, 2))
    batch = build_batch([doc], tok, patch_dim=mot.cfg.patch_dim)
    target = batch.target_visual_mask()
    assert target.sum() == 4 and (mot.route(batch).towers == target.long()).all()
    t = torch.full((len(batch.spans),), 0.5)
    a, b = _hidden(dense, batch, t), _hidden(mot, batch, t)
    # the same weights on row subsets: equal up to the rounding of matmuls over other row counts
    torch.testing.assert_close(b[target], a[target], atol=1e-5, rtol=0)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_moe_upcycled_from_hf_gives_its_logits(hf_dirs):
    """model.block=moe from a dense HF model: every expert a copy of the HF FFN (upcycling),
    routers and their expert_bias buffers fresh; top-k weights sum to 1, so the logits are
    the HF model's whatever the router picks."""
    from mmgen.models.tokenizers import build_tokenizer

    hf, ref = hf_dirs["qwen2"]
    job = _job(hf, extra=["model.block=moe", "model.moe_experts=4", "model.moe_top_k=2"])
    model, source = _init_from_hf(job, hf)
    assert len(source.map.experts) == 3 * 2
    assert "layers.*.feed_forward.router" in source.fresh_summary()
    ffn = model.layers[1].feed_forward
    w = ref.model.layers[1].mlp.gate_proj.weight
    assert all(torch.equal(ffn.experts.w1[e], w.t()) for e in range(4))
    assert torch.equal(ffn.router.expert_bias, torch.zeros(4))
    tok = build_tokenizer(f"hf:{hf}")
    ids = tok.encode(TEXT)[:80]
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_mmgen_logits(model, tok, ids)[:, :320], theirs, atol=ATOL, rtol=0)
    bad = _job(hf, extra=["model.block=moe", "model.moe_experts=4", "model.moe_shared_experts=1"])
    from mmgen.errors import ConfigError

    with pytest.raises(ConfigError, match="moe_shared_experts=0"):
        _init_from_hf(bad, hf)


def test_frozen_text_tower_stays_the_hf_weights(hf_dirs, shapes_dir, tmp_path):
    """LMFusion: model.freeze_text_tower=true from an HF LLM: after a few steps the text tower
    is still exactly the HF model's, while the generation tower has moved."""
    from safetensors.torch import load_file

    from mmgen.models.hf.adapter import init_source
    from tests.test_trainer import make_trainer

    hf = hf_dirs["qwen3"][0]
    trainer = make_trainer(shapes_dir, tmp_path / "run", [
        f"model=hf:{hf}", f"data.tokenizer=hf:{hf}", f"checkpoint.init_from=hf:{hf}", "model.block=mot",
        "model.tower_split=role", "model.freeze_text_tower=true", "trainer.steps=2", "checkpoint.enabled=false",
        "optim.warmup_steps=0"])
    trainer.train()
    assert trainer.state.step == 2
    files = {}
    for f in hf.glob("*.safetensors"):
        files.update(load_file(str(f)))
    moved = 0
    for key, p in trainer.engine.module.named_parameters():
        if ".towers." not in key:
            continue
        want = files[init_source(key)[0]]
        if ".towers.0." in key:
            assert torch.equal(p, want), key
        else:
            moved += not torch.equal(p, want)
    assert moved > 0


@pytest.mark.parametrize("family", ("llama", "qwen2"))
def test_captions_decode_with_a_tokenizer_json(hf_dirs, family):
    """Greedy captions under ``data.tokenizer=hf:``: every non-special text id may be chosen,
    no special but EOS; the cached and the full-recomputation paths agree (they once failed on
    the byte tokenizer's ``num_bytes``)."""
    from mmgen.models.tokenizers import build_tokenizer, special_ids
    from mmgen.sampling.captions import _allowed_tokens, generate_captions
    from mmgen.sampling.config import SamplerConfig

    hf = hf_dirs[family][0]
    tok = build_tokenizer(f"hf:{hf}")
    allowed = _allowed_tokens(tok, tok.vocab_size + 8, "cpu")
    specials = special_ids(tok)
    assert allowed[tok.eos] and allowed.sum() == tok.vocab_size - len(specials) + 1
    assert not allowed[[i for n, i in specials.items() if n != "eos"]].any()
    assert not allowed[tok.vocab_size:].any()
    from mmgen.models import build_model

    job = _job(hf)
    torch.manual_seed(0)
    model = build_model(job.model)
    images = torch.rand(2, 3, job.data.image_size, job.data.image_size) * 2 - 1
    cached = generate_captions(model, tok, images, job.data.patch_size, SamplerConfig(max_caption_len=6), "cpu")
    full = generate_captions(model, tok, images, job.data.patch_size,
                             SamplerConfig(max_caption_len=6, use_cache=False), "cpu")
    assert len(cached) == 2 and all(isinstance(c, str) for c in cached)
    assert cached == full
