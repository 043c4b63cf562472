# The visual codec protocol (DESIGN.md contract 5) and the pixel convention every codec reads.
"""A visual codec turns pixels into the payload of a span and back; everything above it (the
data pipeline, the samplers, the config checks) asks the codec for geometry and widths and
never assumes pixel patches.

Pixels are float tensors in [-1, 1], channels first: an image is ``[C, H, W]``, a clip
``[T, C, H, W]`` (:func:`to_unit` / :func:`to_uint8` convert from / to HWC uint8).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class VisualCodec(Protocol):
    """What every codec provides.

    Attributes:
        name: the registry key (``data.codec``).
        kind: ``mmgen.batch.CONTINUOUS`` (payload rows are float vectors: pixels, VAE latents)
            or ``mmgen.batch.DISCRETE`` (payload rows are code ids: VQ tokenizers).
        channels: channels of what is patched (3 for pixels, the latent channels of a VAE).
        downsample: spatial factor from pixels to the patched grid (1 for pixels, 8 for a
            typical VAE); a patch covers ``downsample * patch_size`` pixels per side.
        patch_size: side of a patch on that grid.
        payload_dim: features per span position (continuous: ``channels * patch_size**2``;
            discrete: 0, the codes go into ``tokens``).
    """

    name: str
    kind: int
    channels: int
    downsample: int
    patch_size: int

    @property
    def payload_dim(self) -> int: ...

    def grid(self, size: int | tuple[int, int], frames: int = 1) -> tuple[int, int, int]:
        """(t, h, w) span grid of ``frames`` frames of ``size`` (side, or (H, W)) pixels;
        ValueError when the size does not divide into whole patches."""
        ...

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """``[C, H, W]`` or ``[T, C, H, W]`` pixels -> (payload rows ``[t*h*w, payload_dim]``
        (discrete: ``[t*h*w]`` codes) in (t, h, w) row-major order, grid (t, h, w))."""
        ...

    def decode(self, rows: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Payload rows of a span on ``grid`` -> pixels ``[T, C, H, W]`` (an image: T = 1)."""
        ...


@runtime_checkable
class LatentCodec(VisualCodec, Protocol):
    """A codec with an explicit latent grid (a VAE or VQ tokenizer): what the device path
    (``mmgen.models.codecs.device``) and the latent cache (``mmgen data encode``) need beyond
    :class:`VisualCodec`. The pixel codec is not one: its payload is the pixels themselves.
    """

    def fingerprint(self) -> str:
        """Hash of the codec's config, weights and latent convention; tags cached latents."""
        ...

    def to(self, device): ...

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` pixels -> ``[B, c, h, w]`` latents (discrete: ``[B, h, w]`` codes)."""
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode_latents` -> ``[B, C, H, W]`` pixels."""
        ...

    def latent_rows(self, latents: torch.Tensor) -> torch.Tensor:
        """One frame's latent ``[c, h, w]`` (codes ``[h, w]``) -> its payload rows."""
        ...


def to_unit(img_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1]."""
    t = torch.as_tensor(np.asarray(img_uint8))
    return t.permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """CHW float in [-1, 1] -> HWC uint8."""
    x = img.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).cpu().numpy()
