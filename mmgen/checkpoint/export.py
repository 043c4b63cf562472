# Consolidated model weights: export a checkpoint to one safetensors file, and load either form.
from __future__ import annotations

import json
from pathlib import Path

import torch

from mmgen.checkpoint.manager import complete_checkpoints


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir (-> its newest complete checkpoint)."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    done = complete_checkpoints(p / "checkpoints")
    if not done:
        raise FileNotFoundError(f"{p}: no complete checkpoint (expected {p}/checkpoints/step_*/meta.json)")
    return done[-1]


def checkpoint_backend(ckpt: Path) -> str:
    """The backend (``parallel.name``) that wrote ``ckpt``, as its meta.json records it."""
    meta_file = ckpt / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if "backend" in meta:
        return meta["backend"]
    # Checkpoints written before meta.json named the backend (and DeepSpeed directories made
    # outside mmgen): recognised by their files. Any ZeRO stage is read by the same code.
    from mmgen.parallel.deepspeed import DS_TAG
    from mmgen.parallel.fsdp import FSDP_DIR

    for marker, backend in (("model.pt", "ddp"), (FSDP_DIR, "fsdp2"), (DS_TAG, "zero1")):
        if (ckpt / marker).exists():
            return backend
    raise FileNotFoundError(f"{ckpt}: no model state found (model.pt, {FSDP_DIR}/ or {DS_TAG}/)")


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Plain-model state dict of a checkpoint of any backend, read by the backend that wrote
    it (no process group needed)."""
    from mmgen.parallel.registry import BACKENDS, get_backend

    backend = checkpoint_backend(ckpt)
    if backend not in BACKENDS:
        raise ValueError(f"{ckpt}: written by backend '{backend}', which this mmgen does not have "
                         f"(available: {', '.join(BACKENDS)})")
    return get_backend(backend).checkpoint_state_dict(ckpt)


def export_safetensors(path: str | Path, out: str | Path) -> Path:
    from safetensors.torch import save_file

    ckpt = find_checkpoint(path)
    state = {k: v.contiguous() for k, v in consolidated_state_dict(ckpt).items()}
    meta = json.loads((ckpt / "meta.json").read_text())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    save_file(state, str(tmp), metadata={"step": str(meta["step"]), "source": str(ckpt)})
    tmp.replace(out)
    return out


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = consolidated_state_dict(find_checkpoint(p))
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in state.items()})
