# Expert parallelism in plain torch: experts sharded over an EP group, tokens exchanged with all_to_all_single.
"""The MoE FFN (``mmgen/models/moe.py``) routes on every rank as on one device; only
:meth:`MoEFeedForward.run_experts` changes: its rows (sorted by global expert id, ``counts[e]``
each) go to the ranks that hold their experts and come back, through
:class:`AllToAllDispatcher`, set on the module from outside by :func:`apply_expert_parallel`.

Per MoE FFN call, on an EP group of ``P`` ranks each holding ``E / P`` consecutive experts:

1. exchange the per-expert counts (``all_to_all_single`` of ``[E]`` ints, ``E / P`` per peer),
   so every rank knows how many rows it receives from each peer for each of its experts;
2. send the rows (one ``all_to_all_single``, uneven splits: the rows of peer ``p``'s experts
   go to ``p``), which arrive grouped by source rank, then by local expert;
3. regroup them by local expert (a permutation), run the local experts (loop or grouped GEMM,
   the same kernels as one device), undo the permutation;
4. send the outputs back (the reverse ``all_to_all_single``); autograd runs the same exchanges
   backwards (``torch.distributed.nn.functional.all_to_all_single``).

Each row meets the same expert weights and the same kernel as on one device, so EP=P equals
EP=1 up to the order of the grouped GEMM's row blocks (fp32: bit-equal in the loop reference).

Gradients: each rank back-propagates its own loss (normalised by global counts, and scaled by
the data-parallel size for DDP's averaging); an expert's gradient therefore already sums the
contributions of every EP peer's tokens. :func:`reduce_expert_grads` divides by the
data-parallel size and sums over the ranks that hold the same experts (``dp / ep`` of them),
which gives the gradient of one device. Expert parameters must be left out of DDP's averaging
(:func:`expert_param_names`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.nn.functional import all_to_all_single

from mmgen.models.moe import Experts, MoEFeedForward


class AllToAllDispatcher:
    """``(experts, rows, counts) -> outputs`` over an EP group (module docstring).

    Args:
        group: the expert-parallel process group.
        n_experts: experts of the MoE FFN in all (divisible by the group size).
    """

    def __init__(self, group, n_experts: int):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if n_experts % self.size:
            raise ValueError(f"model.moe_experts={n_experts} is not divisible by the expert-parallel size {self.size}")
        self.local = n_experts // self.size

    def __call__(self, experts: Experts, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        p, local = self.size, self.local
        send_counts = torch.tensor(counts, dtype=torch.long)
        recv_counts = torch.empty_like(send_counts)
        # counts on the host (gloo and NCCL both take CPU split sizes; the tensor goes to the device for NCCL)
        dev = rows.device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
        recv_counts = recv_counts.to(dev)
        dist.all_to_all_single(recv_counts, send_counts.to(dev), group=self.group)
        recv = recv_counts.cpu().view(p, local)          # [source rank, local expert]
        send_splits = send_counts.view(p, local).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()
        received = all_to_all_single(rows.new_empty(sum(recv_splits), rows.shape[-1]), rows,
                                     recv_splits, send_splits, group=self.group)
        # arrived (source, expert)-major; the experts want expert-major: a stable sort by expert
        expert_of = torch.repeat_interleave(torch.arange(local).repeat(p), recv.reshape(-1)).to(rows.device)
        order = torch.sort(expert_of, stable=True).indices
        out = experts(received[order], recv.sum(0).tolist())
        back = torch.empty_like(out).index_copy(0, order, out) if out.shape[0] else out
        return all_to_all_single(rows.new_empty(rows.shape[0], out.shape[-1]), back,
                                 send_splits, recv_splits, group=self.group)


@torch.no_grad()
def apply_expert_parallel(model: nn.Module, group) -> int:
    """Keep this rank's ``E / P`` experts of every MoE FFN and set the dispatchers. On a
    materialised model the weights are sliced from the full set; on the meta model (an engine's
    parallelize) only the shapes change, and :func:`~mmgen.parallel.parallelize.materialize`
    copies each rank's slice out of a full initialisation (:func:`expert_slices`), so every
    layout holds the same experts.

    Args:
        model: the plain model (materialised with the same weights on every rank, or on meta).
        group: the expert-parallel process group.

    Returns:
        the number of MoE FFNs sharded.
    """
    n = 0
    for module in model.modules():
        if not isinstance(module, MoEFeedForward):
            continue
        d = AllToAllDispatcher(group, module.n_experts)
        lo, hi = d.rank * d.local, (d.rank + 1) * d.local
        ex = module.experts
        for name in EXPERT_WEIGHTS:
            full = getattr(ex, name)
            setattr(ex, name, nn.Parameter(full[lo:hi].clone(), requires_grad=full.requires_grad))
        # on the module, not the parameters: to_empty and fully_shard replace Parameter objects
        ex.ep_range = (lo, hi, module.n_experts)
        ex.n_experts = d.local
        module.dispatcher = d
        n += 1
    return n


EXPERT_WEIGHTS = ("w1", "w3", "w2")


def expert_slices(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """``{parameter name: (first expert, end, experts in all)}`` of every sharded expert weight
    (dim 0 of each is the expert index); empty without expert parallelism."""
    out = {}
    for mname, m in model.named_modules():
        rng = getattr(m, "ep_range", None)
        if isinstance(m, Experts) and rng is not None:
            for w in EXPERT_WEIGHTS:
                out[f"{mname}.{w}" if mname else w] = rng
    return out


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    """The sharded expert parameters (in :func:`expert_slices` order)."""
    params = dict(model.named_parameters())
    return [params[n] for n in expert_slices(model)]


def all_expert_weights(model: nn.Module) -> list[nn.Parameter]:
    """The routed experts' weights of every MoE FFN, split by EP or not (FSDP2 gives them their
    own optimizer param groups at any EP degree, so its checkpoints resume across degrees)."""
    return [getattr(m, w) for m in model.modules() if isinstance(m, Experts) for w in EXPERT_WEIGHTS]


def expert_param_names(model: nn.Module) -> list[str]:
    """Names of the sharded expert parameters (for DDP's ignore list)."""
    return list(expert_slices(model))


@torch.no_grad()
def reduce_expert_grads(model: nn.Module, dp_size: int, expert_dp_group=None) -> None:
    """Turn the sharded experts' gradients into one device's (module docstring): sum over the
    ranks holding the same experts (``expert_dp_group``; None when ``ep == dp``), divide by the
    data-parallel size.

    Args:
        model: the model after :func:`apply_expert_parallel` and the backward.
        dp_size: the data-parallel degree the losses were scaled by.
        expert_dp_group: ranks with the same experts, or None when there is one per expert.
    """
    for p in expert_params(model):
        if p.grad is not None:
            if expert_dp_group is not None:
                dist.all_reduce(p.grad, group=expert_dp_group)
            p.grad.div_(dp_size)


# -- the engines' side: gradient norm, full-expert state dicts --------------------------------
@torch.no_grad()
def clip_with_experts(model: nn.Module, max_norm: float, ep_group) -> torch.Tensor:
    """Clip every gradient by the global norm in which each expert counts once: the other
    parameters are the same on every rank (DDP) or DTensors whose norm is already global
    (FSDP2), the experts' squared norms are summed over the EP group (each expert lives on
    exactly one of its ranks). Returns the pre-clip norm (fp32, on the gradients' device).

    Args:
        model: the model after :func:`reduce_expert_grads`.
        max_norm: ``optim.grad_clip`` (<= 0: no clipping, the norm only).
        ep_group: the expert-parallel process group.
    """
    experts = {id(p) for p in expert_params(model)}
    dense = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in experts]
    local = [p.grad for p in model.parameters() if p.grad is not None and id(p) in experts]
    d = torch.nn.utils.get_total_norm(dense, foreach=True) if dense else torch.zeros(())
    if hasattr(d, "full_tensor"):
        d = d.full_tensor()
    dev = (dense or local)[0].device
    sq = (torch.nn.utils.get_total_norm(local, foreach=True) if local else torch.zeros((), device=dev)).float() ** 2
    sq = sq.to(dev)
    dist.all_reduce(sq, group=ep_group)
    total = (d.float().to(dev) ** 2 + sq).sqrt()
    if max_norm > 0:
        # a Python float: the same scalar multiplies plain and DTensor gradients alike
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        if coef < 1.0:
            for g in dense + local:
                g.mul_(coef)
    return total


def _gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    """The EP group's slices of ``t`` (equal sizes on dim 0), concatenated in rank order."""
    out = t.new_empty((t.shape[0] * dist.get_world_size(group), *t.shape[1:]))
    dist.all_gather_into_tensor(out, t.contiguous(), group=group)
    return out


def gather_expert_rows(t: torch.Tensor, group) -> torch.Tensor:
    """Every EP rank's experts of one weight (dim 0), in rank order: the full set (a collective)."""
    return _gather_rows(t, group)


@torch.no_grad()
def full_model_state(model: nn.Module, state: dict, group) -> dict:
    """``state`` (the model's state dict) with every sharded expert weight gathered whole over
    the EP group (a collective: every rank calls it), as one process would hold it."""
    out = dict(state)
    params = dict(model.named_parameters())
    for name in expert_slices(model):
        out[name] = _gather_rows(params[name].detach(), group)
    return out


def local_model_state(model: nn.Module, state: dict) -> dict:
    """A full (one-process) state dict cut to this rank's experts (any EP degree wrote it)."""
    out = dict(state)
    for name, (lo, hi, total) in expert_slices(model).items():
        if out[name].shape[0] != total:
            raise ValueError(f"{name}: {out[name].shape[0]} experts in the checkpoint, the model has {total}")
        out[name] = out[name][lo:hi]
    return out


def _optimizer_params(optimizer) -> list:
    """Parameters in the order of ``optimizer.state_dict()``'s integer ids."""
    return [p for g in optimizer.param_groups for p in g["params"]]


@torch.no_grad()
def full_optimizer_state(model: nn.Module, optimizer, group) -> dict:
    """``optimizer.state_dict()`` with the sharded experts' per-element states (Adam moments)
    gathered whole over the EP group: the file one process would write (a collective)."""
    sd = optimizer.state_dict()
    experts = {id(p) for p in expert_params(model)}
    for i, p in enumerate(_optimizer_params(optimizer)):
        if id(p) in experts and i in sd["state"]:
            sd["state"][i] = {k: _gather_rows(v, group) if torch.is_tensor(v) and v.shape == p.shape else v
                              for k, v in sd["state"][i].items()}
    return sd


def local_optimizer_state(model: nn.Module, optimizer, sd: dict) -> dict:
    """A full optimizer state dict (:func:`full_optimizer_state`) cut to this rank's experts."""
    slices = {id(p): expert_slices(model)[n] for n, p in model.named_parameters() if n in expert_slices(model)}
    state = dict(sd["state"])
    for i, p in enumerate(_optimizer_params(optimizer)):
        if id(p) in slices and i in state:
            lo, hi, total = slices[id(p)]
            state[i] = {k: v[lo:hi] if torch.is_tensor(v) and v.ndim and v.shape[0] == total else v
                        for k, v in state[i].items()}
    return {**sd, "state": state}
