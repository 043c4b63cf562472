# Sampler and evaluation registries, held-out data resolved from data.sources, and the sample hook.
from __future__ import annotations

import json

import pytest
import torch

from mmgen.models.codecs import build_codec
from mmgen.cli.preflight import compose_job
from mmgen.errors import ConfigError
from mmgen.data.synthetic.shapes import iter_shard, make_splits
from mmgen.evaluation import EvalConfig, HeldOut, get_evaluation, held_out_from_data
from mmgen.models import FLAVORS, build_model
from mmgen.models.tokenizers.text import ByteTokenizer
from mmgen.objectives import OBJECTIVES
from mmgen.sampling import (CAPTION, IMAGE, SAMPLERS, SampleContext, SamplerConfig,
                            sampler_reading)
from mmgen.trainer.hooks import build_hooks


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Two small shapes datasets with different seeds (so different captions)."""
    root = tmp_path_factory.mktemp("two_sources")
    for name, seed in (("a", 10), ("b", 20)):
        make_splits(str(root / name), num_train=40, num_val=8, samples_per_shard=20, seed=seed)
    return root


def _val(root, name):
    return [(s["key"], s["caption"]) for p in sorted((root / name / "val").glob("*.tar"))
            for s in iter_shard(str(p))]


def test_every_objective_names_registered_samplers():
    for name, cls in OBJECTIVES.items():
        assert cls.samplers and set(cls.samplers) <= set(SAMPLERS), name
    both = OBJECTIVES["transfusion"].samplers
    assert SAMPLERS[sampler_reading(both, CAPTION)].task == "text_to_image"
    assert SAMPLERS[sampler_reading(both, IMAGE)].task == "image_to_text"
    # next_token trains no visual output: asking it to draw images is a clear error
    with pytest.raises(ValueError, match="objective=next_token has no sampler that reads captions"):
        sampler_reading(OBJECTIVES["next_token"].samplers, CAPTION, "objective=next_token")
    with pytest.raises(ValueError, match="unknown evaluation 'video'"):
        get_evaluation("video")


def test_held_out_comes_from_the_pair_sources_val_shards():
    single = held_out_from_data(compose_job([]).data)
    assert single.sources == (("shapes", "data/shapes/val"),)
    # mix_v1 declares no val_shards: its pair sources' training shards, never mmc4/webvid
    mix = compose_job(["data=mix_v1"]).data
    assert held_out_from_data(mix).sources == (("coyo", "data/coyo700m"), ("laion", "data/relaion2b_en"))
    mix.sources["coyo"].val_shards = "data/coyo_val"
    assert held_out_from_data(mix).sources == (("coyo", "data/coyo_val"),)
    # shapes_mix: only the pair source, and not once its weight is 0
    shapes_mix = compose_job(["data=shapes_mix"]).data
    assert held_out_from_data(shapes_mix).sources == (("shapes", "data/shapes/val"),)
    shapes_mix.weights["shapes"] = 0.0
    with pytest.raises(ValueError, match="no pair source with a positive weight"):
        held_out_from_data(shapes_mix)


def test_hooks_reject_what_they_cannot_serve_before_training(tmp_path):
    with pytest.raises(ConfigError, match="no pair source"):
        build_hooks(compose_job(["data=shapes_mix", "data.weights.shapes=0", "trainer.sample_every=5"]),
                    ByteTokenizer())
    with pytest.raises(FileNotFoundError, match="matches no shard"):
        build_hooks(compose_job([f"data.val_shards={tmp_path}/none", "trainer.eval_at_end=true"]),
                    ByteTokenizer())
    with pytest.raises(ConfigError, match="trainer.eval_task='video' is not a registered evaluation"):
        compose_job(["trainer.eval_at_end=true", "trainer.eval_task=video"])
    # neither samples nor eval: nothing is resolved, so a video-only mixture trains
    build_hooks(compose_job(["data=shapes_mix", "data.weights.shapes=0"]), ByteTokenizer())


def test_run_with_two_sources_samples_their_val_shards(two_sources, tmp_path):
    """A training run on sources a and b, with only a at data.train_shards / data.val_shards:
    its periodic samples read a's and b's val shards in turn."""
    from mmgen.trainer.run import run_training

    a, b = two_sources / "a", two_sources / "b"
    run = tmp_path / "runs" / "mix"
    sources = (f"{{a:{{shards:{a}/train,val_shards:{a}/val}},"
               f"b:{{shards:{b}/train,val_shards:{b}/val}}}}")
    job = compose_job(["experiment=smoke", "trainer.steps=2", "trainer.sample_every=2",
                       "trainer.num_samples=4", "sampler.steps=2", "sampler.max_caption_len=4",
                       "checkpoint.enabled=false", "metrics.progress=false", "trainer.num_threads=1",
                       f"data.train_shards={a}/train", f"data.val_shards={a}/val",
                       f"+data.sources={sources}", f"run_dir={run}"])
    run_training(job, argv=["test"])
    rec = json.loads((run / "samples" / "step_0000002.json").read_text())
    got = [(s["source"], s["key"], s["caption"]) for s in rec["samples"]]
    va, vb = _val(two_sources, "a"), _val(two_sources, "b")
    assert got == [("a", *va[0]), ("b", *vb[0]), ("a", *va[1]), ("b", *vb[1])]
    # not what data.val_shards alone (v1's _held_out) would have given
    assert [g[1:] for g in got] != va[:4]
    assert rec["samplers"] == ["flow_t2i", "text"]
    assert all(isinstance(s["image_to_text"], str) for s in rec["samples"])
    assert (run / "samples" / "step_0000002.png").is_file()
    assert (run / "samples" / "step_0000002_image_to_text.png").is_file()


def test_shapes_eval_scores_only_what_the_samplers_draw(two_sources, tmp_path):
    torch.manual_seed(0)
    model = build_model(FLAVORS["debug"])
    ctx = SampleContext(ByteTokenizer(), image_size=32, codec=build_codec("pixels", 4),
                        cfg=SamplerConfig(steps=2, max_caption_len=4))
    held_out = HeldOut((("b", str(two_sources / "b" / "val")),), 32)
    shapes = get_evaluation("shapes")
    report = shapes.run(model, ctx, held_out, EvalConfig(num_samples=3, samplers=("text",)), tmp_path)
    assert report["num_samples"] == 3 and "image" not in report and report["caption"]["n"] == 3
    assert [e["prompt"] for e in report["examples"]] == [c for _, c in _val(two_sources, "b")[:3]]
    assert json.loads((tmp_path / "scores.json").read_text()) == report
    assert (tmp_path / "grid.png").is_file()
