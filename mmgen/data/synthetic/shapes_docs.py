# Procedural interleaved documents of shapes: text and images in the OBELICS layout.
"""A document alternates sentences and shape images, e.g. "Look at this picture." <image>
"It shows a small blue square at the top." <image> "Next, a large red circle at the left.".
Each ``{key}.json`` holds parallel ``texts`` / ``images`` lists (at every index exactly one is
null; an image entry names its member, ``"0.jpg"``), and the images are members
``{key}.0.jpg``, ``{key}.1.jpg``, ... of the same sample. Sample ``i`` depends only on
``(seed, i)``.
"""
from __future__ import annotations

import json

import numpy as np

from mmgen.data.synthetic.shapes import encode_jpeg, render, sample_spec, write_sharded

OPENERS = ("Look at this picture.", "Here is an image.", "A drawing:", "Consider this.")


def make_document(index: int, seed: int, image_size: int = 32, max_images: int = 3
                  ) -> tuple[list, list, list[np.ndarray]]:
    """``(texts, images, pixels)`` of document ``index``: parallel lists as stored in the
    ``.json`` (image entries are member names) and the uint8 images they name."""
    rng = np.random.default_rng([seed, index, 11])
    texts: list = []
    images: list = []
    pixels: list[np.ndarray] = []
    if rng.random() < 0.5:
        texts.append(OPENERS[rng.integers(len(OPENERS))])
        images.append(None)
    for j in range(int(rng.integers(1, max_images + 1))):
        spec = sample_spec(rng)
        texts.append(None)
        images.append(f"{j}.jpg")
        pixels.append(render(spec, image_size, rng))
        texts.append(f"It shows {spec.caption()}.")
        images.append(None)
    return texts, images, pixels


def write_document_shards(out_dir: str, num_docs: int, samples_per_shard: int = 100,
                          image_size: int = 32, seed: int = 0, max_images: int = 3,
                          prefix: str = "shapes-docs") -> list[str]:
    """Write ``num_docs`` interleaved documents as WebDataset tars; returns the shard paths."""
    def members(i: int, key: str) -> list[tuple[str, bytes]]:
        texts, images, pixels = make_document(i, seed, image_size, max_images)
        doc = {"texts": texts, "images": images, "seed": seed, "index": i}
        return ([(f"{key}.json", json.dumps(doc).encode("utf-8"))]
                + [(f"{key}.{j}.jpg", encode_jpeg(p)) for j, p in enumerate(pixels)])

    return write_sharded(out_dir, num_docs, samples_per_shard, prefix, members)
