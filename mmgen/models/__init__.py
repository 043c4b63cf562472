# Model registries (flavors; trunk blocks, embedders and heads) and the factory that builds a model.
from __future__ import annotations

import torch
import torch.nn as nn

from mmgen.models.codecs.vae import ConvVAE
from mmgen.models.codecs.vq import ConvVQ
from mmgen.models.config import ModelConfig
from mmgen.models.embedders import EMBEDDERS
from mmgen.models.heads import HEADS
from mmgen.models.kv_cache import KVCache
from mmgen.models.transformer import UnifiedTransformer
from mmgen.models.trunk import BLOCKS

# The one flavor registry: `model=<name>` on the command line selects these (registered in
# Hydra's ConfigStore by mmgen/compose.py; there are no configs/model/*.yaml files).
FLAVORS: dict[str, ModelConfig] = {
    # trains on a CPU in seconds (tests, smoke runs); exercises GQA and qk-norm
    "debug": ModelConfig(),
    # ~100M non-embedding parameters: minutes on one GPU for the shapes benchmark
    "small": ModelConfig(name="small", dim=768, n_layers=12, n_heads=12, n_kv_heads=12,
                         ffn_dim=2048),
    # ~1.2B: the shape of bench/baselines/h100_baseline.py (d=2048, 22 layers, 16 heads, FFN
    # 5632, vocab 32000), with qk-norm (the baseline has none: its like-for-like comparison
    # sets model.qk_norm=false)
    "1b": ModelConfig(name="1b", dim=2048, n_layers=22, n_heads=16, n_kv_heads=16,
                      ffn_dim=5632, vocab_size=32000),
}


# model.family -> the trainable codec module it builds (the transformer is the default family)
CODEC_MODELS: dict[str, type[nn.Module]] = {"vae": ConvVAE, "vq": ConvVQ}


def check_registered(cfg: ModelConfig) -> ModelConfig:
    """Raise ValueError unless ``cfg.block`` and every ``cfg.heads`` entry are registered
    (``BLOCKS``, ``HEADS``); called by the job's validation and by :func:`build_model`. A codec
    family (``cfg.family`` vae / vq) has no blocks or heads to check."""
    if cfg.family != "transformer":
        return cfg
    if cfg.block not in BLOCKS:
        raise ValueError(f"model.block='{cfg.block}' not in {tuple(BLOCKS)}")
    unknown = [h for h in cfg.heads if h not in HEADS]
    if unknown or not cfg.heads or len(set(cfg.heads)) != len(cfg.heads):
        raise ValueError(f"model.heads={list(cfg.heads)} must be distinct names from "
                         f"{tuple(HEADS)}, at least one")
    return cfg


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> nn.Module:
    """Build on the meta device, then materialise on ``device`` and ``init_weights``.

    Args:
        cfg: the shape, and which trunk block, embedders and heads to build (``cfg.block``,
            ``cfg.visual_pos``, ``cfg.heads``; a training job sets ``heads`` from its
            objective, see ``mmgen/models/README.md``).
        device: defaults to the current default device; on "meta" (or inside
            ``with torch.device("meta")``) the model is returned unmaterialised, for a
            backend to parallelize before ``to_empty`` + ``init_weights``. Both paths give
            the same weights for the same seed. ``cfg.family`` vae / vq builds the codec
            (:data:`CODEC_MODELS`) the same way.
    """
    check_registered(cfg)
    device = torch.device(device) if device is not None else torch.get_default_device()
    with torch.device("meta"):
        model = CODEC_MODELS[cfg.family](cfg.autoencoder) if cfg.family in CODEC_MODELS else UnifiedTransformer(cfg)
    if device.type != "meta":
        model.to_empty(device=device)
        model.init_weights()
    return model


def num_params(model: nn.Module, exclude_embedding: bool = True) -> int:
    """Parameter count; embedding lookups are excluded by default since they cost no matmul
    FLOPs (a tied text head still counts, as it is a matmul)."""
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    skip: set[int] = set()
    if exclude_embedding:
        for name, module in model.named_modules():
            if isinstance(module, nn.Embedding) and not (tied and name.endswith("tok_embeddings")):
                skip.add(id(module.weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


__all__ = ["BLOCKS", "CODEC_MODELS", "EMBEDDERS", "FLAVORS", "HEADS", "KVCache", "ModelConfig", "UnifiedTransformer", "build_model",
           "check_registered", "num_params"]
