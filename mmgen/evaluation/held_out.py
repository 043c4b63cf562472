# A run's held-out image-caption samples (and clip-caption samples), resolved once from its data sources.
"""Samples and evaluations read the held-out split of the run's own data: the ``val_shards`` of
every pair source with a positive weight (``data.sources``; the single-source default is the
pair source ``data.train_shards`` / ``data.val_shards``). Sources are read in turn, one sample
each, so a mixture's grid shows every source. Only pair sources are read: their samples are one
image and one caption, what text-to-image and captioning prompts are.

The video evaluation (``mmgen eval shapes --video``) reads the video sources the same way
(:class:`HeldOutClips`): ``data.video_frames`` frames at ``data.video_fps`` from each clip's
start, at ``data.frame_size``, the clips the run's video documents are made of.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np

from mmgen.data.config import PAIR, VIDEO, DataConfig

log = logging.getLogger(__name__)


class HeldOutSample(NamedTuple):
    source: str
    key: str
    image: np.ndarray      # [S, S, 3] uint8
    caption: str
    info: dict             # the sample's .json (shapes: its ShapeSpec)


@dataclass(frozen=True)
class HeldOut:
    """Where held-out samples are read from.

    Args:
        sources: ``(source name, shard pattern)`` pairs, read in this order, one sample each in turn.
        image_size: images are resized to this side (the run's ``data.image_size``).
    """

    sources: tuple[tuple[str, str], ...]
    image_size: int

    def check(self) -> None:
        """Raise FileNotFoundError (naming the pattern) when a source's pattern matches no shard."""
        from mmgen.data import expand_shards

        for _, pattern in self.sources:
            expand_shards(pattern)

    def read(self, limit: int) -> list[HeldOutSample]:
        """At most ``limit`` samples, the same ones on every call (fixed shard and tar order).

        Args:
            limit: how many samples to read (fewer when the shards hold fewer).

        Raises:
            ValueError: the shards hold no usable sample.
        """
        from mmgen.data import iter_eval_samples

        return _in_turn([_tagged(name, iter_eval_samples(pattern, self.image_size), HeldOutSample)
                         for name, pattern in self.sources], limit, self.sources)


class HeldOutClip(NamedTuple):
    source: str
    key: str
    frames: np.ndarray     # [T, S, S, 3] uint8
    caption: str
    info: dict             # the clip's .json (moving shapes: its MotionSpec)


@dataclass(frozen=True)
class HeldOutClips:
    """Where held-out clips are read from (the video evaluation's :class:`HeldOut`).

    Args:
        sources: ``(source name, shard pattern)`` pairs of video shards, read in turn.
        frame_size: frames are scaled and centre-cropped to this side (``data.frame_size``).
        frames: frames per clip (``data.video_frames``).
        fps: the rate they are sampled at from the clip's start (``data.video_fps``).
    """

    sources: tuple[tuple[str, str], ...]
    frame_size: int
    frames: int
    fps: float

    def check(self) -> None:
        """Raise FileNotFoundError (naming the pattern) when a source's pattern matches no shard."""
        HeldOut(self.sources, self.frame_size).check()

    def read(self, limit: int) -> list[HeldOutClip]:
        """At most ``limit`` clips, the same ones on every call (as :meth:`HeldOut.read`)."""
        from mmgen.data import iter_eval_clips

        return _in_turn([_tagged(name, iter_eval_clips(pattern, self.frame_size, self.frames,
                                                       self.fps), HeldOutClip)
                         for name, pattern in self.sources], limit, self.sources)


def _in_turn(streams: list[Iterator], limit: int, sources) -> list:
    """Up to ``limit`` items, one from each stream in turn; ValueError when none has any."""
    out: list = []
    while streams and len(out) < limit:
        for stream in list(streams):
            sample = next(stream, None)
            if sample is None:
                streams.remove(stream)
            elif len(out) < limit:
                out.append(sample)
    if not out:
        raise ValueError("no usable held-out sample in " + ", ".join(
            f"{name}: {pattern}" for name, pattern in sources))
    return out


def _tagged(source: str, samples: Iterator[tuple], kind: type) -> Iterator:
    for key, pixels, caption, info in samples:
        yield kind(source, key, pixels, caption, info)


def held_out_from_data(data: DataConfig) -> HeldOut:
    """The held-out pair shards of ``data``: each weighted pair source's ``val_shards``.

    Sources without a validation split are left out; when no pair source has one, the pair
    sources' training shards are read instead (logged), as v1 did for ``data.val_shards=""``.

    Args:
        data: the run's data config.

    Raises:
        ValueError: no pair source with a positive weight (nothing to draw prompts from).
    """
    weights = data.source_weights()
    pairs = {name: src for name, src in data.source_configs().items()
             if src.type == PAIR and weights[name] > 0}
    if not pairs:
        kinds = ", ".join(f"{n} ({s.type})" for n, s in data.source_configs().items())
        raise ValueError(f"data '{data.name}' has no pair source with a positive weight to draw "
                         f"held-out captions and images from (sources: {kinds})")
    val = tuple((name, src.val_shards) for name, src in pairs.items() if src.val_shards)
    if val:
        return HeldOut(val, data.image_size)
    log.warning("no pair source of data '%s' has val_shards: held-out samples read the training "
                "shards of %s", data.name, ", ".join(pairs))
    return HeldOut(tuple((name, src.shards) for name, src in pairs.items()), data.image_size)


def held_out_clips_from_data(data: DataConfig) -> HeldOutClips:
    """The held-out clips of ``data``: each weighted video source's ``val_shards`` (its
    training shards, logged, when no video source has any), at the run's frame count, rate and
    frame size.

    Args:
        data: the run's data config.

    Raises:
        ValueError: no video source with a positive weight.
    """
    weights = data.source_weights()
    clips = {name: src for name, src in data.source_configs().items()
             if src.type == VIDEO and weights[name] > 0}
    if not clips:
        kinds = ", ".join(f"{n} ({s.type})" for n, s in data.source_configs().items())
        raise ValueError(f"data '{data.name}' has no video source with a positive weight to draw "
                         f"held-out clips from (sources: {kinds}); give the clips' shards with --shards")
    val = tuple((name, src.val_shards) for name, src in clips.items() if src.val_shards)
    if not val:
        log.warning("no video source of data '%s' has val_shards: held-out clips read the "
                    "training shards of %s", data.name, ", ".join(clips))
        val = tuple((name, src.shards) for name, src in clips.items())
    return HeldOutClips(val, data.frame_size, data.video_frames, data.video_fps)
