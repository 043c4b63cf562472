# Procedural captioned-shapes dataset: mmgen's embedded default data and its benchmark.
"""One filled shape per image on a plain dark background, with a caption that names every
attribute, e.g. "a large red circle at the top left" or "a small blue square in the center".

Vocabulary: 3 shapes x 6 colours x 2 sizes x 3x3 positions = 324 captions. Colours are far
apart in RGB (and far from the background) so that JPEG artefacts and a generator's errors
still classify; the pixel scorer lives in :mod:`mmgen.evaluation.shapes`.

Shards use the img2dataset WebDataset layout: ``{key}.jpg``, ``{key}.txt`` (caption) and
``{key}.json`` (ground truth), members of one sample contiguous, keys of 9 digits. Every
sample is drawn from its own generator seeded with ``(seed, index)``, so a dataset is
byte-identical for a seed whatever the shard size.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 50),
    "purple": (170, 70, 210),
    "cyan": (50, 210, 220),
}
BACKGROUND = (30, 30, 30)
SIZES = ("small", "large")
# Shape extent (diameter / side / base and height) as a fraction of the image side; a
# 3x3 cell is 1/3 of the side, so a large shape nearly fills its cell.
SIZE_FRACTION = {"small": 0.19, "large": 0.31}
JITTER_FRACTION = 0.03  # max centre offset (~1 px at 32 px)
POSITIONS = (("top left", "top", "top right"),
             ("left", "center", "right"),
             ("bottom left", "bottom", "bottom right"))
POSITION_TO_CELL = {name: (r, c) for r, row in enumerate(POSITIONS) for c, name in enumerate(row)}
SUPERSAMPLE = 4
JPEG_QUALITY = 95


@dataclass(frozen=True)
class ShapeSpec:
    """Ground truth of one image. ``row``/``col`` index the 3x3 grid from the top left."""

    shape: str
    color: str
    size: str
    row: int
    col: int

    def __post_init__(self):
        if self.shape not in SHAPES or self.color not in COLORS or self.size not in SIZES:
            raise ValueError(f"bad spec {self}")
        if not (0 <= self.row < 3 and 0 <= self.col < 3):
            raise ValueError(f"bad cell ({self.row}, {self.col})")

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.col]

    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.color} {self.shape} {where}"

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict | str) -> "ShapeSpec":
        if isinstance(d, (str, bytes)):
            d = json.loads(d)
        return ShapeSpec(shape=d["shape"], color=d["color"], size=d["size"],
                         row=int(d["row"]), col=int(d["col"]))


def all_specs() -> list[ShapeSpec]:
    """Every spec of the vocabulary (324), in a fixed order."""
    return [ShapeSpec(s, c, z, r, k) for s in SHAPES for c in COLORS for z in SIZES
            for r in range(3) for k in range(3)]


def sample_spec(rng: np.random.Generator) -> ShapeSpec:
    """A spec with every attribute drawn uniformly and independently."""
    return ShapeSpec(shape=SHAPES[rng.integers(len(SHAPES))],
                     color=list(COLORS)[rng.integers(len(COLORS))],
                     size=SIZES[rng.integers(len(SIZES))],
                     row=int(rng.integers(3)), col=int(rng.integers(3)))


def render(spec: ShapeSpec, image_size: int = 32,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw ``spec`` as an ``[H, W, 3]`` uint8 image.

    The shape is centred in its 3x3 cell plus a uniform jitter of up to ``JITTER_FRACTION``
    of the side (none when ``rng`` is None); it is drawn at ``SUPERSAMPLE`` x resolution and
    box-downsampled, which anti-aliases the edges.
    """
    s = image_size * SUPERSAMPLE
    cell = s / 3.0
    cx, cy = (spec.col + 0.5) * cell, (spec.row + 0.5) * cell
    if rng is not None:
        jx, jy = rng.uniform(-1.0, 1.0, size=2) * JITTER_FRACTION * s
        cx, cy = cx + jx, cy + jy
    return draw_shape(spec.shape, spec.color, spec.size, cx, cy, image_size)


def draw_shape(shape: str, color: str, size: str, cx: float, cy: float, image_size: int) -> np.ndarray:
    """One shape centred at (cx, cy) in supersampled pixels, drawn at ``SUPERSAMPLE`` x and
    box-downsampled (anti-aliasing without a dependency); ``[S, S, 3]`` uint8."""
    s = image_size * SUPERSAMPLE
    half = SIZE_FRACTION[size] * s / 2.0
    img = Image.new("RGB", (s, s), BACKGROUND)
    draw = ImageDraw.Draw(img)
    fill = COLORS[color]
    # Pillow includes the end pixel of a box, hence the -1 on the far edges.
    box = [round(cx - half), round(cy - half), round(cx + half) - 1, round(cy + half) - 1]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # isosceles, apex up, base = height = the size
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    return np.array(img, dtype=np.uint8)  # a writable copy


def encode_jpeg(img: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: 4:2:0 subsampling would blur the colour edges of 32-px shapes by a pixel
    Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)


def make_sample(index: int, seed: int, image_size: int = 32) -> tuple[ShapeSpec, np.ndarray]:
    """The ``index``-th sample of the dataset with ``seed``: its spec and uint8 image."""
    rng = np.random.default_rng([seed, index])
    spec = sample_spec(rng)
    return spec, render(spec, image_size, rng)


def write_sharded(out_dir: str, num_samples: int, samples_per_shard: int, prefix: str,
                  members_of: Callable[[int, str], list[tuple[str, bytes]]]) -> list[str]:
    """Write samples ``0..num_samples-1`` into ``{prefix}-NNNNNN.tar`` shards of
    ``samples_per_shard``; ``members_of(i, key)`` gives sample ``i``'s (name, bytes) members,
    written contiguously. Tar metadata is fixed, so shards are byte-identical for a seed."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, num_samples, samples_per_shard)):
        path = os.path.join(out_dir, f"{prefix}-{shard:06d}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(start + samples_per_shard, num_samples)):
                for name, data in members_of(i, f"{i:09d}"):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def write_shards(out_dir: str, num_samples: int, samples_per_shard: int = 1000,
                 image_size: int = 32, seed: int = 0, prefix: str = "shapes") -> list[str]:
    """Write ``num_samples`` samples as WebDataset tars ``{prefix}-{i:06d}.tar``.

    Args:
        out_dir: created if missing.
        num_samples: total samples; the last shard may be short.
        samples_per_shard: samples per tar.
        image_size: side of the square images in pixels.
        seed: dataset seed; sample ``i`` depends only on ``(seed, i)``.
        prefix: shard file name prefix.

    Returns:
        The shard paths, in order.
    """
    def members(i: int, key: str) -> list[tuple[str, bytes]]:
        spec, img = make_sample(i, seed, image_size)
        caption = spec.caption()
        meta = {**spec.to_json(), "caption": caption, "image_size": image_size,
                "seed": seed, "index": i}
        return [(f"{key}.jpg", encode_jpeg(img)), (f"{key}.txt", caption.encode("utf-8")),
                (f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))]

    return write_sharded(out_dir, num_samples, samples_per_shard, prefix, members)


def make_splits(out_dir: str, num_train: int, num_val: int, samples_per_shard: int = 1000,
                image_size: int = 32, seed: int = 0) -> dict[str, list[str]]:
    """Write ``out_dir/train`` (seed ``seed``) and ``out_dir/val`` (seed ``seed + 1``).

    The val images are held out (different jitter and draws); the benchmark reports on val.
    """
    return {
        "train": write_shards(os.path.join(out_dir, "train"), num_train, samples_per_shard,
                              image_size, seed, prefix="shapes-train"),
        "val": write_shards(os.path.join(out_dir, "val"), num_val, samples_per_shard,
                            image_size, seed + 1, prefix="shapes-val"),
    }


def iter_shard(path: str) -> Iterator[dict]:
    """Plain-tarfile reader for tests and benchmarks: yields
    ``{"key", "image" (uint8 HWC), "caption", "spec" (ShapeSpec), "meta"}``."""
    with tarfile.open(path) as tar:
        current: dict = {}
        for member in tar:
            key, ext = member.name.split(".", 1)
            if current and current["key"] != key:
                yield _finish(current)
                current = {}
            current["key"] = key
            current[ext] = tar.extractfile(member).read()
        if current:
            yield _finish(current)


def _finish(raw: dict) -> dict:
    meta = json.loads(raw["json"])
    return {"key": raw["key"], "image": decode_jpeg(raw["jpg"]),
            "caption": raw["txt"].decode("utf-8"), "spec": ShapeSpec.from_json(meta),
            "meta": meta}
