# Atomic, resumable checkpoints: model+optimizer (via the backend), train state, RNG, data position.
"""Layout of one checkpoint (``<run_dir>/checkpoints/step_0000100/``):

* backend files (``model.pt``, ``optimizer.pt`` for DDP; sharded files for ZeRO/FSDP),
* ``train_state.pt``: step, tokens seen, LR scheduler, objective RNG, counters (rank 0),
* ``rank_00000.pt`` ...: per-rank RNG states and data-loader cursor,
* ``meta.json``: step, time, and the layout that wrote it: backend (``parallel.name``),
  parallel degrees (dp, tp, pp, ep), world size, versions (torch, deepspeed where used, the
  mmgen git SHA); written last. ``mmgen export`` reads the backend from it.

Everything is written into ``step_0000100.tmp``; after a barrier rank 0 renames it. A
directory without the ``.tmp`` suffix and with ``meta.json`` is complete; anything else is
an interrupted write and is never loaded (and is cleaned up at the next start).
"""
from __future__ import annotations

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
from mmgen.parallel.dist import barrier

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{7,})$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


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
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step_*.tmp"):
                log.warning("removing incomplete checkpoint %s (interrupted write)", stale)
                shutil.rmtree(stale, ignore_errors=True)
        barrier()

    # -- saving -------------------------------------------------------------------------
    def save(self, step: int, engine, train_state: dict, rank_state: dict) -> Path:
        final = self.root / f"step_{step:07d}"
        tmp = self.root / f"step_{step:07d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        t0 = time.time()
        engine.save(tmp)
        torch.save({"rng": rng_state(), **rank_state}, tmp / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            torch.save(train_state, tmp / "train_state.pt")
        barrier()  # every rank's files are on disk before the checkpoint is declared complete
        if self.rank == 0:
            meta = {"step": step, **self.layout, "world_size": self.world_size, "time": time.time(),
                    "save_seconds": round(time.time() - t0, 3)}
            (tmp / "meta.json").write_text(json.dumps(meta))
            if final.exists():  # re-saving the same step (e.g. final == periodic)
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        done = complete_checkpoints(self.root)
        for old in done[: max(0, len(done) - self.cfg.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    # -- loading ------------------------------------------------------------------------
    def resume_path(self) -> Path | None:
        """Where to resume from, per ``checkpoint.resume``; None to start fresh."""
        mode = self.cfg.resume
        if mode == "none":
            return None
        if mode == "auto":
            done = complete_checkpoints(self.root)
            return done[-1] if done else None
        path = Path(mode)
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"checkpoint.resume={mode}: not a complete checkpoint (no meta.json)")
        return path

    @staticmethod
    def data_states(path: Path) -> list[dict]:
        """Every old rank's data-loader state, in rank order (for re-splitting the data stream
        when the world size or worker count changed)."""
        files = sorted(path.glob("rank_*.pt"))
        return [torch.load(f, map_location="cpu", weights_only=False).get("data") for f in files]

    def load(self, path: Path, engine) -> tuple[dict, dict]:
        """Restore the engine; return (train_state, this rank's state)."""
        meta = json.loads((path / "meta.json").read_text())
        engine.load(path)
        train_state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=False)
        rank_file = path / f"rank_{self.rank:05d}.pt"
        if meta["world_size"] != self.world_size or not rank_file.is_file():
            log.warning("checkpoint was written by %d ranks, now %d: RNG and data position restart per rank",
                        meta["world_size"], self.world_size)
            return train_state, {}
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
        set_rng_state(rank_state.pop("rng"))
        return train_state, rank_state
