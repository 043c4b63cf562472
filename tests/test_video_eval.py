# Video: the moving-shapes scorer, the text->video / video->text samplers and `mmgen eval shapes --video`.
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmgen.batch import IMAGE, VIDEO
from mmgen.data import decode as dec
from mmgen.data.config import DataConfig, SourceConfig
from mmgen.data.pack import T2I, build_video_document
from mmgen.data.patches import to_unit
from mmgen.data.synthetic.shapes import COLORS
from mmgen.data.synthetic.shapes_video import (MotionSpec, encode_mp4, make_clip, make_video_splits,
                                               render_clip)
from mmgen.evaluation.held_out import HeldOutClips, held_out_clips_from_data
from mmgen.evaluation.shapes_video import (parse_motion_caption, read_clip, score_clips,
                                           score_motion_captions)
from mmgen.models import FLAVORS, build_model
from mmgen.models.codecs import PixelCodec
from mmgen.models.tokenizers.text import ByteTokenizer
from mmgen.objectives import OBJECTIVES
from mmgen.sampling import (CAPTION, SAMPLERS, TEXT_TO_VIDEO, VIDEO as READS_VIDEO, VIDEO_TO_TEXT,
                            SampleContext, SamplerConfig, build_batch, generate_captions,
                            generate_videos, get_sampler, text_to_video_doc, video_to_text_doc)
from mmgen.sampling.images import prompt_batch
from tests.conftest import BIN, run_cli

TOK = ByteTokenizer()
CFG = FLAVORS["debug"]                   # patch_dim 48: pixel patches of 4
CODEC = PixelCodec(4)


def _clips(n: int, frames: int = 4, size: int = 32, seed: int = 0):
    pairs = [make_clip(i, seed, size, frames) for i in range(n)]
    return [s for s, _ in pairs], [c for _, c in pairs]


# ---------------------------------------------------------------------------------------------
# the scorer
# ---------------------------------------------------------------------------------------------

def test_rendered_clips_score_one_on_every_attribute():
    specs, clips = _clips(40)
    scores = score_clips(clips, specs)
    assert all(scores[k] == 1.0 for k in ("color", "shape", "size", "start", "end", "direction",
                                           "all", "detected")), scores
    # 8 frames, and float tensors in [-1, 1] (what samplers return) read the same
    specs8, clips8 = _clips(10, frames=8)
    assert score_clips(clips8, specs8)["all"] == 1.0
    as_tensors = [torch.stack([to_unit(f) for f in c]) for c in clips8]
    assert score_clips(as_tensors, specs8)["all"] == 1.0


def test_clips_through_mp4_and_the_decoder_score_about_one():
    """H.264 / yuv420p blurs colour edges; the track and the votes must survive it."""
    specs, decoded = [], []
    for i in range(20):
        spec, frames = make_clip(i, 0, 32, 16)
        # 4 frames at 1.6 fps of a 2-s clip: frames 0, 5, 10, 15 (the preset's sampling)
        decoded.append(dec.decode_video(encode_mp4(frames, 8), 32, 4, 1.6)[0])
        specs.append(spec)
    scores = score_clips(decoded, specs)
    assert scores["color"] == 1.0 and scores["direction"] == 1.0, scores
    assert min(scores[k] for k in ("shape", "size", "start", "end")) >= 0.9, scores


def test_reversed_clips_lose_direction_and_cells_but_keep_appearance():
    specs, clips = _clips(40)
    scores = score_clips([c[::-1] for c in clips], specs)
    assert scores["direction"] == 0.0 and scores["start"] == 0.0 and scores["end"] == 0.0, scores
    assert scores["color"] == scores["shape"] == scores["size"] == 1.0, scores
    # read back: the reversed track runs from the end cell to the start cell
    spec = specs[0]
    got = read_clip(clips[0][::-1])
    assert (got["row0"], got["col0"], got["row1"], got["col1"]) == (spec.row1, spec.col1, spec.row0,
                                                                    spec.col0)


def test_recoloured_clips_lose_only_colour():
    specs, _ = _clips(30)
    other = {c: next(o for o in COLORS if o != c) for c in COLORS}
    recoloured = [render_clip(dataclasses.replace(s, color=other[s.color]), 4, 32) for s in specs]
    scores = score_clips(recoloured, specs)
    assert scores["color"] == 0.0 and scores["all"] == 0.0, scores
    assert all(scores[k] == 1.0 for k in ("shape", "size", "start", "end", "direction")), scores


def test_a_still_or_empty_clip_reads_no_motion():
    specs, clips = _clips(10)
    still = score_clips([np.stack([c[0]] * 4) for c in clips], specs)
    assert still["start"] == 1.0 and still["direction"] == 0.0 and still["end"] == 0.0, still
    assert read_clip(np.stack([clips[0][0]] * 4))["d_row"] == 0
    blank = np.zeros((4, 32, 32, 3), np.uint8) + np.asarray((20, 20, 24), np.uint8)
    got = read_clip(blank)
    assert got["detected"] == 0.0 and got["color"] is None and got["d_row"] is None
    assert score_clips([blank], specs[:1])["all"] == 0.0


def test_one_misread_frame_does_not_move_the_ends():
    """The start and end cells come from a fit of the centre track, not from one frame."""
    specs, clips = _clips(20, frames=6)
    broken = []
    for c in clips:
        c = c.copy()
        c[2] = c[2, ::-1, ::-1]              # one frame in the middle shows the shape elsewhere
        broken.append(c)
    scores = score_clips(broken, specs)
    assert scores["start"] >= 0.9 and scores["end"] >= 0.9 and scores["direction"] >= 0.9, scores


def test_motion_captions_parse_and_score():
    specs, _ = _clips(30)
    texts = [s.caption() for s in specs]
    assert score_motion_captions(texts, specs)["exact"] == 1.0
    assert all(score_motion_captions(texts, specs)[k] == 1.0 for k in ("all", "parsed", "direction"))
    s = MotionSpec("circle", "red", "large", 0, 0, 1, 1)
    assert s.caption() == "a large red circle moving from the top left to center"
    assert parse_motion_caption("  A Large red circle moving from top left to the center. ") == {
        "color": "red", "shape": "circle", "size": "large", "row0": 0, "col0": 0, "row1": 1,
        "col1": 1, "d_row": 1, "d_col": 1}
    assert parse_motion_caption("a large red circle at the top left") is None
    # the places swapped: appearance right, motion wrong
    swapped = [f"a {s.size} {s.color} {s.shape} moving from the {_name(s.row1, s.col1)} to the "
               f"{_name(s.row0, s.col0)}" for s in specs]
    scores = score_motion_captions(swapped, specs)
    assert scores["color"] == scores["shape"] == scores["parsed"] == 1.0
    assert scores["direction"] == scores["start"] == scores["end"] == scores["exact"] == 0.0
    assert score_motion_captions(["garbage"] * 3, specs[:3])["parsed"] == 0.0


def _name(row: int, col: int) -> str:
    from mmgen.data.synthetic.shapes import POSITIONS

    return POSITIONS[row][col]


# ---------------------------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------------------------

def _model():
    torch.manual_seed(0)
    model = build_model(CFG)
    torch.nn.init.normal_(model.visual_out.weight, std=0.1)   # non-trivial velocities
    return model.eval()


def test_video_samplers_are_registered_and_named_by_objectives():
    assert SAMPLERS["flow_t2v"].task == TEXT_TO_VIDEO and SAMPLERS["flow_t2v"].reads == CAPTION
    assert SAMPLERS["text_v2t"].task == VIDEO_TO_TEXT and SAMPLERS["text_v2t"].reads == READS_VIDEO
    assert SAMPLERS["ar_t2v"].task == TEXT_TO_VIDEO and SAMPLERS["ar_v2t"].reads == READS_VIDEO
    assert OBJECTIVES["transfusion"].video_samplers == ("flow_t2v", "text_v2t")
    for name, cls in OBJECTIVES.items():
        for sampler in getattr(cls, "video_samplers", ()):
            assert get_sampler(sampler).task in (TEXT_TO_VIDEO, VIDEO_TO_TEXT), (name, sampler)
        # the image samplers stay image samplers: the trainer's sample hook draws those
        assert all(get_sampler(s).task not in (TEXT_TO_VIDEO, VIDEO_TO_TEXT) for s in cls.samplers)


def test_sampler_prompts_are_the_data_pipelines_video_documents():
    """The samplers' clip documents are token for token the pipeline's (BOV / EOV, VIDEO)."""
    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    sample = dec.VideoSample("k", "s.tar", frames, "a clip", 4.0, 0.0, 0, {})
    rows, grid = CODEC.encode(torch.stack([to_unit(f) for f in frames]))
    for task, ours in ((T2I, text_to_video_doc(TOK, "a clip", rows, grid)),
                       ("i2t", video_to_text_doc(TOK, rows, grid, "a clip"))):
        theirs = build_video_document(sample, task, False, TOK, CODEC)
        a = build_batch([ours], TOK)
        assert a.tokens[0].tolist() == theirs.tokens.tolist()
        assert a.targets[0].tolist() == theirs.targets.tolist()
        assert a.spans.modality.tolist() == [VIDEO] and a.spans.grid.tolist() == [list(grid)]
    _, batch = prompt_batch(TOK, ["x"], (3, 2, 2), CFG.patch_dim, guided=True, device="cpu",
                            video=True)
    assert batch.tokens[0, :3].tolist() == [TOK.bos, ord("x"), TOK.bov]
    assert batch.tokens[1, :2].tolist() == [TOK.bos, TOK.bov]            # the null caption
    assert batch.spans.modality.tolist() == [VIDEO, VIDEO]
    _, image_batch = prompt_batch(TOK, ["x"], (1, 2, 2), CFG.patch_dim, guided=False, device="cpu")
    assert image_batch.tokens[0, 2] == TOK.boi and image_batch.spans.modality.tolist() == [IMAGE]


def test_text_to_video_sampler_returns_clips_of_the_contexts_frame_count():
    model = _model()
    for frames in (2, 3):
        ctx = SampleContext(TOK, 8, CODEC, SamplerConfig(steps=3, seed=5), frames=frames)
        assert ctx.grid_thw == (frames, 2, 2) and ctx.grid_hw == (2, 2)
        clips = get_sampler("flow_t2v")(model, ["a red circle", "b"], ctx)
        assert clips.shape == (2, frames, 3, 8, 8) and clips.min() >= -1 and clips.max() <= 1
        assert torch.equal(clips, get_sampler("flow_t2v")(model, ["a red circle", "b"], ctx))
        # frames differ: one ODE over the whole clip, not one frame copied
        assert not torch.equal(clips[:, 0], clips[:, 1])
    # the image sampler ignores frames: [n, 3, H, W] as before
    ctx = SampleContext(TOK, 8, CODEC, SamplerConfig(steps=3), frames=3)
    assert get_sampler("flow_t2i")(model, ["a"], ctx).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="frames"):
        SampleContext(TOK, 8, CODEC, frames=0)


def test_video_to_text_sampler_returns_strings_and_kv_cache_equals_full_recompute():
    model = _model()
    clips = torch.rand(3, 3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ctx = SampleContext(TOK, 8, CODEC, SamplerConfig(max_caption_len=10), frames=3)
    cached = get_sampler("text_v2t")(model, clips, ctx)
    assert len(cached) == 3 and all(isinstance(t, str) and len(t) <= 10 for t in cached)
    full = get_sampler("text_v2t")(model, clips, dataclasses.replace(
        ctx, cfg=SamplerConfig(max_caption_len=10, use_cache=False)))
    assert cached == full
    with pytest.raises(ValueError, match="clips"):
        get_sampler("text_v2t")(model, clips[:, 0], ctx)


def test_video_samplers_reproduce_a_memorised_clip():
    """Train the debug model on one clip in the data pipeline's two video documents; the video
    samplers must then give back its caption and its frames (their prompts match training's)."""
    from mmgen.documents import pack_documents
    from mmgen.objectives import ObjectiveConfig, build_objective, weighted_total

    torch.manual_seed(0)
    model = build_model(CFG)
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    frames[0, :4, :4] = (220, 40, 40)                 # a red block moving from top left
    frames[1, 4:, 4:] = (220, 40, 40)                 # to bottom right
    sample = dec.VideoSample("k", "s.tar", frames, "red tl br", 4.0, 0.0, 0, {})
    docs = [build_video_document(sample, "i2t", False, TOK, CODEC),
            build_video_document(sample, T2I, False, TOK, CODEC),
            build_video_document(sample, T2I, True, TOK, CODEC)]
    seq = max(len(d) for d in docs)
    batch = pack_documents([(i, 0, d) for i, d in enumerate(docs)], len(docs), seq, TOK.pad,
                           CFG.patch_dim)
    objective = build_objective(ObjectiveConfig(prediction="x"))
    counts, gen = objective.local_counts(batch), torch.Generator().manual_seed(0)
    steps = 150
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    for _ in range(steps):
        loss = weighted_total(objective(model, batch, counts, gen), {"text": 1.0, "visual": 1.0})
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    clip = torch.stack([to_unit(f) for f in frames])
    cfg = SamplerConfig(steps=10, guidance=2.0, prediction="x", max_caption_len=12)
    assert generate_captions(model, TOK, clip[None], CODEC, cfg, "cpu") == ["red tl br"]
    drawn = generate_videos(model, TOK, ["red tl br"], (2, 2, 2), CODEC, cfg, "cpu")[0]
    assert (drawn - clip).abs().mean() < 0.1


# ---------------------------------------------------------------------------------------------
# held-out clips and `mmgen eval shapes --video`
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes_video")
    make_video_splits(str(out), num_train=16, num_val=6, samples_per_shard=8, image_size=32,
                      num_frames=16, fps=8)
    return out


def _video_data(video_dir: Path, **kw) -> DataConfig:
    return DataConfig(name="clips", sources={"clips": SourceConfig(
        str(video_dir / "train"), str(video_dir / "val"), "video")}, patch_size=8,
        video_frames=4, video_fps=1.6, **kw)


def test_held_out_clips_read_the_video_sources_val_split(video_dir):
    held = held_out_clips_from_data(_video_data(video_dir))
    assert held.sources == (("clips", str(video_dir / "val")),) and held.frames == 4
    clips = held.read(4)
    assert len(clips) == 4 and clips[0].frames.shape == (4, 32, 32, 3)
    assert [c.key for c in held.read(4)] == [c.key for c in clips]          # fixed order
    # the frames read are the clip's start and end: the scorer reads its own motion back
    from mmgen.evaluation.shapes_video import motion_spec

    assert score_clips([c.frames for c in clips], [motion_spec(c.info) for c in clips])["all"] >= 0.75
    with pytest.raises(ValueError, match="no video source"):
        held_out_clips_from_data(DataConfig())
    with pytest.raises(FileNotFoundError):
        HeldOutClips((("x", str(video_dir / "nope")),), 32, 4, 1.6).check()


@pytest.fixture(scope="module")
def video_run(video_dir, tmp_path_factory) -> Path:
    """Two steps of a shrunken shapes_video_cpu preset: the preset composes and trains."""
    from mmgen.cli.preflight import compose_job
    from mmgen.trainer.run import run_training

    run = tmp_path_factory.mktemp("video") / "runs" / "tiny"
    job = compose_job(["experiment=shapes_video_cpu", "trainer.steps=2", "checkpoint.every=2",
                       "metrics.progress=false", "trainer.num_threads=1", "data.num_workers=0",
                       "data.batch_size=2", "model.dim=64", "model.n_layers=1", "model.n_heads=2",
                       "model.n_kv_heads=2", "model.ffn_dim=128",
                       f"data.sources.shapes_video.shards={video_dir}/train",
                       f"data.sources.shapes_video.val_shards={video_dir}/val", f"run_dir={run}"])
    run_training(job, argv=["test"])
    return run


def test_eval_shapes_video_writes_scores_and_grid(video_run, tmp_path):
    r = run_cli([str(BIN / "mmgen"), "eval", "shapes", str(video_run), "--video", "--num-samples", "3",
                 "--out", str(tmp_path / "ev"), "--set", "sampler.steps=2",
                 "--set", "sampler.max_caption_len=8"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    scores = json.loads((tmp_path / "ev" / "scores.json").read_text())
    assert scores["num_samples"] == 3 and scores["frames"] == 4
    assert scores["video"]["n"] == 3 and 0 <= scores["video"]["direction"] <= 1
    assert scores["caption"]["n"] == 3 and len(scores["examples"]) == 3
    assert "generated clips" in r.stdout and (tmp_path / "ev" / "grid.png").is_file()


def test_eval_shapes_video_on_image_shards_is_one_error_line(video_run, tmp_path):
    """--shards naming image shards: no clip to read, one error line (after the skip log)."""
    from mmgen.data.synthetic.shapes import make_splits

    make_splits(str(tmp_path / "img"), num_train=2, num_val=2, image_size=32, seed=0)
    r = run_cli([str(BIN / "mmgen"), "eval", "shapes", str(video_run), "--video", "--num-samples", "2",
                 "--shards", str(tmp_path / "img" / "val"), "--out", str(tmp_path / "ev")], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("mmgen: error: no usable held-out sample"), r.stderr[-2000:]
    assert "missing_video" in r.stderr


# ---------------------------------------------------------------------------------------------
# the same on VQ codes (objective=vq_ar): a per-frame VQ codec, samplers ar_t2v / ar_v2t
# ---------------------------------------------------------------------------------------------

from tests.test_vqar import K, codec, tiny_model, vq_file  # noqa: E402,F401  (fixtures)


def test_vq_video_samplers_draw_clips_and_captions_with_cache_equal_to_recompute(codec):  # noqa: F811
    from mmgen.sampling.ar import generate_codes

    model = tiny_model()
    cfg = SamplerConfig(guidance=2.0, top_k=8, max_caption_len=6)
    ctx = SampleContext(TOK, 32, codec, cfg, frames=2)
    clips = get_sampler("ar_t2v")(model, ["a red circle", "a blue square"], ctx)
    assert clips.shape == (2, 2, 3, 32, 32) and clips.abs().max() <= 1
    grid = codec.grid(32, 2)
    assert grid == (2, 8, 8)
    cached = generate_codes(model, TOK, ["a red circle"], grid, K, cfg, "cpu", video=True)
    full = generate_codes(model, TOK, ["a red circle"], grid, K,
                          dataclasses.replace(cfg, use_cache=False), "cpu", video=True)
    assert cached.shape == (1, 128) and torch.equal(cached, full)
    # BOV, not BOI, opens the clip: the image prompt draws other codes
    image_codes = generate_codes(model, TOK, ["a red circle"], grid, K, cfg, "cpu")
    assert not torch.equal(cached, image_codes)
    texts = get_sampler("ar_v2t")(model, clips, ctx)
    recomputed = get_sampler("ar_v2t")(model, clips, dataclasses.replace(
        ctx, cfg=dataclasses.replace(cfg, use_cache=False)))
    assert len(texts) == 2 and texts == recomputed


def test_vq_video_preset_trains_by_config_alone(video_dir, vq_file, tmp_path):  # noqa: F811
    """shapes_video_vqar_cpu, shrunk, with the tiny VQ codec: clips become per-frame codes and
    both losses are trained through the same trainer."""
    from mmgen.cli.preflight import compose_job
    from mmgen.trainer.run import run_training
    from tests.conftest import logged_records

    run = tmp_path / "run"
    job = compose_job(["experiment=shapes_video_vqar_cpu", f"data.codec=vq:{vq_file}",
                       f"model.vocab_size={TOK.vocab_size + K}", "trainer.steps=2", "checkpoint.every=2",
                       "metrics.progress=false", "trainer.num_threads=1", "data.num_workers=0",
                       "data.batch_size=2", "model.dim=64", "model.n_layers=1", "model.n_heads=2",
                       "model.n_kv_heads=2", "model.ffn_dim=128", "trainer.log_every=1",
                       f"data.sources.shapes_video.shards={video_dir}/train",
                       f"data.sources.shapes_video.val_shards={video_dir}/val", f"run_dir={run}"])
    assert job.model.patch_dim == 0 and job.data.video_tokens == 4 * 8 * 8
    run_training(job, argv=["test"])
    last = logged_records(run)[-1]
    assert last["step"] == 2 and last["loss/visual"] > 0 and last["loss/text"] > 0
