# Consolidated model weights: export a checkpoint to one safetensors file, and load either form.
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from mmgen.checkpoint.integrity import read_meta, verify_share
from mmgen.checkpoint.manager import complete_checkpoints
from mmgen.models.mot import expand_dense_state
from mmgen.safe_load import CheckpointError
from mmgen.errors import ConfigError


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


def verify_checkpoint(ckpt: Path) -> None:
    """Check every file against meta.json's checksums in this process (export, init_from:
    no process group). A checkpoint without checksums is not checked here; its loads still
    fail in one line if a file is damaged.

    Raises:
        CheckpointError: a file is missing or differs from its record.
    """
    try:
        meta = read_meta(ckpt)
    except ValueError as e:
        raise CheckpointError(f"{ckpt}: damaged: {e}") from None
    if "files" not in meta:
        return
    problems = verify_share(ckpt, meta, 0, 1)
    if problems:
        raise CheckpointError(f"{ckpt}: damaged: {'; '.join(problems)}")


def consolidated_state_dict(ckpt: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Plain-model state dict of a checkpoint of any backend, read by the backend that wrote
    it (no process group needed).

    Args:
        ckpt: the checkpoint directory.
        trust: let files that need pickle be unpickled (``--trust``, ``checkpoint.trust``).
    """
    from mmgen.parallel.registry import BACKENDS, get_backend

    backend = checkpoint_backend(ckpt)
    if backend not in BACKENDS:
        raise ValueError(f"{ckpt}: written by backend '{backend}', which this mmgen does not have "
                         f"(available: {', '.join(BACKENDS)})")
    if (ckpt / "meta.json").is_file():
        verify_checkpoint(ckpt)
    return get_backend(backend).checkpoint_state_dict(ckpt, trust=trust)


def export_safetensors(path: str | Path, out: str | Path, trust: bool = False) -> Path:
    """Write a checkpoint's plain-model weights to one safetensors file.

    Args:
        path: a checkpoint directory, or a run directory (its newest complete checkpoint).
        out: the file to write. A directory, a path that cannot be created or written, or a
            failed write raises ConfigError (one line); nothing is left behind then: no partial
            file, no ``.tmp``, no directory this call created.
        trust: as for :func:`consolidated_state_dict`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    ckpt = find_checkpoint(path)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    created = _prepare_output(out, tmp)  # before loading: a bad --out fails in a second, not after
    try:
        state = {k: v.contiguous() for k, v in consolidated_state_dict(ckpt, trust=trust).items()}
        meta = json.loads((ckpt / "meta.json").read_text())
        save_file(state, str(tmp), metadata={"step": str(meta["step"]), "source": str(ckpt)})
        tmp.replace(out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        if isinstance(e, (OSError, SafetensorError)) and not isinstance(e, FileNotFoundError):
            raise ConfigError(f"export: cannot write {out}: {_cause(e)}") from None
        raise
    return out


def _cause(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e).splitlines()[0]


def _prepare_output(out: Path, tmp: Path) -> list[Path]:
    """Check that ``out`` can be written (creating its missing parent directories, returned so a
    failure can remove them) by opening the temporary file it is written through."""
    if out.is_dir():
        raise ConfigError(f"export: --out {out} is a directory; give a file name, "
                          f"e.g. {out / 'model.safetensors'}")
    if out.exists() and not out.is_file():
        raise ConfigError(f"export: --out {out} exists and is not a regular file")
    missing = [d for d in (out.parent, *out.parent.parents) if not d.exists()][::-1]
    created: list[Path] = []
    try:
        for d in missing:
            d.mkdir()
            created.append(d)
        with open(tmp, "wb"):
            pass
    except OSError as e:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise ConfigError(f"export: cannot write {out}: {_cause(e)}") from None
    return created


def load_model_weights(model: torch.nn.Module, path: str | Path, trust: bool = False) -> None:
    """Load plain-model weights into ``model`` (strict).

    Args:
        model: the plain model.
        path: a ``.safetensors`` file (no pickle by construction), or a run or checkpoint
            directory of any backend.
        trust: as for :func:`consolidated_state_dict` (checkpoint directories only).
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
        try:
            state = load_file(str(p))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{p}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None
    else:
        state = consolidated_state_dict(find_checkpoint(p), trust=trust)
    device = next(model.parameters()).device
    # a dense checkpoint into a modality-tower model: its block weights start every tower
    state = expand_dense_state(state, model.state_dict().keys())
    # a dense checkpoint into an MoE model: experts start as copies of its FFNs (upcycling)
    from mmgen.models.moe import upcycle_state_dict

    state = upcycle_state_dict(model, state)
    model.load_state_dict({k: v.to(device) for k, v in state.items()})
