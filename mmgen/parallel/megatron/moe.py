# The MoE FFN under parallel=megatron: mmgen's router and experts, megatron-core's token dispatcher and EP groups.
"""Why this split (docs/megatron.md, "Expert parallelism"): the router, its renormalised top-k,
the capacity rule, the aux-free bias, the ``moe_balance`` / ``moe_z`` losses and the router
statistics are :class:`mmgen.models.moe.MoEFeedForward`'s own code (this class subclasses
it), so they are the plain model's numbers by construction; megatron's ``TopKRouter`` differs
(its capacity drops by probability or position per expert, its aux loss is scaled by its own
token counts and its expert bias needs sigmoid scores). What megatron does is the part that
is parallel: ``MoEAlltoAllTokenDispatcher`` (or ``MoEAllGatherTokenDispatcher``) moves each
kept (token, expert) assignment to the expert-parallel rank holding that expert over
``parallel_state``'s EP group and back; the local experts are mmgen's 3-D ``Experts`` on a
contiguous slice ``[ep_rank * E/ep, (ep_rank + 1) * E/ep)`` of the expert axis, so the adapter
cuts and merges them along dim 0 and the checkpoint keeps the plain layout.

Tensor parallelism (``tp > 1`` with ``sequence_parallel=true``, as megatron's own MoE layer
requires; experts not TP-split: megatron's ``expert_tensor_parallel_size=1``): every TP rank
all-gathers the SP chunks and routes ALL the block's tokens (identical routing, capacity and aux losses: the
plain model's), but dispatches only its own 1/tp of them, so each token meets its experts
once across the TP x DP ranks; the routed outputs are all-gathered over TP. The gradient
bookkeeping that makes this the plain gradient:

* input: the all-gather of the SP chunks sums the TP ranks' partial input gradients (each saw
  its own tokens' expert paths) in its backward reduce-scatter;
* the aux losses are the same on every TP rank, and their gradient is scaled by 1/tp so the
  sum above counts it once; the router weight holds a per-rank part (``tp_partial_grad``,
  summed over TP by the engine);
* expert weights carry ``allreduce=False``: megatron DDP reduces them over the expert-data-
  parallel group (the ranks holding the same experts), its optimizer keeps them apart;
* shared experts see the rank's SP chunk, their weights marked ``sequence_parallel`` like the
  norms (megatron sums those over TP).
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as mtp
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher, MoEAlltoAllTokenDispatcher

from mmgen.models.config import ModelConfig
from mmgen.models.moe import Experts, MoEFeedForward, Routing, _in_recomputation

DISPATCHERS = {"alltoall": MoEAlltoAllTokenDispatcher, "allgather": MoEAllGatherTokenDispatcher}


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` (aux losses computed alike on each TP rank)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def local_expert_range(n_experts: int, ep: int, ep_rank: int) -> range:
    """Global ids of the experts expert-parallel rank ``ep_rank`` of ``ep`` holds (a contiguous slice)."""
    per = n_experts // ep
    return range(ep_rank * per, (ep_rank + 1) * per)


class ParallelMoE(MoEFeedForward):
    """:class:`MoEFeedForward` whose routed experts run through megatron's token dispatcher;
    called on megatron's ``[s, b, d]`` (or ``[s/tp, b, d]`` under SP) residual stream.

    Args:
        cfg: the architecture (``model.moe_*``).
        mcfg: megatron's TransformerConfig (``num_moe_experts``, ``moe_token_dispatcher_type``, TP/SP).
    """

    def __init__(self, cfg: ModelConfig, mcfg):
        super().__init__(cfg)
        self.tp, self.sp = mcfg.tensor_model_parallel_size, mcfg.sequence_parallel
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
        self.local_experts = local_expert_range(cfg.moe_experts, ep, ep_rank)
        hidden = cfg.moe_ffn_dim or cfg.ffn_dim
        # only this rank's slice of the expert axis (the adapter writes it from the plain weights)
        self.experts = Experts(len(self.local_experts), cfg.dim, hidden, cfg.moe_experts_impl)
        for p in self.experts.parameters():
            p.allreduce = False       # megatron: an expert parameter (expert-DP reduction, own optimizer)
            # not a TP duplicate: every TP rank's experts count in the grad norm (without this
            # megatron counts only TP rank 0's, measured: 7.8e-5 too small a norm at tp=2 x ep=2)
            mtp.set_tensor_model_parallel_attributes(p, True, 0, 1)
        self.router.weight.tp_partial_grad = self.tp > 1
        if self.shared is not None:
            for p in self.shared.parameters():
                p.sequence_parallel = self.sp
        self.token_dispatcher = DISPATCHERS[mcfg.moe_token_dispatcher_type](
            len(self.local_experts), list(self.local_experts), config=mcfg, pg_collection=get_default_pg_collection())

    def forward(self, x: torch.Tensor, modality=None):
        """``x`` ``[s, b, d]`` (this rank's SP chunk under SP) -> ``(y, aux)`` of ``x``'s shape."""
        if self.tp > 1 and not self.sp:   # checks.check_experts refuses this layout at start-up
            raise ValueError("parallel=megatron MoE with parallel.tp > 1 needs parallel.sequence_parallel=true")
        full = mtp.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True) if self.sp else x
        s, b, d = full.shape
        # route in the plain model's token order ([b, s] flattened): capacity priority is token order
        flat = full.transpose(0, 1).reshape(-1, d)
        routing = self.router(flat)
        routed = self._dispatch_combine(flat, routing)                    # [N, d], every token
        routed = routed.view(b, s, d).transpose(0, 1)
        if self.sp:
            routed = mtp.scatter_to_sequence_parallel_region(routed)
        y = routed if self.shared is None else routed + self.shared(x)
        if self.training and not _in_recomputation():
            self.record(routing, None)
        aux = self.aux_losses(routing)
        if self.tp > 1:
            aux = {k: _ScaleGrad.apply(v, 1.0 / self.tp) for k, v in aux.items()}
        return y.contiguous(), aux

    def _dispatch_combine(self, flat: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Routed-expert output of every token: this TP rank's 1/tp of the tokens through
        megatron's dispatcher, then all-gathered over TP."""
        n = flat.shape[0]
        if n % self.tp:
            raise ValueError(f"parallel=megatron MoE: {n} tokens per micro-batch do not split over tp={self.tp}")
        lo, hi = self.tp_rank * n // self.tp, (self.tp_rank + 1) * n // self.tp
        experts, keep, weights = routing.experts[lo:hi], routing.keep[lo:hi], routing.weights[lo:hi]
        # megatron's routing map: [tokens, E] bool of the kept assignments, and their combine weights
        routing_map = torch.zeros(hi - lo, self.n_experts, dtype=torch.bool, device=flat.device)
        routing_map.scatter_(1, experts, keep)
        probs = torch.zeros(hi - lo, self.n_experts, dtype=weights.dtype, device=flat.device)
        probs = probs.scatter(1, experts, weights)
        disp = self.token_dispatcher
        h, p = disp.dispatch_preprocess(flat[lo:hi], routing_map, probs)
        h, p = disp.token_dispatch(h, p)
        h, tokens_per_expert, p = disp.dispatch_postprocess(h, p)
        out = self.experts(h, [int(c) for c in tokens_per_expert.tolist()])
        # the plain model weights each expert output, then sums a token's k outputs
        out = out * p.to(out.dtype)[:, None]
        out = disp.combine_postprocess(disp.token_combine(disp.combine_preprocess(out)))
        out = out.to(flat.dtype)
        if self.tp > 1:
            # every TP rank's loss gradient is complete: the backward keeps this rank's part
            out = mtp.gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
        return out


def moe_transformer_kwargs(cfg: ModelConfig, parallel) -> dict:
    """The TransformerConfig fields of the MoE settings (empty for a dense model)."""
    if cfg.moe_experts == 0:
        return {}
    kwargs = dict(num_moe_experts=cfg.moe_experts, moe_router_topk=cfg.moe_top_k,
                  moe_ffn_hidden_size=cfg.moe_ffn_dim or cfg.ffn_dim, expert_model_parallel_size=parallel.ep,
                  expert_tensor_parallel_size=1, moe_token_dispatcher_type=parallel.moe_token_dispatcher,
                  moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)
    if cfg.moe_capacity_factor > 0:
        # only so that megatron sizes its buffers by the kept assignments (mmgen's router drops;
        # megatron's own capacity/padding stays off)
        kwargs["moe_expert_capacity_factor"] = cfg.moe_capacity_factor
    return kwargs

