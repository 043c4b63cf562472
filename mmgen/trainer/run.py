# Job set-up around the Trainer: process group, run-directory lock and checks, logging, records, final eval.
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from mmgen.trainer.job import JobConfig, to_yaml
from mmgen.trainer.lock import RunLock
from mmgen.trainer.provenance import git_sha
from mmgen.trainer.resume_check import LAUNCHES, prepare_run_dir
from mmgen.parallel.dist import DistInfo, barrier, init_distributed, shutdown

log = logging.getLogger("mmgen")


def setup_logging(rank: int, run_dir: Path) -> None:
    """Every rank logs everything to runs/<name>/logs/rank_N.log; the console gets rank 0's
    INFO and other ranks' warnings."""
    fmt = logging.Formatter(f"[%(asctime)s rank{rank} %(name)s] %(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    file = logging.FileHandler(run_dir / "logs" / f"rank_{rank}.log")
    handlers = [console, file]
    for h in handlers:
        h.setFormatter(fmt)
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)


def write_run_records(job: JobConfig, run_dir: Path, argv: list[str], dist: DistInfo) -> None:
    """config.yaml (resolved; every launch's kept in configs/), command line, git SHA and world
    layout, by rank 0."""
    if not dist.is_main:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    keep_config(run_dir, to_yaml(job), argv)
    launch = {"argv": argv, "git_sha": git_sha(), "world_size": dist.world_size,
              "torch": torch.__version__, "cwd": os.getcwd(),
              "env": {k: v for k, v in os.environ.items()
                      if k.startswith(("SLURM_JOB", "MASTER_", "WORLD_SIZE", "NCCL_", "OMP_NUM"))}}
    (run_dir / "launch.json").write_text(json.dumps(launch, indent=2))
    with open(run_dir / "command.txt", "a") as f:
        f.write(" ".join(argv) + "\n")


def keep_config(run_dir: Path, text: str, argv: list[str]) -> Path:
    """Write ``config.yaml`` (what ``mmgen sample`` / ``export`` read: the latest launch's) and
    keep every distinct launch config as ``configs/config_NNNN.yaml``, with one line per launch
    in ``configs/launches.jsonl`` (time, config file, command line): the resume check finds in it
    the config a checkpoint was trained with. A ``config.yaml`` found outside the history (an
    older mmgen, a hand edit) is kept first.

    Args:
        run_dir: the run directory.
        text: the new launch's resolved config (``to_yaml``).
        argv: its command line.
    Returns:
        the history file holding ``text``.
    """
    history = run_dir / "configs"
    history.mkdir(exist_ok=True)
    kept = sorted(history.glob("config_*.yaml"))
    latest = kept[-1] if kept else None

    def add(content: str) -> Path:
        nonlocal latest
        number = int(latest.stem.split("_")[1]) + 1 if latest else 1
        latest = history / f"config_{number:04d}.yaml"
        latest.write_text(content)
        return latest

    current = run_dir / "config.yaml"
    if current.is_file() and (latest is None or current.read_text() != latest.read_text()):
        add(current.read_text())
    if latest is None or latest.read_text() != text:
        add(text)
    with open(history / LAUNCHES, "a") as f:
        f.write(json.dumps({"time": time.time(), "config": latest.name, "argv": argv}) + "\n")
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(current)  # atomic: a crash never leaves a half-written config.yaml for mmgen sample
    return latest


def claim_run_dir(job: JobConfig, run_dir: Path, dist: DistInfo) -> tuple[RunLock | None, list[str]]:
    """Rank 0 locks the run directory and checks it against the job (mmgen/trainer/lock.py,
    resume_check.py) before anything in it is written; every rank learns the outcome. Sets
    ``job.checkpoint.resume`` to what the checks decided (a start-over or requeue changes it).

    Returns:
        (the lock on rank 0, None elsewhere; lines to log once logging is set up).
    Raises:
        ConfigError: on rank 0 when refused (the one line); other ranks exit 2 silently.
    """
    lock, notes, failure, outcome = None, [], None, {}
    if dist.is_main:
        try:
            lock, notes = RunLock.acquire(run_dir, force=job.trainer.force_unlock)
            job.checkpoint.resume, checks = prepare_run_dir(job, run_dir, lock.owner)
            notes = [*notes, *checks]
            outcome = {"resume": job.checkpoint.resume}
        except BaseException as e:  # every failure: the other ranks must not wait forever
            if lock is not None:
                lock.release()
            failure, outcome = e, {"error": f"{type(e).__name__}: {e}"}
    outcome = share_from_rank0(outcome)
    if failure is not None:
        raise failure
    if "error" in outcome:
        sys.exit(2)  # rank 0 prints the one line
    job.checkpoint.resume = outcome["resume"]
    return lock, notes


def share_from_rank0(obj: dict) -> dict:
    """Rank 0's ``obj`` on every rank (one broadcast; a no-op without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def dist_errors() -> tuple:
    errs = tuple(getattr(torch.distributed, n) for n in ("DistError", "DistBackendError", "DistNetworkError")
                 if hasattr(torch.distributed, n))
    return errs or (RuntimeError,)


def is_collective_failure(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, dist_errors()) or any(w in text for w in ("timed out", "timeout", "gloo", "nccl",
                                                                       "connection closed", "connection reset"))


def make_deterministic() -> None:
    """Deterministic kernels (trainer.deterministic); before the first CUDA call, because cuBLAS
    reads its workspace setting when its handle is created."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def run_training(job: JobConfig, argv: list[str]) -> None:
    if job.trainer.deterministic:
        make_deterministic()
    dist = init_distributed(job.trainer.device, job.parallel.dist_backend, job.parallel.timeout_minutes)
    run_dir = Path(job.run_dir)
    lock = None
    try:
        lock, notes = claim_run_dir(job, run_dir, dist)  # first: nothing is written before it
        setup_logging(dist.rank, run_dir)
        for line in notes:
            log.warning("%s", line)
        if job.trainer.num_threads:
            torch.set_num_threads(job.trainer.num_threads)
        write_run_records(job, run_dir, argv, dist)
        barrier()
        train_and_evaluate(job, run_dir, dist)
    finally:
        if lock is not None:  # every exit that runs Python: done, error, preemption (exit 3)
            lock.release()
        shutdown()


def train_and_evaluate(job: JobConfig, run_dir: Path, dist: DistInfo) -> None:
    from mmgen.trainer.signals import REQUEUE_EXIT_CODE, Preempted
    from mmgen.errors import DataUnavailableError, one_line
    from mmgen.trainer.trainer import NonFiniteLossError, Trainer

    trainer = Trainer(job, dist)
    try:
        state = trainer.train()
    except Preempted as e:
        log.warning("%s", e)
        # every rank stops at the same step (the stop flag is all-reduced), so they can meet
        # here: a rank that tore its process group down while a peer was still in the
        # checkpoint's last collective made gloo abort that peer ("terminate called without an
        # active exception", exit 134 instead of 3; seen once in five CI runs)
        barrier()
        sys.exit(REQUEUE_EXIT_CODE)
    except NonFiniteLossError as e:
        print(f"mmgen-train: error: {e}", file=sys.stderr)
        sys.exit(1)
    except DataUnavailableError as e:   # e.g. a remote store down: one line, not a traceback
        print(f"mmgen-train: error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except (RuntimeError, *dist_errors()) as e:
        if not is_collective_failure(e):
            raise
        # a hung or broken collective: name this rank and the failure instead of hanging
        log.error("rank %d: collective failed after parallel.timeout_minutes=%s: %s", dist.rank,
                  job.parallel.timeout_minutes, str(e).splitlines()[0] if str(e) else type(e).__name__)
        sys.exit(1)
    log.info("finished at step %d (%d tokens) in %s", state.step, state.tokens_seen, run_dir)
    if dist.is_main:  # the registry's evaluation (trainer.eval_at_end, eval_task) on rank 0
        trainer.hooks.at_end(trainer.engine.module, run_dir / "eval")
    barrier()
