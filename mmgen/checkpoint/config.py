# Typed configuration of checkpointing (Hydra group `checkpoint/`).
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    """Args:
        enabled: write checkpoints at all.
        every: optimizer steps between checkpoints (and one at the end of the run).
        keep_last: complete checkpoints kept; older ones are deleted after a new one lands.
        resume: ``auto`` (newest complete checkpoint in the run directory, if any), ``none``,
            or a path to a checkpoint directory (``.../step_0000100``). ``none``, or a
            checkpoint other than the run's newest, is refused in a run directory that holds
            complete checkpoints (the two runs would mix) unless ``start_over``.
        start_over: before training, move the run directory's checkpoints, metrics and W&B
            id into ``previous-<UTC time>/`` (nothing is deleted), so ``resume`` starts a new run
            there. Once per job: a requeued Slurm job or restarted torchrun workers with the
            same command continue the new run (docs/launch.md, "Run directories").
        init_from: path of a checkpoint (or exported .safetensors) whose *model weights*
            initialise a new run (no optimizer/data state), e.g. to fine-tune.
        trust: allow unpickling checkpoint files that need it (DeepSpeed shards naming
            classes beyond the known few, checkpoints of mmgen v1) from anywhere; unpickling
            can run code, so only for files from someone you trust (docs/checkpoints.md).
            Without it such files load only when this run wrote them into its own directory.
        checksums: record the SHA-256 of every file in meta.json and verify them before a
            resume (a damaged newest checkpoint is set aside and the previous one used).
    """

    enabled: bool = True
    every: int = 500
    keep_last: int = 3
    resume: str = "auto"
    start_over: bool = False
    init_from: str = ""
    trust: bool = False
    checksums: bool = True

    def validate(self) -> None:
        if self.every < 1:
            raise ValueError(f"checkpoint.every must be >= 1, got {self.every}")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
