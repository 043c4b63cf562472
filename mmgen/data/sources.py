# Shard lists, sample order and tar reading: the stages before decoding (mmgen owns the order).
"""Stages 1-5 of the pipeline (see README.md): expand the shard pattern, permute shards per
epoch, split them among readers (rank x worker; sample-level when there are fewer shards than
readers), index a shard's tar headers and read its samples on demand in a permuted order.

Every order here is a pure function of (seed, epoch, names) through a keyed hash, never a running
RNG or Python's global ``random``: a cursor (epoch, item, sample offset) then identifies the same
sample on every machine and after every restart, whatever the layout that reads it.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any

import braceexpand

from mmgen.errors import ConfigError

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


# ----------------------------------------------------------------------------------------------
# Hashing: the only source of "randomness" in the data pipeline
# ----------------------------------------------------------------------------------------------

def unit_hash(*parts: Any) -> float:
    """A uniform number in [0, 1) determined by ``parts`` (stable across processes/versions,
    unlike ``hash()``, which is salted per process)."""
    text = "\x1f".join(str(p) for p in parts).encode("utf-8")
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def hashed_permutation(names: list[str], *seed_parts: Any) -> list[int]:
    """Indices of ``names`` sorted by a keyed hash: a seeded permutation. Ties (equal names)
    keep their input order, so the result is total and deterministic."""
    keys = [(unit_hash(*seed_parts, n), i) for i, n in enumerate(names)]
    return [i for _, i in sorted(keys)]


# ----------------------------------------------------------------------------------------------
# Stage 1: shard list
# ----------------------------------------------------------------------------------------------

def _expand_one(part: str) -> list[str]:
    if os.path.isdir(part):
        return [os.path.join(part, f) for f in os.listdir(part) if f.endswith(SHARD_SUFFIXES)]
    if any(c in part for c in "*?["):
        return [p for p in glob.glob(part) if os.path.isfile(p)]
    named = list(braceexpand.braceexpand(part))
    missing = [p for p in named if not os.path.isfile(p)]
    if missing and len(named) > 1:
        raise FileNotFoundError(
            f"shard pattern '{part}': {len(missing)} of {len(named)} named shards do not exist "
            f"(first missing: {missing[0]})")
    return [p for p in named if os.path.isfile(p)]


def _check_is_shard(path: str) -> None:
    """A named file without a shard suffix must at least be a tar: anything else (a text file, a
    bare image) would otherwise be read as a shard of zero samples and the loader would blame the
    layout. Files with a shard suffix are not opened here (thousands of them on network storage);
    a damaged one is skipped and counted when read."""
    if path.endswith(SHARD_SUFFIXES):
        return
    try:
        is_tar = tarfile.is_tarfile(path)
    except OSError as exn:
        raise ConfigError(f"data: cannot read shard '{path}': {exn.strerror or exn}") from None
    if not is_tar:
        raise ConfigError(f"data: '{path}' is not a tar shard (a shard is a .tar of samples such "
                          f"as <key>.jpg + <key>.txt; `mmgen data check` inspects shards)")


def expand_shards(pattern: str, require_tar: bool = True, remote=None) -> list[str]:
    """All shard paths named by ``pattern`` (directory, glob, brace pattern, or several joined by
    "::"; remote parts ``http(s)://``, ``s3://``, ``gs://``, ``pipe:`` go through
    ``mmgen.data.remote``), de-duplicated and sorted. Raises FileNotFoundError naming the
    pattern if empty, and (``require_tar``) ConfigError naming a local file that is not a tar.

    Args:
        pattern: the shard pattern.
        require_tar: check that named local files without a shard suffix are tars.
        remote: a ``RemoteConfig`` (timeouts for listing); default settings when None.
    """
    from mmgen.data.remote import expand_remote, is_remote

    paths: set[str] = set()
    for part in (p.strip() for p in pattern.split("::")):
        if not part:
            continue
        if is_remote(part):
            if remote is None:
                from mmgen.data.config import RemoteConfig
                remote = RemoteConfig()
            paths.update(expand_remote(part, remote))
        else:
            paths.update(_expand_one(os.path.expanduser(part)))
    if not paths:
        raise FileNotFoundError(f"shard pattern '{pattern}' matches no shard files "
                                f"(cwd {os.getcwd()})")
    ordered = sorted(paths)
    for path in ordered if require_tar else ():
        if not is_remote(path):
            _check_is_shard(path)
    return ordered


def shard_fingerprint(shards: list[str]) -> str:
    """Identifies a shard list by file names, so a checkpoint still resumes after the data moved
    directories (or to a store: ``remote.shard_name``) but refuses to resume on different data."""
    from mmgen.data.remote import shard_name

    names = "\n".join(shard_name(s) for s in shards)
    return hashlib.blake2b(names.encode("utf-8"), digest_size=8).hexdigest()


# ----------------------------------------------------------------------------------------------
# Stages 2-4: per-epoch shard permutation, split by rank, split by worker
# ----------------------------------------------------------------------------------------------

def reader_index(rank: int, world_size: int, worker: int) -> int:
    """Global reader id of (rank, logical worker): readers interleave ranks first, so position
    ``i`` of an epoch's order goes to rank ``i % world_size`` (then worker ``i // world_size % W``)."""
    return rank + world_size * worker


def epoch_items(names: list[str], seed: int, epoch: int, reader: int, num_readers: int
                ) -> list[tuple[int, int, int]]:
    """What reader ``reader`` of ``num_readers`` reads in ``epoch``: ``(shard, slot, stride)``
    triples, ``shard`` an index into ``names`` (the sorted shard list); the reader visits the
    shard's permuted sample order at positions ``slot, slot + stride, ...``.

    * ``len(names) >= num_readers``: whole shards; position ``i`` of the epoch's permutation goes
      to reader ``i % num_readers`` (so counts differ by at most one shard).
    * fewer shards than readers: every reader still gets work. Reader ``g`` shares shard
      ``perm[g % S]`` with the other readers ``g' = g (mod S)`` and takes every ``k``-th sample of
      it (``k`` = number of sharers, ``slot = g // S``): a partition of the shard's samples.
    """
    perm = hashed_permutation(names, "shards", seed, epoch)
    n = len(perm)
    if n >= num_readers:
        return [(perm[i], 0, 1) for i in range(reader, n, num_readers)]
    home = reader % n
    return [(perm[home], reader // n, len(range(home, num_readers, n)))]


# ----------------------------------------------------------------------------------------------
# Stage 5: read one shard, order its samples
# ----------------------------------------------------------------------------------------------

def _has_end_marker(path: str) -> bool:
    """Python's tarfile stops silently when a file is cut at a member header, so check what
    every complete tar ends with: a whole number of 512-byte blocks, the last two all zero."""
    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return not any(f.read(1024))


def read_shard(path: str) -> tuple[list[dict], str | None]:
    """All samples of one tar shard, grouped by key with webdataset's own tar reader, in tar
    order. Shards are small (~1000 samples), so they are held in memory and permuted there.

    Returns ``(samples, error)``: a damaged tar yields the samples before the damage and a
    one-line error instead of raising, so one bad shard never stops a run.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    errors: list[str] = []

    def stop(exn: Exception) -> bool:  # webdataset handler: record, stop this shard
        msg = str(exn.args[0]) if exn.args else str(exn)
        errors.append(f"{type(exn).__name__}: {msg.split(' @ ')[0]}")
        return False

    samples: list[dict] = []
    try:
        with open(path, "rb") as stream:
            files = tar_file_expander([{"url": path, "stream": stream}], handler=stop)
            samples = list(group_by_keys(files, handler=stop))
        if not errors and path.endswith(".tar") and not _has_end_marker(path):
            errors.append("truncated tar (no end-of-archive marker)")
    except OSError as exn:  # unreadable file (permissions, vanished): skip the whole shard
        errors.append(f"{type(exn).__name__}: {exn}")
    return samples, (errors[0] if errors else None)


def sample_order(num_samples: int, shuffle: bool, seed: int, epoch: int, shard: str) -> list[int]:
    """Reading order of a shard's samples: a per-(seed, epoch, shard) permutation, or tar order."""
    if not shuffle:
        return list(range(num_samples))
    names = [str(i) for i in range(num_samples)]
    from mmgen.data.remote import shard_name

    return hashed_permutation(names, "samples", seed, epoch, shard_name(shard))


# ----------------------------------------------------------------------------------------------
# Stage 5 (indexed): find samples by scanning tar headers, read members on demand
# ----------------------------------------------------------------------------------------------

_META = re.compile(r"__[^/]*__($|/)")        # webdataset skips these members entirely
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """``(key, extension)`` as webdataset's ``base_plus_ext``: the key is the path up to the first
    dot of the basename, the extension the rest (lower-cased by the caller); (None, None) when
    the basename has no dot."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


@dataclass
class TarMember:
    name: str
    offset: int      # of the data, in bytes from the start of the file
    size: int


@dataclass
class TarSample:
    key: str
    members: dict[str, TarMember] = field(default_factory=dict)   # extension -> member


def scan_members(path: str) -> tuple[list[TarMember], str | None]:
    """Regular-file members of an uncompressed tar, by reading its headers only (data is skipped
    with seeks). Returns ``(members, error)``; on damage the members before it are kept."""
    members: list[TarMember] = []
    error = None
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                if info.offset_data + info.size > size:
                    error = (f"truncated tar: member {info.name} needs {info.size} bytes, only "
                             f"{max(0, size - info.offset_data)} present")
                    break
                members.append(TarMember(info.name, info.offset_data, info.size))
    except (tarfile.TarError, OSError, EOFError) as exn:
        error = f"{type(exn).__name__}: {exn}"
    if error is None and not _has_end_marker(path):
        error = "truncated tar (no end-of-archive marker)"
    return members, error


def group_members(members: list[TarMember]) -> list[TarSample]:
    """Group members into samples as webdataset's ``group_by_keys`` does: consecutive members with
    the same key form one sample; extensions are lower-cased; ``__*__`` members and names without
    a dot are ignored. A repeated extension within a key starts a new sample (webdataset would stop
    the shard there; ``mmgen data check`` reports it)."""
    samples: list[TarSample] = []
    current: TarSample | None = None
    for m in members:
        if _META.match(m.name) or (m.name.startswith("__") and m.name.endswith("__")):
            continue
        key, ext = split_member_name(m.name)
        if key is None:
            continue
        ext = ext.lower()
        if current is None or key != current.key or ext in current.members:
            current = TarSample(key)
            samples.append(current)
        current.members[ext] = m
    return samples


class ShardFile:
    """The samples of one shard: an index built from the tar headers, members read on demand, so
    memory holds one sample at a time even for shards of large videos. Compressed tars cannot be
    read at an offset and are read into memory whole (``read_shard``).

    ``error`` is a one-line description of damage (the samples before it are usable) or None.
    """

    def __init__(self, path: str):
        self.path = path
        self._file = None
        self._raw: list[dict] | None = None
        if path.endswith(".tar"):
            members, self.error = scan_members(path)
            self.samples = group_members(members)
        else:
            self._raw, self.error = read_shard(path)
            self.samples = [TarSample(r["__key__"]) for r in self._raw]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> dict:
        """Sample ``index`` as a webdataset sample: ``{"__key__", "__url__", ext: bytes}``.
        Raises OSError if the file changed underneath (a short read)."""
        if self._raw is not None:
            return self._raw[index]
        if self._file is None:
            self._file = open(self.path, "rb")
        sample = self.samples[index]
        raw: dict[str, Any] = {"__key__": sample.key, "__url__": self.path}
        for ext, m in sample.members.items():
            self._file.seek(m.offset)
            data = self._file.read(m.size)
            if len(data) != m.size:
                raise OSError(f"short read of {m.name} in {self.path}")
            raw[ext] = data
        return raw

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
