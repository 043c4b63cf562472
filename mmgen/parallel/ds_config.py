# The DeepSpeed JSON: built from mmgen's typed config, overridden by a user file, keys checked.
"""mmgen never asks users to hand-write a DeepSpeed JSON. :func:`build_ds_config` derives it
from ``ParallelConfig`` plus the few facts that live elsewhere in the job (micro batch,
accumulation, precision, clipping). A file named by ``parallel.ds_config`` may override any
field (:func:`merge_user_config` reports each one that differs), except the fields mmgen owns
because the trainer depends on them (batch shape, optimizer, LR schedule).

DeepSpeed silently ignores top-level keys it does not know, so a typo (``zero_optimisation``)
would run a different job than intended: :func:`load_user_config` rejects unknown keys with one
line, and validates the sections DeepSpeed models with pydantic (``zero_optimization``, ``bf16``,
monitors...) with DeepSpeed's own models. It runs from ``ParallelConfig.validate()``, so a bad
file stops ``mmgen-train`` before anything starts (exit 2).

This module imports deepspeed only to validate a user file's sections.
"""
from __future__ import annotations

import copy
import difflib
import importlib
import json
import os
from pathlib import Path

# Every top-level key DeepSpeed 0.19.8 reads (DeepSpeedConfig._initialize_params and the
# sub-configs it builds, plus `sequence_parallel_size` read in DeepSpeedConfig.__init__).
# tests/test_deepspeed.py checks this set against the installed DeepSpeed.
DS_TOP_LEVEL_KEYS = frozenset({
    "activation_checkpointing", "aio", "amp", "autotuning", "bf16", "bfloat16", "checkpoint", "comet",
    "comms_logger", "communication_data_type", "compile", "compression_training", "csv_monitor",
    "curriculum_learning", "data_efficiency", "data_types", "dataloader_drop_last", "datastates_ckpt",
    "disable_allgather", "disable_python_gc", "dump_state", "eigenvalue", "elasticity", "expert_parallel",
    "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping",
    "gradient_predivide_factor", "graph_harvesting", "hybrid_engine", "log_level",
    "managed_gradient_accumulation", "memory_breakdown", "nebula", "optimizer", "pipeline",
    "prescale_gradients", "progressive_layer_drop", "quantize_training", "scheduler",
    "seq_parallel_communication_data_type", "sequence_parallel_size", "sparse_attention",
    "sparse_gradients", "steps_per_print", "tensor_parallel", "tensorboard", "timers", "torch_autocast",
    "train_batch_size", "train_micro_batch_size_per_gpu", "use_data_before_expert_parallelism",
    "vocabulary_size", "wall_clock_breakdown", "wandb", "weight_quantization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "zero_optimization",
})

# Sections DeepSpeed parses with pydantic models that forbid unknown keys: validated here with
# those models so the error comes at start-up, in one line, rather than as a multi-line
# ValidationError from inside deepspeed.initialize on every rank.
SECTION_MODELS = {
    "zero_optimization": "deepspeed.runtime.zero.config:DeepSpeedZeroConfig",
    "bf16": "deepspeed.runtime.precision_config:DeepSpeedBF16Config",
    "bfloat16": "deepspeed.runtime.precision_config:DeepSpeedBF16Config",
    "tensorboard": "deepspeed.monitor.config:TensorBoardConfig",
    "wandb": "deepspeed.monitor.config:WandbConfig",
    "csv_monitor": "deepspeed.monitor.config:CSVConfig",
    "comet": "deepspeed.monitor.config:CometConfig",
    "comms_logger": "deepspeed.comm.config:CommsLoggerConfig",
    "compile": "deepspeed.compile.config:CompileConfig",
}
# activation_checkpointing is read key by key (unknown keys ignored): these are all it reads
ACTIVATION_CHECKPOINTING_KEYS = frozenset({
    "partition_activations", "contiguous_memory_optimization", "cpu_checkpointing", "number_checkpoints",
    "synchronize_checkpoint_boundary", "profile"})

# Fields the trainer depends on: overriding them in a JSON would silently break the loss
# normalisation or the LR schedule, so they are set through mmgen's config only (and so is
# `zero_optimization.stage`, by parallel.name).
MMGEN_OWNED = {
    "train_batch_size": "data.batch_size x trainer.grad_accum x ranks",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "trainer.grad_accum",
    "optimizer": "optim.* (mmgen builds the optimizer and its parameter groups)",
    "scheduler": "optim.* (mmgen's LR schedule drives the optimizer)",
    "fp16": "trainer.precision (bf16 or fp32; fp16 loss scaling is not supported)",
}


def build_ds_config(cfg, *, micro_batch_size: int, grad_accum: int, bf16: bool, grad_clip: float,
                    pin_memory: bool = False) -> dict:
    """The DeepSpeed JSON for ``cfg`` (a ZeRO ``ParallelConfig``).

    Args:
        cfg: the ParallelConfig (``name`` zero1|zero2|zero3 gives the stage).
        micro_batch_size: sequences per rank per micro-batch (``data.batch_size``).
        grad_accum: micro-batches per optimizer step (``trainer.grad_accum``).
        bf16: bf16 parameters and gradients with fp32 master weights in the optimizer.
        grad_clip: max global gradient norm (``optim.grad_clip``; 0 disables clipping).
        pin_memory: page-locked host buffers for CPU offload (CUDA only).
    """
    stage = cfg.zero_stage
    zero: dict = {
        "stage": stage,
        "overlap_comm": cfg.overlap_comm,
        "contiguous_gradients": cfg.contiguous_gradients,
        "reduce_scatter": True,
        "reduce_bucket_size": cfg.reduce_bucket_size,
    }
    if stage < 3:
        zero["allgather_bucket_size"] = cfg.allgather_bucket_size
    else:
        zero.update({
            "stage3_prefetch_bucket_size": cfg.stage3_prefetch_bucket_size,
            "stage3_param_persistence_threshold": cfg.stage3_param_persistence_threshold,
            "stage3_max_live_parameters": cfg.stage3_max_live_parameters,
            "stage3_max_reuse_distance": cfg.stage3_max_reuse_distance,
        })
    if cfg.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    out = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(grad_clip),
        "bf16": {"enabled": bool(bf16)},
        "zero_optimization": zero,
        # mmgen passes its own torch AdamW (same parameter groups as DDP; the LR schedule drives
        # it): no DeepSpeed optimizer is built, so no fused/cpu Adam C++ op is compiled, and
        # offload steps that torch optimizer on the host copies.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": None,  # mmgen's metrics logger reports progress
        "wall_clock_breakdown": False,
    }
    if cfg.activation_checkpointing == "deepspeed":
        # cpu_checkpointing without partition_activations breaks the backward on CPU (PLATFORM.md)
        out["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": False,
                                           "contiguous_memory_optimization": False}
    return out


def merge_user_config(base: dict, user: dict) -> tuple[dict, list[str]]:
    """``base`` with ``user``'s fields written over it (nested dicts merge key by key).

    Returns the merged dict and one ``"key.path: mmgen X -> file Y"`` entry per field whose value
    the file changes (fields mmgen does not set are added silently).
    """
    merged = copy.deepcopy(base)
    conflicts: list[str] = []

    def walk(dst: dict, src: dict, prefix: str) -> None:
        for key, value in src.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and isinstance(dst.get(key), dict):
                walk(dst[key], value, path + ".")
                continue
            if key in dst and dst[key] != value:
                conflicts.append(f"{path}: mmgen {json.dumps(dst[key])} -> file {json.dumps(value)}")
            dst[key] = copy.deepcopy(value)

    walk(merged, user, "")
    return merged, conflicts


def load_user_config(path: str | os.PathLike) -> dict:
    """Read and check a user DeepSpeed JSON; raises ValueError with one line naming the problem."""
    where = f"parallel.ds_config={path}"
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{where}: no such file")
    problem = None  # raised outside the except: a chained cause would join the one-line report
    try:
        user = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        problem = f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    if problem:
        raise ValueError(problem)
    if not isinstance(user, dict):
        raise ValueError(f"{where}: must hold a JSON object, got {type(user).__name__}")
    for key in user:
        if key not in DS_TOP_LEVEL_KEYS:
            near = difflib.get_close_matches(key, DS_TOP_LEVEL_KEYS, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ValueError(f"{where}: unknown DeepSpeed key '{key}'{hint}")
        if key in MMGEN_OWNED and not (key == "fp16" and not _enabled(user[key])):
            raise ValueError(f"{where}: '{key}' is set by mmgen; use {MMGEN_OWNED[key]} instead")
    zero = user.get("zero_optimization")
    if isinstance(zero, dict) and "stage" in zero:  # one source of truth for the stage
        raise ValueError(f"{where}: 'zero_optimization.stage' is set by mmgen; use parallel=zero1|zero2|zero3 instead")
    ac = user.get("activation_checkpointing", {})
    if isinstance(ac, dict):
        for key in ac:
            if key not in ACTIVATION_CHECKPOINTING_KEYS:
                raise ValueError(f"{where}: unknown DeepSpeed key 'activation_checkpointing.{key}'")
    for key, target in SECTION_MODELS.items():
        if isinstance(user.get(key), dict):
            _check_section(where, key, user[key], target)
    return user


def _enabled(section) -> bool:
    return isinstance(section, dict) and bool(section.get("enabled", False))


def _check_section(where: str, key: str, section: dict, target: str) -> None:
    """Validate one section with DeepSpeed's own pydantic model."""
    import pydantic

    # DeepSpeed picks its accelerator on first use; name it as DeepSpeed would detect it, so the
    # import does not log a "Setting accelerator" warning into a one-line error report
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _cuda_available() else "cpu")
    module, name = target.split(":")
    model = getattr(importlib.import_module(module), name)
    problem = None  # raised outside the except: a chained cause would join the one-line report
    try:
        model(**section)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(part) for part in (key, *err.get("loc", ())))
        problem = f"{where}: {loc}: {err.get('msg', 'invalid value')}"
    except (TypeError, ValueError, AssertionError) as e:
        problem = f"{where}: {key}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if problem:
        raise ValueError(problem)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
