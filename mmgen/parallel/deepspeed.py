# DeepSpeed ZeRO backend (stages 1-3, CPU offload, bf16, activation checkpointing) behind Engine.
"""``parallel=zero1|zero2|zero3`` run the plain model under ``deepspeed.initialize`` with a
JSON that :mod:`mmgen.parallel.ds_config` builds from mmgen's typed config.

What mmgen keeps for itself, so that the trainer loop is the same as under DDP:

* the optimizer: mmgen's AdamW with its parameter groups is passed to DeepSpeed (which shards
  its states); ``engine.optimizer`` is that torch optimizer, so mmgen's LambdaLR writes the LR
  into the very param-group dicts the ZeRO optimizer steps with;
* the loss scale: the trainer's loss is normalised by *global* valid counts, so the correct
  gradient is the sum over ranks and micro-batches. DeepSpeed averages over data-parallel ranks
  and, by default, divides the loss by the accumulation steps: :meth:`ZeroEngine.backward`
  multiplies by the DP size and passes ``scale_wrt_gas=False``;
* accumulation boundaries: ``forward_backward`` (the base Engine's loop) says which
  micro-batch is the last (``set_gradient_accumulation_boundary``) and the trainer calls
  ``step`` once per optimizer step.

Parallelize (on the meta model, :mod:`mmgen.parallel.parallelize`): activation checkpointing
-> compile; the model is then materialised and initialised whole on every rank (the same
weights as one process) and ``deepspeed.initialize`` partitions it (ZeRO-3: each rank keeps
its part of the parameters; ``deepspeed.zero.Init`` is not used).

Checkpoints are DeepSpeed's own sharded files under ``<checkpoint>/deepspeed/`` (every rank
writes its optimizer shard) with DeepSpeed's ``latest`` file naming that tag, inside mmgen's
atomic tmp-dir + rename layout; :func:`checkpoint_state_dict` turns them into one plain state
dict with DeepSpeed's ``zero_to_fp32`` (``mmgen export``). DeepSpeed reads its shards with
pickle: :func:`check_shards` proves each file plain first (the trust rule of
:mod:`mmgen.safe_load`).

Expert parallelism (``parallel.ep > 1``, ZeRO-1/2): parallelize splits the experts and sets
mmgen's all-to-all dispatcher (:mod:`mmgen.parallel.ep`), as under DDP; the experts are then
marked as DeepSpeed expert parameters (:func:`mark_expert_params`), the optimizer gets
DeepSpeed's MoE param groups (:func:`build_expert_optimizer`) and the engine is built with
DeepSpeed's expert handling on (:func:`initialize_with_experts`), so ZeRO reduces and
partitions expert gradients and states over the expert-data-parallel group and counts each
expert once in the grad norm. Loading resets each rank's experts from its fp32 masters
(:func:`restore_experts_from_masters`); the export merges expert groups per EP rank
(:func:`expert_parallel_state_dict`). docs/deepspeed.md "Expert parallelism" has the details.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import re
from pathlib import Path

import torch

from mmgen.optim import OptimConfig, build_optimizer
from mmgen.parallel.base import Engine, EngineContext
from mmgen.parallel.config import ParallelConfig
from mmgen.parallel.dist import DistInfo, ensure_process_group, process_group_backend
from mmgen.parallel.parallelize import apply_block_transforms, apply_expert_parallel_from
from mmgen.parallel.ds_config import build_ds_config, load_user_config, merge_user_config

log = logging.getLogger(__name__)

DS_TAG = "deepspeed"  # DeepSpeed's checkpoint "tag": the sub-directory of an mmgen checkpoint
ENGINE_META = "mmgen_engine.json"  # stage / world size / dtype the shards were written with


class ZeroEngine(Engine):
    """The plain model and mmgen's optimizer under a DeepSpeed ZeRO engine.

    Attributes:
        model: the ``deepspeed.DeepSpeedEngine`` (called for training forwards).
        module: the plain model (under ZeRO-3 its parameters are shards outside a forward).
        optimizer: mmgen's torch AdamW; DeepSpeed steps it on (sharded) fp32 master weights.
        ds_config: the DeepSpeed JSON in effect (mmgen's fields + ``parallel.ds_config``).
        stage: the ZeRO stage in effect.
    """

    def __init__(self, module: torch.nn.Module, cfg: ParallelConfig, optim: OptimConfig, ctx: EngineContext):
        super().__init__(cfg.name, ctx)
        dist = ctx.dist
        deepspeed = import_deepspeed(dist.device)
        init_deepspeed_distributed(deepspeed, cfg, dist)
        self.module = module
        base = build_ds_config(cfg, micro_batch_size=ctx.micro_batch_size, grad_accum=ctx.grad_accum, bf16=ctx.bf16,
                               grad_clip=optim.grad_clip, pin_memory=dist.device.type == "cuda")
        user = load_user_config(cfg.ds_config) if cfg.ds_config else {}
        self.ds_config, conflicts = merge_user_config(base, user)
        if dist.is_main:
            for c in conflicts:
                log.warning("parallel.ds_config overrides %s", c)
        self.stage = cfg.zero_stage  # a user JSON may not change it (ds_config.load_user_config)
        if self.stage == 3:
            register_external_parameters(deepspeed, module)
        self.ep = ctx.dims.ep
        if self.ep > 1:
            # mmgen's experts (split by parallelize, tokens exchanged by ep.py's all-to-all) as
            # DeepSpeed expert parameters: ZeRO reduces and partitions them over the expert-
            # data-parallel group (module docstring)
            group_name = mark_expert_params(module, self.ep, ctx.dims.ep_group(dist.device.type))
            self.optimizer = build_expert_optimizer(optim, module)
            self.model = initialize_with_experts(deepspeed, module, self.optimizer,
                                                 copy.deepcopy(self.ds_config), group_name)
        else:
            self.optimizer = build_optimizer(optim, module)
            self.model, _, _, _ = deepspeed.initialize(model=module, optimizer=self.optimizer,
                                                       config=copy.deepcopy(self.ds_config),
                                                       dist_init_required=False)
        if cfg.activation_checkpointing == "deepspeed":
            deepspeed.checkpointing.configure(None, deepspeed_config=copy.deepcopy(self.ds_config))

    # -- the step -------------------------------------------------------------------------
    @contextlib.contextmanager
    def accumulate(self, is_last_microbatch: bool):
        # forward_backward owns the boundary (the trainer steps once per grad_accum micro-batches)
        self.model.set_gradient_accumulation_boundary(is_last_microbatch)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over DP ranks; the loss is a global sum-normalised value,
        # so the correct gradient is the sum: scale by the DP size (exactly like DDPEngine), and
        # keep DeepSpeed from also dividing by the accumulation steps.
        self.model.backward(loss * self.dp_size, scale_wrt_gas=False)

    def step(self, grad_clip: float) -> torch.Tensor:
        """Clip (DeepSpeed's ``gradient_clipping``, set from optim.grad_clip at build time),
        step, zero gradients; returns the global pre-clip grad norm."""
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return torch.tensor(float("nan") if norm is None else float(norm))

    def skip_step(self) -> None:
        """Drop the accumulated gradients without an update (non-finite loss).

        Every ZeRO optimizer already skips the update and clears its gradient buffers when the
        global grad norm is not finite; stage 1/2 with bf16 parameters only checks when asked
        (``check_grad_overflow``), so it is asked for this one step.
        """
        opt = self.model.optimizer
        forced = getattr(opt, "check_grad_overflow", None) is False
        if forced:
            opt.check_grad_overflow = True
        try:
            self.model.step()
        finally:
            if forced:
                opt.check_grad_overflow = False
        if self.model.was_step_applied():
            log.warning("non-finite loss but finite gradients: DeepSpeed applied this update")

    # -- checkpoints ------------------------------------------------------------------------
    def versions(self) -> dict[str, str]:
        import deepspeed

        return {**super().versions(), "deepspeed": deepspeed.__version__}

    def save(self, path: Path) -> None:
        # `latest` names the tag, so DeepSpeed's own tools (the zero_to_fp32.py copied next to
        # it) read <checkpoint>/ without being told tag="deepspeed"
        self.model.save_checkpoint(str(path), tag=DS_TAG, client_state={}, save_latest=True)
        if self.dist.is_main:
            meta = {"stage": self.stage, "world_size": self.dist.world_size, "ep": self.ep,
                    "bf16": bool(self.ds_config.get("bf16", {}).get("enabled", False))}
            (Path(path) / DS_TAG / ENGINE_META).write_text(json.dumps(meta))

    def load(self, path: Path, trust: bool = False, own: bool = False) -> None:
        """DeepSpeed's loader unpickles its shards: each is proven plain first
        (:func:`check_shards`) unless ``trust``; ``own``: this run's own checkpoint, whose
        refused shards are loaded with a warning."""
        meta_file = Path(path) / DS_TAG / ENGINE_META
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"{path}: not written by a ZeRO backend (no {DS_TAG}/{ENGINE_META}); to start this run from "
                f"its weights use checkpoint.init_from={path} with a new run name or checkpoint.resume=none")
        meta = json.loads(meta_file.read_text())
        ep = meta.get("ep", 1)
        if meta["stage"] != self.stage or meta["world_size"] != self.dist.world_size or ep != self.ep:
            raise FileNotFoundError(
                f"{path}: written by ZeRO-{meta['stage']} on {meta['world_size']} ranks with parallel.ep={ep}, this "
                f"run is ZeRO-{self.stage} on {self.dist.world_size} with parallel.ep={self.ep}: DeepSpeed shards only "
                f"resume on the same layout; use checkpoint.init_from={path} (weights only) with checkpoint.resume=none")
        check_shards(Path(path) / DS_TAG, trust, own)
        loaded, _ = self.model.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=False, load_module_strict=True)
        if loaded is None:
            raise FileNotFoundError(f"{path}: DeepSpeed could not load {DS_TAG}/")
        if self.ep > 1:
            restore_experts_from_masters(self.module)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 plain-model state (the optimizer's master weights, gathered).

        Collective: call it on every rank; every rank gets the full state.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.module.named_parameters():
            full = safe_get_full_fp32_param(p)   # experts: gathered over their expert-data-parallel group
            out[name] = (full if full is not None else p).detach().float().cpu().clone()
        if self.ep > 1:   # and then over the EP group: every expert, as one process holds them
            from mmgen.parallel.ep import expert_slices, gather_expert_rows

            group = self.dims.ep_group(self.dist.device.type)
            dev = self.dist.device if self.dist.device.type == "cuda" else torch.device("cpu")
            for name in expert_slices(self.module):
                out[name] = gather_expert_rows(out[name].to(dev), group).cpu()
        return out


def restore_experts_from_masters(module: torch.nn.Module) -> None:
    """After ``load_checkpoint`` under EP: DeepSpeed wrote one module-state file (rank 0's
    parameters, so rank 0's experts) and loads it into every rank, then restores each rank's own
    fp32 master partitions without copying them back into the parameters. Every rank's experts
    are therefore reset from its masters (gathered over the expert-data-parallel group, a
    collective); the dense parameters are the same on every rank and were right already."""
    from deepspeed.utils import safe_get_full_fp32_param

    from mmgen.parallel.ep import expert_params

    with torch.no_grad():
        for p in expert_params(module):
            p.copy_(safe_get_full_fp32_param(p))


# -- set-up helpers ---------------------------------------------------------------------------
def import_deepspeed(device: torch.device):
    """Import deepspeed on the accelerator of ``device``, without its CPU JIT ops."""
    # DeepSpeed picks its accelerator once, from DS_ACCELERATOR or by detection
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name != device.type:
        from mmgen.errors import ConfigError

        raise ConfigError(f"DeepSpeed uses accelerator '{name}' but this run trains on '{device.type}': "
                          f"set DS_ACCELERATOR={device.type}")
    if device.type == "cpu":
        # The CPU accelerator otherwise JIT-builds a shared-memory allreduce op (~110 s with g++,
        # an error without one) on every initialize; torch's gloo collectives serve instead.
        # That op is the only reader of `__compatible_ops__`: seed the cache DeepSpeed fills on
        # first access, so its probe (gcc runs, logged) does not run at all.
        ops = deepspeed.ops
        if "__compatible_ops__" not in vars(ops):
            ops.__compatible_ops__ = {}
        ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def init_deepspeed_distributed(deepspeed, cfg: ParallelConfig, dist: DistInfo) -> None:
    """DeepSpeed's view of the process group (it needs one even for one process)."""
    ensure_process_group(dist, cfg.dist_backend, cfg.timeout_minutes)
    # deepspeed.initialize asserts what a launcher would have exported
    for key, value in (("RANK", dist.rank), ("WORLD_SIZE", dist.world_size), ("LOCAL_RANK", dist.local_rank)):
        os.environ.setdefault(key, str(value))
    deepspeed.init_distributed(dist_backend=process_group_backend(cfg.dist_backend, dist.device),
                               auto_mpi_discovery=False, dist_init_required=False)


def mark_expert_params(module: torch.nn.Module, ep: int, ep_group) -> str:
    """Mark the EP-split expert weights the way DeepSpeed marks its own MoE experts
    (``param.allreduce = False``, ``param.group_name``) and create DeepSpeed's expert and
    expert-data-parallel groups for ``ep`` (deepspeed.utils.groups), which the ZeRO optimizer
    reduces and partitions those weights over. Returns the group name (``ep_size_<ep>``).

    Args:
        module: the materialised plain model after :func:`~mmgen.parallel.ep.apply_expert_parallel`.
        ep: ``parallel.ep``.
        ep_group: mmgen's EP group (the ranks the all-to-all dispatcher exchanges tokens with);
            DeepSpeed's group of the same name must hold the same ranks.
    """
    import torch.distributed as tdist
    from deepspeed.utils import groups

    from mmgen.parallel.ep import expert_params

    name = f"ep_size_{ep}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep)
    ds_ranks = tdist.get_process_group_ranks(groups._get_expert_parallel_group(name))
    if ds_ranks != tdist.get_process_group_ranks(ep_group):
        raise RuntimeError(f"DeepSpeed's expert-parallel group {ds_ranks} is not mmgen's "
                           f"{tdist.get_process_group_ranks(ep_group)}")
    params = expert_params(module)
    if not params:
        raise ValueError(f"parallel.ep={ep}: the model has no expert-parallel MoE layer")
    for p in params:
        p.allreduce = False     # deepspeed.moe.utils.is_moe_param: reduce over group_name's edp group
        p.group_name = name
    return name


def build_expert_optimizer(optim: OptimConfig, module: torch.nn.Module) -> torch.optim.Optimizer:
    """mmgen's AdamW with DeepSpeed's MoE parameter groups: each of mmgen's groups (decay /
    no decay) loses its expert weights to a copy of itself marked ``moe: True`` and named after
    the expert group (deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer),
    which ZeRO partitions over the expert-data-parallel ranks. Same hyper-parameters per
    parameter as :func:`~mmgen.optim.build_optimizer`.

    Args:
        optim: the optimizer config.
        module: the model after :func:`mark_expert_params`.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from mmgen.optim import param_groups

    named = [{**g, "name": f"mmgen-{i}"} for i, g in enumerate(param_groups(module, optim.weight_decay))]
    groups = [g for g in split_params_into_different_moe_groups_for_optimizer(named) if g["params"]]
    return build_optimizer(optim, module, groups)


def initialize_with_experts(deepspeed, module: torch.nn.Module, optimizer, config: dict, group_name: str):
    """``deepspeed.initialize`` for a model whose experts are mmgen's (not deepspeed.moe
    modules). DeepSpeed 0.19.8 turns on its expert handling (``has_moe_layers``: the ZeRO
    optimizer's expert groups, reductions and grad-norm terms) only when it finds its own
    ``MoE``/AutoEP modules; an engine subclass sets the flag after that search, so the ZeRO
    optimizer is built with it. The engine-level flag is then cleared: past construction it
    only selects DeepSpeed's per-expert checkpoint files, which are keyed on those module
    classes; mmgen's experts are saved in the ZeRO shards like every other parameter
    (:func:`expert_parallel_state_dict` reads them back whole). Built as ``initialize``
    builds a non-pipeline engine.

    Args:
        deepspeed: the imported module (:func:`import_deepspeed`).
        module: the model after :func:`mark_expert_params`.
        optimizer: :func:`build_expert_optimizer`'s optimizer.
        config: the DeepSpeed JSON.
        group_name: :func:`mark_expert_params`'s group name.
    """
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine

    from mmgen.models.moe import MoEFeedForward

    n_experts = [m.n_experts for m in module.modules() if isinstance(m, MoEFeedForward)]

    class ExpertParallelEngine(DeepSpeedEngine):
        def _configure_distributed_model(self, model):
            super()._configure_distributed_model(model)
            self.has_moe_layers = True
            self.num_experts = n_experts

    deepspeed.zero.partition_parameters.shutdown_init_context()
    engine = ExpertParallelEngine(args=None, model=module, optimizer=optimizer, model_parameters=None,
                                  dist_init_required=False, config=config,
                                  config_class=DeepSpeedConfig(config, None))
    if not getattr(engine.optimizer, "has_moe_layers", False):
        raise RuntimeError(f"DeepSpeed's ZeRO optimizer did not take the experts ({group_name}) as expert parameters")
    engine.has_moe_layers = False
    return engine


def check_zero3_compile(module: torch.nn.Module, device: torch.device) -> None:
    """Compiled blocks + FlexAttention under ZeRO-3 fail in inductor (measured on the lent H100,
    torch 2.11, deepspeed 0.19.8: ZeRO-3's parameter hooks break each block's graph and the
    FlexAttention backward of the resumed graph gets a symbolic scale). Stop at start-up with
    the fix rather than after the first compile. (With SDPA, on CPU, compile + ZeRO-3 ran and
    matched DDP.)"""
    from mmgen.models.attention import resolve_backend

    compiled = any(getattr(block, "_compiled_call_impl", None) is not None for block in module.layers)
    cfg = getattr(module, "cfg", None)
    if compiled and cfg is not None and resolve_backend(cfg.attention, device) == "flex":
        from mmgen.errors import ConfigError

        raise ConfigError("parallel=zero3 with trainer.compile=true and FlexAttention fails to compile "
                          "(ZeRO-3 parameter hooks split each block's graph): set trainer.compile=false")


def register_external_parameters(deepspeed, module: torch.nn.Module) -> None:
    """ZeRO-3 gathers a parameter only around its own module's forward. The unified model's
    tied text head reads ``tok_embeddings.weight`` in the root module's forward
    (``F.linear(h, tok_embeddings.weight)``): register it there so it is gathered for the head."""
    cfg = getattr(module, "cfg", None)
    if getattr(cfg, "tie_embeddings", False):
        deepspeed.zero.register_external_parameter(module, module.tok_embeddings.weight)


# -- the backend's registry functions (mmgen.parallel.registry) ----------------------------------
def parallelize(module: torch.nn.Module, cfg: ParallelConfig, ctx: EngineContext, *, compile: bool) -> None:
    """Activation checkpointing -> compile on the meta-device plain model; ZeRO itself comes
    with ``deepspeed.initialize`` in :func:`build_engine` (it needs real parameters)."""
    from mmgen.parallel.float8 import check_backend as check_fp8_backend

    check_fp8_backend(ctx.fp8, cfg.name)
    if ctx.dims.dp != ctx.dims.world_size:
        raise ValueError(f"parallel={cfg.name}: DeepSpeed here shards over every rank; layout {ctx.dims.degrees()} "
                         f"needs a backend with tensor/pipeline parallelism")
    import_deepspeed(ctx.dist.device)  # before activation_checkpointing=deepspeed imports it
    apply_expert_parallel_from(module, cfg, ctx)
    apply_block_transforms(module, cfg.activation_checkpointing, compile)
    if cfg.zero_stage == 3:
        check_zero3_compile(module, ctx.dist.device)


def materialize_pretrained(module: torch.nn.Module, cfg: ParallelConfig, optim: OptimConfig, ctx: EngineContext,
                           init) -> bool:
    """ZeRO-3: partition the meta model parameter by parameter with pretrained values in each
    rank's partition (mmgen.parallel.pretrained.materialize_zero3), so no rank holds the whole
    model; returns False (materialise as usual) for stages 1-2, which keep whole parameters."""
    if cfg.zero_stage != 3:
        return False
    from mmgen.parallel.pretrained import materialize_zero3

    deepspeed = import_deepspeed(ctx.dist.device)
    init_deepspeed_distributed(deepspeed, cfg, ctx.dist)
    base = build_ds_config(cfg, micro_batch_size=ctx.micro_batch_size, grad_accum=ctx.grad_accum, bf16=ctx.bf16,
                           grad_clip=optim.grad_clip, pin_memory=ctx.dist.device.type == "cuda")
    ds_config, _ = merge_user_config(base, load_user_config(cfg.ds_config) if cfg.ds_config else {})
    materialize_zero3(module, init, ds_config, ctx.dist.device, torch.bfloat16 if ctx.bf16 else torch.float32)
    return True


def build_engine(module: torch.nn.Module, cfg: ParallelConfig, optim: OptimConfig, ctx: EngineContext) -> ZeroEngine:
    """Wrap the materialised, initialised plain model in a DeepSpeed ZeRO engine built from
    mmgen's config (registry function).

    Args:
        module: the plain model on ``ctx.dist.device``.
        cfg: the ParallelConfig (``name`` zero1|zero2|zero3).
        optim: optimizer config (AdamW, clipping).
        ctx: rank/world/device, layout, precision (bf16 -> DeepSpeed bf16), ``data.batch_size``
            and ``trainer.grad_accum``.
    """
    return ZeroEngine(module, cfg, optim, ctx)


# -- reading DeepSpeed's pickled shards safely ------------------------------------------------------
def shard_globals() -> list:
    """The classes DeepSpeed 0.19's shards name besides tensors and plain values: the loss
    scaler, the ZeRO stage enum and the fragment records of its optimizer states. Plain data
    classes: building them runs no code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_shards(shards: Path, trust: bool, own: bool = False) -> None:
    """Before DeepSpeed unpickles ``shards/*.pt``: prove that each builds nothing but tensors,
    plain values and :func:`shard_globals` (torch's restricted unpickler), unless ``trust``.

    Args:
        shards: the tag directory (``step_N/deepspeed``).
        trust: ``checkpoint.trust`` / ``--trust``: no check.
        own: this run wrote them into its own run directory: a refusal is only a warning.

    Raises:
        UnsafeCheckpointError: a file names anything else (one line: file, global, switch).
    """
    if trust:
        return
    from mmgen.safe_load import check_restricted

    allowed = shard_globals()
    for f in sorted(shards.glob("*.pt")):
        check_restricted(f, allowed, what="a DeepSpeed shard", own=own)


def checkpoint_state_dict(ckpt: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """fp32 weights from a DeepSpeed checkpoint, without a process group (export): ZeRO 1-3 are
    merged from the optimizer's fp32 master shards by DeepSpeed's own zero_to_fp32; a stage-0
    checkpoint is not a ZeRO checkpoint and holds the whole module in
    ``mp_rank_00_model_states.pt['module']``. The shards are checked first (:func:`check_shards`)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mmgen.safe_load import load_plain

    shards = ckpt / DS_TAG
    if not shards.is_dir():
        raise FileNotFoundError(f"{ckpt}: not a DeepSpeed checkpoint (no {DS_TAG}/)")
    check_shards(shards, trust)
    meta_file = shards / ENGINE_META
    ep = json.loads(meta_file.read_text()).get("ep", 1) if meta_file.is_file() else 1
    if ep > 1:
        return expert_parallel_state_dict(shards, ep, trust)
    if not any(shards.glob("*_optim_states.pt")):
        states = load_plain(shards / "mp_rank_00_model_states.pt", trust=trust, allow=shard_globals(),
                            what="a DeepSpeed shard")
        return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    # zero_to_fp32 prints its progress (and tqdm bars) for its own CLI: keep a CLI's output ours
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
    log.debug("zero_to_fp32: %s", chatter.getvalue())
    return state


def expert_parallel_state_dict(shards: Path, ep: int, trust: bool = False) -> dict[str, torch.Tensor]:
    """fp32 weights of a ZeRO-1/2 checkpoint written with ``parallel.ep > 1`` (export,
    init_from), with every expert. DeepSpeed's zero_to_fp32 assumes each param group is
    partitioned over all ranks; the expert groups are partitioned over their expert-data-
    parallel ranks (``r = e, e + ep, ...`` hold EP rank ``e``'s experts, DeepSpeed's E + D
    layout) and each EP rank's file lists its own experts under the same names. So: dense
    groups are the concatenation of every rank's fp32 partition, cut by ``param_shapes``;
    expert groups are merged per EP rank the same way, then stacked along dim 0 (the expert
    index) in EP-rank order. Buffers and tied parameters come from the model-state file, as
    in zero_to_fp32.

    Args:
        shards: the tag directory (``step_N/deepspeed``), already checked (:func:`check_shards`).
        ep: the EP degree it was written with.
        trust: ``checkpoint.trust``.
    """
    from mmgen.safe_load import load_plain

    def load(f: Path):
        return load_plain(f, trust=trust, allow=shard_globals(), what="a DeepSpeed shard")

    model = load(shards / "mp_rank_00_model_states.pt")
    # zero_pp_rank_<r>_mp_rank_00_optim_states.pt (bf16_ in front under bf16)
    files = sorted(shards.glob("*_optim_states.pt"), key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name)[1]))
    if not files:
        raise FileNotFoundError(f"{shards}: no ZeRO optimizer shards (parallel.ep={ep} needs ZeRO-1/2)")
    flats = [load(f)["optimizer_state_dict"] for f in files]
    world = len(flats)
    state = {k: v.float() for k, v in model["module"].items() if k in set(model["buffer_names"])}
    for i, shapes in enumerate(model["param_shapes"]):
        count = flats[0]["partition_count"][i]
        owners = [list(range(world))] if count == world else [list(range(e, world, ep)) for e in range(ep)]
        parts = []
        for ranks in owners:
            flat = torch.cat([flats[r]["single_partition_of_fp32_groups"][i].float().reshape(-1) for r in ranks])
            offset, got = 0, {}
            for name, shape in shapes.items():
                n = math.prod(shape)
                got[name] = flat[offset:offset + n].view(shape).clone()
                offset += n
            if offset != flat.numel():
                raise ValueError(f"{shards}: param group {i} holds {flat.numel()} values, its shapes {offset}")
            parts.append(got)
        for name in shapes:
            state[name] = torch.cat([part[name] for part in parts]) if len(parts) > 1 else parts[0][name]
    for name, source in (model.get("shared_params") or {}).items():
        state[name] = state[source]
    for name, frag in (model.get("frozen_param_fragments") or {}).items():
        state[name] = frag.float()
    return state
