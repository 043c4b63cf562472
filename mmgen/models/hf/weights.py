# Tensor-by-tensor reading of a Hugging Face model's safetensors (one file, or sharded with an index).
from __future__ import annotations

import json
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFWeights:
    """The tensors of a Hugging Face model directory, read lazily.

    Nothing is loaded at construction: only the headers (names, shapes, dtypes). :meth:`rows`
    reads a range of rows of one tensor through ``safe_open(...).get_slice``, so a rank that
    holds one shard of a parameter reads only that shard from disk.

    Args:
        path: the directory (``model.safetensors``, or ``model.safetensors.index.json`` and
            the files its ``weight_map`` names).
    """

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: no weight_map")
        elif (self.path / SINGLE).is_file():
            weight_map = None
        else:
            raise FileNotFoundError(f"{self.path}: no {SINGLE} or {INDEX} (only safetensors weights are read)")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        self._handles = {}
        self.file_of: dict[str, str] = {}
        for name in files:
            f = self.path / name
            if not f.is_file():
                raise FileNotFoundError(f"{index}: names {name}, which is not in {self.path}")
            self._handles[name] = safe_open(str(f), framework="pt", device="cpu")
            for key in self._handles[name].keys():
                self.file_of[key] = name
        if weight_map:
            ghosts = sorted(k for k, f in weight_map.items() if self.file_of.get(k) != f)
            if ghosts:
                raise ValueError(f"{index}: names {len(ghosts)} tensor(s) not in the file it gives, "
                                 f"e.g. '{ghosts[0]}' ({weight_map[ghosts[0]]})")

    def keys(self) -> list[str]:
        return sorted(self.file_of)

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[key]].get_slice(key).get_shape())

    def rows(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` (dim 0) of tensor ``key``; a 0-d tensor whole."""
        sl = self._handles[self.file_of[key]].get_slice(key)
        if not sl.get_shape():
            return self._handles[self.file_of[key]].get_tensor(key)
        stop = sl.get_shape()[0] if stop is None else stop
        return sl[start:stop]

    def tensor(self, key: str) -> torch.Tensor:
        return self._handles[self.file_of[key]].get_tensor(key)
