# The megatron form of the unified transformer: mmgen's embedders, heads and math around megatron TP linears.
"""One pipeline stage of :class:`~mmgen.models.transformer.UnifiedTransformer` built from the
same :class:`~mmgen.models.config.ModelConfig` (README.md says why this design):

* the first stage owns the embedders (mmgen's ``EMBEDDERS`` registry, same attribute names),
  the last stage the final norm and the heads (mmgen's ``HEADS`` registry);
* each block is mmgen's pre-norm block with megatron's tensor-parallel linears: a fused
  ``linear_qkv`` (column-parallel, megatron's grouped layout: per query group its query heads,
  then its key and its value head), ``linear_proj`` (row-parallel), a fused gated
  ``linear_fc1`` (column-parallel, ``[gate; up]`` per rank) and ``linear_fc2`` (row-parallel);
  norms, qk-norm, RoPE and the masked attention are mmgen's own functions (``RMSNorm``,
  ``apply_rope``, ``attend`` with the segment-table mask), so the numbers are the plain model's;
* between blocks the residual stream is ``[s, b, d]`` (megatron's layout: sequence parallelism
  splits dim 0, pipeline stages send ``[s, b, d]``).

:mod:`mmgen.parallel.megatron.adapter` maps its weights to the plain model's one to one.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as mtp
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from mmgen.models.attention import attend, build_mask
from mmgen.models.attention import resolve_backend
from mmgen.models.config import ModelConfig
from mmgen.models.embedders import EMBEDDERS, embedder_names
from mmgen.models.heads import HEADS, head_names, select_rows
from mmgen.models.layers import RMSNorm, apply_rope, rope_cos_sin
from mmgen.models.moe import is_moe_layer
from mmgen.models.transformer import rope_scaling


class StageOutput(Exception):
    """Raised by a non-last pipeline stage's forward to hand its hidden states to the schedule
    (the objective's loss code after the model call belongs to the last stage only)."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("pipeline stage output")
        self.hidden = hidden


def _no_init(weight: torch.Tensor) -> None:
    # weights come from the plain model through the adapter, never from megatron's init
    return None


def _sequence_parallel_norm(norm: RMSNorm, sequence_parallel: bool) -> RMSNorm:
    # under SP each rank normalises its own sequence chunk: megatron's finalize_model_grads
    # all-reduces the grads of parameters marked so over the tensor-parallel group
    norm.weight.sequence_parallel = sequence_parallel
    return norm


class ParallelAttention(nn.Module):
    """Grouped-query attention with a fused column-parallel QKV and a row-parallel output."""

    def __init__(self, cfg: ModelConfig, mcfg, tp: int):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.groups = cfg.n_kv_heads // tp                # query groups (= KV heads) on this rank
        self.per_group = cfg.n_heads // cfg.n_kv_heads    # query heads per group
        width = self.groups * (self.per_group + 2) * self.head_dim * tp
        # q/k/v biases (Qwen2): one fused bias, split with its heads like the weight
        self.linear_qkv = mtp.ColumnParallelLinear(cfg.dim, width, config=mcfg, init_method=_no_init,
                                                   bias=cfg.qkv_bias, gather_output=False)
        self.linear_proj = mtp.RowParallelLinear(cfg.n_heads * self.head_dim, cfg.dim, config=mcfg,
                                                 init_method=_no_init, bias=False, input_is_parallel=True,
                                                 skip_bias_add=True)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                # one weight shared by every head, but each TP rank sees only its own heads: the
                # engine sums these gradients over the TP group (megatron only does so for its
                # own "q_layernorm" names)
                norm.weight.tp_partial_grad = True

    def forward(self, x: torch.Tensor, rope, mask) -> torch.Tensor:
        qkv, _ = self.linear_qkv(x)                         # [s, b, groups * (per_group + 2) * hd]
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.groups, self.per_group + 2, self.head_dim)
        q = qkv[:, :, :, : self.per_group].reshape(s, b, -1, self.head_dim)
        k, v = qkv[:, :, :, self.per_group], qkv[:, :, :, self.per_group + 1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, hd] like the plain model
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attend(q, k, v, mask)                          # [b, heads, s, hd]
        out, _ = self.linear_proj(out.permute(2, 0, 1, 3).reshape(s, b, -1))
        return out


class ParallelSwiGLU(nn.Module):
    """SwiGLU with a fused gated column-parallel ``linear_fc1`` and a row-parallel ``linear_fc2``."""

    def __init__(self, cfg: ModelConfig, mcfg):
        super().__init__()
        self.linear_fc1 = mtp.ColumnParallelLinear(cfg.dim, 2 * cfg.ffn_dim, config=mcfg, init_method=_no_init,
                                                   bias=False, gather_output=False)
        self.linear_fc2 = mtp.RowParallelLinear(cfg.ffn_dim, cfg.dim, config=mcfg, init_method=_no_init,
                                                bias=False, input_is_parallel=True, skip_bias_add=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.linear_fc1(x)
        gate, up = h.chunk(2, dim=-1)
        out, _ = self.linear_fc2(F.silu(gate) * up)
        return out


class ParallelBlock(nn.Module):
    """mmgen's dense pre-norm block (``trunk.TransformerBlock``) with tensor-parallel linears;
    for ``block=moe`` mmgen's ``MoEBlock``, whose MoE layers (``is_moe_layer``) have a
    :class:`~mmgen.parallel.megatron.moe.ParallelMoE` FFN (megatron's token dispatcher, EP)."""

    def __init__(self, cfg: ModelConfig, mcfg, tp: int, layer_id: int = 0):
        super().__init__()
        sp = mcfg.sequence_parallel
        self.attention_norm = _sequence_parallel_norm(RMSNorm(cfg.dim, cfg.norm_eps), sp)
        self.attention = ParallelAttention(cfg, mcfg, tp)
        self.ffn_norm = _sequence_parallel_norm(RMSNorm(cfg.dim, cfg.norm_eps), sp)
        self.is_moe = cfg.block == "moe" and is_moe_layer(cfg, layer_id)
        if self.is_moe:
            from mmgen.parallel.megatron.moe import ParallelMoE

            self.feed_forward = ParallelMoE(cfg, mcfg)
        else:
            self.feed_forward = ParallelSwiGLU(cfg, mcfg)

    def forward(self, x: torch.Tensor, rope, mask):
        x = x + self.attention(self.attention_norm(x), rope, mask)
        if not self.is_moe:
            return x + self.feed_forward(self.ffn_norm(x))
        y, aux = self.feed_forward(self.ffn_norm(x))
        return x + y, aux


def stage_layers(n_layers: int, pp: int, stage: int) -> range:
    """Global indices of the blocks pipeline stage ``stage`` of ``pp`` holds (equal shares)."""
    per = n_layers // pp
    return range(stage * per, (stage + 1) * per)


class MegatronTransformer(MegatronModule):
    """One pipeline stage (the whole model when ``pp == 1``), called like the plain model:
    ``model(batch, visual_in, span_t, heads=...)`` -> head outputs (last stage); other stages
    raise :class:`StageOutput` with their ``[s, b, d]`` hidden states.

    Attributes:
        layer_ids: global indices of this stage's blocks (``layers.<i>`` holds block ``layer_ids[i]``).
    """

    def __init__(self, cfg: ModelConfig, mcfg):
        super().__init__(config=mcfg)
        self.cfg = cfg
        tp, pp = mcfg.tensor_model_parallel_size, mcfg.pipeline_model_parallel_size
        stage = ps.get_pipeline_model_parallel_rank()
        self.first, self.last = stage == 0, stage == pp - 1
        self.pre_process, self.post_process = self.first, self.last   # megatron's names for them
        self.sequence_parallel = mcfg.sequence_parallel
        self.share_embeddings_and_output_weights = False
        self.model_type = ModelType.encoder_or_decoder   # what megatron's schedules ask
        self.embedder_names = tuple(embedder_names(cfg)) if self.first else ()
        self.head_names = tuple(head_names(cfg)) if self.last else ()
        for name in self.embedder_names:
            for attr, module in EMBEDDERS[name].build(cfg).items():
                self.add_module(attr, module)
        self.layer_ids = stage_layers(cfg.n_layers, pp, stage)
        self.layers = nn.ModuleList(ParallelBlock(cfg, mcfg, tp, i) for i in self.layer_ids)
        if self.last:
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            for name in self.head_names:
                for attr, module in HEADS[name].build(cfg).items():
                    self.add_module(attr, module)
        self.input_tensor = None

    def set_input_tensor(self, input_tensor) -> None:
        """The previous stage's output (megatron's schedules call this before each forward)."""
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def forward(self, batch, visual_in=None, span_t=None, mask=None, heads=None) -> dict:
        """As :meth:`UnifiedTransformer.forward` (same arguments and outputs on the last stage)."""
        cfg = self.cfg
        if mask is None:
            mask = build_mask(batch, resolve_backend(cfg.attention, batch.tokens.device))
        # the plain model's tables (UnifiedTransformer.rope), long-context scaling included
        rope = rope_cos_sin(batch.positions, cfg.head_dim, cfg.rope_theta, rope_scaling(cfg))
        if self.first:
            if visual_in is None:
                visual_in = batch.patches
            if span_t is None:
                span_t = torch.zeros(len(batch.spans), device=batch.tokens.device)
            x = None
            for name in self.embedder_names:
                x = EMBEDDERS[name].embed(self, x, batch, visual_in, span_t)
            x = x.transpose(0, 1).contiguous()               # [s, b, d]
            if self.sequence_parallel:
                x = mtp.scatter_to_sequence_parallel_region(x)
        else:
            x = self.input_tensor
        aux: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            x = layer(x, rope, mask)
            if isinstance(x, tuple):   # an MoE block's auxiliary losses, summed over layers as the trunk does
                x, block_aux = x
                for name, value in block_aux.items():
                    aux[name] = aux[name] + value if name in aux else value
        if not self.last:
            raise StageOutput(x)
        if self.sequence_parallel:
            # the heads see every position; each rank's loss gradient is already complete, so the
            # backward only keeps this rank's chunk (no reduce-scatter)
            x = mtp.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        h = self.norm(x).transpose(0, 1)                      # [b, s, d]
        if heads is None:
            heads = {name: HEADS[name].default_positions(batch) for name in self.head_names}
        out = {name: HEADS[name].run(self, select_rows(h, positions)) for name, positions in heads.items()}
        out["aux"] = aux
        return out
