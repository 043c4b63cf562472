# Job set-up around the Trainer: logging, process group, run-directory records, final eval.
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

from mmgen.trainer.job import JobConfig, to_yaml
from mmgen.trainer.provenance import git_sha
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
    """config.yaml (resolved), command line, git SHA and world layout, by rank 0."""
    if not dist.is_main:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(job))
    launch = {"argv": argv, "git_sha": git_sha(), "world_size": dist.world_size,
              "torch": torch.__version__, "cwd": os.getcwd(),
              "env": {k: v for k, v in os.environ.items()
                      if k.startswith(("SLURM_JOB", "MASTER_", "WORLD_SIZE", "NCCL_", "OMP_NUM"))}}
    (run_dir / "launch.json").write_text(json.dumps(launch, indent=2))
    with open(run_dir / "command.txt", "a") as f:
        f.write(" ".join(argv) + "\n")


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
    setup_logging(dist.rank, run_dir)
    if job.trainer.num_threads:
        torch.set_num_threads(job.trainer.num_threads)
    write_run_records(job, run_dir, argv, dist)
    barrier()
    from mmgen.trainer.signals import REQUEUE_EXIT_CODE, Preempted
    from mmgen.trainer.trainer import NonFiniteLossError, Trainer

    try:
        trainer = Trainer(job, dist)
        try:
            state = trainer.train()
        except Preempted as e:
            log.warning("%s", e)
            sys.exit(REQUEUE_EXIT_CODE)
        except NonFiniteLossError as e:
            print(f"mmgen-train: error: {e}", file=sys.stderr)
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
    finally:
        shutdown()
