# Remote shards opened for reading: by byte ranges from stored offsets, or spooled to local disk.
"""The readers of :mod:`mmgen.data.remote`'s shards, with ``ShardFile``'s interface (the local
reader in :mod:`mmgen.data.sources`). Kept apart from the URL, filesystem and retry helpers so
that ``sources`` (which expands remote patterns) and these readers (which reuse its tar
parsing) import downwards only: remote <- sources <- remote_shards."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tarfile
import tempfile
from typing import Any

from mmgen.data.remote import (OFFSETS_SUFFIX, ShardUnavailable, _describe, _parent, download,  # noqa: F401
                               filesystem, folder_index, is_remote, read_range, shard_name, with_retries)
from mmgen.data.sources import ShardFile, TarMember, TarSample, group_members

log = logging.getLogger(__name__)


class RangeShard:
    """A remote shard read by byte ranges from its stored offsets (``<shard>.offsets.json``,
    ``mmgen data index``): one request per sample, in any order, so resume mid-shard and
    sample-level sharing read only their own samples. Same interface as ``ShardFile``."""

    def __init__(self, url: str, offsets: dict, cfg):

        self.path, self.cfg = url, cfg
        self.error = offsets.get("error")
        self._ranges = [(int(a), int(b)) for _, a, b in offsets["samples"]]
        self.samples = [TarSample(k) for k, _, _ in offsets["samples"]]
        self._ahead: dict[int, Any] = {}       # sample index -> Future of its bytes
        self._pool = None

    def __len__(self) -> int:
        return len(self.samples)

    def prefetch(self, indices: list[int]) -> None:
        """Start reading ``indices`` (the next samples of the reader's order) in background
        threads, ``remote.read_ahead`` at a time: one request per sample is latency-bound, a
        few in flight are not. What is read does not depend on it, only when."""
        if self.cfg.read_ahead <= 0:
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.cfg.read_ahead, thread_name_prefix="mmgen-range")
        for i in indices[:self.cfg.read_ahead]:
            if i not in self._ahead:
                a, b = self._ranges[i]
                self._ahead[i] = self._pool.submit(read_range, self.path, a, b, self.cfg)

    def load(self, index: int) -> dict:

        start, end = self._ranges[index]
        future = self._ahead.pop(index, None)
        data = future.result() if future is not None else read_range(self.path, start, end, self.cfg)
        members = []
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for info in tar:
                    if info.isreg():
                        members.append(TarMember(info.name, info.offset_data, info.size))
        except (tarfile.TarError, EOFError) as exn:
            raise OSError(f"sample {index} of {self.path}: {_describe(exn)} (stale offsets? "
                          f"re-run `mmgen data index`)") from None
        grouped = group_members(members)
        if len(grouped) != 1 or grouped[0].key != self.samples[index].key:
            raise OSError(f"sample {index} of {self.path} is not key {self.samples[index].key!r} "
                          f"(stale offsets? re-run `mmgen data index`)")
        raw: dict[str, Any] = {"__key__": grouped[0].key, "__url__": self.path}
        for ext, m in grouped[0].members.items():
            raw[ext] = data[m.offset:m.offset + m.size]
        return raw

    def close(self) -> None:
        for f in self._ahead.values():
            f.cancel()
        self._ahead.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class SpooledShard:
    """A remote shard without stored offsets: copied to local disk once (the shard cache when
    configured, else a private temporary file removed on close), then read as a local file."""

    def __init__(self, url: str, cfg, cache=None):

        self.path, self._cache = url, cache
        if cache is not None:
            self._local = cache.get(url, lambda dst: download(url, dst, cfg))
            self._owned = False
        else:
            fd, self._local = tempfile.mkstemp(prefix="mmgen-shard-", suffix=shard_name(url),
                                               dir=cfg.spool_dir or None)
            os.close(fd)
            self._owned = True
            try:
                download(url, self._local, cfg)
            except BaseException:
                os.remove(self._local)
                raise
        self._file = ShardFile(self._local)
        self.samples, self.error = self._file.samples, self._file.error

    def __len__(self) -> int:
        return len(self._file)

    def load(self, index: int) -> dict:
        raw = self._file.load(index)
        return {**raw, "__url__": self.path}

    def close(self) -> None:
        self._file.close()
        if self._owned and os.path.exists(self._local):
            os.remove(self._local)
        if self._cache is not None:
            self._cache.release(self.path)


@contextlib.contextmanager
def local_copy(path: str, cfg):
    """A local file holding shard ``path`` for the offline tools (``mmgen data check / stats``):
    the path itself when local, else a temporary download removed afterwards. Raises
    ShardUnavailable."""
    if not is_remote(path):
        yield path
        return
    fd, tmp = tempfile.mkstemp(prefix="mmgen-shard-", suffix=shard_name(path), dir=cfg.spool_dir or None)
    os.close(fd)
    try:
        download(path, tmp, cfg)
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def open_remote_shard(url: str, cfg, cache=None, partial: bool = False):
    """A ``ShardFile``-like reader of the remote shard ``url``: by byte ranges when its folder's
    index lists stored offsets and ``cfg.ranges`` asks for them ("always", or "partial" with
    ``partial``: the reader needs only part of the shard), else spooled. Raises ShardUnavailable.

    Args:
        url: the shard's URL.
        cfg: the ``RemoteConfig``.
        cache: a ``ShardCache`` for spooled shards, or None.
        partial: the reader starts mid-shard or takes every k-th sample of it.
    """
    want = cfg.ranges == "always" or (cfg.ranges == "partial" and partial)
    if not url.startswith("pipe:") and want:
        entry = folder_index(url, cfg).get(shard_name(url))
        if entry and entry.get("offsets"):
            fs = filesystem(url, cfg)
            sidecar = f"{_parent(url)}/{entry['offsets']}"
            try:
                offsets = json.loads(with_retries(sidecar, cfg, "offsets read",
                                                  lambda: fs.cat_file(sidecar)))
                return RangeShard(url, offsets, cfg)
            except ShardUnavailable as exn:
                log.info("data: no stored offsets for %s (%s): spooling it", url, exn.reason)
    return SpooledShard(url, cfg, cache)
