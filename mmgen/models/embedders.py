# Input embedders of the unified transformer, by name: text tokens, continuous visual inputs, positions.
"""An embedder owns modules that live on the model under fixed attribute names (their
state-dict prefixes: ``tok_embeddings``, ``patch_in``, ``t_embedder``, ``mask_embed``,
``visual_pos``), their
initialisation, and its part of the trunk's input. The model runs its embedders in registry
order, each taking the sequence built so far: "text" starts it from the token ids, the others
write or add at the positions they own. Which are built follows the config
(:func:`embedder_names`).

To add one (e.g. a VAE-latent input through a codec): a registry entry below with its modules,
init and embed function, and the config field that selects it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from mmgen.batch import MultimodalBatch
from mmgen.models.config import ModelConfig
from mmgen.models.layers import Embedding, TimestepEmbedding, _trunc_normal


class VisualPositionEmbedding(nn.Module):
    """Learned (t, h, w) tables summed per visual position (a factorised 3-D position code)."""

    def __init__(self, max_grid: list[int], dim: int):
        super().__init__()
        self.t = nn.Embedding(max_grid[0], dim)
        self.h = nn.Embedding(max_grid[1], dim)
        self.w = nn.Embedding(max_grid[2], dim)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return self.t(coords[..., 0]) + self.h(coords[..., 1]) + self.w(coords[..., 2])

    def init_weights(self, std: float) -> None:
        for table in (self.t, self.h, self.w):
            _trunc_normal(table.weight, std)


@dataclass(frozen=True)
class Embedder:
    """A registry entry.

    Attributes:
        build: config -> {attribute name on the model: module}.
        init_weights: (model, config) -> None; initialises this embedder's modules.
        embed: (model, x, batch, visual_in, span_t, masked=None) -> x; ``x`` is None for
            the first embedder, else the ``[B, L, dim]`` sequence so far; ``masked`` is the
            objective's ``[N]`` bool over continuous rows (row-major) that the "mar_mask"
            embedder replaces by its learned vector (None: no row is masked; the other
            embedders ignore it).
    """

    build: Callable[[ModelConfig], dict[str, nn.Module]]
    init_weights: Callable[[nn.Module, ModelConfig], None]
    embed: Callable[..., torch.Tensor]


# ---------------------------------------------------------------- text tokens

def _text_init(model: nn.Module, cfg: ModelConfig) -> None:
    # a tied table is also the output projection, so it takes the head's small scale
    _trunc_normal(model.tok_embeddings.weight, cfg.init_std if cfg.tie_embeddings else 1.0)


def _text_embed(model, x, batch: MultimodalBatch, visual_in, span_t, masked=None) -> torch.Tensor:
    return model.tok_embeddings(batch.tokens)


# ---------------------------------------------------------------- continuous visual inputs

def _visual_build(cfg: ModelConfig) -> dict[str, nn.Module]:
    return {"patch_in": nn.Linear(cfg.patch_dim, cfg.dim),
            "t_embedder": TimestepEmbedding(cfg.timestep_dim, cfg.dim)}


def _visual_init(model: nn.Module, cfg: ModelConfig) -> None:
    # unit-gain input projection: patches in [-1, 1] land at the same scale as text embeddings
    _trunc_normal(model.patch_in.weight, 1.0 / math.sqrt(cfg.patch_dim))
    nn.init.zeros_(model.patch_in.bias)
    model.t_embedder.init_weights(cfg.init_std)


def _visual_embed(model, x, batch: MultimodalBatch, visual_in: torch.Tensor,
                  span_t: torch.Tensor, masked=None) -> torch.Tensor:
    """Continuous visual positions take their projected input row plus their span's timestep
    embedding in place of the token embedding."""
    cont = batch.continuous_mask()
    span_of_row = batch.span_ids.flatten()[batch.rows("continuous")]   # [N], row-major like visual_in
    vis = model.patch_in(visual_in.to(x.dtype)) + model.t_embedder(span_t)[span_of_row]
    return x.masked_scatter(cont.unsqueeze(-1), vis.to(x.dtype))


# ---------------------------------------------------------------- MAR's mask embedding

class MaskEmbedding(nn.Module):
    """One learned ``[dim]`` vector that stands in for a visual input the model must predict
    (MAR's ``mask_token``); state-dict key ``mask_embed.weight``."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))

    def init_weights(self, std: float) -> None:
        _trunc_normal(self.weight, std)


def _mask_embed(model, x, batch: MultimodalBatch, visual_in, span_t, masked=None) -> torch.Tensor:
    """Masked continuous rows take the mask vector in place of their projected input and
    timestep embedding (the position code is added after, by "visual_pos", so the trunk knows
    where each masked token sits); everything else is left as it is."""
    if masked is None:
        return x
    where = torch.zeros(x.shape[0] * x.shape[1], dtype=torch.bool, device=x.device)
    where[batch.rows("continuous")] = masked.to(x.device)
    return torch.where(where.view(*x.shape[:2], 1), model.mask_embed.weight.to(x.dtype), x)


# ---------------------------------------------------------------- visual position codes

def _visual_pos_embed(model, x, batch: MultimodalBatch, visual_in, span_t, masked=None) -> torch.Tensor:
    is_visual = (batch.span_ids >= 0).unsqueeze(-1)
    return x + model.visual_pos(batch.coords) * is_visual


EMBEDDERS: dict[str, Embedder] = {
    "text": Embedder(
        build=lambda cfg: {"tok_embeddings": Embedding(cfg.vocab_size, cfg.dim)},
        init_weights=_text_init, embed=_text_embed),
    "visual": Embedder(build=_visual_build, init_weights=_visual_init, embed=_visual_embed),
    # built only with the "mar" head (MAR, objective=mar): other models have no mask_embed
    "mar_mask": Embedder(
        build=lambda cfg: {"mask_embed": MaskEmbedding(cfg.dim)},
        init_weights=lambda model, cfg: model.mask_embed.init_weights(cfg.init_std),
        embed=_mask_embed),
    "visual_pos": Embedder(
        build=lambda cfg: {"visual_pos": VisualPositionEmbedding(cfg.max_grid, cfg.dim)},
        init_weights=lambda model, cfg: model.visual_pos.init_weights(cfg.init_std),
        embed=_visual_pos_embed),
}


def embedder_names(cfg: ModelConfig) -> list[str]:
    """The embedders ``cfg`` builds, in registry order (which is also their order of
    construction, initialisation and application).

    Every model reads token ids ("text": decoding starts from them; discrete visual codes are
    token ids too) and continuous visual rows ("visual": pixel patches or latents), unless
    ``model.patch_dim`` is 0 (a discrete codec: no continuous rows, so no ``patch_in`` or
    ``t_embedder`` left without a gradient); ``model.visual_pos`` selects the position code
    ("learned" -> "visual_pos", added at every visual position, code positions included;
    "none" -> 1-D RoPE alone). A model with the "mar" head also gets "mar_mask" (the learned
    vector at the positions its objective masks), before the position code.
    """
    names = ["text", "visual"] if cfg.patch_dim > 0 else ["text"]
    if "mar" in cfg.heads and cfg.patch_dim > 0:
        names.append("mar_mask")
    if cfg.visual_pos == "learned":
        names.append("visual_pos")
    return names
