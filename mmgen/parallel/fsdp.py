# FSDP2 backend: parameters, gradients and optimizer states sharded per block (torch fully_shard).
"""``parallel=fsdp2``: the PyTorch-native reference for sharded data parallelism.

Parallelize (on the meta model, :mod:`mmgen.parallel.parallelize`): FP8 (``trainer.fp8``:
torchao ``Float8Linear`` in the blocks; FSDP2 shards and all-gathers their high-precision
weights) -> activation checkpointing -> compile -> ``fully_shard`` on every block of ``module.layers``, then on the root
(embeddings, norms and heads). Parameters become DTensors sharded on dim 0 over the
data-parallel mesh; :func:`~mmgen.parallel.parallelize.materialize` then allocates each rank's
shards and copies them out of an unsharded initialisation, so the weights equal those of one
process. Each block's parameters are all-gathered just before its forward/backward and freed
after (``parallel.reshard_after_forward``), gradients are reduce-scattered. The optimizer is
mmgen's AdamW over the sharded parameters, so its states are sharded too.

Expert parallelism (``parallel.ep > 1``) runs first: each rank keeps ``1/ep`` of every MoE
FFN's experts (mmgen/parallel/ep.py). Those weights are left out of ``fully_shard``
(``ignored_params``): they are already split over the EP group, and sharding them again over the
expert-data-parallel ranks would need FSDP over a second mesh plus DTensors that know the EP
split (torchtitan's 2-D expert mesh), more machinery than the memory it saves at the sizes
mmgen trains with EP today. So they stay plain fp32 tensors, replicated over the ``dp / ep`` ranks
that hold the same experts; :meth:`TorchEngine.step` sums their gradients over those ranks and
clips by the norm that counts each expert once; the optimizer keeps them in their own param
groups (a foreach/fused step cannot mix DTensors and plain tensors; at ep=1 too, so the groups,
and with them the checkpoints, are the same at every EP degree). For DCP they are presented
as DTensors sharded on dim 0 over the EP mesh, so a checkpoint holds the full expert set once
(replicas deduplicated), exports whole and reshards on load to another EP degree or world size.

Checkpoints go through torch.distributed.checkpoint (DCP): every rank writes its shards under
``step_N/fsdp/``, and a resume may use another number of ranks (DCP reshards on load).
``mmgen export`` turns the directory into one plain state dict (DCP's own conversion). DCP
unpickles its ``.metadata`` and non-tensor values; here both go through restricted readers
(:func:`safe_dcp_reader`), so a planted pickle runs nothing.
"""
from __future__ import annotations

import contextlib
import functools
import pickle
from pathlib import Path

import torch

from mmgen.optim import OptimConfig, build_optimizer
from mmgen.parallel.base import EngineContext, TorchEngine
from mmgen.parallel.config import ParallelConfig
from mmgen.parallel.dist import ensure_process_group
from mmgen.parallel.parallelize import apply_block_transforms, apply_expert_parallel_from, apply_float8_from

FSDP_DIR = "fsdp"
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parallelize(module: torch.nn.Module, cfg: ParallelConfig, ctx: EngineContext, *, compile: bool) -> None:
    """EP -> FP8 -> activation checkpointing -> compile -> ``fully_shard`` per block and on the
    root, on the meta-device plain model (registry function)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from mmgen.parallel.ep import expert_params

    ensure_process_group(ctx.dist, cfg.dist_backend, cfg.timeout_minutes)  # a mesh even for one process
    apply_expert_parallel_from(module, cfg, ctx)
    apply_float8_from(module, ctx)
    apply_block_transforms(module, cfg.activation_checkpointing, compile)
    # over data- x context-parallel peers: cp ranks hold the same weights, different positions
    mesh = ctx.dims.dp_cp_mesh(ctx.dist.device.type)
    ignored = set(expert_params(module)) or None   # EP's experts: split already (module docstring)
    # fp32 parameters by default: the same numbers as DDP under autocast. bf16 all-gathers
    # half the bytes and computes in bf16; gradients are still reduced in fp32.
    policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[cfg.fsdp_param_dtype], reduce_dtype=torch.float32)
    last = len(module.layers) - 1
    for i, block in enumerate(module.layers):
        # the last block's backward starts right after its forward: freeing its parameters
        # in between would only gather them again at once
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.reshard_after_forward and i < last,
                    ignored_params=ignored)
    # the root keeps the embeddings, norm and heads; it is gathered for the whole forward
    # (the tied text head reads tok_embeddings.weight after the blocks)
    fully_shard(module, mesh=mesh, reshard_after_forward=False, mp_policy=policy, ignored_params=ignored)


def build_engine(module: torch.nn.Module, cfg: ParallelConfig, optim: OptimConfig, ctx: EngineContext):
    """The engine over the sharded, initialised model (registry function)."""
    return FSDPEngine(module, cfg, optim, ctx)


class FSDPEngine(TorchEngine):
    def __init__(self, module: torch.nn.Module, cfg: ParallelConfig, optim: OptimConfig, ctx: EngineContext):
        super().__init__(cfg.name, ctx)
        self.module = self.model = module
        self.optimizer = build_optimizer(optim, module)
        from mmgen.parallel.ep import all_expert_weights

        self.ep_mesh = self.dims.expert_mesh(self.dist.device.type)["ep"] if self.dims.ep > 1 else None
        experts = all_expert_weights(module)
        if experts:   # at every EP degree: the same groups, so DCP checkpoints resume across degrees
            self.optimizer = split_expert_groups(self.optimizer, experts)

    def accumulate(self, is_last_microbatch: bool):
        # reduce-scatter once per optimizer step: earlier micro-batches keep unsharded grads
        self.module.set_requires_gradient_sync(is_last_microbatch)
        return contextlib.nullcontext()

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.module, self.optimizer)
        if self.ep_mesh is not None:
            model, optim = self._experts_as_dtensors(model, optim)
        return {"model": model, "optimizer": optim}

    def _experts_as_dtensors(self, model: dict, optim: dict) -> tuple[dict, dict]:
        """EP's plain expert slices (weights and their Adam moments) as DTensors sharded on
        dim 0 over the EP mesh: DCP then stores one full expert set (module docstring)."""
        from torch.distributed.tensor import DTensor, Shard

        from mmgen.parallel.ep import expert_slices

        def wrap(t):
            return DTensor.from_local(t, self.ep_mesh, [Shard(0)], run_check=False)

        names = expert_slices(self.module)
        model = {k: wrap(v) if k in names else v for k, v in model.items()}
        state = optim.get("state", {})
        for k in names:
            if k in state:
                shape = model[k].to_local().shape
                state[k] = {n: wrap(v) if torch.is_tensor(v) and v.shape == shape else v for n, v in state[k].items()}
        return model, optim

    @staticmethod
    def _experts_as_local(model: dict, optim: dict) -> tuple[dict, dict]:
        from torch.distributed.tensor import DTensor

        def unwrap(v):
            return v.to_local() if isinstance(v, DTensor) and v.device_mesh.mesh_dim_names == ("ep",) else v

        model = {k: unwrap(v) for k, v in model.items()}
        optim = {**optim, "state": {k: {n: unwrap(v) for n, v in s.items()} if isinstance(s, dict) else s
                                    for k, s in optim.get("state", {}).items()}}
        return model, optim

    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(path / FSDP_DIR))

    def load(self, path: Path, trust: bool = False, own: bool = False) -> None:
        """DCP load through :func:`safe_dcp_reader` (no pickle unless ``trust``; ``own``:
        this run's own checkpoint, whose refused files are unpickled with a warning)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from mmgen.safe_load import UnsafeCheckpointError, find_in_chain

        where = path / FSDP_DIR
        if not where.is_dir():
            raise FileNotFoundError(
                f"{path}: not an FSDP checkpoint (no {FSDP_DIR}/); start a new run with "
                f"checkpoint.init_from={path.parent.parent} to take its weights into parallel=fsdp2")
        if not (where / DCP_METADATA).is_file():
            raise FileNotFoundError(f"{path}: {FSDP_DIR}/{DCP_METADATA} is missing from this FSDP checkpoint")
        state = self._state()
        reader, planner = safe_dcp_reader(where, trust, own=own)
        try:
            dcp.load(state, storage_reader=reader, planner=planner)
        except BaseException as e:  # DCP re-raises a rank's failure as CheckpointException (a BaseException)
            refused = find_in_chain(e, UnsafeCheckpointError)
            if refused is None:
                raise
            raise refused from None
        if self.ep_mesh is not None:
            state["model"], state["optimizer"] = self._experts_as_local(state["model"], state["optimizer"])
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights on CPU (a collective: every rank calls it; rank 0 gets the result,
        the others an empty dict, so host memory holds one copy per node at most)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)

        state = get_model_state_dict(self.module, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False))
        if self.ep_mesh is not None:   # every rank gathers the experts; rank 0 keeps them
            from mmgen.parallel.ep import full_model_state

            full = full_model_state(self.module, {}, self.ep_mesh.get_group())
            if state:
                state.update({k: v.detach().cpu() for k, v in full.items()})
        return state


def split_expert_groups(optimizer, experts: list) -> torch.optim.Optimizer:
    """The same optimizer with each param group split into its non-expert and expert parts:
    a foreach or fused step runs per group and cannot mix DTensors with plain tensors."""
    ids = {id(p) for p in experts}
    groups = []
    for g in optimizer.param_groups:
        for part in ([p for p in g["params"] if id(p) not in ids], [p for p in g["params"] if id(p) in ids]):
            if part:
                groups.append({**g, "params": part})
    return type(optimizer)(groups)   # every hyper-parameter travels in the group dicts


# -- DCP without pickle ---------------------------------------------------------------------------
DCP_METADATA = ".metadata"
# what DCP's .metadata pickle names (torch 2.13): its own record classes, torch.Size, the layout
# helper, a path; dtypes are resolved by the RestrictedUnpickler itself
DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    # megatron's dist_checkpointing (torch_dist format) also keeps its save plans in .metadata
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


def safe_dcp_reader(where: Path, trust: bool = False, planner_base=None, own: bool = False):
    """A DCP storage reader and load planner that unpickle nothing but plain records.

    torch's FileSystemReader reads ``.metadata`` with plain ``pickle.load`` and its planners
    read non-tensor values (optimizer hyper-parameters) with ``torch.load(weights_only=False)``;
    here the metadata goes through :class:`~mmgen.safe_load.RestrictedUnpickler` and
    each value is first read with ``weights_only=True`` (tensors were already read that way).

    Args:
        where: the DCP directory (``step_N/fsdp``).
        trust: torch's own reader and planner (pickle) instead.
        planner_base: the DCP load planner class to restrict (default: DefaultLoadPlanner).
        own: this run's own checkpoint: what the restriction refuses is unpickled, with a
            warning (the trust rule's second case).

    Returns:
        ``(storage_reader, planner)`` for DCP's load.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    base = planner_base or DefaultLoadPlanner
    if trust:
        return FileSystemReader(str(where)), base()
    reader_cls, planner_cls = _safe_dcp_classes(base)
    reader = reader_cls(str(where), own=own)
    # read once here: inside dcp.load a refusal would reach us only as text in an AssertionError
    reader.read_metadata()
    return reader, planner_cls(where, own=own)


@functools.cache
def _safe_dcp_classes(planner_base):
    """The restricted reader and planner classes (built on first use: DCP is imported late)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    from mmgen.safe_load import RestrictedUnpickler, allow_own, refusal

    class SafeMetadataReader(FileSystemReader):
        def __init__(self, path: str, own: bool = False):
            super().__init__(path)
            self.own = own

        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            if rank is None and getattr(self, "_metadata", None) is not None:
                return self._metadata  # read (and checked) once, by safe_dcp_reader
            path = Path(str(self.path)) / (DCP_METADATA if rank is None else f"__{rank}{DCP_METADATA}")
            with open(path, "rb") as f:
                try:
                    metadata = RestrictedUnpickler(f, DCP_METADATA_GLOBALS).load()
                except pickle.UnpicklingError as e:
                    allow_own(refusal(path, e, "DCP metadata"), self.own)
                    f.seek(0)
                    metadata = pickle.load(f)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            if rank is None:
                self._metadata = metadata
            return metadata

    class CheckedPlanner(planner_base):
        def __init__(self, where: Path, *args, own: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.where, self.own = where, own

        def load_bytes(self, read_item, value):
            try:
                torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                allow_own(refusal(f"{self.where} (value {read_item.dest_index.fqn})", e), self.own)
            value.seek(0)
            super().load_bytes(read_item, value)  # the same bytes: nothing beyond plain values

    return SafeMetadataReader, CheckedPlanner


def checkpoint_state_dict(ckpt: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Plain-model weights from an FSDP checkpoint, without a process group (export): DCP's
    own conversion (what ``dcp_to_torch_save`` does, kept in memory) through
    :func:`safe_dcp_reader`: nothing is unpickled unless ``trust``."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    where = ckpt / FSDP_DIR
    if not where.is_dir():
        raise FileNotFoundError(f"{ckpt}: not an FSDP checkpoint (no {FSDP_DIR}/)")
    if not (where / DCP_METADATA).is_file():
        raise FileNotFoundError(f"{ckpt}: {FSDP_DIR}/{DCP_METADATA} is missing from this FSDP checkpoint")
    from mmgen.safe_load import UnsafeCheckpointError, find_in_chain

    reader, planner = safe_dcp_reader(where, trust, _EmptyStateDictLoadPlanner)
    state: dict = {}
    try:
        _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=True)
    except BaseException as e:
        refused = find_in_chain(e, UnsafeCheckpointError)
        if refused is None:
            raise
        raise refused from None
    return state["model"]
