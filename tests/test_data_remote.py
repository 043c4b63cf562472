# Remote shards on loopback servers: HTTP (with faults) and S3 (moto) read as local files, resume, no hang.
from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest

from mmgen.data import DataConfig, build_dataloader
from mmgen.data.config import RemoteConfig
from mmgen.errors import ConfigError, DataUnavailableError, one_line
from mmgen.models.tokenizers.text import ByteTokenizer
from tests.conftest import ROOT, run_cli
from tests.remote_servers import ShardHTTPServer, start_s3

NAMES = [f"shapes-train-{i:06d}.tar" for i in range(4)]
BRACE = "shapes-train-{000000..000003}.tar"
BATCHES = 12          # > one epoch per rank: 40 samples, 2 ranks, 2 documents per batch
FAST = {"retries": 2, "backoff_s": 0.05, "connect_timeout_s": 0.5, "read_timeout_s": 0.5}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """4 shards of 10 shapes samples, indexed with sample offsets (``mmgen data index``)."""
    from mmgen.data.synthetic.shapes import make_splits
    from mmgen.data.tools.check import build_index

    root = tmp_path_factory.mktemp("remote_shapes")
    make_splits(root, num_train=40, num_val=10, image_size=32, seed=0, samples_per_shard=10)
    paths = sorted(str(p) for p in (root / "train").glob("*.tar"))
    assert [os.path.basename(p) for p in paths] == NAMES
    (root / "train" / "shardindex.json").write_text(json.dumps(build_index(paths, offsets=True)))
    return root


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> dict:
    """Every 2-rank case in ONE torchrun launch, the servers running in this process."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    out = tmp_path_factory.mktemp("remote_runs")
    faults = {f"train/{NAMES[1]}": {"drop_after": 3000, "times": -1},   # dies mid-shard, always
              f"train/{NAMES[2]}": {"status": 500, "times": 2},         # recovers on retry
              f"train/{NAMES[3]}": {"stall": 1.5, "times": 1}}          # past the read timeout once
    s3, _, env = start_s3({"train": str(shards / "train")})
    try:
        with ShardHTTPServer(str(shards)) as clean, ShardHTTPServer(str(shards), faults) as faulty:
            local = str(shards / "train")
            http = f"{clean.url}/train/{BRACE}"
            cases = [
                {"name": "local", "pattern": local, "workers": 1, "batches": BATCHES},
                # whole shards spooled; its checkpoint resumes on local files
                {"name": "http", "pattern": http, "workers": 1, "batches": BATCHES,
                 "resume_at": 5, "resume_pattern": local, "remote": FAST},
                # listed by a glob, spooled; its checkpoint resumes mid-shard over HTTP, where
                # the rest of that shard is read by byte ranges from the stored offsets
                {"name": "s3", "pattern": "s3://shards/train/*.tar", "workers": 0,
                 "batches": BATCHES, "resume_at": 7, "resume_pattern": http,
                 "remote": FAST},
                {"name": "faults", "pattern": f"{faulty.url}/train/shapes-train-{{000000..000004}}.tar",
                 "workers": 1, "batches": BATCHES, "remote": FAST},
            ]
            r = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone",
                         "--nproc_per_node", "2", str(ROOT / "tests" / "data_remote_worker.py"),
                         json.dumps(cases), str(out)], cwd=ROOT, timeout=240, env=env)
            requests, clean_requests = list(faulty.requests), list(clean.requests)
    finally:
        s3.stop()
    assert r.returncode == 0, r.stderr[-4000:]
    res = {c["name"]: [json.loads((out / f"{c['name']}_rank{k}.json").read_text()) for k in (0, 1)]
           for c in cases}
    return {"results": res, "stderr": r.stderr, "faulty_url": faulty.url, "requests": requests,
            "clean_requests": clean_requests}


def _keys(batches: list, epoch: int | None = None) -> list[str]:
    return [k for b in batches for e, k in b if epoch is None or e == epoch]


def test_http_and_s3_read_exactly_what_local_files_give(runs):
    res = runs["results"]
    for rank in (0, 1):
        for name in ("http", "s3"):
            assert res[name][rank]["batches"] == res["local"][rank]["batches"], (name, rank)
    epoch0 = _keys(res["local"][0]["batches"], 0) + _keys(res["local"][1]["batches"], 0)
    assert len(epoch0) == 40 and len(set(epoch0)) == 40     # every sample once, over both ranks


def test_a_checkpoint_resumes_exactly_across_local_http_and_s3(runs):
    res = runs["results"]
    for rank in (0, 1):
        assert res["http"][rank]["resumed"] == res["local"][rank]["batches"]   # http -> local
        assert res["s3"][rank]["resumed"] == res["local"][rank]["batches"]     # s3 -> http
    # whole shards went over HTTP as one request each; the shard resumed mid-way by ranges
    gets = [(n, rng) for m, n, rng in runs["clean_requests"] if m == "GET"]
    assert any(rng for n, rng in gets if n.endswith(".tar"))
    assert any(n.endswith(".offsets.json") for n, _ in gets)
    assert any(rng is None for n, rng in gets if n.endswith(".tar"))


def test_faulty_shards_are_skipped_counted_and_named_without_a_hang(runs):
    res = runs["results"]["faults"]
    assert all(len(r["batches"]) == BATCHES for r in res)      # both ranks made every step
    skipped = sum(r["stats"]["skipped"].get("unreachable_shard", 0) for r in res)
    url = runs["faulty_url"]
    named = set(re.findall(r"unreachable_shard\) shard=(\S+) ", runs["stderr"]))
    # the shard dropped mid-body and the missing one, each time an epoch reaches it; no other
    assert named == {f"{url}/train/{NAMES[1]}", f"{url}/train/shapes-train-000004.tar"}
    assert skipped == runs["stderr"].count("unreachable_shard) shard=") >= 2
    # the shards that recovered on a retry (HTTP 500 twice, one stall) gave all their samples
    got = set(_keys(res[0]["batches"], 0) + _keys(res[1]["batches"], 0))
    local = runs["results"]["local"]
    want = set(_keys(local[0]["batches"], 0) + _keys(local[1]["batches"], 0))
    assert len(want - got) == 10                                # only shard 1's samples are lost
    assert sum(1 for m, n, _ in runs["requests"] if m == "GET" and n.endswith(NAMES[2])) >= 3


def test_repeated_failures_stop_with_one_line(tmp_path):
    with ShardHTTPServer(str(tmp_path)) as srv:   # serves nothing: every shard is missing
        cfg = DataConfig(train_shards=f"{srv.url}/x-{{0..4}}.tar", batch_size=2, seq_len=128,
                         num_workers=0, remote=RemoteConfig(**FAST, max_consecutive_failures=3))
        loader = build_dataloader(cfg, ByteTokenizer(), 0, 1)
        with pytest.raises(DataUnavailableError) as e:
            next(iter(loader))
    msg = str(e.value)
    assert "\n" not in msg and "3 shards in a row unreachable" in msg and "max_consecutive_failures" in msg


def test_pipe_urls_read_like_files(shards):
    local = DataConfig(train_shards=str(shards / "train"), batch_size=2, seq_len=128, num_workers=0)
    piped = DataConfig(train_shards=f"pipe:cat {shards}/train/{BRACE}", batch_size=2, seq_len=128,
                       num_workers=0)
    a, b = (iter(build_dataloader(c, ByteTokenizer(), 0, 1)) for c in (local, piped))
    assert [next(a).meta["key"] for _ in range(4)] == [next(b).meta["key"] for _ in range(4)]


def test_gcs_without_gcsfs_is_one_clear_line():
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed")
    except ImportError:
        pass
    from mmgen.data.sources import expand_shards

    with pytest.raises(ConfigError, match="gs:// shards need gcsfs"):
        expand_shards("gs://bucket/shards/*.tar")


def test_data_check_and_stats_accept_remote_patterns(shards, capsys):
    from tests.test_data_check import _run

    with ShardHTTPServer(str(shards)) as srv:
        pattern = f"{srv.url}/train/shapes-train-{{000000..000004}}.tar"   # 000004 is missing
        code, out = _run(capsys, "data", "check", pattern)
        assert code == 1, out
        assert f"{srv.url}/train/{NAMES[0]}: 10 samples, 10 ok" in out
        assert f"{srv.url}/train/shapes-train-000004.tar: unreachable_shard:" in out
        assert "checked 5 shards, 40 samples: 40 ok" in out
        code, out = _run(capsys, "data", "stats", f"{srv.url}/train/{BRACE}", "--sample", "0")
        assert code == 0 and "samples: 40" in out and "4 from shardindex.json" in out
        code, out = _run(capsys, "data", "stats", f"{srv.url}/train/*.tar", "--sample", "3")
        assert code == 0 and "samples: 40" in out and "caption characters" in out, out


def test_credentials_in_a_shard_url_are_refused():
    cfg = DataConfig(train_shards="https://me:s3cret@data.example.com/shards/{0..9}.tar")
    with pytest.raises(ConfigError, match="credentials in its URL") as e:
        cfg.validate()
    assert "s3cret" not in str(e.value)
    DataConfig(train_shards="https://data.example.com/x.tar?v=1").validate()   # a query is fine


def test_a_worker_process_error_reads_as_its_one_line(tmp_path):
    with ShardHTTPServer(str(tmp_path)) as srv:   # as above, through a DataLoader worker
        cfg = DataConfig(train_shards=f"{srv.url}/x-{{0..4}}.tar", batch_size=2, seq_len=128,
                         num_workers=1, remote=RemoteConfig(**FAST, max_consecutive_failures=2))
        with pytest.raises(DataUnavailableError) as e:
            next(iter(build_dataloader(cfg, ByteTokenizer(), 0, 1)))
    assert one_line(e.value).startswith("data: 2 shards in a row unreachable for source")
