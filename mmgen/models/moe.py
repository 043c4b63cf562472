# Token-choice Mixture-of-Experts FFN (router, experts, shared experts) and the `moe` trunk block.
"""Single-device code: no ``torch.distributed`` here. Expert parallelism (``mmgen/parallel/ep.py``)
replaces :meth:`MoEFeedForward.run_experts` from outside; everything else (routing, auxiliary
losses, statistics) is the same code on every layout.

One MoE FFN call, on ``x`` ``[N, dim]`` or ``[B, L, dim]``:

1. **Route** (:class:`Router`): logits ``x @ W_r`` ``[N, E]``; scores ``softmax`` or ``sigmoid``;
   each token picks its top-k experts by score (plus the aux-free ``expert_bias`` when
   ``moe_bias_update_rate > 0``: the bias steers *selection* only, DeepSeek-V3); the combine
   weights are the chosen (unbiased) scores, renormalised to sum to 1 when
   ``moe_norm_topk`` (so a uniform router over copies of one FFN gives that FFN: upcycling).
2. **Capacity** (``moe_capacity_factor > 0``): expert ``e`` takes at most
   ``C = ceil(factor * N * k / E)`` assignments; priority is choice rank first (every token's
   first choice before any second choice, GShard), then token order. Dropped assignments get
   weight 0 (their token keeps its residual). ``0`` = dropless.
3. **Experts**: kept assignments sorted by expert, one SwiGLU per contiguous group. ``loop``
   (a Python loop, the CPU reference), ``grouped`` (``torch._grouped_mm`` where it exists and
   the shapes are 16-byte aligned, else one ``bmm`` over groups padded to the largest).
4. **Combine**: outputs put back in assignment order and summed over the k choices per token
   (a fixed-order sum, no atomics: deterministic on GPU too); plus the shared experts, which
   see every token.

Auxiliary losses (per call, one scalar each, summed over layers by the trunk): ``moe_balance``
(Switch/GShard: ``E * sum_e f_e * P_e``, ``f_e`` the fraction of assignments routed to ``e``
before dropping, ``P_e`` its mean normalised score) and ``moe_z`` (router z-loss:
``mean(logsumexp(logits)^2)``, ST-MoE). Their weights are ``model.moe_aux_loss_weight`` and
``model.moe_z_loss_weight`` (:func:`aux_loss_weights`; an ``objective.weights`` entry of the
same name overrides).

Statistics (counted in training mode only, and not again in an activation-checkpointing
recomputation): per expert the assignments of the current optimizer step (for the aux-free
bias update, :func:`update_expert_bias`) and of the current log interval (router metrics,
:func:`collect_router_stats`), dropped assignments, the summed router entropy, per modality
when the caller passes one. They are plain tensors, not buffers, so DDP's buffer broadcast
and the state dict leave them alone; ``expert_bias`` is a persistent buffer (checkpointed).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgen.models.attention import AttentionMask
from mmgen.models.config import ModelConfig
from mmgen.models.kv_cache import LayerKV
from mmgen.models.layers import Attention, RMSNorm, SwiGLU, _trunc_normal

SCORES = ("softmax", "sigmoid")
EXPERT_IMPLS = ("loop", "grouped")
BALANCE, ZLOSS = "moe_balance", "moe_z"
# modality ids counted per expert (mmgen.batch: TEXT, IMAGE, VIDEO; one spare); others ignored
N_MODALITIES = 4


def is_moe_layer(cfg: ModelConfig, layer_id: int) -> bool:
    """Layer ``layer_id`` has an MoE FFN: ``model.moe_experts > 0`` and ``layer_id % moe_every == 0``
    (megatron's ``moe_layer_freq`` pattern: every=2 gives MoE, dense, MoE, ...)."""
    return cfg.moe_experts > 0 and layer_id % cfg.moe_every == 0


def moe_layer_ids(cfg: ModelConfig) -> list[int]:
    """The layers with an MoE FFN (for FLOP accounting and metrics)."""
    return [i for i in range(cfg.n_layers) if is_moe_layer(cfg, i)]


def active_params(cfg: ModelConfig) -> tuple[int, int]:
    """``(total, active)`` trunk FFN + attention parameters per token (no embeddings, heads or
    norms): what "8 experts, top-2, about 1B active" means. Active counts the router, ``top_k``
    routed experts and the shared experts of each MoE layer.

    Args:
        cfg: the model config.
    """
    d, hd = cfg.dim, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + 2 * d * cfg.n_kv_heads * hd
    dense_ffn = 3 * d * cfg.ffn_dim
    hidden = cfg.moe_ffn_dim or cfg.ffn_dim
    total = active = 0
    for i in range(cfg.n_layers):
        if is_moe_layer(cfg, i):
            router, expert = d * cfg.moe_experts, 3 * d * hidden
            total += attn + router + (cfg.moe_experts + cfg.moe_shared_experts) * expert
            active += attn + router + (cfg.moe_top_k + cfg.moe_shared_experts) * expert
        else:
            total += attn + dense_ffn
            active += attn + dense_ffn
    return total, active


def aux_loss_weights(cfg: ModelConfig) -> dict[str, float]:
    """Default weights of the MoE auxiliary losses in the objective's total (empty when the
    model has no MoE layer); the trainer puts them under ``objective.weights``, which wins.

    Args:
        cfg: the model config.
    """
    if not moe_layer_ids(cfg):
        return {}
    return {BALANCE: cfg.moe_aux_loss_weight, ZLOSS: cfg.moe_z_loss_weight}


def _in_recomputation() -> bool:
    """True while autograd's engine runs a backward (activation checkpointing recomputes the
    forward there): statistics must not be counted twice."""
    return torch._C._current_graph_task_id() != -1


class Routing(NamedTuple):
    """What the router decided for ``N`` tokens and ``k`` choices each. A NamedTuple, not a
    dataclass: ZeRO-3's module hooks find the tensors of tuple outputs only, and a router
    output they cannot see leaves the router weight un-gathered in the backward.

    Args:
        logits: ``[N, E]`` router logits (fp32).
        scores: ``[N, E]`` softmax or sigmoid scores.
        experts: ``[N, k]`` chosen expert ids, best first.
        weights: ``[N, k]`` combine weights (0 where dropped).
        keep: ``[N, k]`` bool, False where the capacity dropped the assignment.
        capacity: per-expert capacity (0: dropless).
    """

    logits: torch.Tensor
    scores: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor
    keep: torch.Tensor
    capacity: int


class Router(nn.Module):
    """Top-k token-choice router with an optional aux-free selection bias."""

    def __init__(self, dim: int, n_experts: int, top_k: int, score: str, norm_topk: bool,
                 capacity_factor: float, use_bias: bool = False):
        super().__init__()
        self.n_experts, self.top_k, self.score = n_experts, top_k, score
        self.norm_topk, self.capacity_factor = norm_topk, capacity_factor
        self.use_bias = use_bias
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        # DeepSeek-V3's auxiliary-loss-free balancing: added to the scores for selection only
        self.register_buffer("expert_bias", torch.zeros(n_experts), persistent=True)

    def forward(self, x: torch.Tensor) -> Routing:
        """Route ``x`` ``[N, dim]``."""
        # router math in fp32 (under bf16 autocast too): top-k ties and the z-loss are sensitive
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        choice = scores + self.expert_bias if self.use_bias else scores
        experts = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, experts)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-20)
        keep, capacity = self.capacity_keep(experts)
        return Routing(logits, scores, experts, weights * keep, keep, capacity)

    def capacity_keep(self, experts: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``[N, k]`` bool kept assignments and the capacity (module docstring, step 2)."""
        if self.capacity_factor <= 0:
            return torch.ones_like(experts, dtype=torch.bool), 0
        n, k = experts.shape
        capacity = math.ceil(self.capacity_factor * n * k / self.n_experts)
        # choice rank first, then token order: flatten k-major
        flat = experts.t().reshape(-1)
        onehot = F.one_hot(flat, self.n_experts)
        slot = (onehot.cumsum(0) - 1).gather(1, flat[:, None]).squeeze(1)   # place in its expert
        keep = (slot < capacity).view(k, n).t()
        return keep, capacity

    def init_weights(self, std: float) -> None:
        _trunc_normal(self.weight, std)
        self.expert_bias.zero_()


class Experts(nn.Module):
    """``E`` SwiGLU experts as 3-D weights ``w1, w3: [E, dim, hidden]``, ``w2: [E, hidden, dim]``
    (``x @ w``: the layout grouped GEMMs and expert-parallel sharding along dim 0 want)."""

    def __init__(self, n_experts: int, dim: int, hidden: int, impl: str):
        super().__init__()
        self.n_experts, self.impl = n_experts, impl
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))

    def forward(self, x: torch.Tensor, counts: list[int], impl: str | None = None) -> torch.Tensor:
        """Rows ``x`` ``[M, dim]`` sorted by expert, ``counts[e]`` rows for expert ``e`` (of this
        module's experts) -> ``[M, dim]``.

        Args:
            x: the rows, grouped by expert in order.
            counts: rows per expert (host ints; they sum to ``M``).
            impl: ``loop`` or ``grouped``; default the module's ``moe_experts_impl``.
        """
        impl = impl or self.impl
        if x.shape[0] == 0:
            # no rows (an expert-parallel rank may get none): still connected to x and the
            # weights, so the backward runs the same collectives on every rank
            return x.new_zeros(0, self.w2.shape[-1]) + 0 * (self.w1.sum() + self.w3.sum() + self.w2.sum() + x.sum())
        if impl == "loop":
            return self._loop(x, counts)
        dtype = _grouped_mm_dtype(x)
        rows = x if dtype is None else x.to(dtype)
        if dtype is not None and _grouped_mm_ok(rows, self.w1, self.w2):
            return self._grouped_mm(rows, counts)
        return self._padded_bmm(x, counts)

    def _loop(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outs, start = [], 0
        for e, c in enumerate(counts):
            rows = x[start:start + c]
            outs.append((F.silu(rows @ self.w1[e]) * (rows @ self.w3[e])) @ self.w2[e])
            start += c
        return torch.cat(outs) if outs else x.new_zeros(0, self.w2.shape[-1])

    def _grouped_mm(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        w1, w3, w2 = (w.to(x.dtype) for w in (self.w1, self.w3, self.w2))
        h = F.silu(torch._grouped_mm(x, w1, offs=offs)) * torch._grouped_mm(x, w3, offs=offs)
        return torch._grouped_mm(h, w2, offs=offs)

    def _padded_bmm(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Each group padded to the largest, one ``bmm`` per matmul; padding rows are zeros,
        so they add nothing to any gradient."""
        e, dim = self.n_experts, x.shape[-1]
        width = max(counts) if counts else 0
        if width == 0:
            return x.new_zeros(0, self.w2.shape[-1])
        sizes = torch.tensor(counts, device=x.device)
        starts = sizes.cumsum(0) - sizes
        expert_of = torch.repeat_interleave(torch.arange(e, device=x.device), sizes)
        slot = torch.arange(x.shape[0], device=x.device) - starts[expert_of]
        padded = x.new_zeros(e, width, dim).index_put((expert_of, slot), x)
        h = F.silu(torch.bmm(padded, self.w1.to(x.dtype))) * torch.bmm(padded, self.w3.to(x.dtype))
        return torch.bmm(h, self.w2.to(x.dtype))[expert_of, slot]

    def init_weights(self, std: float, out_std: float) -> None:
        for e in range(self.n_experts):   # expert by expert, in the order of a dense SwiGLU
            _trunc_normal(self.w1[e], std)
            _trunc_normal(self.w3[e], std)
            _trunc_normal(self.w2[e], out_std)


def _grouped_mm_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch._grouped_mm`` runs in for ``x``, or None where it cannot (then padded
    ``bmm``): bf16 on CUDA (its kernels take bf16 only; under bf16 autocast the fp32 rows are cast,
    as autocast would for a matmul) and under torch.compile (its meta function checks the same,
    on any device: compiling an fp32 MoE on CPU failed in dynamo's fake-tensor pass); in eager on
    CPU any dtype (the CPU kernel takes fp32)."""
    if not (x.is_cuda or torch.compiler.is_compiling()):
        return x.dtype
    if x.dtype == torch.bfloat16:
        return x.dtype
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16:
        return torch.bfloat16
    return None


def _grouped_mm_ok(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """``torch._grouped_mm`` exists and its 16-byte stride rule holds (else: padded bmm)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    size = x.element_size()
    return all(w.shape[-1] * size % 16 == 0 and w.shape[-2] * size % 16 == 0 for w in weights)


class MoEFeedForward(nn.Module):
    """Drop-in replacement for :class:`~mmgen.models.layers.SwiGLU` that also returns aux losses:
    ``forward(x[, modality]) -> (y, {"moe_balance": ..., "moe_z": ...})``.

    Args:
        cfg: ``model.moe_*`` fields (experts, top-k, score, capacity, shared experts, impl).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.moe_ffn_dim or cfg.ffn_dim
        self.n_experts, self.top_k = cfg.moe_experts, cfg.moe_top_k
        self.router = Router(cfg.dim, cfg.moe_experts, cfg.moe_top_k, cfg.moe_score,
                             cfg.moe_norm_topk, cfg.moe_capacity_factor,
                             use_bias=cfg.moe_bias_update_rate > 0)
        self.experts = Experts(cfg.moe_experts, cfg.dim, hidden, cfg.moe_experts_impl)
        # shared experts: one SwiGLU of n_shared x hidden (the same function as n separate ones summed)
        self.shared = SwiGLU(cfg.dim, hidden * cfg.moe_shared_experts) if cfg.moe_shared_experts else None
        # set by mmgen.parallel.ep: (routed rows sorted by expert, global counts) -> expert outputs
        self.dispatcher = None
        self.reset_stats()

    # ------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x`` ``[N, dim]`` or ``[B, L, dim]`` -> ``(y, aux)`` of the same shape.

        Args:
            x: token features.
            modality: optional long ids per token (shape of ``x`` without the last dim), for
                per-modality load statistics only.
        """
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = self.router(flat)
        y = self.combine(flat, routing)
        if self.shared is not None:
            y = y + self.shared(flat)
        if self.training and not _in_recomputation():
            self.record(routing, None if modality is None else modality.reshape(-1))
        return y.view(shape), self.aux_losses(routing)

    def combine(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Dispatch the kept assignments to their experts and sum the weighted outputs per token."""
        n, k = routing.experts.shape
        flat_expert = routing.experts.reshape(-1)                    # assignment a = token * k + choice
        keep = routing.keep.reshape(-1)
        # kept assignments sorted by expert (stable: token order inside each expert)
        order = torch.sort(torch.where(keep, flat_expert, self.n_experts), stable=True).indices
        n_kept = int(keep.sum())
        order = order[:n_kept]
        counts = torch.bincount(flat_expert[order], minlength=self.n_experts).tolist()
        rows = x[order // k]
        out = self.run_experts(rows, counts)
        per_assignment = x.new_zeros(n * k, x.shape[-1], dtype=out.dtype).index_copy(0, order, out)
        weights = routing.weights.to(out.dtype).reshape(n, k, 1)
        # the width spelt out: a tower with no tokens in this (context-parallel) slice has n = 0
        return (per_assignment.view(n, k, x.shape[-1]) * weights).sum(1).to(x.dtype)

    def run_experts(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Expert outputs for ``rows`` sorted by expert; an expert-parallel dispatcher (set from
        outside) sends them to the ranks that hold their experts instead."""
        if self.dispatcher is not None:
            return self.dispatcher(self.experts, rows, counts)
        return self.experts(rows, counts)

    def aux_losses(self, routing: Routing) -> dict[str, torch.Tensor]:
        e = self.n_experts
        probs = routing.scores
        if self.router.score == "sigmoid":   # balance is defined on a distribution over experts
            probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-20)
        # f_e from the routing decision (before capacity): what the router asked for
        frac = torch.bincount(routing.experts.reshape(-1), minlength=e).float() / max(routing.experts.numel(), 1)
        if probs.shape[0] == 0:
            # no tokens (a tower or sequence slice without any this step): zero losses, still
            # connected to the router so every rank's backward reaches the same parameters
            zero = 0 * routing.logits.sum()
            return {BALANCE: zero, ZLOSS: zero}
        balance = e * (frac * probs.mean(0)).sum()
        z = torch.logsumexp(routing.logits, dim=-1).square().mean()
        return {BALANCE: balance, ZLOSS: z}

    # ------------------------------------------------------------ statistics

    def reset_stats(self) -> None:
        """Zero the per-step and per-log-interval counters (created lazily on the device)."""
        self._step_load = None
        self._log = None
        self._log_modality = None

    @torch.no_grad()
    def record(self, routing: Routing, modality: torch.Tensor | None) -> None:
        e = self.n_experts
        load = torch.bincount(routing.experts.reshape(-1), minlength=e).float()
        kept = torch.bincount(routing.experts[routing.keep], minlength=e).float()
        p = routing.scores if self.router.score == "softmax" else \
            routing.scores / routing.scores.sum(-1, keepdim=True).clamp(min=1e-20)
        entropy = -(p * p.clamp(min=1e-20).log()).sum(-1).sum()
        self._step_load = load if self._step_load is None else self._step_load + load
        # one flat vector per interval: [load E, kept E, tokens, entropy sum]
        rec = torch.cat([load, kept, load.new_tensor([routing.experts.shape[0]]), entropy[None]])
        self._log = rec if self._log is None else self._log + rec
        if modality is not None:
            mods = modality[:, None].expand_as(routing.experts).reshape(-1)
            ok = (mods >= 0) & (mods < N_MODALITIES)
            mod = torch.bincount((mods * e + routing.experts.reshape(-1))[ok],
                                 minlength=e * N_MODALITIES).float()
            self._log_modality = mod if self._log_modality is None else self._log_modality + mod

    def init_weights(self, std: float, out_std: float) -> None:
        self.router.init_weights(std)
        self.experts.init_weights(std, out_std)
        if self.shared is not None:
            self.shared.init_weights(std, out_std)
        self.reset_stats()


class MoEBlock(nn.Module):
    """Pre-norm block whose FFN is an :class:`MoEFeedForward` on the layers
    :func:`is_moe_layer` picks (a dense SwiGLU elsewhere): same attribute names as the dense
    block, so attention, norms and dense layers keep their state-dict keys."""

    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.qk_norm, cfg.norm_eps,
                                   head_dim=cfg.head_dim, qkv_bias=cfg.qkv_bias)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = is_moe_layer(cfg, layer_id)
        self.feed_forward = MoEFeedForward(cfg) if self.is_moe else SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: AttentionMask, kv: LayerKV | None = None):
        x = x + self.attention(self.attention_norm(x), rope, mask, kv)
        if not self.is_moe:
            return x + self.feed_forward(self.ffn_norm(x))
        y, aux = self.feed_forward(self.ffn_norm(x))
        return x + y, aux

    def init_weights(self, std: float, out_std: float) -> None:
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attention.init_weights(std, out_std)
        self.feed_forward.init_weights(std, out_std)


# ---------------------------------------------------------------- hooks for the trainer

def moe_modules(model: nn.Module) -> list[tuple[int, MoEFeedForward]]:
    """``(layer index, MoE FFN)`` of every MoE FFN in ``model.layers`` (in towers too), in order."""
    found = []
    for i, layer in enumerate(getattr(model, "layers", [])):
        for module in layer.modules():
            if isinstance(module, MoEFeedForward):
                found.append((i, module))
    return found


@torch.no_grad()
def step_loads(model: nn.Module) -> torch.Tensor | None:
    """``[n_moe, E]`` assignments per expert of each MoE FFN since the last bias update (None
    without MoE FFNs or before any training forward). The caller sums it over data-parallel
    ranks before :func:`update_expert_bias`."""
    mods = moe_modules(model)
    if not mods:
        return None
    rows = [m._step_load if m._step_load is not None else m.router.expert_bias.new_zeros(m.n_experts)
            for _, m in mods]
    return torch.stack([r.float() for r in rows])


@torch.no_grad()
def update_expert_bias(model: nn.Module, loads: torch.Tensor | None, rate: float) -> None:
    """DeepSeek-V3's aux-loss-free update, once per optimizer step: each expert's bias moves by
    ``rate`` towards balance, ``b_e += rate * sign(mean load - load_e)``; the step counters reset.

    Args:
        model: the plain model.
        loads: :func:`step_loads`, summed over data-parallel ranks (the same on every rank, so
            every replica's bias stays equal).
        rate: ``model.moe_bias_update_rate`` (0: counters reset, no update).
    """
    for row, (_, m) in enumerate(moe_modules(model)):
        if rate > 0 and loads is not None and float(loads[row].sum()) > 0:
            load = loads[row].to(m.router.expert_bias.device)
            m.router.expert_bias.add_(rate * torch.sign(load.mean() - load))
        m._step_load = None


@torch.no_grad()
def collect_router_stats(model: nn.Module, reset: bool = True) -> dict[int, dict[str, torch.Tensor]]:
    """Raw counters of each MoE layer since the last call: ``{layer: {"load": [E] assignments
    routed, "kept": [E] kept after capacity, "tokens": routed tokens, "entropy_sum": summed
    router entropy (nats), "bias": [E] aux-free bias, "modality_load": [N_MODALITIES, E] when
    the caller passed modality ids}}``.
    Sum ``load``/``kept``/``tokens``/``entropy_sum`` over data-parallel ranks before deriving
    metrics (``mmgen.metrics.router``).

    Args:
        model: the plain model.
        reset: zero the log-interval counters afterwards.
    """
    out = {}
    for layer, m in moe_modules(model):
        e = m.n_experts
        rec = m._log if m._log is not None else m.router.expert_bias.new_zeros(2 * e + 2)
        stats = {"load": rec[:e], "kept": rec[e:2 * e], "tokens": rec[2 * e], "entropy_sum": rec[2 * e + 1],
                 "bias": m.router.expert_bias.detach().clone()}
        if m._log_modality is not None:
            stats["modality_load"] = m._log_modality.view(N_MODALITIES, e)
        key = layer
        while key in out:   # several MoE FFNs in one layer (modality towers): next free key
            key += 1000
        out[key] = stats
        if reset:
            m._log = None
            m._log_modality = None
    return out


# ---------------------------------------------------------------- dense -> MoE upcycling

@torch.no_grad()
def upcycle_state_dict(model: nn.Module, state: dict[str, torch.Tensor], router: str = "keep"
                       ) -> dict[str, torch.Tensor]:
    """A dense state dict made loadable into the MoE ``model`` (sparse upcycling, Komatsuzaki
    et al. 2023): wherever ``model`` has an MoE FFN at module path ``P`` and ``state`` holds a
    dense SwiGLU there (``P.w1.weight`` ...), every expert becomes a copy of that SwiGLU.

    With ``moe_norm_topk`` (weights of the chosen experts sum to 1), no shared experts and no
    token dropping, the upcycled model computes exactly the dense one's function at step 0,
    whatever the router weights: every expert is the same function. A state without dense FFN
    keys at MoE positions is returned unchanged.

    Args:
        model: the MoE model (materialised: its router weights are kept with ``router="keep"``).
        state: the dense checkpoint's plain state dict.
        router: ``keep`` (the model's freshly initialised router: symmetric experts still get
            different tokens, so they diverge) or ``zero`` (uniform scores).

    Raises:
        ValueError: shared experts, an expert width other than the dense FFN's, or a bad ``router``.
    """
    if router not in ("keep", "zero"):
        raise ValueError(f"upcycling router='{router}' must be keep or zero")
    out = dict(state)
    for name, m in model.named_modules():
        if not isinstance(m, MoEFeedForward) or f"{name}.w1.weight" not in state:
            continue
        if m.shared is not None:
            raise ValueError(f"{name}: upcycling a dense FFN into an MoE with shared experts would change "
                             "its output (set model.moe_shared_experts=0)")
        w1, w3, w2 = (out.pop(f"{name}.w{j}.weight") for j in (1, 3, 2))
        if tuple(w1.shape[::-1]) != tuple(m.experts.w1.shape[1:]):
            raise ValueError(f"{name}: dense FFN {tuple(w1.shape)} does not match the experts' "
                             f"[dim, hidden] {tuple(m.experts.w1.shape[1:])} (set model.moe_ffn_dim=0)")
        e = m.n_experts
        out[f"{name}.experts.w1"] = w1.t().unsqueeze(0).repeat(e, 1, 1)
        out[f"{name}.experts.w3"] = w3.t().unsqueeze(0).repeat(e, 1, 1)
        out[f"{name}.experts.w2"] = w2.t().unsqueeze(0).repeat(e, 1, 1)
        weight = m.router.weight.detach().clone()
        out[f"{name}.router.weight"] = weight.zero_() if router == "zero" else weight
        out[f"{name}.router.expert_bias"] = torch.zeros_like(m.router.expert_bias)
    return out
