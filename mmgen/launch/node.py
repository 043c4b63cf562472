# One torchrun per node, with mmgen's exit-code and preemption-signal handling.
"""``python -m mmgen.launch.node [torchrun options] -m module [args]`` is torchrun (its own
argument parser and ``torch.distributed.run.run``) with three differences that Slurm
preemption needs:

* **exit code**: torchrun exits 1 whenever a worker fails, whatever its code. Here, when the
  first failing worker exited with ``REQUEUE_EXIT_CODE`` (checkpoint written after a
  preemption signal), the node exits with that code too, so ``srun`` and the batch script see it.
* **SIGUSR1 / SIGTERM**: torchrun's default handler would stop the workers and give them
  a fixed 30 s before SIGKILL; SIGUSR1 would kill torchrun itself (default action). Here both
  are mmgen's: under a Slurm step, Slurm delivers the signal to every process of the step, so
  the agent only takes note; without Slurm it forwards the signal to its worker processes.
* after such a signal, ``MMGEN_PREEMPTED=1`` is set for workers torchrun restarts, which
  then exit at once with the requeue code (``mmgen/launch/worker.py``) instead of training on.
* a rendezvous that fails (a node that never joins within ``join_timeout``, a store that
  cannot be reached) ends the node with one line and exit code 1, not torchrun's traceback.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

from mmgen.launch import REQUEUE_EXIT_CODE

log = logging.getLogger("mmgen.launch")
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"  # torchrun keeps these; USR1/TERM are mmgen's


def _on_preempt(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    name = signal.Signals(signum).name
    first = not os.environ.get("MMGEN_PREEMPTED")
    os.environ["MMGEN_PREEMPTED"] = "1"  # inherited by workers torchrun starts from now on
    if os.environ.get("SLURM_STEP_ID") is not None:
        # srun/scancel signal every process of the step: the workers have it already
        print(f"mmgen-launch node: {name} received (workers signalled by Slurm)", file=sys.stderr, flush=True)
        return
    import psutil

    children = psutil.Process().children(recursive=False)
    for child in children:
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass
    if first:
        print(f"mmgen-launch node: {name} received, forwarded to {len(children)} worker(s)",
              file=sys.stderr, flush=True)


def requeue_code(failures: dict) -> int:
    """Exit code for a torchrun ChildFailedError's ``failures`` (rank -> ProcessFailure): the
    requeue code when the first failure (by time) was a worker exiting with it, else 1."""
    if not failures:
        return 1
    first = min(failures.values(), key=lambda f: f.timestamp)
    return REQUEUE_EXIT_CODE if first.exitcode == REQUEUE_EXIT_CODE else 1


DEFAULT_JOIN_TIMEOUT = 600  # torchrun's, when --rdzv-conf has no join_timeout


def rendezvous_message(args, exc: BaseException) -> str:
    """One line for a failed rendezvous: which one, what happened, what to do."""
    from torch.distributed.elastic.rendezvous.api import (
        RendezvousClosedError,
        RendezvousConnectionError,
        RendezvousTimeoutError,
    )

    conf = dict(kv.split("=", 1) for kv in args.rdzv_conf.split(",") if "=" in kv)
    where = f"rendezvous '{args.rdzv_id}' at {args.rdzv_endpoint}"
    if isinstance(exc, RendezvousTimeoutError):
        secs = conf.get("join_timeout", DEFAULT_JOIN_TIMEOUT)
        return (f"{where} timed out after {secs} s: not all of the {args.nnodes} nodes joined (start the same "
                f"command on every node; --rdzv-timeout S waits longer)")
    if isinstance(exc, RendezvousConnectionError):
        cause = " ".join(str(exc.__cause__ or exc).split())
        return f"{where}: cannot reach or host the rendezvous store ({cause}); is node rank 0 running there?"
    if isinstance(exc, RendezvousClosedError):
        return f"{where} was closed: the job ended on another node"
    return f"{where} failed: {type(exc).__name__}: {' '.join(str(exc).split())}"


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with ``argv`` (torchrun's own options); return the node's exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv if argv is not None else sys.argv[1:])
    args.signals_to_handle = TORCHRUN_SIGNALS
    previous = {s: signal.signal(s, _on_preempt) for s in PREEMPT_SIGNALS}
    try:
        run(args)
        return 0
    except ChildFailedError as e:
        code = requeue_code(e.failures)
        for rank, f in sorted(e.failures.items()):
            print(f"mmgen-launch node: rank {rank} exited with code {f.exitcode}", file=sys.stderr)
        return code
    except SignalException as e:
        return 128 + int(e.sigval)
    except RendezvousError as e:
        print(f"mmgen-launch node: error: {rendezvous_message(args, e)}", file=sys.stderr, flush=True)
        return 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
