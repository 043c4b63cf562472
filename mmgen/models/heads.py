# Output heads of the unified transformer, by name: "lm" (vocabulary logits), "flow" (patch head), "mar" (MLP denoiser).
"""A head owns modules that live on the model under fixed attribute names (state-dict prefixes
``output``, ``visual_out`` and ``mar_head``), their initialisation, and a function from hidden
states at some positions (``[M, dim]``, row-major) to its output there; a head may also read
inputs of its own (``Head.inputs``, passed by keyword: the "mar" denoiser reads the noised
tokens and their times, ``model(..., head_inputs={"mar": {"x_t": ..., "t": ...}})``). Which
heads a model has is ``model.heads``; at which positions each runs is the objective's choice
(the ``heads`` argument of ``UnifiedTransformer.forward``); ``default_positions`` is the
training-batch choice used when a caller names none.

To add a head (e.g. a second vocabulary projection): a registry entry below and
its name in ``model.heads``; the objective that trains it lists it in its ``heads`` attribute and
asks for it at its positions. Masked-token (Show-o) and VQ-AR prediction reuse "lm" over a
vocabulary that includes the visual codes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgen.batch import MultimodalBatch
from mmgen.models.config import ModelConfig
from mmgen.models.layers import TimestepEmbedding, _trunc_normal


@dataclass(frozen=True)
class Head:
    """A registry entry.

    Attributes:
        build: config -> {attribute name on the model: module} (empty for a head that only
            reads shared weights).
        init_weights: (model, config) -> None; initialises this head's modules.
        run: (model, h ``[M, dim]``, **inputs) -> output ``[M, ...]``; ``inputs`` are the
            keyword inputs named in ``inputs`` (none for "lm" and "flow").
        default_positions: batch -> ``[B, L]`` bool, where the head runs by default.
        inputs: names of the extra keyword inputs ``run`` reads (``model(...,
            head_inputs={name: {...}})``); each is optional.
    """

    build: Callable[[ModelConfig], dict[str, nn.Module]]
    init_weights: Callable[[nn.Module, ModelConfig], None]
    run: Callable[..., torch.Tensor]
    default_positions: Callable[[MultimodalBatch], torch.Tensor]
    inputs: tuple[str, ...] = ()


def text_target_positions(batch: MultimodalBatch) -> torch.Tensor:
    """``[B, L]`` bool: positions with a next-token target (most packed positions have none)."""
    return batch.text_target_mask()


# ---------------------------------------------------------------- "lm": logits over the vocabulary

def _lm_build(cfg: ModelConfig) -> dict[str, nn.Module]:
    # a tied head reads tok_embeddings.weight directly: sharing a Parameter object would not
    # survive a meta-device build followed by to_empty
    return {} if cfg.tie_embeddings else {"output": nn.Linear(cfg.dim, cfg.vocab_size, bias=False)}


def _lm_init(model: nn.Module, cfg: ModelConfig) -> None:
    if not cfg.tie_embeddings:
        _trunc_normal(model.output.weight, cfg.dim ** -0.5)


def _lm_run(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if model.cfg.tie_embeddings:
        return F.linear(h, model.tok_embeddings.weight)
    return model.output(h)


# ---------------------------------------------------------------- "flow": prediction per patch

def _flow_init(model: nn.Module, cfg: ModelConfig) -> None:
    # zero output: the first flow prediction is 0 rather than noise from a random head
    nn.init.zeros_(model.visual_out.weight)
    nn.init.zeros_(model.visual_out.bias)


# ---------------------------------------------------------------- "mar": per-token MLP denoiser

def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class AdaLNResBlock(nn.Module):
    """``x + gate * MLP(LN(x) * (1 + scale) + shift)``, with (shift, scale, gate) from the
    conditioning ``c`` (MAR's ``ResBlock``)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.ada = nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(F.silu(c)).chunk(3, dim=-1)
        h = self.fc2(F.silu(self.fc1(_modulate(self.norm(x), shift, scale))))
        return x + gate * h


class MARDenoiser(nn.Module):
    """MAR's ``SimpleMLPAdaLN`` (Li et al. 2024): a small MLP that maps a noised token ``x_t``
    (``[M, patch_dim]``) at time ``t`` (``[M]``) to the flow prediction for it, conditioned on
    the trunk's hidden state ``z`` (``[M, dim]``) at its position through AdaLN modulation by
    ``cond(z) + time(t)``. ``mar_depth`` residual blocks of width ``mar_width``; the output
    projection and every modulation start at zero, so the first prediction is 0 (as "flow")."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.mar_width
        self.time_embed = TimestepEmbedding(cfg.timestep_dim, w)
        self.cond_embed = nn.Linear(cfg.dim, w)
        self.input_proj = nn.Linear(cfg.patch_dim, w)
        self.blocks = nn.ModuleList(AdaLNResBlock(w) for _ in range(cfg.mar_depth))
        self.final_norm = nn.LayerNorm(w, eps=1e-6, elementwise_affine=False)
        self.final_ada = nn.Linear(w, 2 * w)
        self.out = nn.Linear(w, cfg.patch_dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x_t.to(self.input_proj.weight.dtype))
        c = self.time_embed(t) + self.cond_embed(z.to(x.dtype))
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_ada(F.silu(c)).chunk(2, dim=-1)
        return self.out(_modulate(self.final_norm(x), shift, scale))

    def init_weights(self, std: float) -> None:
        # MAR's init: xavier-uniform linears with zero biases, N(0, 0.02) time MLP, zero AdaLN
        # modulations (each block starts as the identity) and a zero output layer
        for linear in (self.cond_embed, self.input_proj,
                       *(m for b in self.blocks for m in (b.fc1, b.fc2))):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.time_embed.init_weights(std)
        for block in self.blocks:
            block.norm.reset_parameters()
            nn.init.zeros_(block.ada.weight)
            nn.init.zeros_(block.ada.bias)
        for zero in (self.final_ada, self.out):
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)


def _mar_run(model: nn.Module, h: torch.Tensor, x_t: torch.Tensor | None = None,
             t: torch.Tensor | None = None) -> torch.Tensor:
    """Without ``x_t``: the conditioning ``z = h`` itself (a sampler runs the trunk once, then
    the denoiser many times through ``model.run_head("mar", z, x_t=..., t=...)``). With
    ``x_t`` (``[K * M, patch_dim]``, K noise draws per position, draw-major: rows ``k * M + i``
    belong to position ``i``) and ``t`` (``[K * M]``): the denoiser's prediction there, with
    ``z`` repeated K times (the trunk ran once for all draws)."""
    if x_t is None:
        return h
    draws = x_t.shape[0] // max(h.shape[0], 1)
    if draws * h.shape[0] != x_t.shape[0]:
        raise ValueError(f"the 'mar' head got {x_t.shape[0]} noised rows for {h.shape[0]} positions "
                         "(expected a whole number of draws per position)")
    return model.mar_head(x_t, t, h.repeat(draws, 1))


HEADS: dict[str, Head] = {
    "lm": Head(build=_lm_build, init_weights=_lm_init, run=_lm_run,
               default_positions=text_target_positions),
    "flow": Head(build=lambda cfg: {"visual_out": nn.Linear(cfg.dim, cfg.patch_dim)},
                 init_weights=_flow_init, run=lambda model, h: model.visual_out(h),
                 default_positions=lambda batch: batch.continuous_mask()),
    "mar": Head(build=lambda cfg: {"mar_head": MARDenoiser(cfg)},
                init_weights=lambda model, cfg: model.mar_head.init_weights(cfg.init_std),
                run=_mar_run, default_positions=lambda batch: batch.continuous_mask(),
                inputs=("x_t", "t")),
}


def head_names(cfg: ModelConfig) -> list[str]:
    """The heads ``cfg`` builds, in registry order (construction and initialisation order do
    not depend on how ``model.heads`` lists them)."""
    return [name for name in HEADS if name in cfg.heads]


def select_rows(h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of ``h`` (``[B, L, ...]``) at ``positions``: a ``[B, L]`` bool mask, or ``[n]`` flat
    row-major indices (:meth:`MultimodalBatch.rows`); both give the rows in row-major order."""
    if positions.dtype == torch.bool:
        return h[positions]
    return h.flatten(0, 1).index_select(0, positions)
