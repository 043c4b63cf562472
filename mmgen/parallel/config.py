# Typed configuration of the parallelism backend (Hydra group `parallel/`).
from __future__ import annotations

from dataclasses import dataclass

from mmgen.parallel.registry import BACKENDS, check_backend

# DeepSpeed ZeRO stages are backend names rather than a `zero_stage` field next to a generic
# `deepspeed` name: `parallel=zero2` selects configs/parallel/zero2.yaml, `parallel.name=zero3`
# works on the command line too, and no pair of fields can disagree about the stage.
ZERO_BACKENDS = tuple(n for n in BACKENDS if n.startswith("zero"))
ACTIVATION_CHECKPOINTING = ("none", "torch", "deepspeed")
# backends that implement parallel.ep (mmgen/parallel/ep.py wired into the engine)
EP_BACKENDS = ("ddp", "fsdp2", "megatron", "zero1", "zero2")


@dataclass
class ParallelConfig:
    """How the plain model is distributed. One schema for every backend, so a run switches
    backend with ``parallel=<name>`` and nothing else.

    Args:
        name: backend: ``ddp`` (torch DistributedDataParallel; also the single-process path),
            ``fsdp2`` (torch ``fully_shard`` per block: parameters, gradients and optimizer
            states sharded; DCP checkpoints),
            ``zero1`` / ``zero2`` / ``zero3`` (DeepSpeed ZeRO stage 1: optimizer states
            sharded; 2: + gradients; 3: + parameters). See docs/deepspeed.md.
        dist_backend: ``auto`` (NCCL on CUDA, gloo on CPU), ``nccl`` or ``gloo``.
        timeout_minutes: collective timeout; a hung collective becomes an error after it.
        find_unused_parameters: DDP option, for models with parameters a step may skip.
        bucket_cap_mb: DDP gradient bucket size.
        reshard_after_forward: FSDP2: free each block's gathered parameters after its forward
            and gather them again for the backward (less memory, one more all-gather).
        fsdp_param_dtype: FSDP2: ``fp32`` (the numbers of DDP under autocast) or ``bf16``
            (parameters gathered and used in bf16; gradients reduced in fp32).
        gradient_as_bucket_view: DDP: gradients are views into the all-reduce buckets instead
            of separate tensors (saves one gradient copy: 4.8 GB for the 1b flavor in fp32).
        activation_checkpointing: recompute each transformer block in the backward instead of
            keeping its activations: ``none``, ``torch`` (torch.utils.checkpoint, any backend)
            or ``deepspeed`` (deepspeed.checkpointing, ZeRO backends only).
        offload: ZeRO: ``cpu`` keeps optimizer states and fp32 master weights in host memory
            and steps them there; ``none`` keeps them on the device.
        offload_params: ZeRO-3 with ``offload=cpu``: the parameter shards live in host memory
            too and are fetched for each forward/backward.
        overlap_comm: ZeRO: overlap gradient reduction with the backward (more memory).
        contiguous_gradients: ZeRO: copy gradients into one buffer as they are produced
            (less fragmentation).
        reduce_bucket_size: ZeRO: elements reduced per collective.
        allgather_bucket_size: ZeRO-1/2: elements all-gathered per collective after the step.
        stage3_prefetch_bucket_size: ZeRO-3: parameter elements fetched ahead of use.
        stage3_param_persistence_threshold: ZeRO-3: parameters with fewer elements stay whole
            on every rank (norms, biases); 0 partitions everything.
        stage3_max_live_parameters: ZeRO-3: gathered elements kept before releasing.
        stage3_max_reuse_distance: ZeRO-3: keep a gathered parameter if it is used again
            within this many elements.
        ds_config: optional path of a DeepSpeed JSON whose fields override what mmgen builds
            from the fields above (each overridden field is logged as a warning; unknown keys
            stop the run at start-up).
        tp: tensor-parallel degree (``parallel=megatron`` only; docs/megatron.md).
        pp: pipeline-parallel degree (megatron only; 1F1B over ``trainer.grad_accum``
            micro-batches).
        sequence_parallel: megatron: split the residual stream's sequence over the TP ranks
            between the tensor-parallel regions (needs tp > 1).
        distributed_optimizer: megatron: shard optimizer states and fp32 master weights over
            the data-parallel ranks (megatron's DistributedOptimizer).
        cp: context-parallel degree for long sequences (``parallel=ddp`` or ``fsdp2``): the
            ``cp`` ranks of one data-parallel rank read the same rows and each keeps
            ``seq_len / cp`` positions of every row (docs/sequence_parallel.md).
        cp_impl: how attention sees the whole sequence under ``cp > 1``: ``ulysses`` (an
            all-to-all over heads around attention; mmgen/parallel/context.py).
        ep: expert-parallel degree (``parallel=ddp|fsdp2|zero1|zero2|megatron``; MoE models):
            each MoE FFN's experts are split over ``ep`` neighbouring data-parallel ranks, tokens reach them by
            all-to-all; everything else stays replicated (ddp) or sharded (fsdp2) as before.
            Divides the data-parallel size and ``model.moe_experts`` (docs in
            mmgen/models/README.md, "Expert parallelism"); under megatron the EP ranks are cut
            from the TP x DP ranks (docs/megatron.md).
        moe_token_dispatcher: megatron: how tokens reach their experts' ranks, ``alltoall``
            (``MoEAlltoAllTokenDispatcher``) or ``allgather`` (``MoEAllGatherTokenDispatcher``).
    """

    name: str = "ddp"
    dist_backend: str = "auto"
    timeout_minutes: float = 10.0
    find_unused_parameters: bool = False
    bucket_cap_mb: int = 25
    gradient_as_bucket_view: bool = True
    reshard_after_forward: bool = True
    fsdp_param_dtype: str = "fp32"
    activation_checkpointing: str = "none"
    offload: str = "none"
    offload_params: bool = False
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    ds_config: str = ""
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    cp: int = 1
    cp_impl: str = "ulysses"
    ep: int = 1
    moe_token_dispatcher: str = "alltoall"

    @property
    def is_zero(self) -> bool:
        return self.name in ZERO_BACKENDS

    @property
    def zero_stage(self) -> int:
        """ZeRO stage of a ``zero*`` backend (0 for the others)."""
        return int(self.name[-1]) if self.is_zero else 0

    def validate(self) -> None:
        check_backend(self.name)  # the registry is the list of backends
        if self.dist_backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"parallel.dist_backend='{self.dist_backend}' must be auto, nccl or gloo")
        if self.timeout_minutes <= 0:
            raise ValueError("parallel.timeout_minutes must be > 0")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ValueError(f"parallel.activation_checkpointing='{self.activation_checkpointing}' must be "
                             f"one of {', '.join(ACTIVATION_CHECKPOINTING)}")
        if self.activation_checkpointing == "deepspeed" and not self.is_zero:
            raise ValueError("parallel.activation_checkpointing=deepspeed needs a ZeRO backend "
                             "(parallel=zero1|zero2|zero3); use 'torch' with ddp")
        if self.fsdp_param_dtype not in ("fp32", "bf16"):
            raise ValueError(f"parallel.fsdp_param_dtype='{self.fsdp_param_dtype}' must be fp32 or bf16")
        if self.offload not in ("none", "cpu"):
            raise ValueError(f"parallel.offload='{self.offload}' must be none or cpu")
        if self.offload != "none" and not self.is_zero:
            raise ValueError(f"parallel.offload={self.offload} needs a ZeRO backend (parallel=zero1|zero2|zero3)")
        if self.offload_params and (self.name != "zero3" or self.offload != "cpu"):
            raise ValueError("parallel.offload_params=true needs parallel=zero3 and parallel.offload=cpu")
        sizes = {"reduce_bucket_size": self.reduce_bucket_size, "allgather_bucket_size": self.allgather_bucket_size}
        for key, value in sizes.items():
            if value < 1:
                raise ValueError(f"parallel.{key} must be >= 1, got {value}")
        for key in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                    "stage3_max_live_parameters", "stage3_max_reuse_distance"):
            if getattr(self, key) < 0:
                raise ValueError(f"parallel.{key} must be >= 0, got {getattr(self, key)}")
        if self.ep < 1:
            raise ValueError(f"parallel.ep={self.ep} must be >= 1")
        if self.moe_token_dispatcher not in ("alltoall", "allgather"):
            raise ValueError(f"parallel.moe_token_dispatcher='{self.moe_token_dispatcher}' must be alltoall or "
                             f"allgather")
        if min(self.tp, self.pp) < 1:
            raise ValueError(f"parallel.tp={self.tp} and parallel.pp={self.pp} must be >= 1")
        megatron_only = {"tp": self.tp > 1, "pp": self.pp > 1, "sequence_parallel": self.sequence_parallel,
                         "distributed_optimizer": self.distributed_optimizer}
        if self.name != "megatron" and any(megatron_only.values()):
            used = [k for k, v in megatron_only.items() if v]
            raise ValueError(f"parallel.{used[0]} needs parallel=megatron (parallel.name is '{self.name}')")
        if self.sequence_parallel and self.tp < 2:
            raise ValueError("parallel.sequence_parallel=true splits the sequence over tensor-parallel ranks: "
                             "it needs parallel.tp >= 2")
        check_context_parallel(self)
        if self.ep < 1:
            raise ValueError(f"parallel.ep={self.ep} must be >= 1")
        if self.ep > 1 and self.name not in EP_BACKENDS:
            # ZeRO-1/2 take mmgen's experts as DeepSpeed expert parameters (mmgen/parallel/
            # deepspeed.py); ZeRO-3 partitions expert weights only for DeepSpeed's own AutoEP
            # layers (it refuses native MoE), which route with their own gate, not mmgen's router
            raise ValueError(f"parallel.ep={self.ep} is implemented for parallel={', '.join(EP_BACKENDS)}, not "
                             f"parallel={self.name} (DeepSpeed 0.19.8's ZeRO-3 partitions experts only for its own "
                             f"MoE layers): use parallel=zero2 or parallel=fsdp2")
        if self.ep > 1 and self.name == "zero2" and not self.contiguous_gradients:
            # DeepSpeed's ZeRO-2 asserts contiguous gradients once it holds expert parameters
            raise ValueError("parallel.ep>1 under parallel=zero2 needs parallel.contiguous_gradients=true")
        if self.ep > 1 and self.cp > 1:
            raise ValueError(f"parallel.ep={self.ep} with parallel.cp={self.cp} is not supported yet (expert groups "
                             f"are cut from data-parallel ranks only): use one of them")
        if self.ep > 1 and self.name == "fsdp2" and self.fsdp_param_dtype != "fp32":
            raise ValueError("parallel.ep>1 under fsdp2 keeps the experts out of fully_shard (fp32 parameters): "
                             "use parallel.fsdp_param_dtype=fp32 (bf16 compute comes from trainer.precision)")
        if self.ds_config:
            if not self.is_zero:
                raise ValueError(f"parallel.ds_config is a DeepSpeed JSON; it needs parallel=zero1|zero2|zero3, "
                                 f"not '{self.name}'")
            from mmgen.parallel.ds_config import load_user_config

            load_user_config(self.ds_config)  # unknown or mmgen-owned keys: one line, at start-up

    def validate_model(self, model, seq_len: int) -> None:
        """Checks between this layout and the architecture (megatron: heads, KV heads and FFN
        width divisible by TP, layers by PP, the sequence by the SP degree); ValueError, one line."""
        if self.name == "megatron":
            from mmgen.parallel.megatron.checks import check_model

            check_model(self, model, seq_len)
        if self.cp > 1:
            from mmgen.parallel.context import check_model as check_cp_model

            check_cp_model(self, model, seq_len)
        if self.ep > 1:
            from mmgen.models.moe import moe_layer_ids

            if not moe_layer_ids(model):
                raise ValueError(f"parallel.ep={self.ep} shards experts, but model '{getattr(model, 'name', '')}' "
                                 f"(block={model.block}) has no MoE layer (use block=moe|motmoe)")
            if model.moe_experts % self.ep:
                raise ValueError(f"model.moe_experts={model.moe_experts} is not divisible by parallel.ep={self.ep}")


CP_IMPLS = ("ulysses",)
CP_BACKENDS = ("ddp", "fsdp2")


def check_context_parallel(cfg: ParallelConfig) -> None:
    """``parallel.cp`` / ``cp_impl`` against the backend; ValueError, one line."""
    if cfg.cp < 1:
        raise ValueError(f"parallel.cp={cfg.cp} must be >= 1")
    if cfg.cp_impl not in CP_IMPLS:
        raise ValueError(f"parallel.cp_impl='{cfg.cp_impl}' must be one of {', '.join(CP_IMPLS)}")
    if cfg.cp == 1 or cfg.name in CP_BACKENDS:
        return
    ulysses = f"parallel=ddp (or fsdp2) parallel.cp={cfg.cp} parallel.cp_impl=ulysses"
    if cfg.name == "megatron":
        import importlib.util

        if importlib.util.find_spec("transformer_engine") is None:
            raise ValueError(f"parallel.cp={cfg.cp} with parallel=megatron needs Transformer Engine (megatron's "
                             f"context parallelism runs only in TEDotProductAttention; not importable here): "
                             f"use Ulysses sequence parallelism instead, {ulysses}")
        raise ValueError(f"parallel.cp={cfg.cp} with parallel=megatron: megatron's Transformer Engine context "
                         f"parallelism is not wired into mmgen's megatron layers; use {ulysses}")
    raise ValueError(f"parallel.cp={cfg.cp} runs with parallel=ddp or parallel=fsdp2, not '{cfg.name}' ({ulysses})")
