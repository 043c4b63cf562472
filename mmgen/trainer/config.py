# Typed configuration of the training loop (Hydra group `trainer/`).
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainerConfig:
    """Args:
        steps: optimizer steps in the run (the LR schedule spans them).
        grad_accum: micro-batches per optimizer step, per rank. Micro-batch ``a`` of rank ``r``
            reads data stream ``a * world_size + r`` and draws its noise from (seed, step,
            stream), so 1 GPU x grad_accum N trains on the same global batches as N GPUs.
        seed: seeds model init, objective noise and data order.
        device: ``auto`` (CUDA if present, else CPU), ``cpu`` or ``cuda``.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``bf16`` or ``fp32``.
        compile: torch.compile each transformer block (GPU runs; ~80 s per model on CPU).
        fp8: FP8 training of the trunk's linear layers through torchao's ``Float8Linear``
            (``pip install 'mmgen[fp8]'``): ``none``, ``tensorwise`` (one dynamic scale per
            tensor, cuBLAS) or ``rowwise`` (one per row, power-of-two scales, CUTLASS); torchao's
            ``Float8LinearConfig`` recipes of those names. Attention projections and dense /
            shared-expert FFN linears of ``model.layers`` are converted; embedders, timestep
            embedding, heads, the MoE router and routed experts stay in bf16 (mmgen/parallel/float8.py,
            docs/fp8.md). ``parallel=ddp|fsdp2`` on a GPU with FP8 tensor cores (compute
            capability >= 8.9); best with ``compile=true``.
        fp8_emulate: run ``fp8``'s casts with emulated matmuls (torchao's ``emulate``): the FP8
            rounding without FP8 hardware, e.g. on a CPU; slower than bf16, for tests.
        num_threads: CPU intra-op threads (0 keeps torch's default).
        log_every: optimizer steps between metric records.
        sample_every: steps between sample grids (0: never during training).
        num_samples: prompts in each periodic sample grid.
        max_minutes: stop (with a checkpoint) after this wall time; 0 disables. For
            fixed-budget benchmarks.
        eval_at_end: score samples on the held-out split when training ends (``eval_task``).
        eval_task: the evaluation run at the end (a key of ``mmgen.evaluation.EVALUATIONS``).
        eval_samples: held-out prompts/images scored at the end.
        max_nonfinite_steps: consecutive steps with a non-finite loss that are skipped (no
            update, counted) before the run aborts with a clear message.
        preemption_signals: signals that mean "checkpoint and exit 3 to be requeued".
        deterministic: deterministic GPU kernels (``torch.use_deterministic_algorithms``,
            ``CUBLAS_WORKSPACE_CONFIG``, no cuDNN autotuning), so a rerun on the same GPUs gives
            the same numbers; slower. For debugging and parity checks.
        record_keys: write every consumed sample key to ``runs/<name>/data_keys/rank_N.jsonl``
            (one line per micro-batch: step, stream, worker, [source, epoch, key] per
            document): an audit trail of what each rank trained on.
        sync_every: optimizer steps between the host reading the step's results (losses,
            gradient norm, whether the loss was finite, the stop signals of other ranks). Each
            read makes the host wait for the GPU, which then idles while the host prepares the
            next step; between reads the host queues step after step. 0 = ``log_every`` where
            the engine can skip a non-finite update on the device (DDP with the fused AdamW,
            dense or tower models: MoE bias updates read every step) and the device is a GPU,
            else 1 (read every step). Between reads a non-finite step is still skipped (on the
            device) and counted at the next read; the abort after ``max_nonfinite_steps`` and
            a preemption signal of another rank take effect at the next read. Logging,
            checkpoints and samples read first.
        force_unlock: take over the run directory's lock (``runs/<name>/.lock``) although its
            owner, on another machine, cannot be checked: for a lock left by a node that crashed
            outside Slurm (a requeued Slurm job takes over its own lock by itself). Never
            overrides an owner that runs on this machine. For one launch, not for a job script.
    """

    steps: int = 1000
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    fp8: str = "none"
    fp8_emulate: bool = False
    num_threads: int = 0
    log_every: int = 10
    sample_every: int = 0
    num_samples: int = 16
    max_minutes: float = 0.0
    eval_at_end: bool = False
    eval_task: str = "shapes"
    eval_samples: int = 200
    max_nonfinite_steps: int = 5
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    deterministic: bool = False
    record_keys: bool = False
    force_unlock: bool = False
    sync_every: int = 0

    def validate(self) -> None:
        if self.steps < 1 or self.grad_accum < 1:
            raise ValueError(f"trainer.steps and trainer.grad_accum must be >= 1 (got {self.steps}, {self.grad_accum})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"trainer.device='{self.device}' must be auto, cpu or cuda")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"trainer.precision='{self.precision}' must be auto, bf16 or fp32")
        self._validate_fp8()
        if self.log_every < 1:
            raise ValueError("trainer.log_every must be >= 1")
        if self.sync_every < 0:
            raise ValueError(f"trainer.sync_every must be >= 0 (0 = log_every on a GPU), got {self.sync_every}")
        if self.max_nonfinite_steps < 0:
            raise ValueError("trainer.max_nonfinite_steps must be >= 0")
        if self.sample_every < 0 or self.max_minutes < 0 or self.num_threads < 0:
            raise ValueError("trainer.sample_every, max_minutes and num_threads must be >= 0")
        if self.eval_at_end:
            from mmgen.evaluation.registry import EVALUATIONS  # torch: only when it will be used

            if self.eval_task not in EVALUATIONS:
                raise ValueError(f"trainer.eval_task='{self.eval_task}' is not a registered "
                                 f"evaluation ({', '.join(EVALUATIONS)})")

    def _validate_fp8(self) -> None:
        from mmgen.parallel.float8 import FP8_RECIPES  # torchao itself is imported only by a run that converts

        if self.fp8 not in FP8_RECIPES:
            raise ValueError(f"trainer.fp8='{self.fp8}' must be one of {', '.join(FP8_RECIPES)}")
        if self.fp8 == "none":
            return
        import importlib.util

        if importlib.util.find_spec("torchao") is None:
            raise ValueError("trainer.fp8 needs torchao: pip install 'mmgen[fp8]'")
        if self.device == "cpu" and not self.fp8_emulate:
            raise ValueError(f"trainer.fp8={self.fp8} needs FP8 tensor cores (a CUDA GPU of compute capability "
                             f">= 8.9); on trainer.device=cpu set trainer.fp8_emulate=true (emulated, no speed-up)")
