# Preemption: turn SIGTERM/SIGUSR1 into "finish this step, checkpoint on every rank, exit 3".
"""Slurm sends SIGUSR1 (``--signal=B:USR1@N``) or SIGTERM before it kills a job; torchrun
forwards SIGTERM to its workers. The handler only sets a flag: the loop checks it after each
optimizer step, all ranks agree through one all-reduce (a rank that got no signal still
stops at the same step), a checkpoint is written, and the process exits with
``REQUEUE_EXIT_CODE`` so the launcher can requeue the job."""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 3


class Preempted(Exception):
    """Raised out of the loop after the preemption checkpoint is on disk."""

    def __init__(self, step: int, signame: str):
        super().__init__(f"preempted by {signame} at step {step}: checkpoint written, exit {REQUEUE_EXIT_CODE} (requeue)")
        self.step, self.signame = step, signame


class PreemptionFlag:
    def __init__(self, names: list[str]):
        self.received: str | None = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for name in names:
            sig = getattr(signal, name, None)
            if sig is None:
                raise ValueError(f"trainer.preemption_signals: unknown signal '{name}'")
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        log.warning("received %s: stopping after this step with a checkpoint", self.received)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
