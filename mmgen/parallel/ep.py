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
    """Keep this rank's ``E / P`` experts of every MoE FFN (weights sliced from the full,
    initialised model, so every layout holds the same experts) and set the dispatchers.

    Args:
        model: the materialised plain model (every rank the same weights).
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
        for name in ("w1", "w3", "w2"):
            full = getattr(ex, name)
            setattr(ex, name, nn.Parameter(full[lo:hi].clone(), requires_grad=full.requires_grad))
            getattr(ex, name)._mmgen_expert_parallel = True
        ex.n_experts = d.local
        module.dispatcher = d
        n += 1
    return n


def expert_param_names(model: nn.Module) -> list[str]:
    """Names of the sharded expert parameters (for DDP's ignore list)."""
    return [n for n, p in model.named_parameters() if getattr(p, "_mmgen_expert_parallel", False)]


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
    for p in model.parameters():
        if getattr(p, "_mmgen_expert_parallel", False) and p.grad is not None:
            if expert_dp_group is not None:
                dist.all_reduce(p.grad, group=expert_dp_group)
            p.grad.div_(dp_size)
