# The convolutional KL-VAE (an nn.Module mmgen trains) and its frozen VisualCodec wrapper.
"""``ConvVAE`` maps pixels to a diagonal Gaussian posterior over a ``latent_channels`` map
downsampled by ``cfg.downsample`` and decodes a sample back. ``VAECodec`` puts a trained one
behind the codec protocol: ``encode`` takes the posterior mean (deterministic, so cached latents
are reproducible), scales it with ``(mean - shift_factor) * scaling_factor`` and cuts it into
``patch_size`` patches; ``decode`` inverts each step.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mmgen.batch import CONTINUOUS
from mmgen.models.codecs.blocks import Decoder, Encoder, frames_of, latent_grid, reset_modules
from mmgen.models.codecs.config import AutoencoderConfig
from mmgen.models.codecs.pixel import patchify, unpatchify

# log-variance bounds (as LDM): exp() stays finite in fp32 and bf16 at any initialisation
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class ConvVAE(nn.Module):
    """KL-regularised convolutional autoencoder.

    Args:
        cfg: the shape (``model.autoencoder``).
    """

    family = "vae"

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.encoder = Encoder(cfg, 2 * cfg.latent_channels)
        self.decoder = Decoder(cfg, cfg.latent_channels)

    def init_weights(self) -> None:
        reset_modules(self)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance), each ``[N, latent_channels, H/d, W/d]``."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Reconstruct ``x`` (``[N, C, H, W]`` in [-1, 1]).

        Args:
            x: images.
            generator: draws the posterior sample (on its own device, then moved: the same
                numbers on any accelerator); None decodes the mean.

        Returns:
            ``recon`` ``[N, C, H, W]``; ``kl`` ``[N]``, KL(q(z|x) || N(0, I)) per image as a
            mean over latent elements; ``mean`` and ``logvar``.
        """
        mean, logvar = self.posterior(x)
        z = mean
        if generator is not None:
            eps = torch.randn(mean.shape, generator=generator, device=generator.device)
            z = mean + torch.exp(0.5 * logvar) * eps.to(device=mean.device, dtype=mean.dtype)
        kl = 0.5 * (mean.float().square() + logvar.float().exp() - 1.0 - logvar.float())
        return {"recon": self.decode(z), "kl": kl.flatten(1).mean(1), "mean": mean, "logvar": logvar}


class ModuleCodec:
    """What the VAE and VQ codecs share: geometry from the module's shape, a frozen module in
    eval mode, and pixels moved to the module's device and dtype."""

    name = "module"
    kind = CONTINUOUS

    def __init__(self, module: nn.Module, patch_size: int = 1, source: str = ""):
        if patch_size < 1:
            raise ValueError(f"{self.name} codec: patch_size must be >= 1, got {patch_size}")
        self.module = module.eval().requires_grad_(False)
        self.patch_size, self.source = int(patch_size), source
        cfg: AutoencoderConfig = module.cfg
        self.downsample = cfg.downsample
        self.scaling_factor, self.shift_factor = float(cfg.scaling_factor), float(cfg.shift_factor)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(source={self.source!r}, downsample={self.downsample}, "
                f"channels={self.channels}, patch_size={self.patch_size})")

    def grid(self, size: int | tuple[int, int], frames: int = 1) -> tuple[int, int, int]:
        return latent_grid(size, frames, self.downsample, self.patch_size, f"the {self.name} codec")

    # -- the LatentCodec part (mmgen data encode, data.encode_on=device) ---------------------
    @property
    def in_channels(self) -> int:
        return self.module.cfg.in_channels

    def to(self, device) -> "ModuleCodec":
        """Move the frozen module to ``device``; returns self."""
        self.module.to(device)
        return self

    def fingerprint(self) -> str:
        """``<name>-<sha256 prefix>`` of the shape, the weights and the latent convention
        (scaling, shift, posterior mean): equal fingerprints give equal latents for equal pixels."""
        if getattr(self, "_fingerprint", None) is None:
            import dataclasses
            import hashlib
            import json

            h = hashlib.sha256(f"mmgen-{self.name}-posterior-mean-v1".encode())
            h.update(json.dumps(dataclasses.asdict(self.module.cfg), sort_keys=True).encode())
            for key, value in sorted(self.module.state_dict().items()):
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = f"{self.name}-{h.hexdigest()[:20]}"
        return self._fingerprint

    def _frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels as ``[T, C, H, W]`` on the module's device and in its dtype (geometry checked)."""
        frames = frames_of(pixels, self.module.cfg.in_channels, f"{self.name} codec")
        self.grid((frames.shape[2], frames.shape[3]), frames.shape[0])
        p = next(self.module.parameters())
        return frames.to(device=p.device, dtype=p.dtype)


class VAECodec(ModuleCodec):
    """A :class:`ConvVAE` behind the :class:`~mmgen.models.codecs.base.VisualCodec` protocol:
    continuous rows of ``latent_channels * patch_size**2`` scaled latent features.

    Args:
        module: a trained ConvVAE (frozen here: eval mode, no gradients).
        patch_size: patch side on the latent grid (``data.patch_size``).
        source: where it was loaded from (for messages and fingerprints).
    """

    name = "vae"
    kind = CONTINUOUS

    def __init__(self, module: ConvVAE, patch_size: int = 1, source: str = ""):
        super().__init__(module, patch_size, source)
        self.channels = module.cfg.latent_channels

    @property
    def payload_dim(self) -> int:
        return self.channels * self.patch_size ** 2

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        frames = self._frames(pixels)
        mean, _ = self.module.posterior(frames)
        z = (mean.float() - self.shift_factor) * self.scaling_factor
        grid = self.grid((frames.shape[2], frames.shape[3]), frames.shape[0])
        return torch.cat([patchify(f, self.patch_size) for f in z]), grid

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` pixels in [-1, 1] -> scaled posterior means ``[B, c, h, w]`` (fp32,
        on the module's device)."""
        p = next(self.module.parameters())
        mean, _ = self.module.posterior(pixels.to(device=p.device, dtype=p.dtype))
        return (mean.float() - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode_latents` -> pixels ``[B, C, H, W]`` (fp32)."""
        p = next(self.module.parameters())
        z = latents.float() / self.scaling_factor + self.shift_factor
        return self.module.decode(z.to(device=p.device, dtype=p.dtype)).float()

    def latent_rows(self, latents: torch.Tensor) -> torch.Tensor:
        """One frame's latent ``[c, h, w]`` -> ``[(h/p)*(w/p), p*p*c]`` payload rows."""
        return patchify(latents.float(), self.patch_size)

    @torch.no_grad()
    def decode(self, rows: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        t, gh, gw = (int(g) for g in grid)
        if rows.shape != (t * gh * gw, self.payload_dim):
            raise ValueError(f"vae codec: {list(rows.shape)} rows do not fit grid {tuple(grid)} x "
                             f"payload_dim {self.payload_dim}")
        per_frame = rows.float().reshape(t, gh * gw, self.payload_dim)
        z = torch.stack([unpatchify(f, gh, gw, self.patch_size, self.channels) for f in per_frame])
        z = z / self.scaling_factor + self.shift_factor
        p = next(self.module.parameters())
        return self.module.decode(z.to(device=p.device, dtype=p.dtype)).float()
