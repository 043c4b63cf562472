# The local shard cache: one download when two workers want one shard, LRU under a size cap, loader hits.
import multiprocessing as mp
import os
import time

from mmgen.data import DataConfig, build_dataloader
from mmgen.data.cache import ShardCache
from mmgen.data.config import RemoteConfig
from mmgen.data.remote import download
from mmgen.models.tokenizers.text import ByteTokenizer
from tests.remote_servers import ShardHTTPServer
from tests.test_data_remote import BRACE, FAST, NAMES, shards  # noqa: F401  (module fixture)

CFG = RemoteConfig(**FAST)


def _fetch_into(root: str, url: str, out) -> None:
    path = ShardCache(root, 1 << 30).get(url, lambda dst: download(url, dst, CFG))
    out.put((path, os.path.getsize(path)))


def test_two_workers_fetching_one_shard_download_it_once(shards, tmp_path):  # noqa: F811
    root = str(tmp_path / "cache")
    # a slow reply keeps the first download in flight while the second worker asks for it
    with ShardHTTPServer(str(shards), {f"train/{NAMES[0]}": {"stall": 0.3, "times": -1}}) as srv:
        url = f"{srv.url}/train/{NAMES[0]}"
        ctx, q = mp.get_context("fork"), mp.get_context("fork").Queue()
        procs = [ctx.Process(target=_fetch_into, args=(root, url, q)) for _ in range(2)]
        for p in procs:
            p.start()
        got = [q.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
        gets = [r for r in srv.requests if r[0] == "GET" and r[1].endswith(NAMES[0])]
    assert len(gets) == 1 and got[0] == got[1]
    assert got[0][1] == os.path.getsize(shards / "train" / NAMES[0])
    assert not [f for f in os.listdir(root) if ".part-" in f]


def test_lru_eviction_under_the_size_cap(shards, tmp_path):  # noqa: F811
    size = os.path.getsize(shards / "train" / NAMES[0])
    cache = ShardCache(str(tmp_path / "c"), int(2.5 * size))
    with ShardHTTPServer(str(shards)) as srv:
        urls = [f"{srv.url}/train/{n}" for n in NAMES[:3]]
        for u in urls[:2]:
            cache.get(u, lambda d, u=u: download(u, d, CFG))
            cache.release(u)         # read and closed: evictable
            time.sleep(0.02)         # distinct mtimes: the LRU order
        cache.get(urls[0], lambda d: download(urls[0], d, CFG))   # a hit: 0 is now the newest
        cache.release(urls[0])
        time.sleep(0.02)
        cache.get(urls[2], lambda d: download(urls[2], d, CFG))   # over the cap: evicts 1
    kept = {os.path.basename(cache.local_path(u)) for u in urls if os.path.exists(cache.local_path(u))}
    assert kept == {os.path.basename(cache.local_path(urls[i])) for i in (0, 2)}
    assert (cache.hits, cache.misses) == (1, 3)


def test_loader_reads_later_epochs_from_the_cache(shards, tmp_path):  # noqa: F811
    with ShardHTTPServer(str(shards)) as srv:
        cfg = DataConfig(train_shards=f"{srv.url}/train/{BRACE}", batch_size=2, seq_len=128,
                         num_workers=0, remote=RemoteConfig(**FAST, ranges="never",
                                                            cache_dir=str(tmp_path / "cache")))
        it = iter(build_dataloader(cfg, ByteTokenizer(), 0, 1))
        epochs = set()
        while len(epochs) < 3:
            epochs.update(next(it).meta["epoch"])
        gets = [r for r in srv.requests if r[0] == "GET"]
    assert len(gets) == len(NAMES)      # each shard downloaded once over three epochs
