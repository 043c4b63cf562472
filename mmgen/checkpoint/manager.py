# Atomic, verified checkpoints: model+optimizer (via the backend), train state, RNG, data position.
"""Layout of one checkpoint (``<run_dir>/checkpoints/step_0000100/``):

* backend files (``model.pt``, ``optimizer.pt`` for DDP; sharded files for ZeRO/FSDP),
* ``train_state.pt``: step, tokens seen, LR scheduler, counters (rank 0),
* ``rank_00000.pt`` ...: per-rank RNG states and data-loader cursor,
* ``meta.json``: step, time, the layout that wrote it (backend ``parallel.name``, parallel
  degrees, world size, versions), the run directory that wrote it, and the size and SHA-256
  of every other file (:mod:`mmgen.checkpoint.integrity`); written last. ``mmgen export``
  reads the backend from it.

mmgen's own files hold tensors and plain values only (dicts, lists, numbers, strings) and
are read with ``torch.load(weights_only=True)``; the trust rule for formats that need pickle
is in :mod:`mmgen.safe_load` and docs/checkpoints.md.

Everything is written into ``step_0000100.tmp``; once every rank's files are on disk and
hashed, rank 0 writes meta.json and renames the directory. A directory without the ``.tmp``
suffix and with ``meta.json`` is complete; anything else is an interrupted write and is never
loaded (and is removed at the next start). A write that fails (a full disk, any I/O error)
removes the ``.tmp`` directory, leaves the earlier checkpoints as they were and stops the run
with one line naming the file and the cause.

Before resuming, the files are checked against meta.json. With ``checkpoint.resume=auto`` a
damaged checkpoint is set aside (renamed ``step_0000100.damaged``, never deleted) with one
warning naming the file, and the previous one is tried; a damaged checkpoint named by
``checkpoint.resume=<path>`` is an error.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from mmgen.checkpoint.config import CheckpointConfig
from mmgen.checkpoint.integrity import (checksum_share, describe_write_error, is_io_error, read_meta,
                                        set_aside_name, verify_share)
from mmgen.safe_load import TRUST_SWITCH, CheckpointError, UnsafeCheckpointError, load_plain
from mmgen.parallel.dist import barrier

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{7,})$")
FORMAT = 2  # plain-value files + checksums; meta.json of mmgen v1 has no "format"


# -- RNG state as tensors and plain values (weights_only=True reads it) ------------------------
def rng_state() -> dict:
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "keys": torch.tensor(keys, dtype=torch.int64), "gauss": gauss},
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s dict (or mmgen v1's pickled tuples, loaded with trust)."""
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(int(k) for k in py["keys"].tolist()), py["gauss"]))
    else:
        random.setstate(py)
    if isinstance(npy, dict):
        np.random.set_state({"bit_generator": npy["bit_generator"],
                             "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
                             "has_gauss": npy["has_gauss"], "gauss": npy["gauss"]})
    else:
        np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain_record(value):
    """A dataclass from a checkpoint of mmgen v1 (loaded with trust) as a plain dict."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def gather(obj) -> list:
    """``obj`` of every rank, in rank order (all ranks get the list; a collective)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def first_problem(per_rank: list) -> str | None:
    return next((p for p in per_rank if p), None)


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, run_dir: Path, rank: int, world_size: int,
                 layout: dict | None = None):
        """Args:
            cfg: the checkpoint config.
            run_dir: the run directory (checkpoints go to ``run_dir/checkpoints``).
            rank, world_size: this process among all ranks (one ``rank_N.pt`` each).
            layout: what meta.json records about the writer (``Engine.layout()`` plus the
                mmgen version): ``backend``, ``parallel`` degrees, ``versions``.
        """
        self.cfg = cfg
        self.layout = dict(layout or {})
        self.root = Path(run_dir) / "checkpoints"
        self.rank, self.world_size = rank, world_size
        # which run wrote a checkpoint: its run directory, resolved (a copy elsewhere is not "own")
        self.run_dir = str(Path(run_dir).resolve())
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step_*.tmp"):
                log.warning("removing incomplete checkpoint %s (interrupted write)", stale)
                shutil.rmtree(stale, ignore_errors=True)
        barrier()

    # -- saving -------------------------------------------------------------------------
    def save(self, step: int, engine, train_state: dict, rank_state: dict) -> Path:
        """Write checkpoint ``step`` (a collective). ``train_state`` and ``rank_state`` hold
        tensors and plain values only.

        Raises:
            CheckpointError: a file could not be written (one line: file and cause); the
                temporary directory is removed and the earlier checkpoints are untouched.
        """
        final = self.root / f"step_{step:07d}"
        tmp = self.root / f"step_{step:07d}.tmp"
        problem = None
        if self.rank == 0:
            problem = self._guard(step, tmp, tmp, lambda: (shutil.rmtree(tmp, ignore_errors=True),
                                                           tmp.mkdir(parents=True)))
        self._raise_if_any(gather(problem), tmp)  # also the barrier: the directory exists
        t0 = time.time()
        problem = self._guard(step, tmp, None, lambda: engine.save(tmp))
        if problem is None:
            rank_file = tmp / f"rank_{self.rank:05d}.pt"
            problem = self._guard(step, tmp, rank_file, lambda: torch.save({"rng": rng_state(), **rank_state}, rank_file))
        if problem is None and self.rank == 0:
            state_file = tmp / "train_state.pt"
            problem = self._guard(step, tmp, state_file, lambda: torch.save(train_state, state_file))
        self._raise_if_any(gather(problem), tmp)  # every rank's files are on disk
        sums: dict = {}
        if self.cfg.checksums:
            problem = self._guard(step, tmp, None, lambda: sums.update(checksum_share(tmp, self.rank, self.world_size)))
        shares = gather((problem, sums))
        self._raise_if_any([p for p, _ in shares], tmp)
        problem = None
        if self.rank == 0:
            files = {k: v for _, share in shares for k, v in share.items()}
            meta = {"step": step, "format": FORMAT, **self.layout, "world_size": self.world_size,
                    "run_dir": self.run_dir, "time": time.time(), "save_seconds": round(time.time() - t0, 3)}
            if self.cfg.checksums:
                meta["files"] = dict(sorted(files.items()))
            problem = self._guard(step, tmp, tmp / "meta.json",
                                  lambda: (tmp / "meta.json").write_text(json.dumps(meta)))
            if problem is None:
                if final.exists():  # re-saving the same step (e.g. final == periodic)
                    shutil.rmtree(final)
                tmp.rename(final)
                self._prune()
        self._raise_if_any(gather(problem), tmp)
        return final

    @staticmethod
    def _guard(step: int, tmp: Path, path: Path | None, write) -> str | None:
        """Run ``write``; an I/O error becomes its one-line description (other errors pass)."""
        try:
            write()
        except BaseException as e:  # DCP's CheckpointException derives from BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)) or not is_io_error(e):
                raise
            return describe_write_error(e, step, tmp, path)
        return None

    def _raise_if_any(self, problems: list, tmp: Path) -> None:
        """Every rank has the same list: all raise together (no rank waits at a barrier)."""
        if not any(problems):
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space; a .tmp is never loaded anyway
        barrier()
        mine = problems[self.rank]
        raise CheckpointError(mine or f"{first_problem(problems)} (on rank {problems.index(first_problem(problems))})")

    def _prune(self) -> None:
        done = complete_checkpoints(self.root)
        for old in done[: max(0, len(done) - self.cfg.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    # -- checking -----------------------------------------------------------------------
    def problem(self, path: Path) -> str | None:
        """What is wrong with checkpoint ``path`` (None: intact), the same answer on every
        rank (a collective: the ranks share the hashing)."""
        damage: str | None = None
        unreadable: str | None = None
        try:
            meta = read_meta(path)
            if self.cfg.checksums:  # meta.json's checksums, or the structure of an older checkpoint
                found = verify_share(path, meta, self.rank, self.world_size)
                damage = "; ".join(found) if found else None
        except ValueError as e:
            damage = str(e)
        except OSError as e:  # the storage failed to read: not a reason to set the checkpoint aside
            unreadable = f"{path}: cannot be read to verify it ({e.strerror or e}: {e.filename or path})"
        results = gather((damage, unreadable))
        fatal = first_problem([u for _, u in results])
        if fatal:
            raise CheckpointError(fatal)
        return first_problem([d for d, _ in results])

    def is_own(self, path: Path, meta: dict) -> bool:
        """Written by this run into its own run directory (the trust rule's "own" case): it
        lies in this run's checkpoints/ and meta.json names this run directory as its writer's."""
        return path.resolve().parent == self.root.resolve() and meta.get("run_dir") == self.run_dir

    # -- loading ------------------------------------------------------------------------
    def resume_path(self) -> Path | None:
        """Where to resume from, per ``checkpoint.resume``; None to start fresh.

        ``auto``: the newest intact checkpoint; damaged ones are set aside on the way.

        Raises:
            CheckpointError: an explicit ``checkpoint.resume=<path>`` is damaged, or every
                checkpoint of the run directory was (they are kept as ``*.damaged``).
        """
        mode = self.cfg.resume
        if mode == "none":
            return None
        if mode != "auto":
            path = Path(mode)
            if not (path / "meta.json").is_file():
                raise FileNotFoundError(f"checkpoint.resume={mode}: not a complete checkpoint (no meta.json)")
            problem = self.problem(path)
            if problem:
                raise CheckpointError(f"checkpoint.resume={mode}: damaged: {problem}")
            return path
        set_aside = []
        for path in reversed(complete_checkpoints(self.root)):
            problem = self.problem(path)
            if problem is None:
                return path
            aside = set_aside_name(path)
            if self.rank == 0:
                path.rename(aside)
                log.warning("checkpoint %s is damaged (%s): set aside as %s; trying the previous one",
                            path, problem, aside.name)
            barrier()
            set_aside.append(aside.name)
        if set_aside:
            raise CheckpointError(f"{self.root}: no intact checkpoint left ({', '.join(set_aside)} set aside); the "
                                  f"next start of this run begins again at step 0")
        return None

    def _load_own_file(self, path: Path, meta: dict):
        """One of mmgen's own files: plain values only (pickle with checkpoint.trust=true)."""
        try:
            return load_plain(path, trust=self.cfg.trust)
        except UnsafeCheckpointError as e:
            if "format" in meta:
                raise
            raise UnsafeCheckpointError(
                f"{path}: written by mmgen v1, which pickled its train state and RNG; unpickling can run code: "
                f"resume it once with {TRUST_SWITCH} if you trust who wrote it (checkpoints written from then on "
                f"need no trust)") from e

    def data_states(self, path: Path) -> list[dict]:
        """Every old rank's data-loader state, in rank order (for re-splitting the data stream
        when the world size or worker count changed)."""
        meta = read_meta(path)
        return [self._load_own_file(f, meta).get("data") for f in sorted(path.glob("rank_*.pt"))]

    def load(self, path: Path, engine) -> tuple[dict, dict]:
        """Restore the engine; return (train_state, this rank's state). mmgen's small files
        are read first, so a refusal comes before the (long) engine load."""
        meta = read_meta(path)
        train_state = self._load_own_file(path / "train_state.pt", meta)
        train_state["state"] = plain_record(train_state["state"])
        rank_file = path / f"rank_{self.rank:05d}.pt"
        same_world = meta["world_size"] == self.world_size and rank_file.is_file()
        rank_state = self._load_own_file(rank_file, meta) if same_world else {}
        engine.load(path, trust=self.cfg.trust, own=self.is_own(path, meta))
        if not same_world:
            log.warning("checkpoint was written by %d ranks, now %d: RNG and data position restart per rank",
                        meta["world_size"], self.world_size)
            return train_state, {}
        set_rng_state(rank_state.pop("rng"))
        return train_state, rank_state
