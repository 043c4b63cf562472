# Plain weights of a megatron checkpoint without a process group (mmgen export, checkpoint.init_from).
"""The weights are a ``dist_checkpointing`` directory in its ``torch_dist`` format, which is
torch.distributed.checkpoint (DCP) underneath, holding plain keys in the plain layout
(engine.py), so DCP's own no-process-group load rebuilds every full tensor. It goes through
the FSDP backend's restricted reader: nothing is unpickled unless ``trust``."""
from __future__ import annotations

from pathlib import Path

import torch

MEGATRON_DIR = "megatron"


def read_weights(ckpt: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Every plain-model tensor of megatron checkpoint ``ckpt`` (step directory)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from mmgen.parallel.fsdp import safe_dcp_reader
    from mmgen.safe_load import UnsafeCheckpointError, find_in_chain

    where = Path(ckpt) / MEGATRON_DIR
    if not (where / ".metadata").is_file():
        raise FileNotFoundError(f"{ckpt}: not a megatron checkpoint (no {MEGATRON_DIR}/.metadata)")
    reader, planner = safe_dcp_reader(where, trust, _EmptyStateDictLoadPlanner)
    state: dict = {}
    try:
        _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=True)
    except BaseException as e:  # DCP wraps a refusal in CheckpointException (a BaseException)
        refused = find_in_chain(e, UnsafeCheckpointError)
        if refused is None:
            raise
        raise refused from None
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
