# Output heads of the unified transformer, by name: "lm" (vocabulary logits) and "flow" (patch head).
"""A head owns modules that live on the model under fixed attribute names (state-dict prefixes
``output`` and ``visual_out``), their initialisation, and a function from hidden states at
some positions (``[M, dim]``, row-major) to its output there. Which heads a model has is
``model.heads``; at which positions each runs is the objective's choice (the ``heads``
argument of ``UnifiedTransformer.forward``); ``default_positions`` is the training-batch
choice used when a caller names none.

To add a head (a MAR MLP denoiser, a second vocabulary projection): a registry entry below and
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
from mmgen.models.layers import _trunc_normal


@dataclass(frozen=True)
class Head:
    """A registry entry.

    Attributes:
        build: config -> {attribute name on the model: module} (empty for a head that only
            reads shared weights).
        init_weights: (model, config) -> None; initialises this head's modules.
        run: (model, h ``[M, dim]``) -> output ``[M, ...]``.
        default_positions: batch -> ``[B, L]`` bool, where the head runs by default.
    """

    build: Callable[[ModelConfig], dict[str, nn.Module]]
    init_weights: Callable[[nn.Module, ModelConfig], None]
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    default_positions: Callable[[MultimodalBatch], torch.Tensor]


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


HEADS: dict[str, Head] = {
    "lm": Head(build=_lm_build, init_weights=_lm_init, run=_lm_run,
               default_positions=text_target_positions),
    "flow": Head(build=lambda cfg: {"visual_out": nn.Linear(cfg.dim, cfg.patch_dim)},
                 init_weights=_flow_init, run=lambda model, h: model.visual_out(h),
                 default_positions=lambda batch: batch.continuous_mask()),
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
