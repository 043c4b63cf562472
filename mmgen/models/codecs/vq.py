# The VQ tokenizer: a vector quantiser (EMA or straight-through, dead-code restarts), the
# convolutional VQ autoencoder mmgen trains around it, and its frozen VisualCodec wrapper.
"""Codes are looked up in fp32 (autocast off: a bf16 distance would flip near-ties). The
codebook's running state (EMA statistics, how long each code has been idle) is held in buffers,
so it is saved, restored and, under DDP, broadcast from rank 0 with the rest of the model.

Dead-code restarts are deterministic (no random draw, so a resumed run is bitwise the same): a
code unused for ``dead_after`` training forwards takes the encoder output of the current
micro-batch that is farthest from its own code, the farthest going to the lowest dead index.
Under data parallelism with ``update="st"`` the codebook is a parameter that DDP does not
broadcast, so each rank would restart its own codes: use ``update="ema"`` there (the default).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgen.batch import DISCRETE
from mmgen.models.codecs.blocks import Decoder, Encoder, reset_modules
from mmgen.models.codecs.config import AutoencoderConfig
from mmgen.models.codecs.vae import ModuleCodec


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation of ``[M, dim]`` vectors.

    Args:
        num_codes: codebook size K.
        dim: code dimension.
        update: "ema" (codebook = running mean of the vectors assigned to each code) or "st"
            (a parameter trained through the codebook loss).
        decay: EMA decay.
        l2_normalize: compare and return l2-normalised vectors (cosine lookup).
        dead_after: restart codes idle for this many training forwards (0: never).
    """

    def __init__(self, num_codes: int, dim: int, update: str = "ema", decay: float = 0.99,
                 l2_normalize: bool = False, dead_after: int = 0):
        super().__init__()
        if update not in ("ema", "st"):
            raise ValueError(f"vector quantiser: update='{update}' must be ema or st")
        self.num_codes, self.dim, self.update, self.decay = num_codes, dim, update, decay
        self.l2_normalize, self.dead_after = l2_normalize, dead_after
        if update == "st":
            self.embedding = nn.Parameter(torch.empty(num_codes, dim))
        else:
            self.register_buffer("embedding", torch.empty(num_codes, dim))
            self.register_buffer("cluster_size", torch.empty(num_codes))
            self.register_buffer("embed_sum", torch.empty(num_codes, dim))
        self.register_buffer("idle", torch.empty(num_codes, dtype=torch.long))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Codes uniform in +-1/K (VQGAN); EMA statistics as if each code had been assigned its
        own vector once, so a code nobody picks keeps its vector instead of decaying to 0."""
        self.embedding.uniform_(-1.0 / self.num_codes, 1.0 / self.num_codes)
        if self.update == "ema":
            self.cluster_size.fill_(1.0)
            self.embed_sum.copy_(self.embedding)
        self.idle.zero_()

    def codebook(self) -> torch.Tensor:
        """The ``[K, dim]`` codes as looked up and returned (l2-normalised if asked)."""
        e = self.embedding.float()
        return F.normalize(e, dim=-1) if self.l2_normalize else e

    def lookup(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes ``[M]``, squared distance of each vector to its code ``[M]``), fp32."""
        with torch.autocast(z.device.type, enabled=False), torch.no_grad():
            z = z.float()
            e = self.codebook()
            d = z.square().sum(1, keepdim=True) - 2.0 * z @ e.t() + e.square().sum(1)[None]
            dist, codes = d.min(dim=1)
        return codes, dist.clamp(min=0)

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Quantise ``z`` (``[M, dim]``).

        Returns:
            ``quantized`` ``[M, dim]`` (straight-through: forward the code, gradient to ``z``),
            ``codes`` ``[M]`` long, ``commit`` ``[M]`` (mean of (z - sg(code))^2), ``codebook``
            ``[M]`` (mean of (sg(z) - code)^2; zeros under EMA, which needs no loss),
            ``counts`` ``[K]`` vectors per code in this call.
        """
        if self.l2_normalize:
            z = F.normalize(z, dim=-1)
        codes, dist = self.lookup(z)
        if self.update == "st":
            e = F.normalize(self.embedding, dim=-1) if self.l2_normalize else self.embedding
            q = F.embedding(codes, e).to(z.dtype)
            codebook = (z.detach() - q).float().square().mean(1)
        else:
            q = F.embedding(codes, self.codebook()).to(z.dtype)
            codebook = torch.zeros(z.shape[0], device=z.device)
        commit = (z - q.detach()).float().square().mean(1)
        counts = torch.bincount(codes, minlength=self.num_codes).float()
        if self.training:
            self.update_codebook(z.detach().float(), codes, counts, dist)
        return {"quantized": z + (q - z).detach(), "codes": codes, "commit": commit,
                "codebook": codebook, "counts": counts}

    @torch.no_grad()
    def update_codebook(self, z: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor,
                        dist: torch.Tensor) -> None:
        """EMA step (``update="ema"``), idle counters, then restarts of dead codes."""
        if self.update == "ema":
            sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, z)
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            self.embedding.copy_(self.embed_sum / self.cluster_size.clamp(min=1e-12)[:, None])
        self.idle.add_(1).masked_fill_(counts > 0, 0)
        if self.dead_after:
            self.restart(z, dist)

    @torch.no_grad()
    def restart(self, z: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """Put codes idle for ``dead_after`` forwards on the farthest vectors of ``z``; returns
        the restarted code ids (ascending)."""
        dead = torch.nonzero(self.idle >= self.dead_after).flatten()
        n = min(dead.numel(), z.shape[0])
        if n == 0:
            return dead[:0]
        dead = dead[:n]
        order = torch.sort(dist, descending=True, stable=True).indices[:n]
        picked = z[order]
        self.embedding[dead] = picked.to(self.embedding.dtype)
        if self.update == "ema":
            self.embed_sum[dead] = picked
            self.cluster_size[dead] = 1.0
        self.idle[dead] = 0
        return dead


class ConvVQ(nn.Module):
    """VQ autoencoder: encoder -> (1x1 down to the lookup dim) -> quantiser -> (1x1 up) -> decoder.

    Args:
        cfg: the shape (``model.autoencoder``).
    """

    family = "vq"

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg.validate()
        c, d = cfg.latent_channels, cfg.lookup_dim
        self.encoder = Encoder(cfg, c)
        self.quant_in = nn.Conv2d(c, d, 1) if d != c else nn.Identity()
        self.quantizer = VectorQuantizer(cfg.codebook_size, d, cfg.update, cfg.ema_decay,
                                         cfg.l2_normalize, cfg.dead_after)
        self.quant_out = nn.Conv2d(d, c, 1) if d != c else nn.Identity()
        self.decoder = Decoder(cfg, c)

    def init_weights(self) -> None:
        reset_modules(self)

    def _to_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        h = self.quant_in(self.encoder(x))
        n, d, gh, gw = h.shape
        return h.permute(0, 2, 3, 1).reshape(n * gh * gw, d), (n, gh, gw)

    def _from_rows(self, rows: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        n, gh, gw = shape
        q = rows.reshape(n, gh, gw, -1).permute(0, 3, 1, 2)
        return self.decoder(self.quant_out(q))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Reconstruct ``x`` (``[N, C, H, W]``); ``generator`` is unused (no sampling).

        Returns:
            ``recon``; ``codes`` ``[N, h, w]``; ``commit`` and ``codebook`` ``[N]`` (per-image
            means); ``counts`` ``[K]`` codes used in this call.
        """
        rows, shape = self._to_rows(x)
        q = self.quantizer(rows)
        n = shape[0]
        return {"recon": self._from_rows(q["quantized"], shape), "codes": q["codes"].reshape(shape),
                "commit": q["commit"].reshape(n, -1).mean(1),
                "codebook": q["codebook"].reshape(n, -1).mean(1), "counts": q["counts"]}

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> codes ``[N, h, w]`` (lookup only: no codebook update)."""
        rows, shape = self._to_rows(x)
        if self.quantizer.l2_normalize:
            rows = F.normalize(rows, dim=-1)
        return self.quantizer.lookup(rows)[0].reshape(shape)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[N, h, w]`` -> pixels ``[N, C, H, W]``."""
        rows = F.embedding(codes.flatten(), self.quantizer.codebook())
        p = next(self.decoder.parameters())
        return self._from_rows(rows.to(p.dtype), tuple(codes.shape))


class VQCodec(ModuleCodec):
    """A :class:`ConvVQ` behind the :class:`~mmgen.models.codecs.base.VisualCodec` protocol:
    discrete, one code per latent position (``patch_size`` must be 1), payload rows are code ids.

    Attributes (beyond the protocol): ``vocab_size`` (= ``codebook_size``), the number of codes
    (the visual vocabulary placed above the text ids).

    Args:
        module: a trained ConvVQ (frozen here).
        patch_size: must be 1 (a code is one position).
        source: where it was loaded from.
    """

    name = "vq"
    kind = DISCRETE

    def __init__(self, module: ConvVQ, patch_size: int = 1, source: str = ""):
        if patch_size != 1:
            raise ValueError(f"vq codec: one code is one span position, so data.patch_size must be 1 "
                             f"(got {patch_size})")
        super().__init__(module, patch_size, source)
        self.channels = module.cfg.lookup_dim
        self.vocab_size = module.cfg.codebook_size
        # the name the start-up vocabulary check and the AR sampler read (as diffusers' VQModel)
        self.codebook_size = self.vocab_size

    @property
    def payload_dim(self) -> int:
        return 0

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        frames = self._frames(pixels)
        codes = self.module.encode_codes(frames)
        return codes.flatten().long(), (int(codes.shape[0]), int(codes.shape[1]), int(codes.shape[2]))

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` pixels -> codes ``[B, h, w]`` (long; distances in fp32)."""
        p = next(self.module.parameters())
        with torch.autocast(p.device.type, enabled=False):
            return self.module.encode_codes(pixels.to(device=p.device, dtype=torch.float32)).long()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, h, w]`` -> pixels ``[B, C, H, W]`` (fp32)."""
        dev = next(self.module.parameters()).device
        return self.module.decode_codes(latents.long().to(dev)).float()

    def latent_rows(self, latents: torch.Tensor) -> torch.Tensor:
        """One frame's codes ``[h, w]`` -> ``[h*w]`` payload rows (code ids)."""
        return latents.reshape(-1).long()

    @torch.no_grad()
    def decode(self, rows: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        t, gh, gw = (int(g) for g in grid)
        if rows.shape != (t * gh * gw,):
            raise ValueError(f"vq codec: {list(rows.shape)} codes do not fit grid {tuple(grid)}")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.vocab_size):
            raise ValueError(f"vq codec: codes must be in [0, {self.vocab_size})")
        dev = next(self.module.parameters()).device
        return self.module.decode_codes(rows.long().to(dev).reshape(t, gh, gw)).float()
