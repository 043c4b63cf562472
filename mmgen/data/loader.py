# The data loader: runs the stages in workers, and owns the exact-resume cursor of every worker.
"""``build_dataloader`` -> ``MultimodalLoader``: an infinite iterator of packed
``MultimodalBatch`` with ``state_dict()`` / ``load_state_dict()`` / ``stats()``.

How resume stays exact (README.md, "Resume"):

* A *logical worker* w in 0..W-1 (W = max(1, num_workers)) reads a fixed sub-stream: in every
  epoch its shards are ``worker_shards(..., rank, world_size, w, W)``, in its permuted sample order.
* Its cursor is (epoch, shard index, sample offset) of the first sample **not in any emitted
  batch**; every batch carries its worker's cursor and counters in ``meta["data_state"]``.
* DataLoader hands out batches from workers 0, 1, ..., W-1 in turn. After C consumed batches the
  next one is due from logical worker C % W, so on resume DataLoader worker j plays logical
  worker (j + C) % W: the batch sequence continues exactly as if never interrupted.
"""
from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmgen.data import decode as dec
from mmgen.data.batch import MultimodalBatch
from mmgen.data.config import DataConfig
from mmgen.data.pack import BatchPacker, Document, build_document, choose_task, collate
from mmgen.data.sources import (check_split, expand_shards, read_shard, sample_order,
                                shard_fingerprint, worker_shards)

log = logging.getLogger(__name__)

STATE_VERSION = 1


def _initial_cursor() -> dict:
    return {"epoch": 0, "shard": 0, "offset": 0}


@dataclass
class _Split:
    """Who reads what: everything a worker needs to compute its shard lists."""
    shards: list[str]
    seed: int
    rank: int
    world_size: int
    num_workers: int       # logical workers (>= 1)

    def shards_for(self, worker: int, epoch: int) -> list[str]:
        return worker_shards(self.shards, self.seed, epoch, self.rank, self.world_size,
                             worker, self.num_workers)


# ----------------------------------------------------------------------------------------------
# One logical worker's stream: shards -> samples -> decode -> documents
# ----------------------------------------------------------------------------------------------

class _DocumentStream:
    """Documents of one logical worker from a cursor on, forever. Alongside each document it
    yields the cursor and counters as they were *before* that document's sample was read, which
    is what a batch that stops just before the document must record."""

    def __init__(self, cfg: DataConfig, tokenizer, split: _Split, worker: int, cursor: dict,
                 counters: dict):
        self.cfg, self.tokenizer, self.split, self.worker = cfg, tokenizer, split, worker
        self.cursor = dict(cursor)
        self.skips = dec.SkipLog()
        self.skips.counts.update(counters.get("skipped", {}))
        self.samples_read = int(counters.get("samples_read", 0))

    def counters(self) -> dict:
        return {"samples_read": self.samples_read, "skipped": dict(self.skips.counts)}

    def __iter__(self) -> Iterator[tuple[Document, dict, dict]]:
        epoch, first, offset = (self.cursor[k] for k in ("epoch", "shard", "offset"))
        while True:
            shards = self.split.shards_for(self.worker, epoch)
            whole_epoch, found = (first, offset) == (0, 0), False
            for shard_idx in range(first, len(shards)):
                for item in self._shard(shards[shard_idx], epoch, shard_idx, offset):
                    found = True
                    yield item
                offset = 0
            if whole_epoch and not found:  # otherwise an all-bad shard set would spin forever
                raise RuntimeError(f"data: worker {self.worker} found no usable sample in a whole "
                                   f"epoch of its shards {shards}; see the skip log above")
            epoch, first = epoch + 1, 0

    def _shard(self, path: str, epoch: int, shard_idx: int, offset: int):
        raw, error = read_shard(path)
        order = sample_order(len(raw), self.cfg.shuffle_samples, self.cfg.seed, epoch, path)
        for k in range(offset, len(order)):
            before = ({"epoch": epoch, "shard": shard_idx, "offset": k}, self.counters())
            doc = self._document(raw[order[k]], path)
            if doc is not None:
                yield doc, *before
        if error is not None:  # the samples before the damage were used; the rest are lost
            self.skips.skip(dec.SHARD_ERROR, path, "-", error)

    def _document(self, raw: dict, path: str) -> Document | None:
        self.samples_read += 1
        key = raw.get("__key__", "?")
        out = dec.decode_sample(raw, self.cfg.image_size)
        if isinstance(out, tuple):
            self.skips.skip(out[0], path, key, out[1])
            return None
        cfg = self.cfg
        task, dropped = choose_task(cfg.seed, key, cfg.t2i_ratio, cfg.caption_dropout)
        doc = build_document(out, task, dropped, self.tokenizer, cfg.patch_size)
        if len(doc) > cfg.seq_len:
            self.skips.skip(dec.TOO_LONG, path, key, f"{len(doc)} > seq_len {cfg.seq_len}")
            return None
        return doc


# ----------------------------------------------------------------------------------------------
# The IterableDataset run inside each DataLoader worker (or the main process)
# ----------------------------------------------------------------------------------------------

class PackedBatchDataset(IterableDataset):
    """Yields packed batches of one logical worker. ``start`` holds every logical worker's
    cursor and counters; ``role_offset`` rotates DataLoader worker ids onto logical workers."""

    def __init__(self, cfg: DataConfig, tokenizer, split: _Split):
        self.cfg, self.tokenizer, self.split = cfg, tokenizer, split
        self.start: list[dict] = [{"cursor": _initial_cursor(), "counters": {}}
                                  for _ in range(split.num_workers)]
        self.role_offset = 0

    def _logical_worker(self) -> int:
        info = get_worker_info()
        physical, count = (info.id, info.num_workers) if info else (0, 1)
        if count != self.split.num_workers:
            raise RuntimeError(f"data: DataLoader has {count} workers, split expects "
                               f"{self.split.num_workers}")
        return (physical + self.role_offset) % count

    def __iter__(self) -> Iterator[MultimodalBatch]:
        worker = self._logical_worker()
        start = self.start[worker]
        stream = _DocumentStream(self.cfg, self.tokenizer, self.split, worker, start["cursor"],
                                 start["counters"])
        packer = BatchPacker(self.cfg.batch_size, self.cfg.seq_len)
        patch_dim = self.cfg.patch_size**2 * 3
        for doc, cursor, counters in stream:
            if packer.add(doc):
                continue
            # `doc` starts the next batch: it is the first document not in this one
            batch = packer.build(self.tokenizer.pad, patch_dim)
            batch.meta["data_state"] = {"worker": worker, "cursor": cursor, "counters": counters}
            yield batch
            packer = BatchPacker(self.cfg.batch_size, self.cfg.seq_len)
            packer.add(doc)


# ----------------------------------------------------------------------------------------------
# The loader the trainer holds
# ----------------------------------------------------------------------------------------------

class MultimodalLoader:
    """Infinite iterator of ``MultimodalBatch`` for one rank, with exact-resume state.

    Each ``iter()`` continues after the last batch this object yielded (batches prefetched but
    never yielded are discarded and re-made), so ``load_state_dict`` may be called between
    iterations, never during one.
    """

    def __init__(self, cfg: DataConfig, tokenizer, split: _Split, pattern: str, split_name: str):
        self.cfg, self.tokenizer, self.split = cfg, tokenizer, split
        self.pattern, self.split_name = pattern, split_name
        self.dataset = PackedBatchDataset(cfg, tokenizer, split)
        self._workers = copy.deepcopy(self.dataset.start)
        self._consumed = 0
        self._totals: Counter[str] = Counter()

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[MultimodalBatch]:
        self.dataset.start = copy.deepcopy(self._workers)
        self.dataset.role_offset = self._consumed % self.split.num_workers
        for batch in self._dataloader():
            self._record(batch)
            yield batch

    def _dataloader(self):
        if self.cfg.num_workers == 0:
            return iter(self.dataset)
        return iter(DataLoader(self.dataset, batch_size=None, collate_fn=collate,
                               num_workers=self.cfg.num_workers,
                               prefetch_factor=self.cfg.prefetch_factor))

    def _record(self, batch: MultimodalBatch) -> None:
        state = batch.meta["data_state"]
        expected = self._consumed % self.split.num_workers
        if state["worker"] != expected:  # would mean DataLoader's round-robin assumption broke
            raise RuntimeError(f"data: batch from logical worker {state['worker']}, "
                               f"expected {expected}")
        self._workers[expected] = {"cursor": state["cursor"], "counters": state["counters"]}
        self._consumed += 1
        self._totals["documents"] += len(batch.meta["key"])
        self._totals["positions"] += batch.document_ids.numel()
        self._totals["padding"] += int((batch.document_ids < 0).sum())

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain JSON-serialisable dict (see README.md, "State dict")."""
        return {
            "version": STATE_VERSION, "split": self.split_name, "rank": self.split.rank,
            "world_size": self.split.world_size, "num_workers": self.split.num_workers,
            "seed": self.cfg.seed, "num_shards": len(self.split.shards),
            "shards_fingerprint": shard_fingerprint(self.split.shards),
            "batches": self._consumed, "totals": dict(self._totals),
            "workers": copy.deepcopy(self._workers),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for k in ("version", "split", "rank", "world_size", "num_workers", "seed", "num_shards",
                  "shards_fingerprint"):
            if state.get(k) != mine[k]:
                raise ValueError(f"data: cannot resume: state has {k}={state.get(k)!r}, this "
                                 f"loader has {mine[k]!r} (re-splitting a stream is not supported)")
        self._workers = copy.deepcopy(state["workers"])
        self._consumed = int(state["batches"])
        self._totals = Counter(state.get("totals", {}))

    def stats(self) -> dict:
        """Counters since the start of training (restored on resume): samples read and skipped
        (by reason) as of the consumed batches, documents and batches consumed, padding."""
        skipped: Counter[str] = Counter()
        for w in self._workers:
            skipped.update(w["counters"].get("skipped", {}))
        positions = self._totals["positions"]
        return {
            "samples_read": sum(w["counters"].get("samples_read", 0) for w in self._workers),
            "skipped": dict(skipped), "skipped_total": sum(skipped.values()),
            "batches": self._consumed, "documents": self._totals["documents"],
            "padding_fraction": self._totals["padding"] / positions if positions else 0.0,
            "epoch": max(w["cursor"]["epoch"] for w in self._workers),
        }


def build_dataloader(cfg: DataConfig, tokenizer, rank: int, world_size: int,
                     split: str = "train") -> MultimodalLoader:
    """The packed-batch loader of one rank.

    Args:
        cfg: the data config (validated here).
        tokenizer: text tokenizer (``pad``, ``bos``, ``eos``, ``boi``, ``eoi``, ``visual``,
            ``encode``), e.g. ``mmgen.models.tokenizers.text.ByteTokenizer``.
        rank, world_size: this rank among the data-parallel ranks that read distinct data.
        split: "train" or "val" (selects ``train_shards`` / ``val_shards``).
    """
    cfg.validate()
    if split not in ("train", "val"):
        raise ValueError(f"data: split must be 'train' or 'val', got {split!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"data: rank {rank} outside world_size {world_size}")
    pattern = cfg.train_shards if split == "train" else cfg.val_shards
    shards = expand_shards(pattern)
    num_workers = max(1, cfg.num_workers)
    check_split(shards, pattern, world_size, num_workers)
    return MultimodalLoader(cfg, tokenizer, _Split(shards, cfg.seed, rank, world_size, num_workers),
                            pattern, split)


# ----------------------------------------------------------------------------------------------
# Evaluation: decoded held-out samples, no packing
# ----------------------------------------------------------------------------------------------

def iter_eval_samples(shards: str, image_size: int, limit: int | None = None
                      ) -> Iterator[tuple[str, np.ndarray, str, dict]]:
    """``(key, image [S, S, 3] uint8, caption, json dict)`` in a fixed order (sorted shards, tar
    order), skipping (and logging) unusable samples, at most ``limit`` of them."""
    count, skips = 0, dec.SkipLog()
    for path in expand_shards(shards):
        raw, error = read_shard(path)
        for r in raw:
            if limit is not None and count >= limit:
                return
            out = dec.decode_sample(r, image_size, want_info=True)
            if isinstance(out, tuple):
                skips.skip(out[0], path, r.get("__key__", "?"), out[1])
                continue
            count += 1
            yield out.key, out.image, out.caption, out.info
        if error is not None:
            skips.skip(dec.SHARD_ERROR, path, "-", error)
