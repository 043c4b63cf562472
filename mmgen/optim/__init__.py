# Optimizer and learning-rate schedule (Hydra group `optim/`).
"""AdamW with linear warm-up and cosine (or constant) decay to ``min_lr_ratio * lr``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class OptimConfig:
    """Args:
        lr: peak learning rate after warm-up.
        betas, eps, weight_decay: AdamW. Weight decay applies to matrices only (not to norms,
            biases, embeddings' position tables), the usual LLM practice.
        warmup_steps: linear warm-up from 0.
        decay: ``cosine``, ``linear`` or ``constant`` after warm-up.
        min_lr_ratio: floor of the decay, as a fraction of ``lr``.
        grad_clip: max global gradient norm (0 disables clipping; the norm is still logged).
        fused: use the fused AdamW kernel on CUDA.
        fused_cpu: use torch's fused AdamW on CPU too. The trainer sets it when
            ``trainer.sync_every > 1`` on a CPU: only the fused step can skip a non-finite
            update on the device, without the host reading the loss first.
    """

    name: str = "adamw"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 100
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    fused: bool = True
    fused_cpu: bool = False

    def validate(self) -> None:
        if self.name != "adamw":
            raise ValueError(f"optim.name='{self.name}' is not available (available: adamw)")
        # NaN compares False with everything, so each bound is written as "ok" (never "bad"),
        # and inf is refused explicitly: either would train on NaN weights from the first step
        finite = math.isfinite
        if not (finite(self.lr) and self.lr > 0):
            raise ValueError(f"optim.lr must be a finite number > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(finite(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        for key in ("eps", "weight_decay", "grad_clip"):
            value = getattr(self, key)
            if not (finite(value) and value >= 0):
                raise ValueError(f"optim.{key} must be a finite number >= 0, got {value}")
        if self.decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"optim.decay='{self.decay}' must be cosine, linear or constant")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


def decays(name: str, p: torch.Tensor) -> bool:
    """Whether parameter ``name`` takes weight decay: 2-D+ weights except embedding tables
    (the one rule, also for backends that group parameters themselves, e.g. megatron)."""
    is_table = "embed" in name.lower() or name.endswith("pos.weight")
    return p.ndim >= 2 and not is_table


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D+ weights except embedding tables; never decay norms and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module, groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (default :func:`param_groups`; a backend may regroup them, e.g.
    DeepSpeed's expert groups, keeping each parameter's hyper-parameters)."""
    on_cuda = any(p.is_cuda for p in model.parameters())
    groups = param_groups(model, cfg.weight_decay) if groups is None else groups
    return torch.optim.AdamW(groups, lr=cfg.lr,
                             betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=bool(cfg.fused and (on_cuda or cfg.fused_cpu)))


def lr_factor(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.decay == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(cfg: OptimConfig, optimizer, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, total_steps))
