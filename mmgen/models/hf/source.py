# The initial value of every mmgen parameter of a run started from a Hugging Face model, by row range.
""":class:`PretrainedSource` answers "rows ``a:b`` of parameter ``name``" for any parameter of the
plain model: trunk rows from the HF safetensors (read row range by row range, never a whole
file), extra vocabulary rows (mmgen's specials) and the multimodal parts initialised fresh. A
backend that shards on dim 0 (FSDP2) asks for its own rows, ZeRO-3 for the rows around its flat
partition, DDP for everything: every layout gets the same values.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn

from mmgen.models.hf.adapter import PretrainedMap
from mmgen.models.hf.config import read_hf_config
from mmgen.models.hf.weights import HFWeights

log = logging.getLogger(__name__)
_MEAN_CHUNK = 8192  # rows read at a time for the mean embedding


class PretrainedSource:
    """Initial values of a plain mmgen model's parameters from HF directory ``path``.

    Args:
        model: the plain model (meta device is fine: only names, shapes and ``init_weights``
            are used), before any backend transforms it.
        path: the Hugging Face model directory.
        seed: seeds the fresh parts' initialisation (``trainer.seed``).

    Attributes:
        map: the checked :class:`PretrainedMap` (missing/unexpected keys and shape mismatches
            raise ValueError at construction).
    """

    def __init__(self, model: nn.Module, path: str, seed: int):
        self.path, self.seed = str(path), seed
        self.weights = HFWeights(path)
        shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}
        self.shapes = shapes
        hf_shapes = {k: self.weights.shape(k) for k in self.weights.keys()}
        tied_hf = bool(read_hf_config(path).get("tie_word_embeddings", False))
        self.map = PretrainedMap.build(shapes, hf_shapes, self.path, tied_hf=tied_hf)
        self._reference = copy.deepcopy(model).to("meta")
        self._fresh: dict[str, torch.Tensor] | None = None
        self._extra: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------ what is fresh
    def fresh_summary(self) -> str:
        """One line: every fresh module and the extra vocabulary rows."""
        parts = list(self.map.fresh_modules())
        for key, n in self.map.hf_rows.items():
            if n < self.shapes[key][0]:
                parts.append(f"{key.split('.')[0]} rows {n}:{self.shapes[key][0]}")
        return ", ".join(parts) or "nothing"

    def _fresh_values(self) -> dict[str, torch.Tensor]:
        """The fresh parameters (and every buffer), initialised by the model's own
        ``init_weights`` on a copy whose pretrained parts stay on the meta device (no memory, no
        random numbers drawn for them), so the values are the same on every rank and under
        every layout. A top-level module with only fresh parameters is materialised whole;
        inside one that is partly pretrained (the trunk of an MoE, whose routers are fresh)
        only the modules that own fresh parameters or buffers are, so a rank never holds a
        full copy of the pretrained trunk."""
        if self._fresh is None:
            ref = self._reference
            fresh = set(self.map.fresh)
            tops = {name for name, module in ref.named_children()
                    if (keys := [f"{name}.{k}" for k, _ in module.named_parameters()]) and fresh.issuperset(keys)}
            owners = {k.rsplit(".", 1)[0] for k in fresh} | {k.rsplit(".", 1)[0] for k, _ in ref.named_buffers()}
            for name, module in ref.named_modules():
                if (name and name.split(".")[0] in tops) or name in owners:
                    module.to_empty(device="cpu", recurse=False)
            torch.manual_seed(self.seed)
            with torch.no_grad():
                ref.init_weights()
            params = dict(ref.named_parameters())
            self._fresh = {k: params[k].detach().clone() for k in self.map.fresh}
            self.buffers = {k: b.detach().clone() for k, b in ref.named_buffers()}
            self._reference = None
        return self._fresh

    def _extra_rows(self, key: str) -> torch.Tensor:
        """Rows of mmgen's specials above the HF vocabulary: the mean pretrained row (new tokens
        start where the model's average token is, rather than far from every trained row)."""
        if key not in self._extra:
            hf_key, n = self.map.source[key], self.map.hf_rows[key]
            total = torch.zeros(self.shapes[key][1:], dtype=torch.float64)
            for start in range(0, n, _MEAN_CHUNK):
                total += self.weights.rows(hf_key, start, min(start + _MEAN_CHUNK, n)).double().sum(0)
            extra = self.shapes[key][0] - n
            self._extra[key] = (total / n).float().expand(extra, *self.shapes[key][1:]).clone()
        return self._extra[key]

    # ------------------------------------------------------------ values
    def rows(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` (dim 0) of parameter ``key``'s initial value (fp32 or the file's
        dtype; the caller casts)."""
        shape = self.shapes[key]
        stop = shape[0] if stop is None else stop
        if not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"rows {start}:{stop} outside {key} {list(shape)}")
        if key not in self.map.source:
            return self._fresh_values()[key][start:stop]
        hf_key = self.map.source[key]
        if key in self.map.experts:   # experts start:stop, each the HF matrix transposed (upcycling)
            t = self.weights.tensor(hf_key).t()
            return t.unsqueeze(0).expand(stop - start, *t.shape).contiguous()
        n = self.map.hf_rows.get(key, shape[0])
        parts = []
        if start < n:
            parts.append(self.weights.rows(hf_key, start, min(stop, n)))
        if stop > n:
            extra = self._extra_rows(key)
            parts.append(extra[max(start, n) - n:stop - n].to(parts[0].dtype if parts else extra.dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``start:stop`` of parameter ``key`` flattened (a ZeRO-3 partition), reading
        only the rows they span."""
        shape = self.shapes[key]
        row = 1
        for s in shape[1:]:
            row *= s
        first, last = start // row, -(-stop // row)
        block = self.rows(key, first, last).reshape(-1)
        return block[start - first * row:stop - first * row]

    def buffer(self, key: str) -> torch.Tensor:
        """The initial value of buffer ``key`` (e.g. an MoE router's ``expert_bias``): buffers
        are never in the HF files, and no backend shards them."""
        self._fresh_values()
        return self.buffers[key]

    @torch.no_grad()
    def load_into(self, module: nn.Module) -> None:
        """Fill a materialised, unsharded plain model (every parameter whole, every buffer)."""
        for key, p in module.named_parameters():
            p.copy_(self.rows(key).to(p.dtype))
        for key, b in module.named_buffers():
            b.copy_(self.buffer(key).to(b.dtype))
