# Step-matched sweep of small mmgen VAEs on shapes: held-out PSNR and the shapes reader on reconstructions.
"""Trains each variant with Adam (lr 2e-3, batch 16) on freshly rendered shapes images (the
distribution of ``mmgen data make-shapes``), then encodes/decodes 200 held-out images through
the frozen-codec path (``VAECodec``) and scores them with ``mmgen.evaluation.shapes``.
Usage: python bench/codec_shapes_sweep.py STEPS [device]."""
from __future__ import annotations

import json
import sys
import time

import torch

from mmgen.data.synthetic.shapes import make_sample
from mmgen.evaluation.shapes import score_images
from mmgen.models.codecs.base import to_uint8, to_unit
from mmgen.models.codecs.config import AutoencoderConfig
from mmgen.models.codecs.vae import ConvVAE, VAECodec
from mmgen.objectives.reconstruction import psnr

VARIANTS = {
    "d4_c16_z4": dict(base_channels=16, channel_mult=[1, 2, 2], latent_channels=4),
    "d4_c32_z4": dict(base_channels=32, channel_mult=[1, 2, 2], latent_channels=4),
    "d4_c16_z8": dict(base_channels=16, channel_mult=[1, 2, 2], latent_channels=8),
    "d4_c16_z4_kl1e-4": dict(base_channels=16, channel_mult=[1, 2, 2], latent_channels=4, kl=1e-4),
    "d4_c16_z4_l2": dict(base_channels=16, channel_mult=[1, 2, 2], latent_channels=4, loss="l2"),
    "d2_c16_z4": dict(base_channels=16, channel_mult=[1, 2], latent_channels=4),
    "d2_c32_z4": dict(base_channels=32, channel_mult=[1, 2], latent_channels=4),
}


def main(steps: int, device: str) -> None:
    train = torch.stack([to_unit(make_sample(i, 0)[1]) for i in range(4000)]).to(device)
    held = [make_sample(i, 12345) for i in range(200)]
    x_val = torch.stack([to_unit(im) for _, im in held])
    for name, v in VARIANTS.items():
        v = dict(v)
        kl_w, loss = v.pop("kl", 1e-3), v.pop("loss", "l1")
        torch.manual_seed(0)
        m = ConvVAE(AutoencoderConfig(**v)).to(device)
        m.init_weights()
        opt = torch.optim.Adam(m.parameters(), lr=2e-3)
        g = torch.Generator(device=device).manual_seed(0)
        t0 = time.time()
        for step in range(steps):
            idx = torch.randint(0, len(train), (16,), generator=g, device=device)
            b = train[idx]
            out = m(b, generator=g)
            err = out["recon"] - b
            rec = err.abs().mean() if loss == "l1" else err.square().mean()
            total = rec + kl_w * out["kl"].mean()
            opt.zero_grad()
            total.backward()
            opt.step()
        codec = VAECodec(m.cpu(), patch_size=1)
        enc = [codec.encode(im) for im in x_val]
        recon = torch.cat([codec.decode(r, gr) for r, gr in enc]).clamp(-1, 1)
        lat = torch.cat([r for r, _ in enc])
        score = score_images([to_uint8(r) for r in recon], [s for s, _ in held])
        print(json.dumps({"variant": name, "steps": steps, "s": round(time.time() - t0, 1),
                          "params": sum(p.numel() for p in m.parameters()),
                          "psnr": round(float(psnr(recon, x_val).mean()), 2),
                          "latent_std": round(float(lat.std()), 3), **score}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cpu")
