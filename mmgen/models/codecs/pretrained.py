# Pretrained codecs from local files: a diffusers AutoencoderKL or VQModel directory behind the protocol.
"""``data.codec=diffusers:<dir>`` loads ``<dir>/config.json`` + safetensors weights (what
``save_pretrained`` writes; nothing is downloaded). Geometry comes from ``config.json`` alone,
so a config validates (and ``model.patch_dim`` resolves) without reading the weights; the
weights are read on the first ``encode`` / ``decode``.

Latent convention (the one the diffusers pipelines use): a continuous codec's latent is the
posterior *mean* ``z`` (deterministic, so latents can be cached and compared), scaled as
``(z - shift_factor) * scaling_factor`` from the file's config (shift 0 when the config has
none); ``decode`` undoes it. A VQ codec's latent is the codebook index per latent cell (scaling
does not apply to codes), found in fp32 always: an argmin over bf16 distances can flip codes.

Beyond the :class:`~mmgen.models.codecs.base.VisualCodec` protocol these codecs provide the
latent-grid methods of :class:`~mmgen.models.codecs.base.LatentCodec` (batched latents for the
device path and the latent cache, and ``fingerprint()`` that tags cached shards).
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import torch

from mmgen.batch import CONTINUOUS, DISCRETE
from mmgen.models.codecs.pixel import patchify, unpatchify

KL, VQ = "AutoencoderKL", "VQModel"
# bump when the latent convention above changes: cached shards of the old one must not load
CONVENTION = "mmgen-latents-v1: posterior mean, (z - shift) * scale; vq argmin fp32"


def _fail(path: Path, why: str) -> ValueError:
    return ValueError(f"codec diffusers:{path}: {why}")


def read_diffusers_config(path: str | Path) -> dict:
    """``config.json`` of a diffusers autoencoder directory, checked (one-line ValueError).

    Args:
        path: the directory ``save_pretrained`` wrote.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise _fail(path, "no such directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise _fail(path, "no config.json (expected a diffusers save_pretrained directory)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail(path, f"config.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("_class_name") not in (KL, VQ):
        name = cfg.get("_class_name") if isinstance(cfg, dict) else None
        raise _fail(path, f"config.json names class {name!r}; supported: {KL}, {VQ}")
    if not sorted(path.glob("*.safetensors")):
        raise _fail(path, "no *.safetensors weights (only safetensors are loaded)")
    return cfg


class DiffusersCodec:
    """A diffusers ``AutoencoderKL`` (continuous latents) or ``VQModel`` (discrete codes).

    Args:
        path: the model directory (``config.json`` + ``*.safetensors``).
        patch_size: patch side on the latent grid (``data.patch_size``).
    """

    def __init__(self, path: str | Path, patch_size: int):
        self.path = Path(path).expanduser().resolve()
        self.config = read_diffusers_config(self.path)
        c = self.config
        self.class_name = c["_class_name"]
        if patch_size < 1:
            raise _fail(self.path, f"patch_size must be >= 1, got {patch_size}")
        self.name = f"diffusers:{path}"
        self.patch_size = int(patch_size)
        self.kind = CONTINUOUS if self.class_name == KL else DISCRETE
        self.downsample = 2 ** (len(c.get("block_out_channels", [64])) - 1)
        self.in_channels = int(c.get("in_channels", 3))
        self.channels = int(c.get("latent_channels", 4 if self.kind == CONTINUOUS else 3))
        self.scaling_factor = float(c.get("scaling_factor") or 1.0)
        self.shift_factor = float(c.get("shift_factor") or 0.0)
        # the codebook: codes are 0..codebook_size-1 (the data pipeline offsets them)
        self.codebook_size = int(c.get("num_vq_embeddings", 0)) if self.kind == DISCRETE else 0
        if self.kind == DISCRETE and self.patch_size != 1:
            raise _fail(self.path, f"a VQ codec has one code per latent cell: patch_size must be 1, "
                                   f"got {self.patch_size}")
        self._module = None
        self._fingerprint: str | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"DiffusersCodec({self.class_name}, {self.path}, downsample={self.downsample}, "
                f"channels={self.channels}, patch_size={self.patch_size})")

    # -- geometry (config.json only) --------------------------------------------------------
    @property
    def payload_dim(self) -> int:
        return self.channels * self.patch_size ** 2 if self.kind == CONTINUOUS else 0

    def grid(self, size: int | tuple[int, int], frames: int = 1) -> tuple[int, int, int]:
        h, w = (size, size) if isinstance(size, int) else size
        side = self.downsample * self.patch_size
        if h % side or w % side:
            raise ValueError(f"image {h}x{w} is not divisible by downsampling {self.downsample} x "
                             f"patch size {self.patch_size} = {side}")
        return int(frames), h // side, w // side

    # -- weights ----------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        """The diffusers model, loaded (eval, no grad, fp32) on first use."""
        if self._module is None:
            with self._lock:
                if self._module is None:
                    self._module = self._load()
        return self._module

    def _load(self) -> torch.nn.Module:
        try:
            import diffusers
        except ImportError:
            raise ValueError(f"codec {self.name}: needs the diffusers package "
                             f"(pip install 'mmgen[hf]')") from None
        cls = getattr(diffusers, self.class_name)
        try:
            model = cls.from_pretrained(str(self.path), local_files_only=True, use_safetensors=True,
                                         low_cpu_mem_usage=False)
        except Exception as e:  # noqa: BLE001 - diffusers raises many kinds; one line for people
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise _fail(self.path, f"cannot load the weights ({type(e).__name__}: {first})") from None
        model.eval().requires_grad_(False)
        return model

    def to(self, device: torch.device | str) -> "DiffusersCodec":
        """Move the weights (loading them first) to ``device``; returns self."""
        self._module = self.module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def fingerprint(self) -> str:
        """``diffusers-<sha256 prefix>`` of the config, the weight files and the latent
        convention: equal fingerprints mean equal latents for equal pixels."""
        if self._fingerprint is None:
            h = hashlib.sha256(CONVENTION.encode())
            h.update(json.dumps(self.config, sort_keys=True).encode())
            for f in sorted(self.path.glob("*.safetensors")):
                h.update(f.name.encode())
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
            self._fingerprint = f"diffusers-{h.hexdigest()[:20]}"
        return self._fingerprint

    # -- latents (batched) ------------------------------------------------------------------
    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` pixels in [-1, 1] -> scaled latents ``[B, c, H/d, W/d]`` (float32),
        or codes ``[B, H/d, W/d]`` (long) for a VQ codec; on the weights' device, in the
        caller's autocast (VQ distances always in fp32)."""
        m = self.module
        x = pixels.to(self.device)
        if self.kind == CONTINUOUS:
            z = m.encode(x.to(m.dtype)).latent_dist.mean.float()
            return (z - self.shift_factor) * self.scaling_factor
        with torch.autocast(x.device.type, enabled=False):
            h = m.encode(x.float()).latents.float()
            _, _, (_, _, idx) = m.quantize(h)
        return idx.reshape(h.shape[0], h.shape[2], h.shape[3]).long()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode_latents`: scaled latents ``[B, c, h, w]`` (or codes
        ``[B, h, w]``) -> pixels ``[B, C, H, W]``, float32 on the weights' device."""
        m = self.module
        z = latents.to(self.device)
        if self.kind == CONTINUOUS:
            z = z.float() / self.scaling_factor + self.shift_factor
            return m.decode(z.to(m.dtype)).sample.float()
        b, h, w = z.shape
        q = m.quantize.get_codebook_entry(z.reshape(-1).long(), (b, h, w, m.quantize.vq_embed_dim))
        q2 = m.post_quant_conv(q)
        return m.decoder(q2, q if m.config.norm_type == "spatial" else None).float()

    def latent_rows(self, latents: torch.Tensor) -> torch.Tensor:
        """One image's latent ``[c, h, w]`` (codes ``[h, w]``) -> payload rows in row-major
        order: ``[(h/p)*(w/p), p*p*c]`` patches (pixel-codec layout), or ``[h*w]`` codes."""
        if self.kind == DISCRETE:
            return latents.reshape(-1).long()
        return patchify(latents.float(), self.patch_size)

    def rows_to_latents(self, rows: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """Inverse of :meth:`latent_rows` for one frame."""
        if self.kind == DISCRETE:
            return rows.reshape(grid_h, grid_w).long()
        return unpatchify(rows.float(), grid_h, grid_w, self.patch_size, self.channels)

    # -- the protocol -----------------------------------------------------------------------
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        frames = pixels[None] if pixels.dim() == 3 else pixels
        if frames.dim() != 4 or frames.shape[1] != self.in_channels:
            raise ValueError(f"codec {self.name}: expected [C, H, W] or [T, C, H, W] with C = "
                             f"{self.in_channels}, got {list(pixels.shape)}")
        grid = self.grid((frames.shape[2], frames.shape[3]), frames.shape[0])
        # frame by frame, as a video goes through an image codec
        latents = self.encode_latents(frames).cpu()
        return torch.cat([self.latent_rows(z) for z in latents]), grid

    def decode(self, rows: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        t, gh, gw = (int(g) for g in grid)
        want = (t * gh * gw,) if self.kind == DISCRETE else (t * gh * gw, self.payload_dim)
        if tuple(rows.shape) != want:
            raise ValueError(f"codec {self.name}: {list(rows.shape)} rows do not fit grid "
                             f"{tuple(grid)} (expected {list(want)})")
        per_frame = rows.reshape(t, gh * gw, *want[1:])
        latents = torch.stack([self.rows_to_latents(f, gh, gw) for f in per_frame])
        return self.decode_latents(latents).cpu()


def load_diffusers_codec(path: str, patch_size: int) -> DiffusersCodec:
    """``CODEC_LOADERS["diffusers"]``: the codec of a diffusers directory.

    Args:
        path: the directory (``config.json`` + safetensors).
        patch_size: patch side on the latent grid.
    """
    return DiffusersCodec(path, patch_size)
