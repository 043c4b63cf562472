# Video clips and interleaved documents: decode (frame sampling, layouts) and pack (spans, masks).
from __future__ import annotations

import base64
import itertools
import json

import numpy as np
import pytest
import torch

from mmgen.data import DataConfig, build_dataloader
from mmgen.data import decode as dec
from mmgen.batch import IGNORE_INDEX, IMAGE, TEXT, VIDEO
from mmgen.data.config import SourceConfig
from mmgen.data.pack import T2I, build_interleaved_document, build_video_document
from mmgen.data.patches import grid_coords, patchify, to_unit
from mmgen.data.synthetic.shapes import encode_jpeg
from mmgen.data.synthetic.shapes_docs import write_document_shards
from mmgen.data.synthetic.shapes_video import encode_mp4, make_clip, write_video_shards
from mmgen.models.codecs import PixelCodec
from mmgen.models.tokenizers.text import ByteTokenizer
from tests.test_data_pipeline import timeout_fixture, write_shard

_deadline = timeout_fixture(120)
TOK = ByteTokenizer()
P = 4
CODEC = PixelCodec(P)


# ---------------------------------------------------------------------------------------------
# video decode: which frames are sampled
# ---------------------------------------------------------------------------------------------

def _mp4(num_frames=16, fps=8, size=32, index=3):
    spec, frames = make_clip(index, 0, size, num_frames)
    return spec, frames, encode_mp4(frames, fps)


def _close(a, b, tol=12.0):
    return float(np.abs(a.astype(float) - b.astype(float)).mean()) < tol


def test_video_frames_follow_fps_and_clip_start():
    spec, frames, data = _mp4()          # 16 frames at 8 fps: a 2-second clip
    out, start, held = dec.decode_video(data, 32, 16, 8.0, "start")
    assert out.shape == (16, 32, 32, 3) and start == 0.0 and held == 0
    assert all(_close(out[k], frames[k]) for k in range(16))
    # 4 frames at 2 fps from the start: source frames 0, 4, 8, 12
    out, _, _ = dec.decode_video(data, 32, 4, 2.0, "start")
    assert all(_close(out[k], frames[4 * k]) for k in range(4))
    # centre: a 0.5-s clip (4 frames at 8 fps) in a 2-s video starts at 0.75 s = frame 6
    out, start, _ = dec.decode_video(data, 32, 4, 8.0, "center")
    assert start == pytest.approx(0.75)
    assert all(_close(out[k], frames[6 + k]) for k in range(4))
    # random: a hash of (seed, key), the same every time, frames from that start
    a = dec.decode_video(data, 32, 4, 8.0, "random", seed=0, key="k1")
    b = dec.decode_video(data, 32, 4, 8.0, "random", seed=0, key="k1")
    assert a[1] == b[1] and 0 <= a[1] <= 1.5 and np.array_equal(a[0], b[0])
    first = int(np.floor(a[1] * 8 + 1e-6))
    assert all(_close(a[0][k], frames[first + k]) for k in range(4))
    assert len({dec.decode_video(data, 32, 4, 8.0, "random", 0, f"k{i}")[1]
                for i in range(8)}) > 4


def test_video_longer_than_the_file_holds_the_last_frame():
    _, frames, data = _mp4(num_frames=6)
    out, start, held = dec.decode_video(data, 16, 10, 8.0, "random", key="x")
    assert start == 0.0 and held == 4
    assert all(np.array_equal(out[k], out[5]) for k in range(5, 10))


def test_video_resize_and_crop_non_square():
    frames = np.stack([np.full((24, 48, 3), 40 * i, np.uint8) for i in range(4)])
    frames[:, :, :12] = 255                 # a white left quarter is cropped away
    out, _, _ = dec.decode_video(encode_mp4(frames, 4), 16, 4, 4.0, "start")
    assert out.shape == (4, 16, 16, 3)
    assert abs(float(out[3].mean()) - 120) < 12


def test_corrupt_and_missing_video_are_skip_reasons():
    _, _, data = _mp4()
    raw = {"__key__": "k", "mp4": data[: len(data) // 3], "txt": b"cut"}
    reason, detail = dec.decode_video_sample(raw, 16, 4, 4.0, "start", 0)
    assert reason == dec.CORRUPT_VIDEO and "mp4" in detail
    assert dec.decode_video_sample({"__key__": "k", "txt": b"x"}, 16, 4, 4.0, "start", 0)[0] \
        == dec.MISSING_VIDEO
    assert dec.decode_video_sample({"__key__": "k", "mp4": data}, 16, 4, 4.0, "start", 0)[0] \
        == dec.MISSING_CAPTION


# ---------------------------------------------------------------------------------------------
# video pack
# ---------------------------------------------------------------------------------------------

def _video_sample(key="v", caption="a clip", t=4, size=16):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8)
    return dec.VideoSample(key, "s.tar", frames, caption, 4.0, 0.25, 0, {})


def test_text_to_video_document_layout():
    s = _video_sample()
    doc = build_video_document(s, T2I, False, TOK, CODEC)
    n = 4 * 4 * 4                                   # t * gh * gw
    cap = list(b"a clip")
    assert doc.tokens.tolist() == [TOK.bos, *cap, TOK.bov, *[TOK.visual] * n, TOK.eov, TOK.eos]
    I = IGNORE_INDEX
    assert doc.targets.tolist() == [*cap, TOK.bov, I, *[I] * n, TOK.eos, I]
    start = 2 + len(cap)
    assert (doc.modality[start:start + n] == VIDEO).all()
    assert torch.equal(doc.coords[start:start + n], grid_coords(4, 4, 4))
    (span,) = doc.spans
    assert span.grid == (4, 4, 4) and span.is_target and span.modality == VIDEO
    assert torch.equal(span.payload, torch.cat([patchify(to_unit(f), P) for f in s.frames]))
    assert doc.meta["task"] == "t2v" and doc.meta["clip"] == {"fps": 4.0, "frames": 4,
                                                               "start": 0.25, "held": 0}


def test_video_to_text_document_layout():
    doc = build_video_document(_video_sample(), "i2t", False, TOK, CODEC)
    n, cap = 64, list(b"a clip")
    assert doc.tokens.tolist() == [TOK.bos, TOK.bov, *[TOK.visual] * n, TOK.eov, *cap, TOK.eos]
    I = IGNORE_INDEX
    assert doc.targets.tolist() == [I, I, *[I] * n, *cap, TOK.eos, I]
    assert not doc.spans[0].is_target and doc.meta["task"] == "v2t"


# ---------------------------------------------------------------------------------------------
# interleaved documents
# ---------------------------------------------------------------------------------------------

def _img(v, size=16):
    return np.full((size, size, 3), v, np.uint8)


def test_interleaved_layouts_obelics_and_mmc4():
    a, b = encode_jpeg(_img(50)), encode_jpeg(_img(200))
    obelics = {"__key__": "d", "json": json.dumps({
        "texts": ["Intro.", None, "Middle.", None, "End."],
        "images": [None, "0.jpg", None, "https://gone.example/x.jpg", None]}).encode(),
        "0.jpg": a}
    out = dec.decode_interleaved(obelics, 16, 8)
    kinds = ["img" if isinstance(s, np.ndarray) else s for s in out.segments]
    assert kinds == ["Intro.", "img", "Middle.", "End."] and out.images_dropped == 1
    # OpenFlamingo's MMC4 conversion: image_base64 stored as str(bytes), placed before its sentence
    mmc4 = {"__key__": "m", "json": json.dumps({
        "text_list": ["First.", "Second.", "Third."],
        "image_info": [{"image_name": "x.jpg", "matched_text_index": 1, "matched_sim": 0.3,
                        "image_base64": str(base64.b64encode(b))},
                       {"image_name": "y.jpg", "matched_text_index": 2, "matched_sim": 0.2}]
    }).encode()}
    out = dec.decode_interleaved(mmc4, 16, 8)
    kinds = ["img" if isinstance(s, np.ndarray) else s for s in out.segments]
    assert kinds == ["First.", "img", "Second.", "Third."] and out.images_dropped == 1
    assert abs(float(out.segments[1].mean()) - 200) < 3
    bad = dec.decode_interleaved({"__key__": "z", "json": b'{"texts": ["a"], "images": []}'}, 16, 8)
    assert bad[0] == dec.BAD_DOCUMENT and "differ in length" in bad[1]
    assert dec.decode_interleaved({"__key__": "z", "json": b'{"texts": [null], "images": '
                                   b'["9.jpg"]}'}, 16, 8)[0] == dec.EMPTY_DOCUMENT


def test_interleaved_document_tokens_targets_and_truncation():
    s = dec.InterleavedSample("doc", "s.tar", ["Hi", _img(10), "there", _img(20), "bye"])
    doc = build_interleaved_document(s, 0, 1.0, TOK, CODEC, seq_len=256)   # every image a target
    v = [TOK.visual] * 16
    assert doc.tokens.tolist() == [TOK.bos, *b"Hi", TOK.boi, *v, TOK.eoi, *b"there", TOK.boi,
                                   *v, TOK.eoi, *b"bye", TOK.eos]
    assert [sp.start for sp in doc.spans] == [4, 4 + 16 + 1 + 5 + 1]
    assert all(sp.is_target and sp.modality == IMAGE for sp in doc.spans)
    I = IGNORE_INDEX
    tg = doc.targets.tolist()
    assert tg[:4] == [ord("H"), ord("i"), TOK.boi, I]     # BOI of a target span is predicted
    cond = build_interleaved_document(s, 0, 0.0, TOK, CODEC, seq_len=256)   # every image a condition
    assert cond.targets.tolist()[2] == I               # ... of a condition span it is not
    assert not doc.meta["truncated"] and doc.meta["type"] == "interleaved"
    short = build_interleaved_document(s, 0, 1.0, TOK, CODEC, seq_len=30)
    assert len(short) <= 30 and short.meta["truncated"] and short.tokens[-1] == TOK.eos
    assert len(short.spans) == 1                      # the second image did not fit


@pytest.mark.parametrize("mode,want", [("last", [False, True]), ("all", [True, True]),
                                       ("none", [False, False])])
def test_interleaved_targets_by_config(mode, want):
    s = dec.InterleavedSample("doc", "s.tar", ["Hi", _img(10), "there", _img(20), "bye"])
    doc = build_interleaved_document(s, 0, 0.5, TOK, CODEC, seq_len=256, targets=mode)
    assert [sp.is_target for sp in doc.spans] == want
    # the text before a generated image predicts its BOI; before a condition nothing does
    boi = [sp.start - 1 for sp in doc.spans]
    assert [doc.targets[b - 1].item() == TOK.boi for b in boi] == want
    # "last" is the last image kept after the cut
    short = build_interleaved_document(s, 0, 0.5, TOK, CODEC, seq_len=30, targets="last")
    assert [sp.is_target for sp in short.spans] == [True]
    with pytest.raises(ValueError, match="interleaved targets"):
        build_interleaved_document(s, 0, 0.5, TOK, CODEC, seq_len=256, targets="first")


def test_interleaved_condition_and_target_mask_and_losses_match_brute_force():
    """A document of text, a condition image, text, a target image, text (``targets=last``),
    packed with a second document: the attention mask against the rule written out per (q, k),
    and the Transfusion losses against a per-position recomputation from the model's outputs."""
    from mmgen.data.pack import BatchPacker
    from mmgen.models import FLAVORS, build_model
    from mmgen.models.attention import build_dense_mask
    from mmgen.objectives.config import ObjectiveConfig
    from mmgen.objectives.flow import sample_flow
    from mmgen.objectives.transfusion import TransfusionObjective

    torch.manual_seed(0)
    s = dec.InterleavedSample("doc", "s.tar", ["A red", _img(60), "and then", _img(200), "done"])
    other = dec.InterleavedSample("doc2", "s.tar", ["x", _img(120), "y"])
    packer = BatchPacker(1, 96)
    for d in (build_interleaved_document(s, 0, 0.5, TOK, CODEC, seq_len=96, targets="last"),
              build_interleaved_document(other, 0, 0.5, TOK, CODEC, seq_len=96, targets="none")):
        assert packer.add(d)
    batch = packer.build(TOK.pad, CODEC.payload_dim)
    sp = batch.spans
    assert sp.is_target.tolist() == [False, True, False] and sp.row.tolist() == [0, 0, 0]

    # the mask, brute force: same document; key at or before the query, or both in one span
    doc, span = batch.document_ids[0].tolist(), batch.span_ids[0].tolist()
    L = len(doc)
    want = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            if doc[q] < 0:
                want[q, k] = q == k          # padding sees itself only
            elif doc[q] == doc[k]:
                want[q, k] = k <= q or (span[q] >= 0 and span[q] == span[k])
    assert torch.equal(build_dense_mask(batch)[0, 0], want)

    # the losses, brute force over positions, from the same forward
    model = build_model(FLAVORS["debug"])
    model.init_weights()
    torch.nn.init.normal_(model.visual_out.weight, std=0.05)   # a zero-initialised head would predict 0
    objective = TransfusionObjective(ObjectiveConfig())
    counts = objective.local_counts(batch)
    denominators = {k: v.clamp(min=1).float() for k, v in counts.items()}
    flow = sample_flow(batch, objective.cfg, torch.Generator().manual_seed(3))
    cont = batch.continuous_mask()[0]
    n_cond = int(sp.length[0])
    assert (flow.span_t[[0, 2]] == 0).all() and flow.span_t[1] > 0       # conditions stay clean
    assert torch.equal(flow.x_t[:n_cond], flow.x0[:n_cond])
    assert flow.is_loss.tolist() == [i in range(n_cond, n_cond + int(sp.length[1]))
                                     for i in range(int(cont.sum()))]
    losses = objective.losses(model, batch, flow, denominators)
    with torch.no_grad():
        everywhere = torch.ones_like(batch.targets, dtype=torch.bool)
        out = model(batch, flow.x_t, flow.span_t, heads={"lm": everywhere, "flow": batch.continuous_mask()})
    text_sum, text_n = 0.0, 0
    for i, t in enumerate(batch.targets[0].tolist()):
        if t != IGNORE_INDEX:
            text_sum += float(torch.nn.functional.cross_entropy(out["lm"][i], torch.tensor(t)))
            text_n += 1
    vis_sum, vis_n = 0.0, 0
    for row in range(int(cont.sum())):
        if flow.is_loss[row]:
            velocity = flow.noise[row] - flow.x0[row]
            vis_sum += float((out["flow"][row].float() - velocity).square().mean())
            vis_n += 1
    assert text_n == int(counts["text"]) and vis_n == int(counts["visual"]) == int(sp.length[1])
    assert float(losses["text"].detach()) == pytest.approx(text_sum / text_n, rel=1e-5)
    assert float(losses["visual"].detach()) == pytest.approx(vis_sum / vis_n, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# all three through the loader, checked against the batch contract
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    write_video_shards(str(root / "video"), 6, 3, image_size=16, num_frames=8, fps=8)
    write_document_shards(str(root / "docs"), 8, 4, image_size=16)
    (root / "pairs").mkdir()
    write_shard(root / "pairs" / "p.tar", [(f"p{i}", {"jpg": encode_jpeg(_img(30 * i)),
                                                      "txt": f"grey {i}".encode()})
                                           for i in range(6)])
    return root


def test_mixed_batches_keep_the_contract(mixed):
    cfg = DataConfig(name="m", image_size=16, patch_size=4, seq_len=256, batch_size=3,
                     num_workers=0, video_frames=4, video_fps=4.0,
                     sources={"pairs": SourceConfig(str(mixed / "pairs")),
                              "video": SourceConfig(str(mixed / "video"), type="video"),
                              "docs": SourceConfig(str(mixed / "docs"), type="interleaved")})
    seen = set()
    for batch in itertools.islice(iter(build_dataloader(cfg, TOK, 0, 1)), 12):
        sp = batch.spans
        for s in range(len(sp)):
            r, st, n = int(sp.row[s]), int(sp.start[s]), int(sp.length[s])
            assert n == int(sp.grid[s].prod())
            assert (batch.span_ids[r, st:st + n] == s).all()
            assert (batch.modality[r, st:st + n] == int(sp.modality[s])).all()
            assert torch.equal(batch.coords[r, st:st + n], grid_coords(*sp.grid[s].tolist()))
            expect_open = TOK.bov if int(sp.modality[s]) == VIDEO else TOK.boi
            assert batch.tokens[r, st - 1] == expect_open
            assert int(sp.grid[s][0]) == (4 if int(sp.modality[s]) == VIDEO else 1)
        visual = batch.span_ids >= 0
        assert torch.equal(visual, batch.modality != TEXT)
        assert batch.patches.shape == (int(visual.sum()), CODEC.payload_dim)
        assert torch.equal(batch.loss_masks["visual"], batch.target_visual_mask())
        valid = batch.targets != IGNORE_INDEX
        assert not (valid & visual).any()
        for t, c in zip(batch.meta["type"], batch.meta["clip"]):
            assert (c is not None) == (t == "video")
        seen.update(batch.meta["type"])
    assert seen == {"pair", "video", "interleaved"}


def test_corrupt_members_are_skipped_and_counted(tmp_path):
    """A cut mp4, a cut JPEG in a pair, an interleaved document without its .json: each is
    skipped, counted by reason, and the good samples still arrive."""
    _, _, good = _mp4(num_frames=8, size=16)
    write_shard(tmp_path / "v.tar", [("v0", {"mp4": good, "txt": b"ok"}),
                                     ("v1", {"mp4": good[:300], "txt": b"cut"}),
                                     ("v2", {"mp4": good, "txt": b"ok too"})])
    write_shard(tmp_path / "d.tar", [("d0", {"0.jpg": encode_jpeg(_img(9))}),
                                     ("d1", {"json": json.dumps({"texts": ["x", None],
                                                                 "images": [None, "0.jpg"]}).encode(),
                                             "0.jpg": encode_jpeg(_img(9))[:100]})])
    cfg = DataConfig(name="c", image_size=16, patch_size=4, seq_len=512, batch_size=1,
                     num_workers=0, video_frames=4, video_fps=4.0,
                     sources={"v": SourceConfig(str(tmp_path / "v.tar"), type="video"),
                              "d": SourceConfig(str(tmp_path / "d.tar"), type="interleaved")})
    loader = build_dataloader(cfg, TOK, 0, 1)
    keys = [k for b in itertools.islice(iter(loader), 12) for k in b.meta["key"]]
    assert {"v0", "v2", "d1"} <= set(keys) and not {"v1", "d0"} & set(keys)
    st = loader.stats()
    assert st["skipped"]["corrupt_video"] >= 1 and st["skipped"]["bad_document"] >= 1
    assert st["source/d/images_dropped"] >= 1            # d1's cut image was dropped, not d1
