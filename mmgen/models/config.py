# Typed configuration of the unified transformer (Hydra structured config, group `model`).
from __future__ import annotations

from dataclasses import dataclass, field

from mmgen.models.codecs.config import AutoencoderConfig

ATTENTION_BACKENDS = ("auto", "sdpa", "flex")
VISUAL_POS = ("learned", "none")
# what build_model builds: the unified transformer, or one of mmgen's trainable codecs (a run
# that trains a VAE / VQ tokenizer through the same trainer, objective vae / vq)
FAMILIES = ("transformer", "vae", "vq")


@dataclass
class ModelConfig:
    """Shape of a :class:`~mmgen.models.transformer.UnifiedTransformer`.

    Defaults are the ``debug`` flavor, small enough to train on a CPU in seconds. Flat and
    made of plain types so Hydra/OmegaConf can type-check overrides.

    Args:
        n_kv_heads: key/value heads (grouped-query attention); must divide ``n_heads``.
        vocab_size: text (and later discrete visual) vocabulary; 264 = ByteTokenizer.
        patch_dim: features per continuous visual position (p * p * C).
        max_grid: largest (t, h, w) patch grid the learned visual position tables cover.
        visual_pos: "learned" adds learned t/h/w embeddings at visual positions; "none" relies
            on 1-D RoPE alone.
        attention: "auto" = FlexAttention on CUDA, SDPA with a boolean mask elsewhere.
        timestep_dim: width of the sinusoidal timestep features fed to the timestep MLP.
        block: kind of trunk block (``mmgen.models.trunk.BLOCKS``; registry names are checked by
            ``mmgen.models.check_registered``, since the registries import this module).
        heads: output heads to build (``mmgen.models.heads.HEADS``): "lm" (vocabulary logits),
            "flow" (velocity / clean-patch prediction per continuous visual position). A
            training job derives it from the objective (each objective names the heads it
            trains, ``Objective.heads``), so no parameter goes without a gradient; the default
            here is Transfusion's pair.
        family: "transformer" (everything above), or "vae" / "vq": the model is then a
            convolutional codec shaped by ``autoencoder`` and the transformer fields are unused.
        autoencoder: the codec's shape (``family`` vae or vq only).
    """

    name: str = "debug"
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 192
    vocab_size: int = 264
    patch_dim: int = 48
    max_grid: list[int] = field(default_factory=lambda: [16, 32, 32])
    visual_pos: str = "learned"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qk_norm: bool = True
    tie_embeddings: bool = False
    init_std: float = 0.02
    attention: str = "auto"
    timestep_dim: int = 256
    block: str = "dense"
    heads: list[str] = field(default_factory=lambda: ["lm", "flow"])
    family: str = "transformer"
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> "ModelConfig":
        """Raise ValueError on an inconsistent shape; returns self so calls can chain."""
        if self.family not in FAMILIES:
            raise ValueError(f"model.family='{self.family}' not in {FAMILIES}")
        if self.family != "transformer":
            self.autoencoder.validate()
            return self
        positive = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size",
                    "patch_dim", "timestep_dim")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by "
                             f"n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model head_dim={self.head_dim} must be even for RoPE")
        if self.timestep_dim % 2:
            raise ValueError(f"model.timestep_dim={self.timestep_dim} must be even")
        if len(self.max_grid) != 3 or min(self.max_grid) <= 0:
            raise ValueError(f"model.max_grid must be 3 positive ints (t, h, w), "
                             f"got {self.max_grid}")
        if self.visual_pos not in VISUAL_POS:
            raise ValueError(f"model.visual_pos='{self.visual_pos}' not in {VISUAL_POS}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention='{self.attention}' not in {ATTENTION_BACKENDS}")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("model.rope_theta, norm_eps and init_std must be positive")
        return self
