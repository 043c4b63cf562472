# The data package: batch contract, patch helpers, and the shard -> packed-batch pipeline.
"""Import ``DataConfig`` cheaply; the loader (webdataset, Pillow, DataLoader) is imported on first
use, so model code importing ``mmgen.batch`` does not pull the data stack (absent on some
GPU images). Stages and resume rules: ``mmgen/data/README.md``.
"""
from __future__ import annotations

import importlib

from mmgen.data.config import DataConfig, SourceConfig

_LAZY = {
    "build_dataloader": "mmgen.data.factory",
    "iter_eval_samples": "mmgen.data.factory",
    "iter_eval_clips": "mmgen.data.factory",
    "MultimodalLoader": "mmgen.data.loader",
    "expand_shards": "mmgen.data.sources",
    "collate": "mmgen.data.pack",
    "load_recipe": "mmgen.data.tools.recipes",
}

__all__ = ["DataConfig", "SourceConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmgen.data' has no attribute {name!r}")
