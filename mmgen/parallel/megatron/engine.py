# The megatron-core engine: TP/SP linears, 1F1B pipeline schedule, megatron DDP and (distributed) optimizer.
"""Built by :func:`mmgen.parallel.megatron.build_engine` from the materialised, initialised
plain model: its weights go through the adapter into this rank's stage of
:class:`~mmgen.parallel.megatron.model.MegatronTransformer` and the plain copy is dropped.

* process groups: megatron's ``parallel_state`` with order ``tp-cp-ep-dp-pp`` (tensor-parallel
  ranks adjacent, pipeline outermost), the same rank layout as :class:`ParallelDims`;
* the step: megatron's ``get_forward_backward_func()`` (no pipelining, or 1F1B over the
  step's micro-batches); the trainer's ``loss_fn`` runs on every stage (its noise is drawn from
  the per-micro-batch seed, so every stage draws the same), the first stage embeds, a
  non-last stage hands its hidden states on (``StageOutput``), the last runs heads and loss;
* losses arrive already normalised by global counts (``calculate_per_token_loss=True`` keeps
  megatron from dividing by micro-batches; DDP then sums gradients over data-parallel ranks
  instead of averaging);
* checkpoints: weights through ``dist_checkpointing`` in plain keys and layout (any TP/PP
  reads them), optimizer state one file per rank (same layout only).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as tdist

from mmgen.optim import OptimConfig, decays
from mmgen.parallel.base import Engine, EngineContext
from mmgen.parallel.config import ParallelConfig
from mmgen.parallel.dist import ensure_process_group
import mmgen.parallel.megatron.adapter as adapter
from mmgen.parallel.megatron.model import MegatronTransformer, StageOutput

log = logging.getLogger(__name__)
MEGATRON_DIR = "megatron"          # dist_checkpointing directory of the weights
OPTIM_FILE = "optim_rank_{:05d}.pt"


def init_parallel_state(tp: int, pp: int, device: torch.device, seed: int = 0, ep: int = 1) -> None:
    """megatron's process groups for (tp, pp, ep), re-made when a previous engine in this process
    used other degrees (tests build several). Experts are not tensor-parallel
    (``expert_tensor_parallel_size=1``): the EP group is cut from the TP x DP ranks."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if ps.model_parallel_is_initialized():
        now = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
               ps.get_expert_model_parallel_world_size())
        if now == (tp, pp, ep):
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep, expert_tensor_parallel_size=1,
                                 order="tp-cp-ep-dp-pp")
    # on the CPU only megatron's no-op RNG tracker works; mmgen's blocks have no dropout anyway
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=device.type == "cpu")


def transformer_config(model_cfg, cfg: ParallelConfig, device: torch.device):
    """megatron's TransformerConfig for mmgen's architecture (the one source of truth is the
    ModelConfig; this only restates it for megatron's layers and schedules)."""
    from megatron.core.transformer import TransformerConfig

    from mmgen.parallel.megatron.moe import moe_transformer_kwargs

    return TransformerConfig(
        num_layers=model_cfg.n_layers, hidden_size=model_cfg.dim, num_attention_heads=model_cfg.n_heads,
        num_query_groups=model_cfg.n_kv_heads, ffn_hidden_size=model_cfg.ffn_dim, kv_channels=model_cfg.head_dim,
        normalization="RMSNorm", layernorm_epsilon=model_cfg.norm_eps, gated_linear_unit=True,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=cfg.tp, pipeline_model_parallel_size=cfg.pp,
        sequence_parallel=cfg.sequence_parallel,
        # fp32 parameters and main gradients; bf16 is mmgen's autocast around the forward
        params_dtype=torch.float32, pipeline_dtype=torch.float32, bf16=False,
        # perform_initialization=True only to get the tensor-parallel attributes megatron reads (the
        # init method itself does nothing: the adapter writes the weights)
        use_cpu_initialization=True, perform_initialization=True, gradient_accumulation_fusion=False,
        calculate_per_token_loss=True,
        # megatron's batched isend/irecv gives silently wrong results for interleaved PP on gloo
        # (PLATFORM.md); separate send/recv is always right
        batch_p2p_comm=False,
        **moe_transformer_kwargs(model_cfg, cfg),
    )


class MegatronEngine(Engine):
    """One rank's pipeline stage under megatron DDP and megatron's optimizer."""

    def __init__(self, plain: torch.nn.Module, cfg: ParallelConfig, optim: OptimConfig, ctx: EngineContext):
        super().__init__(cfg.name, ctx)
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        self.cfg, self.optim_cfg, self.model_cfg = cfg, optim, plain.cfg
        dev = self.dist.device
        self.mcfg = transformer_config(plain.cfg, cfg, dev)
        stage = MegatronTransformer(plain.cfg, self.mcfg)
        self.tp_rank, self.pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        self.ep_rank, self.edp_rank = ps.get_expert_model_parallel_rank(), ps.get_expert_data_parallel_rank()
        local = adapter.to_megatron(plain.state_dict(), plain.cfg, cfg.tp, self.tp_rank, stage.layer_ids,
                                    stage.first, stage.last, ep=cfg.ep, ep_rank=self.ep_rank)
        stage.load_state_dict(local, strict=True)
        stage.to(dev)
        self.stage = self.module = stage
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=cfg.distributed_optimizer)
        self.model = DistributedDataParallel(config=self.mcfg, ddp_config=ddp_config, module=stage)
        self.megatron_optimizer = self._build_optimizer(optim)
        self.mcfg.no_sync_func = self.model.no_sync
        self.mcfg.finalize_model_grads_func = _finalize_without_token_scaling
        self.model.zero_grad_buffer()

    def _build_optimizer(self, optim: OptimConfig):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

        ocfg = OptimizerConfig(optimizer="adam", lr=optim.lr, min_lr=optim.lr * optim.min_lr_ratio,
                               weight_decay=optim.weight_decay, adam_beta1=optim.betas[0],
                               adam_beta2=optim.betas[1], adam_eps=optim.eps,
                               clip_grad=optim.grad_clip if optim.grad_clip > 0 else float("inf"),
                               use_distributed_optimizer=self.cfg.distributed_optimizer,
                               bf16=False, params_dtype=torch.float32)
        # mmgen's weight-decay rule (mmgen.optim.decays), not megatron's "1-D or bias"
        no_decay = ParamKey(with_name_predicate=ParamWithNamePredicate(
            name="mmgen_no_decay", fn=lambda p, name: not decays(name, p)))
        opt = get_megatron_optimizer(ocfg, [self.model], config_overrides={no_decay: {"wd_mult": 0.0}})
        inner = opt.chained_optimizers if hasattr(opt, "chained_optimizers") else [opt]
        # one optimizer for the dense parameters, a second one for the experts (MoE: megatron keeps
        # them apart, they reduce over the expert-data-parallel group)
        want = 2 if self.model_cfg.moe_experts else 1
        if len(inner) != want:
            raise RuntimeError(f"expected {want} megatron optimizer(s), got {len(inner)}")
        self.inner_optimizers = inner
        # megatron's own LR scheduler would set these each step; mmgen's LambdaLR drives the
        # torch optimizer inside instead, so the per-group decay is set once here
        for part in inner:
            for group in part.optimizer.param_groups:
                group["weight_decay"] = optim.weight_decay * group.get("wd_mult", 1.0)
        self.optimizer = inner[0].optimizer
        return opt

    # -- the step ------------------------------------------------------------------------------
    def forward_backward(self, micro_batches, loss_fn):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        sums: dict[str, torch.Tensor] = {}
        data = iter(enumerate(micro_batches))

        def forward_step(data_iterator, model):
            micro, batch = next(data_iterator)
            try:
                with self.autocast():
                    losses = loss_fn(model, batch, micro)
            except StageOutput as out:   # not the last stage: the schedule sends this on
                return out.hidden, None
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            # already normalised by global counts: megatron must neither divide nor scale
            return losses["total"], lambda t: (t, torch.ones((), dtype=torch.int), {})

        first = micro_batches[0]
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=[self.model],
            num_microbatches=len(micro_batches), seq_length=first.tokens.shape[1],
            micro_batch_size=first.tokens.shape[0], forward_only=False)
        return self._losses_from_last_stage(sums)

    def _losses_from_last_stage(self, sums: dict) -> dict[str, torch.Tensor]:
        """Every pipeline stage returns the last stage's loss sums (the trainer logs and checks
        them on every rank)."""
        if self.cfg.pp == 1:
            return sums
        from megatron.core import parallel_state as ps

        group = ps.get_pipeline_model_parallel_group()
        mine = {k: float(v) for k, v in sums.items()}
        every: list = [None] * self.cfg.pp
        tdist.all_gather_object(every, mine, group=group)
        return {k: torch.tensor(v, device=self.dist.device) for k, v in every[-1].items()}

    def backward(self, loss: torch.Tensor) -> None:
        # megatron's schedules run the backward inside forward_backward; a lone loss (no
        # pipeline) still back-propagates into megatron DDP's gradient buffers
        loss.backward()

    def step(self, grad_clip: float) -> torch.Tensor:
        """megatron's optimizer step (clipping at ``optim.grad_clip`` was configured at build);
        returns the pre-clip global gradient norm (over TP, PP and DP, duplicates once)."""
        lr = self.optimizer.param_groups[0]["lr"]
        for part in self.inner_optimizers[1:]:   # the experts' optimizer follows the scheduled LR
            for group in part.optimizer.param_groups:
                group["lr"] = lr
        ok, grad_norm, _ = self.megatron_optimizer.step()
        self.zero_grads()
        if grad_norm is None:
            grad_norm = float("nan")
        return torch.as_tensor(grad_norm, dtype=torch.float32)

    def zero_grads(self) -> None:
        self.model.zero_grad_buffer()
        self.megatron_optimizer.zero_grad()

    def skip_step(self) -> None:
        self.zero_grads()

    # -- state ---------------------------------------------------------------------------------
    def layout(self) -> dict:
        out = super().layout()
        out["megatron"] = {"sequence_parallel": self.cfg.sequence_parallel,
                           "distributed_optimizer": self.cfg.distributed_optimizer}
        return out

    def versions(self) -> dict[str, str]:
        import megatron.core

        return {**super().versions(), "megatron-core": megatron.core.__version__}

    def _plain_shards(self) -> dict:
        return adapter.plain_shards(self.stage.state_dict(), self.model_cfg, self.stage.layer_ids)

    def _sharded_state_dict(self) -> dict:
        """This rank's weights as dist_checkpointing ShardedTensors, in plain keys and layout."""
        from megatron.core.dist_checkpointing import ShardedTensor

        dp_rank = self.dims.dp_rank
        out = {}
        for key, (value, axis) in self._plain_shards().items():
            value = value.detach().contiguous()
            if axis == adapter.EXPERT_AXIS:   # cut over EP ranks; replicated over expert-DP peers
                out[key] = ShardedTensor.from_rank_offsets(key, value, (0, self.ep_rank, self.cfg.ep),
                                                           replica_id=self.edp_rank)
            elif axis is None:   # replicated over TP (and DP): one writer
                out[key] = ShardedTensor.from_rank_offsets(key, value, replica_id=(self.tp_rank, dp_rank))
            else:
                out[key] = ShardedTensor.from_rank_offsets(key, value, (axis, self.tp_rank, self.cfg.tp),
                                                           replica_id=(0, dp_rank))
        return out

    def save(self, path: Path) -> None:
        from megatron.core import dist_checkpointing

        where = path / MEGATRON_DIR
        where.mkdir(parents=True, exist_ok=True)
        tdist.barrier()
        dist_checkpointing.save(self._sharded_state_dict(), str(where))
        torch.save(self._optimizer_state(), where / OPTIM_FILE.format(self.dist.rank))

    def _optimizer_state(self) -> dict:
        inner = self.inner_optimizers[0]
        state = {"layout": self.dims.degrees(), "state": inner.state_dict()}
        if len(self.inner_optimizers) > 1:   # MoE: the experts' optimizer (plain, not distributed)
            state["expert_states"] = [part.state_dict() for part in self.inner_optimizers[1:]]
        if self.cfg.distributed_optimizer:
            params = inner.get_parameter_state_dp_reshardable()
            # megatron 0.16.1's loader filters on a "padding" flag its own getter never writes
            for key, per_dtype in params.items():
                if isinstance(key, int):
                    for buckets in per_dtype.values():
                        for bucket in buckets:
                            for item in bucket:
                                item.setdefault("padding", False)
            state["params"] = params
        return state

    @torch.no_grad()   # megatron copies into views of the (leaf) parameters
    def load(self, path: Path, trust: bool = False, own: bool = False) -> None:
        """Weights at any TP/PP (dist_checkpointing reshards); optimizer state only at the layout
        that wrote it (otherwise one line pointing at ``checkpoint.init_from``)."""
        from mmgen.safe_load import load_plain

        where = path / MEGATRON_DIR
        if not where.is_dir():
            raise FileNotFoundError(f"{path}: not a megatron checkpoint (no {MEGATRON_DIR}/); start a new run with "
                                    f"checkpoint.init_from={path.parent.parent} to take its weights into "
                                    f"parallel=megatron")
        optim_file = where / OPTIM_FILE.format(self.dist.rank)
        saved = load_plain(optim_file, map_location="cpu", trustable=False) if optim_file.is_file() else None
        if saved is None or saved["layout"] != self.dims.degrees() or self._saved_flags(path) != self.layout()["megatron"]:
            raise FileNotFoundError(
                f"{path}: its optimizer state was written at another layout than {self.dims.degrees()} (megatron "
                f"optimizer states resume at the same layout); start a new run with checkpoint.init_from="
                f"{path.parent.parent}: the weights reshard to any tp/pp")
        self.load_weights(path)
        inner = self.inner_optimizers[0]
        inner.load_state_dict(saved["state"])
        if self.cfg.distributed_optimizer:
            inner.load_parameter_state_from_dp_reshardable(saved["params"])
        for part, state in zip(self.inner_optimizers[1:], saved.get("expert_states", [])):
            part.load_state_dict(state)
        for part in self.inner_optimizers:
            # megatron 0.16.1 (without TE/apex) gives every parameter's state ONE shared "step"
            # tensor, which torch's AdamW then increments once per parameter: one each again
            for state in part.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
            for group in part.optimizer.param_groups:
                group["weight_decay"] = self.optim_cfg.weight_decay * group.get("wd_mult", 1.0)

    @staticmethod
    def _saved_flags(path: Path) -> dict:
        meta = path / "meta.json"
        return json.loads(meta.read_text()).get("megatron", {}) if meta.is_file() else {}

    @torch.no_grad()
    def load_weights(self, path: Path) -> None:
        """This rank's weights from a megatron checkpoint of any TP/PP (no optimizer state)."""
        from megatron.core import dist_checkpointing

        loaded = dist_checkpointing.load(self._sharded_state_dict(), str(path / MEGATRON_DIR))
        local = self._local_from_shards(loaded)
        for name, param in self.stage.state_dict(keep_vars=True).items():
            if isinstance(param, torch.Tensor):
                param.data.copy_(local[name].to(param.device))

    def _local_from_shards(self, shards: dict) -> dict:
        """This rank's megatron state from its plain-key chunks (what dist_checkpointing returns)."""
        ids = self.stage.layer_ids
        # to_megatron on chunks: every split tensor is already this rank's chunk (tp=1 cut);
        # plain layer keys use global indices, which to_megatron maps to local ones
        # (expert weights too: dist_checkpointing returned this rank's expert slice)
        return adapter.to_megatron(shards, self.model_cfg, 1, 0, ids, self.stage.first, self.stage.last)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Full plain weights on rank 0 (a collective; other ranks get an empty dict)."""
        mine = {k: (v.detach().cpu().clone(), axis) for k, (v, axis) in self._plain_shards().items()}
        if self.dist.world_size == 1:
            return adapter.merge_ranks([mine], self.cfg.tp)
        # data-parallel index 0 holds every dense shard; with EP, other ranks hold other experts
        # (every rank sends then: the list stays in global rank order, which merge_ranks reads)
        send = self.dims.dp_rank == 0 or self.cfg.ep > 1
        every: list = [None] * self.dist.world_size
        tdist.all_gather_object(every, (mine, self.ep_rank) if send else None)
        if not self.dist.is_main:
            return {}
        sent = [s for s in every if s is not None]
        return adapter.merge_ranks([s for s, _ in sent], self.cfg.tp, [r for _, r in sent], self.cfg.ep)


def _finalize_without_token_scaling(model, num_tokens=None, **kwargs):
    """megatron's gradient finalisation (DP reduction, SP norm grads over TP) without its
    division by the token count: mmgen's losses are already normalised by global counts."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(model, None, **kwargs)
    group = ps.get_tensor_model_parallel_group()
    if tdist.get_world_size(group) == 1:
        return
    # parameters shared by the heads of every TP rank (qk-norm): each rank holds a partial sum
    grads = [p.main_grad for chunk in model for p in chunk.parameters()
             if getattr(p, "tp_partial_grad", False) and getattr(p, "main_grad", None) is not None]
    if grads:
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        flat = _flatten_dense_tensors(grads)
        tdist.all_reduce(flat, group=group)
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)


def build(plain: torch.nn.Module, cfg: ParallelConfig, optim: OptimConfig, ctx: EngineContext) -> MegatronEngine:
    """The engine over the materialised plain model (the backend's ``build_engine``)."""
    if ctx.dist.device.type == "cpu":
        import mmgen.parallel.megatron.cpu_compat as cpu_compat

        cpu_compat.apply()
    ensure_process_group(ctx.dist, cfg.dist_backend, cfg.timeout_minutes)
    init_parallel_state(cfg.tp, cfg.pp, ctx.dist.device, ep=cfg.ep)
    return MegatronEngine(plain, cfg, optim, ctx)
