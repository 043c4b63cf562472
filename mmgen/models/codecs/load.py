# mmgen's own trained codecs as frozen codecs: `data.codec=vae:<path>` / `vq:<path>` (no pickle).
"""``<kind>:<path>`` is the one pattern for codecs read from disk (``CODEC_LOADERS`` holds the
kinds; diffusers directories join it as another kind). For ``vae`` and ``vq`` the path is:

* a run directory of a codec run (``experiment=codec_vae_shapes``): its newest checkpoint;
* one checkpoint directory of such a run (``runs/x/checkpoints/step_0001500``);
* a ``.safetensors`` file: written by :func:`save_codec` (the shape in its metadata) or by
  ``mmgen export`` of a codec run (the shape from the run's ``config.yaml``).

Weights are read with ``torch.load(weights_only=True)`` through :mod:`mmgen.safe_load` or
with safetensors; nothing is unpickled. A loaded codec is cached per (kind, file, mtime, patch
size), since configs ask for the codec several times while validating.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from mmgen.models.codecs.config import AutoencoderConfig
from mmgen.models.codecs.vae import ConvVAE, VAECodec
from mmgen.models.codecs.vq import ConvVQ, VQCodec

MODULES: dict[str, tuple[type[nn.Module], type]] = {"vae": (ConvVAE, VAECodec), "vq": (ConvVQ, VQCodec)}


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete ``checkpoints/step_*`` of a run (renamed from ``.tmp`` when done)."""
    root = run_dir / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if p.name[5:].isdigit() and (p / "meta.json").is_file()) \
        if root.is_dir() else []
    return done[-1] if done else None


def run_model_config(run_dir: Path, where: str) -> tuple[str, AutoencoderConfig]:
    """(family, autoencoder shape) from a run's resolved ``config.yaml``."""
    f = run_dir / "config.yaml"
    if not f.is_file():
        raise ValueError(f"{where}: no config.yaml in {run_dir} to read the codec's shape from")
    model = (yaml.safe_load(f.read_text()) or {}).get("model") or {}
    return str(model.get("family", "transformer")), AutoencoderConfig(**model.get("autoencoder", {}))


def read_codec_files(path: Path) -> tuple[str, AutoencoderConfig, dict[str, torch.Tensor]]:
    """(family, shape, state dict) of a run directory, checkpoint directory or safetensors file."""
    from mmgen.safe_load import load_plain

    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if "autoencoder" in meta:
            return meta.get("family", ""), AutoencoderConfig(**json.loads(meta["autoencoder"])), state
        source = Path(meta.get("source", ""))
        family, cfg = run_model_config(source.parent.parent, f"{path} (exported from {source})")
        return family, cfg, state
    if not path.is_dir():
        raise ValueError(f"{path}: not a codec run directory, checkpoint directory or .safetensors file")
    ckpt, run_dir = (path, path.parent.parent) if (path / "model.pt").is_file() else (newest_checkpoint(path), path)
    if ckpt is None or not (ckpt / "model.pt").is_file():
        raise ValueError(f"{path}: no complete checkpoint with model.pt (a codec trained under parallel=ddp)")
    family, cfg = run_model_config(run_dir, str(path))
    return family, cfg, load_plain(ckpt / "model.pt", map_location="cpu", trustable=False)


@functools.lru_cache(maxsize=8)
def _load(kind: str, path: str, mtime: float, patch_size: int):
    family, cfg, state = read_codec_files(Path(path))
    if family and family != kind:
        raise ValueError(f"{kind}:{path} holds a model.family={family} model, not a {kind}")
    module_cls, codec_cls = MODULES[kind]
    module = module_cls(cfg)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{kind}:{path}: weights do not fit the recorded shape: "
                         f"{str(e).splitlines()[0]}") from None
    return codec_cls(module, patch_size, source=f"{kind}:{path}")


def load_codec(kind: str, path: str, patch_size: int):
    """The frozen codec of kind ``vae`` or ``vq`` stored at ``path`` (see the module docstring).

    Args:
        kind: "vae" or "vq".
        path: run directory, checkpoint directory or .safetensors file.
        patch_size: ``data.patch_size`` (1 for vq).
    """
    if kind not in MODULES:
        raise ValueError(f"unknown mmgen codec kind {kind!r} (available: {', '.join(MODULES)})")
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"{kind} codec: {path} does not exist")
    marker = newest_checkpoint(p) if p.is_dir() else p
    mtime = (marker or p).stat().st_mtime
    return _load(kind, str(p.resolve()), mtime, int(patch_size))


def save_codec(module: nn.Module, path: str | Path) -> Path:
    """Write a trained ConvVAE / ConvVQ to one safetensors file with its shape in the metadata,
    so ``vae:<file>`` / ``vq:<file>`` loads it alone.

    Args:
        module: the codec module (e.g. a codec run's ``engine.module``).
        path: the ``.safetensors`` file to write.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    meta = {"family": module.family, "autoencoder": json.dumps(dataclasses.asdict(module.cfg))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return path
