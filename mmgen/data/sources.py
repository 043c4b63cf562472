# Shard lists and sample order: the stages before decoding (mmgen owns the order, not webdataset).
"""Stages 1-5 of the pipeline (see README.md): expand the shard pattern, permute shards per
epoch, split by rank and by worker, read one shard and order its samples.

Every order here is a pure function of (seed, epoch, names) through a keyed hash, never a running
RNG or Python's global ``random``: a cursor (epoch, shard index, sample offset) then identifies
the same sample on every machine and after every restart.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
from typing import Any

import braceexpand

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


def expand_shards(pattern: str) -> list[str]:
    """All shard paths named by ``pattern`` (directory, glob, brace pattern, or several joined by
    "::"), de-duplicated and sorted. Raises FileNotFoundError naming the pattern if empty."""
    paths: set[str] = set()
    for part in (p.strip() for p in pattern.split("::")):
        if part:
            paths.update(_expand_one(os.path.expanduser(part)))
    if not paths:
        raise FileNotFoundError(f"shard pattern '{pattern}' matches no shard files "
                                f"(cwd {os.getcwd()})")
    return sorted(paths)


def shard_fingerprint(shards: list[str]) -> str:
    """Identifies a shard list by basenames, so a checkpoint still resumes after the data moved
    directories but refuses to resume on different data."""
    names = "\n".join(os.path.basename(s) for s in shards)
    return hashlib.blake2b(names.encode("utf-8"), digest_size=8).hexdigest()


# ----------------------------------------------------------------------------------------------
# Stages 2-4: per-epoch shard permutation, split by rank, split by worker
# ----------------------------------------------------------------------------------------------

def epoch_shards(shards: list[str], seed: int, epoch: int) -> list[str]:
    """The shard order of one epoch (same on every rank, so the rank split is a partition)."""
    names = [os.path.basename(s) for s in shards]
    return [shards[i] for i in hashed_permutation(names, "shards", seed, epoch)]


def worker_shards(shards: list[str], seed: int, epoch: int, rank: int, world_size: int,
                  worker: int, num_workers: int) -> list[str]:
    """The shards one (rank, logical worker) reads in ``epoch``: position i of the epoch's
    permutation goes to rank i % world_size, then position j of the rank's list to worker
    j % num_workers. Counts differ by at most one; a reader with fewer shards simply starts its
    next epoch sooner (the stream is infinite)."""
    return epoch_shards(shards, seed, epoch)[rank::world_size][worker::num_workers]


def check_split(shards: list[str], pattern: str, world_size: int, num_workers: int) -> None:
    """Every reader needs at least one shard per epoch."""
    readers = world_size * num_workers
    if len(shards) < readers:
        raise ValueError(
            f"shard pattern '{pattern}' has {len(shards)} shards, fewer than world_size x "
            f"num_workers = {world_size} x {num_workers} = {readers}; use fewer workers or more "
            f"shards")


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
    return hashed_permutation(names, "samples", seed, epoch, os.path.basename(shard))
