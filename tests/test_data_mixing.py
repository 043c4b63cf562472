# Weighted sample-level mixing: proportions, its own generator, per-source counters, config surface.
from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from mmgen.data import DataConfig, build_dataloader
from mmgen.data.config import SourceConfig
from mmgen.data.mixing import Mixer
from mmgen.models.tokenizers.text import ByteTokenizer
from tests.test_data_pipeline import make_sample, timeout_fixture, write_shard

_deadline = timeout_fixture(120)
WEIGHTS = {"a": 0.6, "b": 0.3, "c": 0.1}


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("three")
    for name in WEIGHTS:
        (root / name).mkdir()
        for s in range(2):
            write_shard(root / name / f"{name}-{s}.tar",
                        [make_sample(f"{name}{s}{i:03d}", i) for i in range(40)])
    return root


def cfg3(root, **kw) -> DataConfig:
    base = dict(name="three", sources={n: SourceConfig(str(root / n)) for n in WEIGHTS},
                weights=dict(WEIGHTS), image_size=8, patch_size=4, seq_len=64, batch_size=8,
                num_workers=0)
    base.update(kw)
    return DataConfig(**base)


def test_mixing_proportions_within_four_sigma(three_sources):
    """Each source's share of ~2,400 documents is within 4 binomial standard deviations of its
    weight (the stated tolerance: sqrt(w (1 - w) / n) per source)."""
    loader = build_dataloader(cfg3(three_sources), ByteTokenizer(), 0, 1)
    docs = []
    for batch in loader:
        docs += batch.meta["source"]
        if len(docs) >= 2400:
            break
    n = len(docs)
    stats = loader.stats()
    for name, w in WEIGHTS.items():
        share = docs.count(name) / n
        assert abs(share - w) < 4 * math.sqrt(w * (1 - w) / n), (name, share)
        assert stats[f"source/{name}/documents"] == docs.count(name)
        assert stats[f"source/{name}/share"] == pytest.approx(share)
        assert stats[f"source/{name}/samples_read"] >= docs.count(name)
    assert stats["documents"] == n and stats["samples_read"] >= n
    for key in ("samples_read", "skipped", "skipped_total", "padding_fraction", "epoch"):
        assert key in stats


def test_mixing_uses_its_own_generator(three_sources):
    """Same seed -> same source sequence; another seed -> another; Python's and NumPy's global
    generators are neither used nor disturbed."""
    def sources(seed):
        loader = build_dataloader(cfg3(three_sources, seed=seed), ByteTokenizer(), 0, 1)
        return [s for b in itertools.islice(iter(loader), 20) for s in b.meta["source"]]

    random.seed(123)
    np.random.seed(123)
    py_state, np_state = random.getstate(), np.random.get_state()[1].copy()
    a = sources(0)
    assert random.getstate() == py_state and (np.random.get_state()[1] == np_state).all()
    random.seed(999)          # a different global state changes nothing
    assert sources(0) == a
    assert sources(1) != a


def test_mixer_state_round_trip():
    m = Mixer(WEIGHTS, (0, 0, 1, 0, 0))
    [m.choose() for _ in range(17)]
    state = m.state()
    ahead = [m.choose() for _ in range(50)]
    again = Mixer(WEIGHTS, (5, 5, 5, 5, 5), state)   # the state wins over the seed
    assert [again.choose() for _ in range(50)] == ahead
    assert Mixer({"only": 1.0}, (0,)).state() is None
    zero = Mixer({"a": 1.0, "z": 0.0}, (0,))          # a 0-weight source is never drawn
    assert {zero.choose() for _ in range(100)} == {"a"}


def test_zero_weight_source_is_not_read(three_sources):
    cfg = cfg3(three_sources, weights={"a": 1.0, "b": 1.0, "c": 0.0})
    loader = build_dataloader(cfg, ByteTokenizer(), 0, 1)
    seen = {s for b in itertools.islice(iter(loader), 10) for s in b.meta["source"]}
    # a 0-weight source is left out of the loader (its shards are not even listed)
    assert seen == {"a", "b"} and "source/c/samples_read" not in loader.stats()


@pytest.mark.parametrize("change,needle", [
    (dict(weights={"a": 1.0, "nope": 1.0}), "weights.nope: no such source"),
    (dict(weights={"a": 1.0}), "no entry for source(s) b, c"),
    (dict(weights={"a": -1.0, "b": 1.0, "c": 1.0}), "must be >= 0"),
    (dict(sources={"v": SourceConfig("x", type="film")}, weights={}), "is not one of"),
    (dict(sources={"v": SourceConfig("x", type="video")}, weights={}, video_frames=64),
     "one video document needs"),
])
def test_mixture_config_errors_are_one_line(three_sources, change, needle):
    with pytest.raises(ValueError, match="data config: ") as e:
        cfg3(three_sources, **change).validate()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_shipped_mix_config_composes_without_data():
    """configs/data/mix_v1.yaml validates on a machine without the data (test_config composes
    every shipped config too); its weights are the issue's."""
    from mmgen.cli.preflight import compose_job

    job = compose_job(["data=mix_v1"])
    d = job.data
    assert d.weights == {"laion": 0.5, "coyo": 0.3, "mmc4": 0.1, "webvid": 0.1}
    assert {n: s.type for n, s in d.sources.items()} == {
        "laion": "pair", "coyo": "pair", "mmc4": "interleaved", "webvid": "video"}
    assert abs(sum(d.source_weights().values()) - 1) < 1e-9
