# Tiny random diffusers autoencoders written with save_pretrained, for the pretrained-codec tests.
from __future__ import annotations

from pathlib import Path

import torch

BLOCKS = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
              layers_per_block=1, norm_num_groups=4, sample_size=32)


def make_kl(path: Path, seed: int = 0, **overrides) -> "torch.nn.Module":
    """An AutoencoderKL with downsampling 2, 4 latent channels and non-trivial scale and shift
    (so a forgotten factor shows), saved at ``path``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kl = AutoencoderKL(**{**BLOCKS, "latent_channels": 4, "scaling_factor": 0.7,
                          "shift_factor": 0.1, **overrides})
    kl.save_pretrained(path)
    return kl.eval()


def make_vq(path: Path, seed: int = 0) -> "torch.nn.Module":
    """A VQModel with downsampling 2 and a 32-entry codebook spread like the encoder's output
    (a default random codebook maps nearly every cell to one code, which tests nothing)."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    vq = VQModel(**BLOCKS, latent_channels=4, num_vq_embeddings=32, vq_embed_dim=4)
    with torch.no_grad():
        h = vq.encode(torch.rand(4, 3, 32, 32) * 2 - 1).latents
        vq.quantize.embedding.weight.copy_(h.permute(0, 2, 3, 1).reshape(-1, 4)[::31][:32])
    vq.save_pretrained(path)
    return vq.eval()
