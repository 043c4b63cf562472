# The backend registry: `parallel.name` -> the module that parallelizes the model and builds its engine.
"""A backend is a module with two functions:

* ``parallelize(model, cfg, ctx, *, compile)``: in place, on the meta-device plain model, in
  DESIGN.md 6's order (see :mod:`mmgen.parallel.parallelize`);
* ``build_engine(model, cfg, optim, ctx) -> Engine``: on the materialised, initialised model;

and one for export without a process group:

* ``checkpoint_state_dict(ckpt, trust=False) -> dict``: the plain-model weights of a checkpoint
  it wrote, unpickling nothing unless ``trust`` (mmgen.safe_load).

Modules are imported only when chosen, so ``import mmgen.parallel`` never imports deepspeed.
Adding a backend is one entry here plus its module.
"""
from __future__ import annotations

import importlib
from types import ModuleType

BACKENDS: dict[str, str] = {
    "ddp": "mmgen.parallel.ddp",
    "fsdp2": "mmgen.parallel.fsdp",
    # the ZeRO stages are backend names (see config.py): one module, the stage from the name
    "zero1": "mmgen.parallel.deepspeed",
    "zero2": "mmgen.parallel.deepspeed",
    "zero3": "mmgen.parallel.deepspeed",
    "megatron": "mmgen.parallel.megatron",
}


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"parallel.name='{name}' is not a backend (available: {', '.join(BACKENDS)})")
    return name


def get_backend(name: str) -> ModuleType:
    """The module implementing backend ``name`` (ValueError naming the choices if unknown)."""
    return importlib.import_module(BACKENDS[check_backend(name)])
