# Consolidated model weights: export a checkpoint to one safetensors file, and load either form.
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path

import torch

from mmgen.checkpoint.manager import complete_checkpoints
from mmgen.errors import ConfigError

log = logging.getLogger(__name__)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir (-> its newest complete checkpoint)."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    done = complete_checkpoints(p / "checkpoints")
    if not done:
        raise FileNotFoundError(f"{p}: no complete checkpoint (expected {p}/checkpoints/step_*/meta.json)")
    return done[-1]


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Plain-model state dict from any backend's checkpoint layout."""
    if (ckpt / "model.pt").is_file():  # DDP: replicated, one file
        return torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    from mmgen.parallel.deepspeed import DS_TAG
    from mmgen.parallel.fsdp import FSDP_DIR, fsdp_state_dict

    if (ckpt / FSDP_DIR).is_dir():  # FSDP2: torch.distributed.checkpoint shards
        return fsdp_state_dict(ckpt)
    if (ckpt / DS_TAG).is_dir():  # ZeRO: shards in DeepSpeed's layout (mmgen.parallel.deepspeed)
        return _deepspeed_state_dict(ckpt, DS_TAG)
    raise FileNotFoundError(f"{ckpt}: no model state found (model.pt, {FSDP_DIR}/ or {DS_TAG}/)")


def _deepspeed_state_dict(ckpt: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights from a DeepSpeed checkpoint: ZeRO 1-3 are merged from the optimizer's
    fp32 master shards by DeepSpeed's own zero_to_fp32; a stage-0 checkpoint is not a ZeRO
    checkpoint and holds the whole module in ``mp_rank_00_model_states.pt['module']``."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    shards = ckpt / tag
    if not any(shards.glob("*_optim_states.pt")):
        states = torch.load(shards / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    # zero_to_fp32 prints its progress (and tqdm bars) for its own CLI: keep a CLI's output ours
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
    log.debug("zero_to_fp32: %s", chatter.getvalue())
    return state


def export_safetensors(path: str | Path, out: str | Path) -> Path:
    """Write a checkpoint's plain-model weights to one safetensors file.

    Args:
        path: a checkpoint directory, or a run directory (its newest complete checkpoint).
        out: the file to write. A directory, a path that cannot be created or written, or a
            failed write raises ConfigError (one line); nothing is left behind then: no partial
            file, no ``.tmp``, no directory this call created.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    ckpt = find_checkpoint(path)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    created = _prepare_output(out, tmp)  # before loading: a bad --out fails in a second, not after
    try:
        state = {k: v.contiguous() for k, v in consolidated_state_dict(ckpt).items()}
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


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = consolidated_state_dict(find_checkpoint(p))
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in state.items()})
