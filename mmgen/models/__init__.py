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
    # modality towers (mmgen/models/mot.py), BAGEL's split: understanding vs generation tokens.
    # The debug shape with two towers per block (trains on a CPU in seconds)
    "mot_debug": ModelConfig(name="mot_debug", block="mot", tower_split="role"),
    # the 1b shape with two towers: ~1.2B active parameters per position, ~2.3B in all
    "mot_1b": ModelConfig(name="mot_1b", dim=2048, n_layers=22, n_heads=16, n_kv_heads=16,
                          ffn_dim=5632, vocab_size=32000, block="mot", tower_split="role"),
    # the debug shape with an MoE FFN in every other layer (4 experts, top-2, one shared expert,
    # aux-free bias on): every MoE code path in seconds on a CPU
    "moe_debug": ModelConfig(name="moe_debug", n_layers=2, block="moe", moe_experts=4, moe_top_k=2,
                             moe_ffn_dim=96, moe_shared_experts=1, moe_every=1, moe_bias_update_rate=0.001),
    # modality towers whose FFNs are MoE (MoT x MoE): the mot_debug shape, 4 experts top-2 per tower
    "motmoe_debug": ModelConfig(name="motmoe_debug", block="motmoe", tower_split="role", moe_experts=4,
                                moe_top_k=2, moe_ffn_dim=96, moe_every=1),
    # 8 experts, top-2, MoE in every layer: 1.01B active / 3.43B total trunk parameters
    # (mmgen.models.moe.active_params; + 0.13B embedding and LM head), d=2048 like the 1b
    # flavor, 16 layers, experts 4096 wide (Mixtral's recipe at ~1/13 of its active size)
    "moe_8x": ModelConfig(name="moe_8x", dim=2048, n_layers=16, n_heads=16, n_kv_heads=8,
                          ffn_dim=4096, vocab_size=32000, block="moe", moe_experts=8, moe_top_k=2,
                          moe_every=1),
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
    towers = getattr(BLOCKS[cfg.block], "uses_towers", False)
    if towers != (cfg.tower_split != "none"):
        raise ValueError(f"model.block={cfg.block} with model.tower_split={cfg.tower_split}: a "
                         "tower block (mot) needs tower_split=role|modality, other blocks none")
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
