# One metrics processor: JSONL always; W&B and TensorBoard optionally (null objects otherwise); a bar.
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from mmgen.metrics.config import MetricsConfig

log = logging.getLogger(__name__)

# Dense bf16 peak (TFLOP/s) by device name fragment, for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def detect_peak_tflops(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)


class _NullWandb:
    def log(self, *a, **k): pass
    def finish(self, *a, **k): pass


class _NullTensorBoard:
    def log(self, *a, **k): pass
    def log_image(self, *a, **k): pass
    def finish(self, *a, **k): pass


class _TensorBoard:
    """Event files under ``runs/<name>/tensorboard/``: every numeric value of a metrics.jsonl
    record as a scalar under the same key and step, sample grids as images.

    The writer opens at the first event, with ``purge_step`` = that step: a resumed run re-logs
    the steps after its checkpoint, and TensorBoard's reader then drops the earlier process's
    events from that step on (as metrics.jsonl readers keep the last record of a step)."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._writer = None

    def _open(self, step: int):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=step)
        return self._writer

    def log(self, values: dict, step: int) -> None:
        w = self._open(step)
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                w.add_scalar(k, v, global_step=step)
        w.flush()  # a crashed run keeps what it logged, like metrics.jsonl

    def log_image(self, key: str, path: Path, step: int, caption: str = "") -> None:
        import numpy as np
        from PIL import Image

        w = self._open(step)
        with Image.open(path) as im:
            w.add_image(key, np.asarray(im.convert("RGB")), global_step=step, dataformats="HWC")
        if caption:
            w.add_text(f"{key}/caption", caption, global_step=step)
        w.flush()

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _init_tensorboard(cfg: MetricsConfig, run_dir: Path):
    if not cfg.tensorboard:
        return _NullTensorBoard()
    return _TensorBoard(run_dir / "tensorboard")


def _init_wandb(cfg: MetricsConfig, run_dir: Path, name: str, config: dict, tags: list[str]):
    if not cfg.wandb or cfg.wandb_mode == "disabled":
        return _NullWandb()
    import wandb

    group, name = wandb_placement(cfg, run_dir, name)
    return wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity or None,
                      group=group, job_type=cfg.wandb_job_type or None, name=name, id=_stable_id(run_dir),
                      resume="allow", dir=str(run_dir), mode=cfg.wandb_mode,
                      config=config, tags=list(cfg.tags) + tags)


def wandb_placement(cfg: MetricsConfig, run_dir: Path, name: str) -> tuple[str | None, str]:
    """(group, run name). Runs of a Hydra ``-m`` sweep live in ``runs/<name>-sweep/<N>``
    (configs/config.yaml): without an explicit group they are grouped by the sweep directory
    and named ``<name>-<N>``, so W&B shows one group with distinguishable runs."""
    sweep = Path(run_dir).parent.name
    if sweep.endswith("-sweep"):
        return cfg.wandb_group or sweep, f"{name}-{Path(run_dir).name}"
    return cfg.wandb_group or None, name


def _stable_id(run_dir: Path) -> str:
    """Same run directory -> same W&B run id, so a resumed job continues its W&B run."""
    f = run_dir / "wandb_id.txt"
    if f.is_file():
        return f.read_text().strip()
    import uuid

    rid = uuid.uuid4().hex[:12]
    f.write_text(rid)
    return rid


class MetricsLogger:
    """Rank 0 writes; other ranks get a logger whose methods do nothing."""

    def __init__(self, cfg: MetricsConfig, run_dir: Path, is_main: bool, name: str = "",
                 config: dict | None = None, tags: list[str] | None = None, total_steps: int = 0):
        self.is_main = is_main
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self._file = None
        self._bar = None
        self.wandb = _NullWandb()
        self.tensorboard = _NullTensorBoard()
        if not is_main:
            return
        # unbuffered binary append: each record reaches the file in one write() call, so a
        # record is never split across two writes (readers polling a live run still skip a
        # last line that has no newline yet)
        self._file = open(self.run_dir / "metrics.jsonl", "ab", buffering=0)
        self.wandb = _init_wandb(cfg, self.run_dir, name, config or {}, tags or [])
        self.tensorboard = _init_tensorboard(cfg, self.run_dir)
        if cfg.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, dynamic_ncols=True, desc="train", mininterval=1.0)

    def set_progress(self, step: int) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def log(self, step: int, values: dict) -> None:
        if not self.is_main:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) or torch.is_tensor(v) else v)
                 for k, v in values.items()}
        record = {"step": step, "time": round(time.time(), 3), **clean}
        self._file.write((json.dumps(record, allow_nan=True) + "\n").encode())
        self.wandb.log(clean, step=step)
        self.tensorboard.log(clean, step=step)
        if self._bar is not None:
            self._bar.n = step
            short = {k.split("/")[-1]: v for k, v in clean.items()
                     if k in ("loss/total", "loss/text", "loss/visual", "perf/tokens_per_s")}
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else v)
                                   for k, v in short.items()}, refresh=True)

    def log_image(self, step: int, key: str, path: Path, caption: str = "") -> None:
        if not self.is_main:
            return
        self.tensorboard.log_image(key, path, step, caption)
        if isinstance(self.wandb, _NullWandb):
            return
        import wandb

        self.wandb.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        self.wandb.finish()
        self.tensorboard.finish()
