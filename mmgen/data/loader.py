# The data loader: runs the stages in workers, mixes sources, and owns every worker's resume state.
"""``build_dataloader`` -> ``MultimodalLoader``: an infinite iterator of packed
``MultimodalBatch`` with ``state_dict()`` / ``load_state_dict()`` / ``stats()``.

How resume stays exact (README.md, "Resume"):

* A *logical worker* w in 0..W-1 (W = max(1, num_workers)) of stream s (of S streams) is
  reader ``g = s + S * w`` of ``R = S * W``. A stream is a rank's sequence of micro-batches:
  with ``grad_accum`` A > 1 a rank reads A streams (``streams.AccumLoader``); saved states
  keep the v1 keys ``rank``/``world_size`` for the stream index and the number of streams.
  Names: a *stream* is such a micro-batch sequence, a *reader* (``_SourceReader``) reads one
  source for one logical worker, a *mixer* (``_WorkerMixer``) mixes a worker's readers. For
  every source a reader reads a fixed sub-sequence: in each epoch the items ``epoch_items(shards, seed, epoch, g, R)``, each in its
  permuted sample order.
* Its state is, per source, a cursor (epoch, item index, sample offset) of the first sample
  **not in any emitted batch**, plus the mixing generator's state before the draw of that
  document; every batch carries its worker's state in ``meta["data_state"]``.
* DataLoader hands out batches from workers 0, 1, ..., W-1 in turn. The main process tracks
  which logical worker is due next (``rotation``), so on resume DataLoader worker j plays logical
  worker (j + rotation) % W: the batch sequence continues exactly as if never interrupted.
"""
from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmgen.data import decode as dec
from mmgen.batch import MultimodalBatch
from mmgen.data.config import PAIR, VIDEO, DataConfig
from mmgen.data.latents import decode_cached_sample
from mmgen.data.mixing import Mixer
from mmgen.data.pack import (BatchPacker, Document, DocumentCost, build_document,
                             build_interleaved_document, build_video_document, choose_task,
                             collate)
from mmgen.data.resume import (STATE_VERSION, check_compatible, check_rank_set,
                               fresh_source_state, resplit, upgrade)
from mmgen.errors import DataUnavailableError
from mmgen.data.remote import ShardUnavailable, is_remote, shard_name
from mmgen.data.remote_shards import open_remote_shard
from mmgen.data.sources import (ShardFile, epoch_items, reader_index,
                                sample_order, shard_fingerprint)
from mmgen.data.stats import loader_stats

log = logging.getLogger(__name__)


@dataclass
class _Source:
    name: str
    type: str
    pattern: str
    shards: list[str]
    cached: bool = False      # latent shards of `mmgen data encode` (data/latents.py)

    @property
    def names(self) -> list[str]:
        return [shard_name(s) for s in self.shards]   # local or remote: the same file names


@dataclass
class _Layout:
    """Who reads: this data stream (a rank's micro-batch sequence; = the data-parallel rank
    unless grad_accum > 1), the number of streams and of logical workers per stream. (Saved
    states keep the v1 keys "rank" / "world_size" for the stream and the number of streams.)"""
    stream: int
    num_streams: int
    num_workers: int       # logical workers (>= 1)

    @property
    def num_readers(self) -> int:
        return self.num_streams * self.num_workers

    def reader(self, worker: int) -> int:
        return reader_index(self.stream, self.num_streams, worker)


def shard_cache(cfg: DataConfig):
    """The node's shard cache (``data.remote.cache_dir``), or None."""
    if not cfg.remote.cache_dir:
        return None
    from mmgen.data.cache import ShardCache

    return ShardCache.shared(cfg.remote.cache_dir, int(cfg.remote.cache_max_gb * 2**30))


def _fresh_worker_state(sources: list[_Source]) -> dict:
    return {"mix": None, "sources": {s.name: fresh_source_state() for s in sources}}


# ----------------------------------------------------------------------------------------------
# One source's documents for one logical worker, with an explicit state
# ----------------------------------------------------------------------------------------------

class _SourceReader:
    """Stages 2-8 for one (source, logical worker): items -> samples -> decode -> documents.

    ``state()`` is always "the next sample to read, and the counters so far", so a snapshot taken
    before ``next_doc()`` is where a batch that stops before that document must resume.
    """

    def __init__(self, cfg: DataConfig, tokenizer, source: _Source, layout: _Layout, worker: int,
                 state: dict, single: bool):
        self.cfg, self.tok, self.src = cfg, tokenizer, source
        # the workers' codec on raw images (pixel patches under encode_on=device); cached
        # latents are read through the configured codec itself
        self.codec = cfg.worker_codec()
        self.latent_codec = cfg.visual_codec()
        self.reader, self.num_readers = layout.reader(worker), layout.num_readers
        self.names = source.names
        self.cursor = dict(state["cursor"])
        self.plan = state.get("plan")            # never mutated: snapshots share it
        counters = state.get("counters", {})
        self.samples_read = int(counters.get("samples_read", 0))
        self.images_dropped = int(counters.get("images_dropped", 0))
        self.truncated = int(counters.get("truncated", 0))
        self.skips = dec.SkipLog()
        self.skips.counts.update(counters.get("skipped", {}))
        self.hash_key = (lambda k: k) if single else (lambda k: f"{source.name}/{k}")
        self._items: tuple[int, list] | None = None
        self._file: tuple[int, ShardFile] | None = None
        self._order: tuple[tuple, list[int]] | None = None
        # empty-epoch detection (only for epochs this object starts from their beginning)
        self._epoch_fresh = self.plan is None and (self.cursor["shard"], self.cursor["offset"]) == (0, 0)
        self._epoch_reads = self._epoch_docs = self._empty_epochs = 0
        self._failures_in_a_row = 0              # unreachable remote shards, reset by a read

    def counters(self) -> dict:
        out = {"samples_read": self.samples_read, "skipped": dict(self.skips.counts)}
        if self.images_dropped:
            out["images_dropped"] = self.images_dropped
        if self.truncated:
            out["truncated"] = self.truncated
        return out

    def state(self) -> dict:
        return {"cursor": dict(self.cursor), "plan": self.plan, "counters": self.counters()}

    # -- where the cursor points ------------------------------------------------------------------
    def _epoch_items(self, epoch: int) -> list:
        if self._items is None or self._items[0] != epoch:
            self._items = (epoch, epoch_items(self.names, self.cfg.seed, epoch, self.reader,
                                              self.num_readers))
        return self._items[1]

    def _item(self) -> tuple[int, int, int, int]:
        """(epoch, shard, slot, stride) at the cursor, moving past finished plans and epochs."""
        while True:
            if self.plan is not None:
                items = self.plan["items"]
                if self.cursor["shard"] < len(items):
                    e, s, slot, stride, _ = items[self.cursor["shard"]]
                    return e, s, slot, stride
                self.cursor = {"epoch": int(self.plan["next_epoch"]), "shard": 0, "offset": 0}
                self.plan = None
                self._new_epoch()
                continue
            e = self.cursor["epoch"]
            items = self._epoch_items(e)
            if self.cursor["shard"] < len(items):
                return (e, *items[self.cursor["shard"]])
            self._end_epoch(e)
            self.cursor = {"epoch": e + 1, "shard": 0, "offset": 0}
            self._new_epoch()

    def _new_epoch(self) -> None:
        self._epoch_fresh, self._epoch_reads, self._epoch_docs = True, 0, 0

    def _end_epoch(self, epoch: int) -> None:
        """Refuse to spin forever on a source that cannot give this reader a document."""
        if not self._epoch_fresh or self._epoch_docs:
            self._empty_epochs = 0
            return
        where = (f"source {self.src.name!r} ({len(self.names)} shards, pattern "
                 f"'{self.src.pattern}'), reader {self.reader} of {self.num_readers}")
        if self._epoch_reads:
            raise RuntimeError(f"data: no usable sample in a whole epoch ({epoch}) of {where}; "
                               f"see the skip log above")
        self._empty_epochs += 1
        if self._empty_epochs > len(self.names):
            raise RuntimeError(f"data: {self._empty_epochs} epochs in a row without a sample for "
                               f"{where}: the source has fewer samples than readers")

    def _advance(self) -> None:
        self.cursor["shard"] += 1
        items = self.plan["items"] if self.plan is not None else None
        in_plan = items is not None and self.cursor["shard"] < len(items)
        self.cursor["offset"] = int(items[self.cursor["shard"]][4]) if in_plan else 0

    def _shard_file(self, shard: int, stride: int = 1) -> ShardFile:
        if self._file is None or self._file[0] != shard:
            if self._file is not None:
                self._file[1].close()
            self._file = None
            path = self.src.shards[shard]
            if is_remote(path):
                # byte ranges pay only when part of the shard is read; whole ones are spooled
                partial = stride > 1 or self.cursor["offset"] > 0
                sf = open_remote_shard(path, self.cfg.remote, shard_cache(self.cfg), partial)
            else:
                sf = ShardFile(path)
            self._file = (shard, sf)
        return self._file[1]

    def _unreachable(self, exn: ShardUnavailable) -> None:
        """A remote shard failed after its retries: skip it for this epoch (counted, logged with
        its URL); the stream goes on with the next shard, so every rank still yields its
        batches. Too many in a row means the store is down: one clear error."""
        self.skips.skip(dec.UNREACHABLE_SHARD, exn.url, "-", exn.reason)
        self._failures_in_a_row += 1
        limit = self.cfg.remote.max_consecutive_failures
        if limit and self._failures_in_a_row >= limit:
            raise DataUnavailableError(
                f"data: {self._failures_in_a_row} shards in a row unreachable for source "
                f"{self.src.name!r} (last: {exn.url}: {exn.reason}); check the store and the "
                f"network, or raise data.remote.max_consecutive_failures ({limit})")

    def _sub_order(self, epoch: int, shard: int, slot: int, stride: int, sf: ShardFile) -> list[int]:
        key = (epoch, shard, slot, stride)
        if self._order is None or self._order[0] != key:
            order = sample_order(len(sf), self.cfg.shuffle_samples, self.cfg.seed, epoch, sf.path)
            self._order = (key, order[slot::stride])
        return self._order[1]

    # -- documents --------------------------------------------------------------------------------
    def next_doc(self) -> Document:
        while True:
            epoch, shard, slot, stride = self._item()
            try:
                sf = self._shard_file(shard, stride)
            except ShardUnavailable as exn:
                self._unreachable(exn)
                self._advance()
                continue
            order = self._sub_order(epoch, shard, slot, stride, sf)
            k = self.cursor["offset"]
            if k >= len(order):
                if sf.error is not None and slot == 0:   # the samples before the damage were used
                    self.skips.skip(dec.SHARD_ERROR, sf.path, "-", sf.error)
                self._advance()
                continue
            self.cursor["offset"] = k + 1
            self.samples_read += 1
            self._epoch_reads += 1
            if hasattr(sf, "prefetch"):   # remote byte ranges: keep the next reads in flight
                sf.prefetch(order[k + 1:k + 1 + self.cfg.remote.read_ahead])
            try:
                raw = sf.load(order[k])
                self._failures_in_a_row = 0
            except ShardUnavailable as exn:   # a remote read failed after its retries
                self._unreachable(exn)
                self.cursor["offset"] = len(order)
                continue
            except OSError as exn:   # the file changed or vanished: lose the rest of this shard
                self.skips.skip(dec.SHARD_ERROR, sf.path, "-", str(exn))
                self.cursor["offset"] = len(order)
                continue
            doc = self._document(raw, sf.path)
            if doc is not None:
                self._epoch_docs += 1
                doc.meta["epoch"] = epoch
                return doc

    def _document(self, raw: dict, path: str) -> Document | None:
        cfg, tok, name = self.cfg, self.tok, self.src.name
        key = raw.get("__key__", "?")
        hkey = self.hash_key(key)
        if self.src.type == PAIR:
            if self.src.cached:
                out = decode_cached_sample(raw, self.latent_codec, self.codec.payload_dim)
            else:
                out = dec.decode_sample(raw, cfg.image_size)
            if not isinstance(out, tuple):
                task, dropped = choose_task(cfg.seed, hkey, cfg.t2i_ratio, cfg.caption_dropout)
                codec = self.latent_codec if self.src.cached else self.codec
                doc = build_document(out, task, dropped, tok, codec, name, PAIR)
        elif self.src.type == VIDEO:
            out = dec.decode_video_sample(raw, cfg.frame_size, cfg.video_frames, cfg.video_fps,
                                          cfg.video_clip_start, cfg.seed, hkey)
            if not isinstance(out, tuple):
                task, dropped = choose_task(cfg.seed, hkey, cfg.t2i_ratio, cfg.caption_dropout)
                doc = build_video_document(out, task, dropped, tok, self.codec, name)
        else:
            out = dec.decode_interleaved(raw, cfg.image_size, cfg.max_images_per_doc)
            if not isinstance(out, tuple):
                self.images_dropped += out.images_dropped
                doc = build_interleaved_document(out, cfg.seed, cfg.t2i_ratio, tok, self.codec,
                                                 cfg.seq_len, name, cfg.interleaved_targets)
                self.truncated += bool(doc.meta["truncated"])
        if isinstance(out, tuple):
            self.skips.skip(out[0], path, key, out[1])
            return None
        if len(doc) > cfg.seq_len:
            self.skips.skip(dec.TOO_LONG, path, key, f"{len(doc)} > seq_len {cfg.seq_len}")
            return None
        return doc


class _WorkerMixer:
    """All sources of one logical worker, mixed per document by the worker's own generator."""

    def __init__(self, cfg: DataConfig, tokenizer, sources: list[_Source], weights: dict,
                 layout: _Layout, worker: int, state: dict, resplits: int):
        single = len(sources) == 1
        self.readers = {s.name: _SourceReader(cfg, tokenizer, s, layout, worker,
                                              state["sources"].get(s.name) or fresh_source_state(),
                                              single)
                        for s in sources}
        self.mixer = Mixer(weights, (cfg.seed, layout.stream, layout.num_streams, worker, resplits),
                           state.get("mix"))

    def state(self) -> dict:
        return {"mix": self.mixer.state(),
                "sources": {n: s.state() for n, s in self.readers.items()}}

    def next_doc(self) -> Document:
        return self.readers[self.mixer.choose()].next_doc()


# ----------------------------------------------------------------------------------------------
# The IterableDataset run inside each DataLoader worker (or the main process)
# ----------------------------------------------------------------------------------------------

class PackedBatchDataset(IterableDataset):
    """Yields packed batches of one logical worker. ``start`` holds every logical worker's
    state; ``role_offset`` rotates DataLoader worker ids onto logical workers."""

    def __init__(self, cfg: DataConfig, tokenizer, sources: list[_Source], weights: dict,
                 layout: _Layout, cost: DocumentCost | None = None):
        self.cfg, self.tokenizer, self.sources, self.weights = cfg, tokenizer, sources, weights
        self.layout, self.cost = layout, cost
        self.start: list[dict] = [_fresh_worker_state(sources) for _ in range(layout.num_workers)]
        self.role_offset = 0
        self.resplits = 0

    def _logical_worker(self) -> int:
        info = get_worker_info()
        physical, count = (info.id, info.num_workers) if info else (0, 1)
        if count != self.layout.num_workers:
            raise RuntimeError(f"data: DataLoader has {count} workers, the layout expects "
                               f"{self.layout.num_workers}")
        return (physical + self.role_offset) % count

    def __iter__(self) -> Iterator[MultimodalBatch]:
        worker = self._logical_worker()
        mixer = _WorkerMixer(self.cfg, self.tokenizer, self.sources, self.weights, self.layout,
                              worker, self.start[worker], self.resplits)
        packer = BatchPacker(self.cfg.batch_size, self.cfg.seq_len, self.cost)
        payload_dim = self.cfg.worker_codec().payload_dim
        while True:
            before = mixer.state()
            doc = mixer.next_doc()
            if packer.add(doc):
                continue
            # `doc` starts the next batch: it is the first document not in this one
            batch = packer.build(self.tokenizer.pad, payload_dim)
            batch.meta["data_state"] = {"worker": worker, "state": before}
            yield batch
            packer = BatchPacker(self.cfg.batch_size, self.cfg.seq_len, self.cost)
            packer.add(doc)


# ----------------------------------------------------------------------------------------------
# The loader the trainer holds
# ----------------------------------------------------------------------------------------------

class MultimodalLoader:
    """Infinite iterator of ``MultimodalBatch`` for one rank, with exact-resume state.

    Each ``iter()`` continues after the last batch this object yielded (batches prefetched but
    never yielded are discarded and re-made), so ``load_state_dict`` may be called between
    iterations, never during one. The stream never ends, so every rank yields as many batches
    as it is asked for: collectives in the training step cannot hang on uneven data.
    """

    def __init__(self, cfg: DataConfig, tokenizer, sources: list[_Source], weights: dict,
                 layout: _Layout, split_name: str, cost: DocumentCost | None = None):
        self.cfg, self.tokenizer, self.sources, self.weights = cfg, tokenizer, sources, weights
        self.layout, self.split_name = layout, split_name
        self.dataset = PackedBatchDataset(cfg, tokenizer, sources, weights, layout, cost)
        self._workers = copy.deepcopy(self.dataset.start)
        self._rotation = 0          # the logical worker whose batch is due next
        self._batches = 0
        self._resplits = 0
        self._totals: Counter[str] = Counter()

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[MultimodalBatch]:
        self.dataset.start = copy.deepcopy(self._workers)
        self.dataset.role_offset = self._rotation
        self.dataset.resplits = self._resplits
        for batch in self._dataloader():
            self._record(batch)
            yield batch

    def _dataloader(self):
        pin = self.cfg.pin_memory and torch.cuda.is_available()
        if self.cfg.num_workers == 0:
            return (b.pin_memory() for b in self.dataset) if pin else iter(self.dataset)
        return iter(DataLoader(self.dataset, batch_size=None, collate_fn=collate,
                               num_workers=self.cfg.num_workers,
                               prefetch_factor=self.cfg.prefetch_factor, pin_memory=pin,
                               multiprocessing_context=self._worker_context()))

    def _worker_context(self):
        """Workers of a source set with video start from a forkserver, not a fork of this
        process: once this process has decoded video, PyAV/FFmpeg state inherited by fork can
        deadlock a worker's first frame conversion (seen here: workers stuck in swscale).
        The server is started once per process, with the loader pre-imported."""
        if not any(s.type == VIDEO for s in self.sources):
            return None
        import multiprocessing

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["mmgen.data.loader"])
        return ctx

    def _record(self, batch: MultimodalBatch) -> None:
        state = batch.meta["data_state"]
        if state["worker"] != self._rotation:  # would mean DataLoader's round-robin assumption broke
            raise RuntimeError(f"data: batch from logical worker {state['worker']}, "
                               f"expected {self._rotation}")
        self._workers[self._rotation] = state["state"]
        self._rotation = (self._rotation + 1) % self.layout.num_workers
        self._batches += 1
        self._totals["documents"] += len(batch.meta["key"])
        self._totals["positions"] += batch.document_ids.numel()
        self._totals["padding"] += int((batch.document_ids < 0).sum())
        for name in batch.meta["source"]:
            self._totals[f"documents/{name}"] += 1

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain JSON-serialisable dict (see README.md, "State dict")."""
        L = self.layout
        return {
            "version": STATE_VERSION, "split": self.split_name, "rank": L.stream,
            "world_size": L.num_streams, "num_workers": L.num_workers, "seed": self.cfg.seed,
            "shuffle_samples": self.cfg.shuffle_samples,
            "sources": {s.name: {"type": s.type, "num_shards": len(s.shards),
                                 "shards_fingerprint": shard_fingerprint(s.shards)}
                        for s in self.sources},
            "weights": dict(self.weights), "batches": self._batches, "rotation": self._rotation,
            "resplits": self._resplits, "totals": dict(self._totals),
            "workers": copy.deepcopy(self._workers),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state saved by ``state_dict``. Either this rank's own state from the same
        layout (exact resume), or ``{"ranks": [state of old rank 0, 1, ...]}`` with every old
        rank's state, which also works after the world size or worker count changed (re-split,
        README.md "Re-splitting")."""
        if "ranks" in state:
            self._load_all_ranks(state["ranks"])
            return
        if "streams" in state:
            raise ValueError(
                f"data: cannot resume: the state is from a rank that accumulated over "
                f"{len(state['streams'])} streams (trainer.grad_accum); a layout change re-splits "
                f"the stream and needs every old rank's state: load_state_dict({{'ranks': [...]}})")
        state = upgrade(state, self.sources[0].name)
        mine = self.state_dict()
        check_compatible(state, mine)
        for k in ("rank", "world_size", "num_workers"):
            if state[k] != mine[k]:
                raise ValueError(
                    f"data: cannot resume: state has {k}={state[k]!r}, this loader has "
                    f"{mine[k]!r}; a layout change (world_size {state['world_size']} -> "
                    f"{mine['world_size']}, num_workers {state['num_workers']} -> "
                    f"{mine['num_workers']}) re-splits the stream and needs every old rank's "
                    f"state: load_state_dict({{'ranks': [...]}})")
        known = set(state["sources"])
        for s in self.sources:
            if s.name not in known:
                log.warning("data: source %r is new in this run: it starts from its beginning",
                            s.name)
        self._workers = [{"mix": w.get("mix"),
                          "sources": {s.name: w["sources"].get(s.name) or fresh_source_state()
                                      for s in self.sources}}
                         for w in copy.deepcopy(state["workers"])]
        self._batches = int(state["batches"])
        self._rotation = int(state["rotation"])
        self._resplits = int(state.get("resplits", 0))
        self._totals = Counter(state.get("totals", {}))

    def _load_all_ranks(self, states: list[dict]) -> None:
        # a rank that accumulated over several streams saved one state per stream
        flat = [st for s in states for st in s.get("streams", [s])]
        states = check_rank_set([upgrade(s, self.sources[0].name) for s in flat])
        mine = self.state_dict()
        for s in states:
            check_compatible(s, mine)
        old = states[0]
        if (old["world_size"], old["num_workers"]) == (mine["world_size"], mine["num_workers"]):
            self.load_state_dict(states[self.layout.stream])   # same layout: exact resume
            return
        L = self.layout
        per_source = {s.name: resplit(states, s.name, s.names, self.cfg.seed, L.num_readers)
                      for s in self.sources}
        self._workers = [{"mix": None, "sources": {n: per_source[n][L.reader(w)]
                                                   for n in per_source}}
                         for w in range(L.num_workers)]
        self._batches = int(old["batches"])
        self._rotation = 0
        self._resplits = max(int(s.get("resplits", 0)) for s in states) + 1
        self._totals = Counter(states[L.stream]["totals"]) if L.stream < len(states) else Counter()
        log.info("data: re-split the stream of %d ranks x %d workers onto %d ranks x %d workers "
                 "(rank %d)", old["world_size"], old["num_workers"], L.num_streams, L.num_workers,
                 L.stream)

    def stats(self) -> dict:
        """Counters since the start of training (restored on resume): samples read and skipped
        (by reason) as of the consumed batches, documents and batches consumed, padding, and per
        source ``source/<name>/{documents,share,samples_read,skipped,epoch}``."""
        return loader_stats(self.sources, self._workers, self._totals, self._batches)

    def same_layout(self, state: dict | None) -> bool:
        """Whether ``state`` (this rank's saved state) resumes exactly here, with no re-split."""
        L = self.layout
        return (state is not None and "streams" not in state
                and (state.get("rank"), state.get("world_size"), state.get("num_workers"))
                == (L.stream, L.num_streams, L.num_workers))
