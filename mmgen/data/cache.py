# Local shard cache for streamed shards: size cap, least-recently-used eviction, shared by a node's workers.
"""``ShardCache(root, max_bytes)`` keeps downloaded remote shards under ``root`` so later epochs
(and the other DataLoader workers and ranks of the node) read them from local disk.

* One file per URL, named by a hash of the URL plus the shard's file name; a shard's
  last use is its file's mtime (touched on every hit), so least-recently-used order survives
  restarts and is shared by every process using the folder.
* Safe against two workers fetching one shard: the fetch holds an exclusive ``flock`` on
  ``<name>.lock`` while it downloads to a private temporary name and renames it into place
  (atomic on POSIX); a second worker waits on the lock and then finds the file. Readers never
  see a partial file.
* Eviction runs after each fetch, under a folder-wide lock: oldest files first until the total is
  under ``max_bytes``. Files other processes have open are still evicted safely (POSIX keeps an
  unlinked file readable for whoever has it open); the shard a process is reading is pinned
  by it while open, and never evicted by that process.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from typing import Callable

log = logging.getLogger(__name__)

_SHARED: dict[tuple, "ShardCache"] = {}


@contextlib.contextmanager
def _locked(path: str):
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ShardCache:
    """Downloaded shards kept on local disk (module docstring)."""

    def __init__(self, root: str, max_bytes: int):
        self.root, self.max_bytes = root, int(max_bytes)
        os.makedirs(root, exist_ok=True)
        self._pinned: dict[str, int] = {}      # local file -> readers in this process
        self.hits = self.misses = 0

    @classmethod
    def shared(cls, root: str, max_bytes: int) -> "ShardCache":
        """One cache object per (folder, process): readers of one worker share pins."""
        key = (os.path.abspath(root), int(max_bytes), os.getpid())
        if key not in _SHARED:
            _SHARED[key] = cls(root, max_bytes)
        return _SHARED[key]

    def local_path(self, url: str) -> str:
        from mmgen.data.remote import shard_name

        digest = hashlib.blake2b(url.encode("utf-8"), digest_size=8).hexdigest()
        return os.path.join(self.root, f"{digest}-{shard_name(url)}")

    def get(self, url: str, fetch: Callable[[str], None]) -> str:
        """The local copy of ``url``, fetched with ``fetch(dst)`` on a miss (``fetch`` writes
        ``dst`` atomically, e.g. ``remote.download``); pinned until :meth:`release`."""
        dst = self.local_path(url)
        with _locked(dst + ".lock"):
            if os.path.exists(dst):
                self.hits += 1
                os.utime(dst)           # most recently used
            else:
                self.misses += 1
                fetch(dst)
        self._pinned[dst] = self._pinned.get(dst, 0) + 1
        self.evict()
        return dst

    def release(self, url: str) -> None:
        dst = self.local_path(url)
        n = self._pinned.get(dst, 0) - 1
        if n > 0:
            self._pinned[dst] = n
        else:
            self._pinned.pop(dst, None)

    def evict(self) -> None:
        """Remove least-recently-used shards until the folder is under ``max_bytes``."""
        with _locked(os.path.join(self.root, ".evict.lock")):
            files = []
            for name in os.listdir(self.root):
                path = os.path.join(self.root, name)
                if name.endswith(".lock") or name.startswith(".") or ".part-" in name:
                    continue
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime, st.st_size, path))
            total = sum(f[1] for f in files)
            for _, size, path in sorted(files):
                if total <= self.max_bytes:
                    break
                if path in self._pinned:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                    total -= size
                    log.info("data: shard cache evicted %s (%d bytes)", os.path.basename(path), size)
