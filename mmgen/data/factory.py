# The data factory: one rank's packed-batch loader, and held-out samples for evaluation.
"""``build_dataloader`` assembles the pipeline of mmgen/data/README.md for one rank: sources
from the config, the (stream, worker) layout, one ``MultimodalLoader`` per accumulation stream
(``AccumLoader`` over them when ``grad_accum`` > 1)."""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np

from mmgen.data import decode as dec
from mmgen.data.config import PAIR, DataConfig
from mmgen.data.latents import check_manifest, source_manifest
from mmgen.errors import ConfigError
from mmgen.data.loader import MultimodalLoader, _Layout, _Source
from mmgen.data.pack import DocumentCost
from mmgen.data.sources import expand_shards, read_shard
from mmgen.data.streams import AccumLoader, stream_index

log = logging.getLogger(__name__)


def build_dataloader(cfg: DataConfig, tokenizer, rank: int, world_size: int,
                     split: str = "train", grad_accum: int = 1,
                     unit_costs: dict[str, float] | None = None) -> MultimodalLoader | AccumLoader:
    """The packed-batch loader of one rank.

    Args:
        cfg: the data config (validated here).
        tokenizer: text tokenizer (``pad``, ``bos``, ``eos``, ``boi``, ``eoi``, ``bov``,
            ``eov``, ``visual``, ``encode``), e.g. ``mmgen.models.tokenizers.text.ByteTokenizer``.
        rank, world_size: this rank among the data-parallel ranks that read distinct data.
        split: "train" or "val" (each source's train or val shards; sources without val shards
            are left out of "val").
        grad_accum: micro-batches per optimizer step on this rank. Above 1, micro-batch ``a``
            of a step comes from stream ``a * world_size + rank`` (``AccumLoader``), so the
            global batches depend on ``world_size * grad_accum`` only, not on how it is split.
        unit_costs: the model's per-unit training FLOPs (``mmgen.metrics.flops.unit_costs``);
            needed when ``cfg.pack_compute_budget`` > 0 (compute-balanced packing).
    """
    cfg.validate()
    if split not in ("train", "val"):
        raise ValueError(f"data: split must be 'train' or 'val', got {split!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"data: rank {rank} outside world_size {world_size}")
    all_weights = cfg.source_weights()
    sources = []
    for name, sc in cfg.source_configs().items():
        pattern = sc.shards if split == "train" else sc.val_shards
        if not pattern:
            continue
        if all_weights[name] == 0:  # never drawn (mixing.py), so its shards need not exist
            if rank == 0:
                log.info("data: source %r has weight 0: not read (%s shards %r not opened)",
                         name, split, pattern)
            continue
        sources.append(_cached_or_raw(cfg, name, sc.type, pattern, expand_shards(pattern, remote=cfg.remote)))
    if not sources:
        raise ValueError(f"data: no source of data config '{cfg.name}' with a weight above 0 "
                         f"has {split} shards")
    weights = {s.name: all_weights[s.name] for s in sources}
    if grad_accum < 1:
        raise ValueError(f"data: grad_accum must be >= 1, got {grad_accum}")
    streams = world_size * grad_accum
    workers = max(1, cfg.num_workers)
    for s in sources:
        if len(s.shards) < streams * workers and rank == 0:
            log.info("data: source %r has %d shards for %d readers (%d streams x %d workers): "
                     "readers share shards, each taking every k-th sample", s.name,
                     len(s.shards), streams * workers, streams, workers)
    cost = None
    if cfg.pack_compute_budget > 0:
        if unit_costs is None:
            raise ValueError("data: pack_compute_budget > 0 needs the model's unit costs "
                             "(build_dataloader(..., unit_costs=mmgen.metrics.flops.unit_costs(model_cfg)))")
        cost = DocumentCost.from_units(unit_costs, cfg.pack_compute_budget)
    loaders = [MultimodalLoader(cfg, tokenizer, sources, weights,
                                _Layout(stream_index(rank, world_size, a), streams, workers), split,
                                cost)
               for a in range(grad_accum)]
    return loaders[0] if grad_accum == 1 else AccumLoader(loaders, rank, world_size)


def _cached_or_raw(cfg: DataConfig, name: str, type_: str, pattern: str, shards: list[str]) -> _Source:
    """A source, marked cached when its shards are latents (``codec.json``): refused (one line)
    unless the configured codec made them at the configured image size."""
    manifest = source_manifest(name, shards)
    if manifest is None:
        return _Source(name, type_, pattern, shards)
    if type_ != PAIR:
        raise ConfigError(f"data: source {name!r} is a latent cache; cached latents are read for "
                         f"pair sources only (type={type_!r})")
    check_manifest(name, manifest, cfg.visual_codec(), cfg.image_size)
    return _Source(name, type_, pattern, shards, cached=True)


# ----------------------------------------------------------------------------------------------
# Evaluation: decoded held-out samples (pairs, clips), no packing
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


def iter_eval_clips(shards: str, size: int, num_frames: int, fps: float, limit: int | None = None
                    ) -> Iterator[tuple[str, np.ndarray, str, dict]]:
    """``(key, frames [T, S, S, 3] uint8, caption, json dict)`` of video shards in a fixed order,
    as :func:`iter_eval_samples`: ``num_frames`` frames at ``fps`` from each clip's start (the
    decode of the training path, ``video_clip_start=start``)."""
    count, skips = 0, dec.SkipLog()
    for path in expand_shards(shards):
        raw, error = read_shard(path)
        for r in raw:
            if limit is not None and count >= limit:
                return
            out = dec.decode_video_sample(r, size, num_frames, fps, "start", seed=0)
            if isinstance(out, tuple):
                skips.skip(out[0], path, r.get("__key__", "?"), out[1])
                continue
            count += 1
            yield out.key, out.frames, out.caption, out.info
        if error is not None:
            skips.skip(dec.SHARD_ERROR, path, "-", error)
