# DDP backend: replicated model and optimizer, gradients all-reduced by DistributedDataParallel.
"""``parallel=ddp`` (also the single-process path). Parallelize: expert parallelism
(``parallel.ep``) -> FP8 (``trainer.fp8``) -> activation checkpointing -> compile on the meta model; the
DistributedDataParallel wrapper comes after materialisation (it broadcasts rank 0's
parameters at construction, so it needs real ones).

With ``parallel.ep > 1`` each rank holds ``1/ep`` of the experts: DDP ignores those parameters
(no broadcast, no all-reduce over all ranks; :meth:`TorchEngine.step` sums their gradients
over the expert-data-parallel group), and checkpoints hold the full expert set, gathered over
the EP group on save and cut again on load, so ``model.pt`` / ``optimizer.pt`` are the files
of one process: resume works at any EP degree and ``mmgen export`` reads them unchanged."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from mmgen.optim import OptimConfig, build_optimizer
from mmgen.parallel.base import EngineContext, TorchEngine
from mmgen.parallel.config import ParallelConfig
from mmgen.parallel.parallelize import apply_block_transforms, apply_expert_parallel_from, apply_float8_from


class DDPEngine(TorchEngine):
    """One data-parallel rank: the plain model. Several: DDP over the data-parallel group,
    gloo (CPU) or NCCL (GPU)."""

    def __init__(self, module: torch.nn.Module, cfg: ParallelConfig, optim: OptimConfig, ctx: EngineContext):
        super().__init__(cfg.name, ctx)
        self.module = module
        dev = self.dist.device
        self.ep_group = self.dims.ep_group(dev.type) if self.dims.ep > 1 else None
        if self.ep_group is not None:
            from mmgen.parallel.ep import expert_param_names

            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, expert_param_names(module))
        if self.grad_size > 1:   # data-parallel (x context-parallel) peers sum their gradients
            self.model = DistributedDataParallel(
                module, device_ids=[dev.index] if dev.type == "cuda" else None, process_group=self.grad_group,
                bucket_cap_mb=cfg.bucket_cap_mb, find_unused_parameters=cfg.find_unused_parameters,
                gradient_as_bucket_view=cfg.gradient_as_bucket_view)
        else:
            self.model = module
        self.optimizer = build_optimizer(optim, module)

    def accumulate(self, is_last_microbatch: bool):
        if isinstance(self.model, DistributedDataParallel) and not is_last_microbatch:
            return self.model.no_sync()
        return super().accumulate(is_last_microbatch)

    def save(self, path: Path) -> None:
        if self.ep_group is not None:   # every rank: the experts are gathered (a collective)
            from mmgen.parallel.ep import full_model_state, full_optimizer_state

            model = full_model_state(self.module, self.module.state_dict(), self.ep_group)
            optim = full_optimizer_state(self.module, self.optimizer, self.ep_group)
        elif self.dist.is_main:
            model, optim = self.module.state_dict(), self.optimizer.state_dict()
        if self.dist.is_main:  # replicated state: one copy is the whole state
            torch.save(model, path / "model.pt")
            torch.save(optim, path / "optimizer.pt")

    def load(self, path: Path, trust: bool = False, own: bool = False) -> None:
        """Both files hold tensors and plain values: always read with weights_only=True
        (``trust`` and ``own`` are not needed)."""
        from mmgen.safe_load import load_plain

        dev = self.dist.device
        check_ddp_files(path)
        model = load_plain(path / "model.pt", map_location=dev, trustable=False)
        optim = load_plain(path / "optimizer.pt", map_location=dev, trustable=False)
        if self.ep_group is not None:   # the files hold every expert: keep this rank's
            from mmgen.parallel.ep import local_model_state, local_optimizer_state

            model = local_model_state(self.module, model)
            optim = local_optimizer_state(self.module, self.optimizer, optim)
        self.module.load_state_dict(model)
        self.optimizer.load_state_dict(optim)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The plain model's weights (with ``parallel.ep > 1`` a collective: the experts are
        gathered, every rank gets the full set)."""
        state = self.module.state_dict()
        if self.ep_group is not None:
            from mmgen.parallel.ep import full_model_state

            state = full_model_state(self.module, state, self.ep_group)
        return {k: v.detach().cpu() for k, v in state.items()}


# -- the backend's registry functions (mmgen.parallel.registry) ----------------------------------
def parallelize(model: torch.nn.Module, cfg: ParallelConfig, ctx: EngineContext, *, compile: bool) -> None:
    """Expert parallelism -> FP8 -> activation checkpointing -> compile, on the meta-device plain model."""
    apply_expert_parallel_from(model, cfg, ctx)
    apply_float8_from(model, ctx)
    apply_block_transforms(model, cfg.activation_checkpointing, compile)


def build_engine(model: torch.nn.Module, cfg: ParallelConfig, optim: OptimConfig, ctx: EngineContext) -> DDPEngine:
    """Wrap the materialised model (DDP when there are several data-parallel ranks)."""
    return DDPEngine(model, cfg, optim, ctx)


def check_ddp_files(path: Path) -> None:
    """A DDP checkpoint's two files are there; if not, say which is missing, or that the
    checkpoint is another backend's (a missing file of a DDP checkpoint is no layout change)."""
    missing = [f for f in ("model.pt", "optimizer.pt") if not (path / f).is_file()]
    if not missing:
        return
    meta_file = path / "meta.json"
    backend = json.loads(meta_file.read_text()).get("backend", "") if meta_file.is_file() else ""
    if backend == "ddp" or (path / "optimizer.pt").is_file():
        raise FileNotFoundError(f"{path}: {' and '.join(missing)} missing from this DDP checkpoint")
    raise FileNotFoundError(
        f"{path}: not a DDP checkpoint (no model.pt; written by {backend or 'a sharded backend?'}); start "
        f"a new run with checkpoint.init_from={path.parent.parent} to take its weights into parallel=ddp")


def checkpoint_state_dict(ckpt: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """The replicated weights, one file of tensors (weights_only=True; ``trust`` unused)."""
    from mmgen.safe_load import load_plain

    if not (ckpt / "model.pt").is_file():
        raise FileNotFoundError(f"{ckpt}: not a DDP checkpoint (no model.pt)")
    return load_plain(ckpt / "model.pt", trustable=False)
