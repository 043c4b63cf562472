# Procedural captioned videos of moving shapes (mp4 via PyAV): the embedded video data.
"""One filled shape glides in a straight line from the centre of one 3x3 cell to another over the
clip, on the same dark background as the still shapes (``mmgen.data.synthetic.shapes``), with a caption
such as "a large red circle moving from the top left to the bottom right".

Shards use the video2dataset WebDataset layout: ``{key}.mp4`` (H.264, yuv420p),
``{key}.txt`` (caption), ``{key}.json`` (ground truth, fps, frames, duration). Every sample is
drawn from its own generator seeded with ``(seed, index)`` and encoded single-threaded, so a
dataset is byte-identical for a seed whatever the shard size.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass

import numpy as np
from mmgen.data.synthetic.shapes import (COLORS, POSITIONS, SHAPES, SIZES, SUPERSAMPLE, draw_shape,
                               write_sharded)


@dataclass(frozen=True)
class MotionSpec:
    """Ground truth of one clip: the shape moves from cell (row0, col0) to (row1, col1)."""

    shape: str
    color: str
    size: str
    row0: int
    col0: int
    row1: int
    col1: int

    def caption(self) -> str:
        return (f"a {self.size} {self.color} {self.shape} moving from "
                f"{_place(self.row0, self.col0)} to {_place(self.row1, self.col1)}")


def _place(row: int, col: int) -> str:
    name = POSITIONS[row][col]
    return name if name == "center" else f"the {name}"


def sample_motion(rng: np.random.Generator) -> MotionSpec:
    """A spec with uniform attributes and two different cells."""
    start = int(rng.integers(9))
    end = int(rng.integers(8))
    end += end >= start
    return MotionSpec(SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))],
                      SIZES[rng.integers(len(SIZES))], start // 3, start % 3, end // 3, end % 3)


def render_frame(spec: MotionSpec, u: float, image_size: int) -> np.ndarray:
    """The frame at fraction ``u`` in [0, 1] of the motion, ``[S, S, 3]`` uint8 (drawn at
    ``SUPERSAMPLE`` x and box-downsampled, as the still shapes are)."""
    s = image_size * SUPERSAMPLE
    cell = s / 3.0
    cx = ((1 - u) * spec.col0 + u * spec.col1 + 0.5) * cell
    cy = ((1 - u) * spec.row0 + u * spec.row1 + 0.5) * cell
    return draw_shape(spec.shape, spec.color, spec.size, cx, cy, image_size)


def render_clip(spec: MotionSpec, num_frames: int, image_size: int) -> np.ndarray:
    """``[T, S, S, 3]`` uint8: the whole motion over ``num_frames`` frames."""
    steps = max(1, num_frames - 1)
    return np.stack([render_frame(spec, t / steps, image_size) for t in range(num_frames)])


def encode_mp4(frames: np.ndarray, fps: int, crf: int = 18) -> bytes:
    """``[T, H, W, 3]`` uint8 (H, W even) -> H.264 mp4 bytes, single-threaded (deterministic)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
        stream.codec_context.thread_count = 1
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def make_clip(index: int, seed: int, image_size: int = 32, num_frames: int = 16
              ) -> tuple[MotionSpec, np.ndarray]:
    rng = np.random.default_rng([seed, index, 7])
    spec = sample_motion(rng)
    return spec, render_clip(spec, num_frames, image_size)


def write_video_shards(out_dir: str, num_samples: int, samples_per_shard: int = 100,
                       image_size: int = 32, num_frames: int = 16, fps: int = 8, seed: int = 0,
                       prefix: str = "shapes-video") -> list[str]:
    """Write ``num_samples`` clips as WebDataset tars ``{prefix}-{i:06d}.tar``.

    Args:
        out_dir: created if missing.
        num_samples: total clips; the last shard may be short.
        samples_per_shard: clips per tar.
        image_size: frame side in pixels (even, for yuv420p).
        num_frames: frames per clip; the clip lasts ``num_frames / fps`` seconds.
        fps: frame rate written into the mp4.
        seed: dataset seed; clip ``i`` depends only on ``(seed, i)``.
        prefix: shard file name prefix.

    Returns:
        The shard paths, in order.
    """
    if image_size % 2:
        raise ValueError(f"image_size must be even for yuv420p video, got {image_size}")
    def members(i: int, key: str) -> list[tuple[str, bytes]]:
        spec, frames = make_clip(i, seed, image_size, num_frames)
        caption = spec.caption()
        meta = {**asdict(spec), "caption": caption, "fps": fps, "frames": num_frames,
                "duration": num_frames / fps, "image_size": image_size, "seed": seed,
                "index": i}
        return [(f"{key}.mp4", encode_mp4(frames, fps)), (f"{key}.txt", caption.encode("utf-8")),
                (f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))]

    return write_sharded(out_dir, num_samples, samples_per_shard, prefix, members)


def make_video_splits(out_dir: str, num_train: int, num_val: int, samples_per_shard: int = 100,
                      image_size: int = 32, num_frames: int = 16, fps: int = 8, seed: int = 0
                      ) -> dict[str, list[str]]:
    """``out_dir/train`` (seed ``seed``) and ``out_dir/val`` (seed ``seed + 1``)."""
    kw = dict(samples_per_shard=samples_per_shard, image_size=image_size, num_frames=num_frames,
              fps=fps)
    return {"train": write_video_shards(os.path.join(out_dir, "train"), num_train, seed=seed,
                                        prefix="shapes-video-train", **kw),
            "val": write_video_shards(os.path.join(out_dir, "val"), num_val, seed=seed + 1,
                                      prefix="shapes-video-val", **kw)}
