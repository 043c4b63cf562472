# Typed configuration of metrics and dashboards (Hydra group `metrics/`).
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class MetricsConfig:
    """Args:
        wandb: also log to Weights & Biases (``metrics.jsonl`` is always written).
        tensorboard: also write TensorBoard event files to ``runs/<name>/tensorboard/`` (the
            same keys and steps as metrics.jsonl; sample grids as images). Both backends at
            once: ``metrics=[wandb,tensorboard]`` or ``metrics=wandb metrics.tensorboard=true``.
        wandb_mode: ``offline`` (no network; sync later with ``wandb sync``) or ``online``.
        wandb_project, wandb_entity, wandb_group, tags: W&B run placement. An empty
            ``wandb_group`` groups the runs of one ``-m`` sweep (``runs/<name>-sweep/N``) under
            ``<name>-sweep`` and names each ``<name>-N``.
        wandb_job_type: W&B job type (``train``; e.g. ``eval`` or ``bench`` for other runs).
        progress: show a progress bar on rank 0.
        peak_tflops: accelerator peak for MFU; 0 = detect (H100/H200 bf16 dense: 989).
        router_dead_intervals: MoE: warn when an expert gets no tokens in this many consecutive
            log intervals (0: never).
        router_heatmap_every: MoE: steps between per-expert load heat maps (``router/load``
            image, ``runs/<name>/router/``; taken at the next log step; 0: never).
    """

    wandb: bool = False
    tensorboard: bool = False
    wandb_mode: str = "offline"
    wandb_project: str = "mmgen"
    wandb_entity: str = ""
    wandb_group: str = ""
    wandb_job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    progress: bool = True
    peak_tflops: float = 0.0
    router_dead_intervals: int = 3
    router_heatmap_every: int = 100

    def validate(self) -> None:
        if not (math.isfinite(self.peak_tflops) and self.peak_tflops >= 0):
            raise ValueError(f"metrics.peak_tflops must be a finite number >= 0 (0 = detect), got {self.peak_tflops}")
        if self.router_dead_intervals < 0 or self.router_heatmap_every < 0:
            raise ValueError("metrics.router_dead_intervals and metrics.router_heatmap_every must be >= 0")
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"metrics.wandb_mode='{self.wandb_mode}' must be offline, online or disabled")
