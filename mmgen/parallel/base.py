# The interface every parallelism backend implements; the trainer only talks to this.
"""An ``Engine`` owns the (possibly wrapped) model and its optimizer and hides how gradients
are synchronised and how state is sharded: DDP (ddp.py), FSDP2 (fsdp.py) and DeepSpeed ZeRO
(deepspeed.py) implement it; megatron-core plugs in behind the same methods.

The engine owns the step: :meth:`Engine.forward_backward` runs every micro-batch of one
optimizer step (accumulation context, mixed precision, backward) and :meth:`Engine.step`
applies the update. A pipeline schedule overrides ``forward_backward``; the trainer only
supplies ``loss_fn`` and never loops over micro-batches itself. The data-parallel rank, size
and group the trainer uses for data streams, noise seeds and count reductions come from the
engine's :class:`~mmgen.parallel.dims.ParallelDims`.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mmgen.parallel.dims import ParallelDims
from mmgen.parallel.dist import DistInfo

# loss_fn(model, micro_batch, micro_index) -> named scalar losses; "total" is back-propagated
LossFn = Callable[[torch.nn.Module, object, int], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class EngineContext:
    """Facts of the run that every engine is built with, besides the model and its configs.

    Args:
        dist: rank, world size and device of this process.
        dims: the parallel layout (built by the trainer before the data and the model).
        precision: ``trainer.precision`` (auto = bf16 autocast on CUDA, fp32 on CPU).
        micro_batch_size: ``data.batch_size`` (DeepSpeed's config needs it).
        grad_accum: micro-batches per optimizer step (``trainer.grad_accum``).
        fp8: ``trainer.fp8``: the trunk's linears in float8 (mmgen/parallel/float8.py).
        fp8_emulate: ``trainer.fp8_emulate``.
    """

    dist: DistInfo
    dims: ParallelDims
    precision: str = "auto"
    micro_batch_size: int = 1
    grad_accum: int = 1
    fp8: str = "none"
    fp8_emulate: bool = False

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and self.dist.device.type == "cuda")


class Engine(ABC):
    """What the trainer steps.

    Attributes:
        name: the backend (``parallel.name``), recorded in every checkpoint's meta.json.
        model: callable used for training forwards (may be a wrapper such as DDP).
        module: the plain single-device model (sampling, evaluation, export).
        optimizer: the optimizer the LR scheduler drives.
        dist: rank/world/device of this process.
        dims: the parallel layout.
    """

    model: torch.nn.Module
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer

    def __init__(self, name: str, ctx: EngineContext):
        self.name, self.ctx = name, ctx
        self.dist, self.dims = ctx.dist, ctx.dims

    # -- the data-parallel layout ------------------------------------------------------------
    @property
    def dp_size(self) -> int:
        """Data-parallel degree (ranks that see different data)."""
        return self.dims.dp

    @property
    def dp_rank(self) -> int:
        return self.dims.dp_rank

    @property
    def dp_group(self):
        """Process group of the data-parallel peers (None: the default group of all ranks)."""
        return self.dims.dp_group(self.dist.device.type)

    @property
    def grad_size(self) -> int:
        """Ranks whose gradients are summed: data- x context-parallel peers (each context-
        parallel rank holds the gradient of its own positions only)."""
        return self.dims.dp * self.dims.cp

    @property
    def grad_group(self):
        """Process group of :attr:`grad_size` (None: the default group of all ranks)."""
        return self.dims.dp_cp_group(self.dist.device.type)

    @property
    def context(self):
        """The context-parallel group's helper (``parallel.cp > 1``), else None."""
        if self.dims.cp == 1:
            return None
        if getattr(self, "_context", None) is None:
            from mmgen.parallel.context import ContextParallel

            self._context = ContextParallel(self.dims, self.dist.device.type)
        return self._context

    # -- the step ------------------------------------------------------------------------------
    def autocast(self):
        """Mixed precision of the forward (bf16 autocast per ``trainer.precision``)."""
        if self.ctx.bf16:
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def accumulate(self, is_last_microbatch: bool):
        """Context for one micro-batch's forward+backward; gradient sync only on the last."""
        return contextlib.nullcontext()

    def forward_backward(self, micro_batches: Sequence, loss_fn: LossFn) -> dict[str, torch.Tensor]:
        """Forward and backward of every micro-batch of one optimizer step, gradients
        accumulated and synchronised once (after the last micro-batch).

        Args:
            micro_batches: this rank's micro-batches of the step, on the device.
            loss_fn: ``loss_fn(model, batch, micro)`` runs the forward of micro-batch number
                ``micro`` with ``model`` and returns named scalar losses, already normalised by
                global counts; ``"total"`` is back-propagated. The index lets the caller seed
                per-micro-batch noise.

        Returns:
            every loss name -> its detached fp32 sum over this rank's micro-batches (with
            context parallelism: over its group's, each rank having run its slice of them).
        """
        sums: dict[str, torch.Tensor] = {}
        last = len(micro_batches) - 1
        context = self.context
        for i, batch in enumerate(micro_batches):
            if context is not None:
                batch = context.shard(batch)
            with self.accumulate(i == last):
                with self.autocast():
                    losses = loss_fn(self.model, batch, i)
                self.backward(losses["total"])
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        return sums if context is None else context.sum_losses(sums)

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss that is already normalised by *global* counts: backends that
        average gradients over data-parallel ranks must undo that average here."""

    @abstractmethod
    def step(self, grad_clip: float) -> torch.Tensor:
        """Clip (if > 0), step the optimizer, zero gradients; returns the pre-clip grad norm."""

    def skip_step(self) -> None:
        """Drop the accumulated gradients without updating (non-finite loss)."""
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def can_step_on_device(self) -> bool:
        """Whether :meth:`step_on_device` works: the update can be skipped without the host
        knowing whether the loss was finite. False unless a backend says otherwise."""
        return False

    def step_on_device(self, grad_clip: float, finite: torch.Tensor) -> torch.Tensor:
        """:meth:`step` if ``finite`` (a 0-d bool tensor on the device), else :meth:`skip_step`,
        decided on the device: no host synchronisation (``trainer.sync_every``)."""
        raise NotImplementedError(f"the {self.name} engine steps only after the host read the loss")

    # -- state -----------------------------------------------------------------------------------
    def layout(self) -> dict:
        """What a checkpoint records about the layout that wrote it (meta.json)."""
        return {"backend": self.name, "parallel": self.dims.degrees(), "world_size": self.dims.world_size,
                "versions": self.versions()}

    def versions(self) -> dict[str, str]:
        """Versions of the libraries whose formats this engine's checkpoints depend on."""
        return {"torch": torch.__version__}

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write model and optimizer state under ``path`` (called on every rank)."""

    @abstractmethod
    def load(self, path: Path, trust: bool = False, own: bool = False) -> None:
        """Restore what :meth:`save` wrote (called on every rank). Files that need pickle
        are unpickled only with ``trust`` (``checkpoint.trust``) or, with a warning, ``own``
        (this run wrote them into its own run directory): mmgen.safe_load."""

    @abstractmethod
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Full, unsharded plain-model state on rank 0 (a collective under sharded backends:
        every rank calls it; other ranks may get an empty dict)."""


class TorchEngine(Engine):
    """An engine whose gradients torch averages over data-parallel ranks (DDP, FSDP2) and
    whose optimizer is a plain torch optimizer over ``module``'s parameters."""

    def backward(self, loss: torch.Tensor) -> None:
        # the backend averages gradients over ranks; the loss is a global sum-normalised value,
        # so the correct gradient is the sum over ranks: scale by the data-parallel size (times
        # the context-parallel size: those ranks hold different positions of the same rows)
        (loss * self.grad_size).backward()

    def step(self, grad_clip: float) -> torch.Tensor:
        if self.dims.ep > 1:
            return self._step_expert_parallel(grad_clip)
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = grad_clip if grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):      # sharded (DTensor) gradients: the global norm
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    @property
    def can_step_on_device(self) -> bool:
        # torch's fused AdamW reads found_inf / grad_scale tensors on the device (the GradScaler
        # protocol); plain parameters only (a DTensor step would mix DTensors and plain tensors)
        return (self.dims.ep == 1 and bool(self.optimizer.defaults.get("fused"))
                and not any(hasattr(p, "device_mesh") for p in self.module.parameters()))

    def step_on_device(self, grad_clip: float, finite: torch.Tensor) -> torch.Tensor:
        """The update with no host synchronisation: the fused AdamW leaves weights, moments and
        step counts alone where ``found_inf`` is 1, and divides the gradients by ``grad_scale``
        inside its kernel, which applies the clip factor (``norm / grad_clip``, at least 1)
        without a pass of its own over the gradients. The clip is the same as
        ``clip_grad_norm_``'s up to rounding (a division by the inverse factor)."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        opt = self.optimizer
        opt.found_inf = (~finite).to(device=norm.device, dtype=torch.float32)
        if grad_clip > 0:
            opt.grad_scale = ((norm.float() + 1e-6) / grad_clip).clamp(min=1.0)
        try:
            opt.step()
        finally:
            del opt.found_inf
            if grad_clip > 0:
                del opt.grad_scale
        opt.zero_grad(set_to_none=True)
        return norm.detach()

    def _step_expert_parallel(self, grad_clip: float) -> torch.Tensor:
        """``parallel.ep > 1``: the experts' gradients were left out of DDP's / FSDP's
        reduction; sum them over the ranks holding the same experts, then clip by the norm in
        which each expert counts once (mmgen/parallel/ep.py)."""
        from mmgen.parallel.ep import clip_with_experts, reduce_expert_grads

        dev = self.dist.device.type
        reduce_expert_grads(self.module, self.dp_size, self.dims.expert_dp_group(dev))
        norm = clip_with_experts(self.module, grad_clip, self.dims.ep_group(dev))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()
