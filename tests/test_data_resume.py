# Exact resume with 2 ranks x 2 workers over mixed sources, and re-splitting onto new layouts.
from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest
import torch

from mmgen.data import DataConfig, build_dataloader
from mmgen.data.config import SourceConfig
from mmgen.data.synthetic.shapes_docs import write_document_shards
from mmgen.data.synthetic.shapes_video import write_video_shards
from mmgen.models.tokenizers.text import ByteTokenizer
from tests.test_data_pipeline import make_sample, timeout_fixture, write_shard

_deadline = timeout_fixture(150)
TOK = ByteTokenizer()
PAIR_SHARDS = (8, 12, 15, 10, 15)          # uneven on purpose


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    (root / "pairs").mkdir()
    for s, n in enumerate(PAIR_SHARDS):
        write_shard(root / "pairs" / f"p-{s:03d}.tar",
                    [make_sample(f"p{s}x{i:03d}", i) for i in range(n)])
    write_document_shards(str(root / "docs"), 30, 10, image_size=16)      # 3 shards < 4 readers
    write_video_shards(str(root / "video"), 12, 4, image_size=16, num_frames=8, fps=8)
    return root


def mix_cfg(root, video=True, **kw) -> DataConfig:
    srcs = {"pairs": SourceConfig(str(root / "pairs")),
            "docs": SourceConfig(str(root / "docs"), type="interleaved")}
    weights = {"pairs": 0.5, "docs": 0.3}
    if video:
        srcs["video"] = SourceConfig(str(root / "video"), type="video")
        weights["video"] = 0.2
    base = dict(name="mix", sources=srcs, weights=weights, image_size=16, patch_size=4,
                seq_len=256, batch_size=2, num_workers=2, video_frames=4, video_fps=4.0,
                video_clip_start="random")
    base.update(kw)
    return DataConfig(**base)


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def same(a, b) -> None:
    assert [x.meta["key"] for x in a] == [y.meta["key"] for y in b]
    for x, y in zip(a, b):
        for name in ("tokens", "targets", "modality", "document_ids", "span_ids", "coords",
                     "patches"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert torch.equal(x.spans.grid, y.spans.grid)
        assert x.meta["clip"] == y.meta["clip"]


def test_exact_resume_two_ranks_two_workers(sources):
    """Interrupted + resumed == uninterrupted, per rank, across epochs, with the mixing
    generator, video clip starts and interleaved documents; the state survives JSON."""
    cfg = mix_cfg(sources)
    n, m = 5, 6
    for rank in range(2):
        reference = take(build_dataloader(cfg, TOK, rank, 2), n + m)
        first = build_dataloader(cfg, TOK, rank, 2)
        same(take(first, n), reference[:n])
        state = json.loads(json.dumps(first.state_dict()))
        assert state["workers"][0]["mix"]["bit_generator"] == "PCG64"
        resumed = build_dataloader(cfg, TOK, rank, 2)
        resumed.load_state_dict(state)
        same(take(resumed, m), reference[n:])
        assert {t for b in reference for t in b.meta["type"]} == {"pair", "interleaved", "video"}
        assert resumed.stats()["epoch"] >= 1      # crossed an epoch boundary somewhere
        assert resumed.stats()["batches"] == n + m


def _consumed(batches) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    for b in batches:
        for src, key, epoch in zip(b.meta["source"], b.meta["key"], b.meta["epoch"]):
            out.setdefault(src, Counter())[(key, epoch)] += 1
    return out


def _all_keys(root) -> dict[str, set]:
    from mmgen.data.sources import ShardFile, expand_shards

    return {name: {s.key for p in expand_shards(str(root / name)) for s in ShardFile(p).samples}
            for name in ("pairs", "docs")}


@pytest.mark.parametrize("new_ws,new_workers", [(3, 0), (1, 2)])
def test_resplit_onto_a_new_layout_loses_and_repeats_nothing(sources, new_ws, new_workers):
    """2 ranks x 2 workers run 6 steps, then resume on another layout: the old and new runs
    together read every sample of the epochs begun before the change exactly once."""
    cfg = mix_cfg(sources, video=False)
    old_batches, states = [], []
    for rank in range(2):
        loader = build_dataloader(cfg, TOK, rank, 2)
        old_batches += take(loader, 6)
        states.append(json.loads(json.dumps(loader.state_dict())))
    new_cfg = mix_cfg(sources, video=False, num_workers=new_workers)
    new = [build_dataloader(new_cfg, TOK, r, new_ws) for r in range(new_ws)]
    for loader in new:
        loader.load_state_dict({"ranks": states})
    next_epoch = {}
    for name in ("pairs", "docs"):
        eps = set()
        for loader in new:
            for w in loader.state_dict()["workers"]:
                st = w["sources"][name]
                eps.add(st["plan"]["next_epoch"] if st["plan"] else st["cursor"]["epoch"])
        (next_epoch[name],) = eps                    # one frontier for every new reader
    assert max(next_epoch.values()) >= 2             # the old run had crossed an epoch
    # run the new readers until every one of them has moved past its plan in every source
    new_batches = []
    for loader in new:
        it = iter(loader)
        done: set = set()
        readers = max(1, new_workers)
        for _ in range(400):
            b = next(it)
            new_batches.append(b)
            w = b.meta["data_state"]["worker"]
            for src, ep in zip(b.meta["source"], b.meta["epoch"]):
                if ep >= next_epoch[src]:
                    done.add((w, src))
            if len(done) == 2 * readers:
                break
        assert len(done) == 2 * readers, "a new reader never finished its plan"
        assert loader.stats()["batches"] > 6          # continues the old step count
    old, fresh = _consumed(old_batches), _consumed(new_batches)
    for name, keys in _all_keys(sources).items():
        together = old[name] + Counter({k: v for k, v in fresh[name].items()
                                        if k[1] < next_epoch[name]})
        expected = Counter({(k, e): 1 for k in keys for e in range(next_epoch[name])})
        assert together == expected, name
        assert not (set(fresh[name]) & set(old[name]))   # nothing read twice


def test_resplit_refusals(sources):
    cfg = mix_cfg(sources, video=False, num_workers=0)
    states = []
    for rank in range(2):
        loader = build_dataloader(cfg, TOK, rank, 2)
        take(loader, 2 + rank)                      # rank 1 is one step ahead
        states.append(loader.state_dict())
    one = build_dataloader(cfg, TOK, 0, 3)
    with pytest.raises(ValueError, match="needs every old rank's state"):
        one.load_state_dict(states[0])
    with pytest.raises(ValueError, match="need the states of all 2 old ranks"):
        one.load_state_dict({"ranks": states[:1]})
    with pytest.raises(ValueError, match="disagree on batches"):
        one.load_state_dict({"ranks": states})
    other_seed = build_dataloader(mix_cfg(sources, video=False, num_workers=0, seed=1), TOK, 0, 2)
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(states[0])


def test_resume_accepts_a_weight_change_and_a_version_1_state(shard_dir_v1):
    """New weights continue from the saved cursors; a state written before mixing existed
    (version 1) still resumes a single-source run exactly."""
    cfg = DataConfig(train_shards=str(shard_dir_v1), batch_size=2, seq_len=256, num_workers=0)
    reference = take(build_dataloader(cfg, TOK, 0, 1), 7)
    loader = build_dataloader(cfg, TOK, 0, 1)
    take(loader, 4)
    v2 = loader.state_dict()
    w = v2["workers"][0]["sources"]["shapes"]
    v1 = {k: v2[k] for k in ("split", "rank", "world_size", "num_workers", "seed", "batches",
                            "totals")}
    v1.update(version=1, num_shards=v2["sources"]["shapes"]["num_shards"],
              shards_fingerprint=v2["sources"]["shapes"]["shards_fingerprint"],
              workers=[{"cursor": w["cursor"], "counters": w["counters"]}])
    resumed = build_dataloader(cfg, TOK, 0, 1)
    resumed.load_state_dict(v1)
    same(take(resumed, 3), reference[4:])


@pytest.fixture(scope="module")
def shard_dir_v1(tmp_path_factory):
    root = tmp_path_factory.mktemp("v1")
    for s in range(3):
        write_shard(root / f"s-{s}.tar", [make_sample(f"{s}k{i:02d}", i) for i in range(10)])
    return root
