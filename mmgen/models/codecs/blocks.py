# Convolutional encoder and decoder shared by the VAE and the VQ tokenizer (residual blocks, 2x steps).
"""Layout (LDM / VQGAN style, without attention so it stays cheap on a CPU): ``conv_in`` ->
per level ``num_res_blocks`` residual blocks, then a stride-2 convolution except after the last
level -> GroupNorm, SiLU, ``conv_out``. The decoder mirrors it with nearest-neighbour 2x
upsampling. Both map ``[N, C, H, W]`` maps; a clip goes through frame by frame as a batch of
frames, so video needs nothing more here (the span grid carries time).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgen.models.codecs.config import AutoencoderConfig


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 projection on the skip when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """``[N, in_channels, H, W]`` -> ``[N, out_channels, H/d, W/d]``, d = ``cfg.downsample``.

    Args:
        cfg: the autoencoder shape.
        out_channels: channels of the output map (a VAE asks for 2 x latent: mean, log-variance).
    """

    def __init__(self, cfg: AutoencoderConfig, out_channels: int):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cin, w, cfg.norm_groups))
                cin = w
            if i < len(widths) - 1:
                blocks.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, cin)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))


class Upsample(nn.Module):
    """Nearest 2x, then a 3x3 convolution (no checkerboard artefacts of transposed convs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """``[N, in_channels, h, w]`` -> ``[N, cfg.in_channels, h*d, w*d]`` (unbounded; pixels are
    [-1, 1] by convention, the reconstruction loss pulls the output there).

    Args:
        cfg: the autoencoder shape.
        in_channels: channels of the latent map it reads.
    """

    def __init__(self, cfg: AutoencoderConfig, in_channels: int):
        super().__init__()
        widths = [cfg.base_channels * m for m in reversed(cfg.channel_mult)]
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cin, w, cfg.norm_groups))
                cin = w
            if i < len(widths) - 1:
                blocks.append(Upsample(w))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, cin)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z)))))


def reset_modules(module: nn.Module) -> None:
    """``reset_parameters`` of every submodule in registration order, from the current RNG:
    the same seed gives the same weights (the trainer seeds before ``init_weights``)."""
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def frames_of(pixels: torch.Tensor, channels: int, who: str) -> torch.Tensor:
    """``[C, H, W]`` or ``[T, C, H, W]`` -> ``[T, C, H, W]`` (ValueError on any other shape)."""
    frames = pixels[None] if pixels.dim() == 3 else pixels
    if frames.dim() != 4 or frames.shape[1] != channels:
        raise ValueError(f"{who}: expected [C, H, W] or [T, C, H, W] with C = {channels}, "
                         f"got {list(pixels.shape)}")
    return frames


def latent_grid(size: int | tuple[int, int], frames: int, downsample: int, patch_size: int,
                who: str) -> tuple[int, int, int]:
    """(t, h, w) span grid of ``frames`` frames of ``size`` pixels under a codec that
    downsamples by ``downsample`` and patches its latent by ``patch_size``."""
    h, w = (size, size) if isinstance(size, int) else size
    side = downsample * patch_size
    if h % side or w % side:
        raise ValueError(f"image {h}x{w} is not divisible by {who}'s downsample {downsample} x "
                         f"patch size {patch_size} = {side}")
    return int(frames), h // side, w // side
