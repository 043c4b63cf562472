# Launchers: torchrun on one or more nodes, Slurm batch jobs with preemption and requeue.
"""``mmgen-launch`` (``mmgen/launch/cli.py``) composes and validates the same Hydra overrides
as ``mmgen-train``, records how the job was launched under ``runs/<name>/launch/`` and then
either runs torchrun here (``local``) or writes and submits an sbatch script (``slurm``,
``mmgen/launch/sbatch.py``), with a cluster's defaults from ``launch/clusters/NAME.yaml``
(``--cluster NAME``, ``mmgen/launch/profile.py``).

Exit-code contract with the trainer: after SIGTERM or SIGUSR1 the trainer finishes its step,
writes a checkpoint and exits with ``REQUEUE_EXIT_CODE``; the per-node agent
(``mmgen/launch/node.py``) passes that code through torchrun and the batch script then calls
``scontrol requeue``.
"""
from __future__ import annotations

from mmgen.trainer import REQUEUE_EXIT_CODE

__all__ = ["REQUEUE_EXIT_CODE"]
