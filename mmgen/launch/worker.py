# The command torchrun starts on every rank: mmgen-train, unless this node was preempted.
"""When the node agent has received a preemption signal (``MMGEN_PREEMPTED`` in its
environment), a worker that torchrun restarts (``--max-restarts``) must not train on: the
checkpoint is written and Slurm is about to requeue the job, so it exits with the requeue
code at once. Otherwise it is exactly ``mmgen-train`` with the same arguments."""
from __future__ import annotations

import os
import sys


def main() -> None:
    if os.environ.get("MMGEN_PREEMPTED"):
        from mmgen.launch import REQUEUE_EXIT_CODE

        print("mmgen worker: node was preempted; not restarting training", file=sys.stderr)
        sys.exit(REQUEUE_EXIT_CODE)
    from mmgen.train import main as train_main

    sys.argv = ["mmgen-train", *sys.argv[1:]]
    train_main()


if __name__ == "__main__":
    main()
