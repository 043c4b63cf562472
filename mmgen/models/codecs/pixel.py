# The pixel-patch codec: a span's payload is its image cut into p x p patches, (p, p, C) flattened.
"""The first :class:`~mmgen.models.codecs.base.VisualCodec` (Transfusion on pixels): continuous,
no downsampling, ``payload_dim = channels * p * p``. Encoding and decoding are exact
permutations of the pixels. A clip is patched frame by frame, so a clip of T frames is a span of
T * (H/p) * (W/p) positions in (t, h, w) row-major order.
"""
from __future__ import annotations

import torch

from mmgen.batch import CONTINUOUS


def patchify(img: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[C, H, W]`` -> ``[(H/p)*(W/p), p*p*C]`` in row-major patch order."""
    c, h, w = img.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not divisible by patch size {p}")
    x = img.reshape(c, h // p, p, w // p, p).permute(1, 3, 2, 4, 0)
    return x.reshape((h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, grid_h: int, grid_w: int, patch_size: int,
               channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[gh*gw, p*p*C]`` -> ``[C, gh*p, gw*p]``."""
    p = patch_size
    x = patches.reshape(grid_h, grid_w, p, p, channels).permute(4, 0, 2, 1, 3)
    return x.reshape(channels, grid_h * p, grid_w * p)


class PixelCodec:
    """Pixel patches of side ``patch_size`` (``data.patch_size``).

    Args:
        patch_size: patch side in pixels.
        channels: image channels (3: RGB).
    """

    name = "pixels"
    kind = CONTINUOUS
    downsample = 1

    def __init__(self, patch_size: int, channels: int = 3):
        if patch_size < 1 or channels < 1:
            raise ValueError(f"pixel codec: patch_size ({patch_size}) and channels ({channels}) "
                             "must be >= 1")
        self.patch_size, self.channels = int(patch_size), int(channels)

    def __repr__(self) -> str:
        return f"PixelCodec(patch_size={self.patch_size}, channels={self.channels})"

    @property
    def payload_dim(self) -> int:
        return self.channels * self.patch_size ** 2

    def grid(self, size: int | tuple[int, int], frames: int = 1) -> tuple[int, int, int]:
        h, w = (size, size) if isinstance(size, int) else size
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image {h}x{w} is not divisible by patch size {p}")
        return int(frames), h // p, w // p

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        frames = pixels[None] if pixels.dim() == 3 else pixels
        if frames.dim() != 4 or frames.shape[1] != self.channels:
            raise ValueError(f"pixel codec: expected [C, H, W] or [T, C, H, W] with C = "
                             f"{self.channels}, got {list(pixels.shape)}")
        grid = self.grid((frames.shape[2], frames.shape[3]), frames.shape[0])
        return torch.cat([patchify(f, self.patch_size) for f in frames]), grid

    def decode(self, rows: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        t, gh, gw = (int(g) for g in grid)
        if rows.shape != (t * gh * gw, self.payload_dim):
            raise ValueError(f"pixel codec: {list(rows.shape)} rows do not fit grid {tuple(grid)} "
                             f"x payload_dim {self.payload_dim}")
        per_frame = rows.reshape(t, gh * gw, self.payload_dim)
        return torch.stack([unpatchify(f, gh, gw, self.patch_size, self.channels)
                            for f in per_frame])
