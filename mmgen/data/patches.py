# Pixel <-> patch conversion shared by the data pipeline, the samplers and the scorers.
"""Images are float tensors in [-1, 1], channels first; a patch vector is (p, p, C) flattened.

Videos (``[T, C, H, W]``) use per-frame patches with a temporal grid coordinate, so a clip of
T frames is a span of T * (H/p) * (W/p) positions.
"""
from __future__ import annotations

import numpy as np
import torch


def to_unit(img_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1]."""
    t = torch.as_tensor(np.asarray(img_uint8))
    return t.permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """CHW float in [-1, 1] -> HWC uint8."""
    x = img.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).cpu().numpy()


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


def grid_coords(grid_t: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """``[t*h*w, 3]`` (t, h, w) coordinates in the same row-major order as the patches."""
    t, h, w = torch.meshgrid(torch.arange(grid_t), torch.arange(grid_h), torch.arange(grid_w),
                             indexing="ij")
    return torch.stack([t, h, w], -1).reshape(-1, 3)
