# Typed shape of mmgen's own trainable codecs (the `model.autoencoder` sub-config): VAE and VQ.
from __future__ import annotations

from dataclasses import dataclass, field

VQ_UPDATES = ("ema", "st")


@dataclass
class AutoencoderConfig:
    """Shape of a convolutional VAE (``model.family=vae``) or VQ tokenizer (``model.family=vq``).

    Encoder and decoder have one resolution level per ``channel_mult`` entry and halve the side
    between levels, so ``downsample = 2 ** (len(channel_mult) - 1)``.

    Args:
        in_channels: image channels (3: RGB).
        base_channels: channels of the first level; level ``i`` has ``base * channel_mult[i]``.
        channel_mult: per-level channel multipliers (its length sets the downsampling).
        num_res_blocks: residual blocks per level.
        norm_groups: GroupNorm groups (must divide every level's channels).
        latent_channels: channels of the latent (VAE: of its mean; VQ: of the quantised map the
            decoder reads).
        codebook_size: VQ codes (the discrete vocabulary of the codec).
        codebook_dim: dimension the lookup happens in; 0 = ``latent_channels``. Smaller than
            ``latent_channels`` gives factorised codes (a 1x1 projection down before the lookup
            and up after it, ViT-VQGAN).
        l2_normalize: look codes up by cosine similarity (inputs and codebook l2-normalised).
        update: "ema" (codebook = running means of the inputs assigned to each code; no
            codebook loss) or "st" (codebook learned by gradient through the straight-through
            estimator, with a codebook loss).
        ema_decay: decay of the EMA statistics.
        dead_after: a code unused for this many training forwards is restarted on the encoder
            output of the current micro-batch that is farthest from its code; 0 disables.
        scaling_factor: latents are ``(z - shift_factor) * scaling_factor`` in the codec
            protocol (unit variance for the generator; SD/FLUX-style).
        shift_factor: see ``scaling_factor``.
    """

    in_channels: int = 3
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    norm_groups: int = 8
    latent_channels: int = 4
    codebook_size: int = 256
    codebook_dim: int = 0
    l2_normalize: bool = False
    update: str = "ema"
    ema_decay: float = 0.99
    dead_after: int = 50
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def lookup_dim(self) -> int:
        return self.codebook_dim or self.latent_channels

    def validate(self) -> "AutoencoderConfig":
        """Raise ValueError (one line) on an inconsistent shape; returns self."""
        for name in ("in_channels", "base_channels", "num_res_blocks", "norm_groups",
                     "latent_channels", "codebook_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.autoencoder.{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"model.autoencoder.channel_mult must be positive ints, got {self.channel_mult}")
        bad = [self.base_channels * m for m in self.channel_mult if (self.base_channels * m) % self.norm_groups]
        if bad:
            raise ValueError(f"model.autoencoder.norm_groups={self.norm_groups} does not divide level "
                             f"channels {bad}")
        if self.codebook_dim < 0 or self.dead_after < 0:
            raise ValueError("model.autoencoder.codebook_dim and dead_after must be >= 0")
        if self.update not in VQ_UPDATES:
            raise ValueError(f"model.autoencoder.update='{self.update}' not in {VQ_UPDATES}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"model.autoencoder.ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.scaling_factor <= 0:
            raise ValueError(f"model.autoencoder.scaling_factor must be > 0, got {self.scaling_factor}")
        return self
