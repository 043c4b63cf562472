# The shard -> packed-batch loader on tiny on-the-fly tars: order, resume, rank split, bad samples.
from __future__ import annotations

import io
import itertools
import json
import logging
import signal
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mmgen.data import DataConfig, build_dataloader, iter_eval_samples
from mmgen.data.sources import expand_shards
from mmgen.models.tokenizers.text import ByteTokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
NUM_SHARDS, PER_SHARD = 5, 40


def timeout_fixture(seconds: int):
    """An autouse fixture failing a test that runs longer than ``seconds`` (SIGALRM; the alarm
    is not inherited by DataLoader worker processes). Assign it to a module-level name."""
    @pytest.fixture(autouse=True)
    def _deadline():
        def expire(*_):
            raise TimeoutError(f"test exceeded its {seconds} s limit")
        previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(seconds)
        yield
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return _deadline


_deadline = timeout_fixture(120)


def _jpeg(colour, size=32) -> bytes:
    img = np.zeros((size, size, 3), np.uint8)
    img[8:24, 8:24] = colour
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path, samples) -> None:
    """samples: list of (key, {ext: bytes}); members of a sample stay contiguous."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                _add(tar, f"{key}.{ext}", data)


def make_sample(key: str, i: int) -> tuple[str, dict]:
    name = list(COLOURS)[i % 3]
    caption = f"a {name} square number {i}"
    return key, {"jpg": _jpeg(COLOURS[name]), "txt": caption.encode(),
                 "json": json.dumps({"caption": caption, "index": i}).encode()}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    for s in range(NUM_SHARDS):
        write_shard(root / f"shapes-{s:06d}.tar",
                    [make_sample(f"{s:04d}{i:04d}", s * PER_SHARD + i) for i in range(PER_SHARD)])
    return root


def cfg_for(root, **kw) -> DataConfig:
    base = dict(train_shards=str(root), val_shards=str(root), batch_size=4, seq_len=256,
                num_workers=0)
    base.update(kw)
    return DataConfig(**base)


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.meta["key"] == y.meta["key"]
        for name in ("tokens", "targets", "positions", "modality", "document_ids", "span_ids",
                     "coords", "patches"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert torch.equal(x.spans.start, y.spans.start)
        assert torch.equal(x.spans.is_target, y.spans.is_target)


# ---------------------------------------------------------------------------------------------
# shard patterns and config
# ---------------------------------------------------------------------------------------------

def test_shard_patterns(shard_dir):
    by_dir = expand_shards(str(shard_dir))
    assert len(by_dir) == NUM_SHARDS and by_dir == sorted(by_dir)
    assert expand_shards(str(shard_dir / "*.tar")) == by_dir
    assert expand_shards(str(shard_dir / "shapes-{000000..000004}.tar")) == by_dir
    assert expand_shards(f"{shard_dir}/shapes-000000.tar::{shard_dir}/shapes-000001.tar") \
        == by_dir[:2]


def test_pattern_matching_nothing_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        build_dataloader(cfg_for(tmp_path / "nothing-here"), ByteTokenizer(), 0, 1)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        expand_shards(str(tmp_path / "x-{000..002}.tar"))


def test_config_validation():
    with pytest.raises(ValueError, match="not divisible"):
        DataConfig(image_size=30, patch_size=4).validate()
    with pytest.raises(ValueError, match="seq_len"):
        DataConfig(image_size=64, patch_size=4, seq_len=200).validate()
    with pytest.raises(ValueError, match="t2i_ratio"):
        DataConfig(t2i_ratio=1.5).validate()
    DataConfig().validate()


def test_fewer_shards_than_readers_split_samples(shard_dir):
    """5 shards for 6 readers (6 ranks, in-process workers): readers share shards sample by
    sample, and one epoch of all readers is still every sample exactly once."""
    from mmgen.data.sources import epoch_items

    tok = ByteTokenizer()
    names = sorted(f"shapes-{s:06d}.tar" for s in range(NUM_SHARDS))
    seen = []
    for rank in range(6):
        # one document per batch (two never fit in 128 positions): batches = documents, in order
        loader = build_dataloader(cfg_for(shard_dir, batch_size=1, seq_len=128), tok, rank, 6)
        (shard, slot, stride), = epoch_items(names, 0, 0, rank, 6)
        n = len(range(slot, PER_SHARD, stride))     # this reader's share of epoch 0
        keys = [b.meta["key"][0] for b in take(loader, n + 1)]
        assert {k[:4] for k in keys[:n]} == {f"{shard:04d}"}   # all from its one shard
        assert loader.stats()["epoch"] == 1                     # the next one starts epoch 1
        seen += keys[:n]
    assert sorted(seen) == sorted(f"{s:04d}{i:04d}" for s in range(NUM_SHARDS)
                                  for i in range(PER_SHARD))


# ---------------------------------------------------------------------------------------------
# order, determinism, ranks
# ---------------------------------------------------------------------------------------------

def test_deterministic_and_seeded(shard_dir):
    tok = ByteTokenizer()
    a = take(build_dataloader(cfg_for(shard_dir), tok, 0, 1), 6)
    b = take(build_dataloader(cfg_for(shard_dir), tok, 0, 1), 6)
    assert_same_batches(a, b)
    c = take(build_dataloader(cfg_for(shard_dir, seed=1), tok, 0, 1), 6)
    assert [x.meta["key"] for x in a] != [x.meta["key"] for x in c]


def test_one_epoch_sees_every_sample_once(shard_dir):
    loader = build_dataloader(cfg_for(shard_dir), ByteTokenizer(), 0, 1)
    keys = []
    for batch in loader:
        keys += batch.meta["key"]
        if len(keys) >= NUM_SHARDS * PER_SHARD:
            break
    first_epoch = keys[:NUM_SHARDS * PER_SHARD]
    assert len(set(first_epoch)) == NUM_SHARDS * PER_SHARD
    assert loader.state_dict()["workers"][0]["sources"]["shapes"]["cursor"]["epoch"] == 1


def test_two_ranks_read_disjoint_shards(shard_dir):
    tok = ByteTokenizer()
    seen = []
    for rank in range(2):
        loader = build_dataloader(cfg_for(shard_dir), tok, rank, 2)
        shards = set()
        for batch in take(loader, 8):   # 8 batches x 8 docs < one epoch of either rank
            shards.update(batch.meta["shard"])
        seen.append(shards)
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_task_choice_is_a_function_of_the_key(shard_dir):
    tok = ByteTokenizer()
    a = take(build_dataloader(cfg_for(shard_dir), tok, 0, 1), 30)       # > 1 epoch
    task = {}
    for batch in a:
        for k, t, d in zip(batch.meta["key"], batch.meta["task"], batch.meta["caption_dropped"]):
            assert task.setdefault(k, (t, d)) == (t, d)   # same in both epochs
    tasks = [t for t, _ in task.values()]
    assert 0.3 < tasks.count("t2i") / len(tasks) < 0.7


# ---------------------------------------------------------------------------------------------
# exact resume
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_workers,n,m", [(0, 7, 25), (2, 7, 24), (2, 18, 9)])
def test_exact_resume(shard_dir, num_workers, n, m):
    tok = ByteTokenizer()
    cfg = cfg_for(shard_dir, num_workers=num_workers)
    reference = take(build_dataloader(cfg, tok, 0, 1), n + m)

    first = build_dataloader(cfg, tok, 0, 1)
    assert_same_batches(take(first, n), reference[:n])
    state = json.loads(json.dumps(first.state_dict()))    # must survive a JSON round trip
    assert state["batches"] == n

    resumed = build_dataloader(cfg, tok, 0, 1)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, m), reference[n:])
    epochs = [w["sources"]["shapes"]["cursor"]["epoch"] for w in resumed.state_dict()["workers"]]
    assert max(epochs) >= 1    # the runs crossed an epoch boundary


def test_resume_refuses_a_different_split(shard_dir):
    tok = ByteTokenizer()
    loader = build_dataloader(cfg_for(shard_dir), tok, 0, 1)
    take(loader, 2)
    other = build_dataloader(cfg_for(shard_dir), tok, 0, 2)
    with pytest.raises(ValueError, match="world_size"):
        other.load_state_dict(loader.state_dict())


def test_iterating_again_continues(shard_dir):
    tok = ByteTokenizer()
    reference = take(build_dataloader(cfg_for(shard_dir), tok, 0, 1), 6)
    loader = build_dataloader(cfg_for(shard_dir), tok, 0, 1)
    assert_same_batches(take(loader, 2) + take(loader, 4), reference)


# ---------------------------------------------------------------------------------------------
# bad samples
# ---------------------------------------------------------------------------------------------

@pytest.fixture()
def dirty_dir(tmp_path):
    good = [make_sample(f"g{i:03d}", i) for i in range(12)]
    bad_jpeg = ("bad_jpeg", {"jpg": _jpeg(COLOURS["red"])[:200], "txt": b"a truncated image"})
    no_image = ("no_image", {"txt": b"a caption without an image"})
    no_caption = ("no_caption", {"jpg": _jpeg(COLOURS["blue"])})
    write_shard(tmp_path / "d-000.tar", good[:4] + [bad_jpeg] + good[4:8])
    write_shard(tmp_path / "d-001.tar", [no_image] + good[8:] + [no_caption])
    return tmp_path


def test_bad_samples_are_skipped_counted_and_logged(dirty_dir, caplog):
    loader = build_dataloader(cfg_for(dirty_dir, batch_size=2), ByteTokenizer(), 0, 1)
    with caplog.at_level(logging.WARNING, logger="mmgen.data.decode"):
        keys = [k for b in take(loader, 8) for k in b.meta["key"]]
    assert {k for k in keys} == {f"g{i:03d}" for i in range(12)}
    stats = loader.stats()
    assert stats["skipped"]["corrupt_image"] >= 1
    assert stats["skipped"]["missing_image"] >= 1
    assert stats["skipped"]["missing_caption"] >= 1
    assert stats["samples_read"] > stats["skipped_total"] > 0
    assert 0.0 < stats["padding_fraction"] < 1.0
    text = caplog.text
    for key, reason in (("bad_jpeg", "corrupt_image"), ("no_image", "missing_image"),
                        ("no_caption", "missing_caption")):
        assert f"key={key}" in text and reason in text
    assert "d-00" in text   # the shard is named


def test_truncated_tar_keeps_the_samples_before_the_damage(tmp_path, caplog):
    write_shard(tmp_path / "t-000.tar", [make_sample(f"k{i:03d}", i) for i in range(10)])
    data = (tmp_path / "t-000.tar").read_bytes()
    (tmp_path / "t-000.tar").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        out = list(iter_eval_samples(str(tmp_path), 32))
    assert 2 <= len(out) < 10
    assert "shard_error" in caplog.text


# ---------------------------------------------------------------------------------------------
# evaluation samples
# ---------------------------------------------------------------------------------------------

def test_iter_eval_samples(shard_dir):
    out = list(iter_eval_samples(str(shard_dir), 16, limit=5))
    assert len(out) == 5
    key, image, caption, info = out[0]
    assert key == "00000000" and image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert caption == info["caption"] and info["index"] == 0
