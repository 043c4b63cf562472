# Stage 6: decode a raw tar sample into an image and a caption; bad samples are skipped, not fatal.
"""Decoding follows img2dataset conventions: ``{key}.jpg|jpeg|png|webp`` (first present wins),
``{key}.txt`` for the caption (else the ``caption`` field of ``{key}.json``), ``{key}.json``
metadata. A sample that cannot be used returns a skip reason (one of ``SKIP_REASONS``); the
caller counts and logs it, and iteration goes on.
"""
from __future__ import annotations

import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
CORRUPT_IMAGE = "corrupt_image"
CORRUPT_TEXT = "corrupt_text"        # caption not UTF-8, or .json not valid JSON
TOO_LONG = "too_long"                # the document would not fit in one row (seq_len)
SHARD_ERROR = "shard_error"          # damaged tar: the rest of that shard is lost
SKIP_REASONS = (MISSING_IMAGE, MISSING_CAPTION, CORRUPT_IMAGE, CORRUPT_TEXT, TOO_LONG, SHARD_ERROR)


@dataclass
class Sample:
    """A decoded image-caption pair."""
    key: str
    shard: str
    image: np.ndarray        # [H, W, 3] uint8, H = W = image_size
    caption: str
    info: dict = field(default_factory=dict)   # the .json metadata ({} if absent)


class SkipLog:
    """Counts skipped samples by reason and logs them with shard and key. Logging is throttled
    (every sample of the first few per reason, then every 1000th) so a dirty web-scale shard set
    cannot flood the log; the counts are always exact."""

    def __init__(self, verbose_first: int = 10, every: int = 1000):
        self.counts: Counter[str] = Counter()
        self.verbose_first = verbose_first
        self.every = every

    def skip(self, reason: str, shard: str, key: str, detail: str = "") -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= self.verbose_first or n % self.every == 0:
            log.warning("data: skipped sample (%s) shard=%s key=%s%s [%d so far]", reason, shard,
                        key, f": {detail}" if detail else "", n)


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Encoded bytes -> [S, S, 3] uint8 RGB. Non-square images are resized on the short side and
    centre-cropped (no aspect distortion). Raises on corrupt or truncated data."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")   # forces a full decode: a truncated file raises here
    w, h = im.size
    if (w, h) != (image_size, image_size):
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        im = im.crop((left, top, left + image_size, top + image_size))
    return np.asarray(im, dtype=np.uint8).copy()


def _caption(raw: dict, info: dict | None) -> str | None:
    if "txt" in raw:
        return raw["txt"].decode("utf-8").strip()
    if info and isinstance(info.get("caption"), str):
        return info["caption"].strip()
    return None


def decode_sample(raw: dict, image_size: int, want_info: bool = False) -> Sample | tuple[str, str]:
    """One raw webdataset sample (``{"__key__", "__url__", ext: bytes}``) -> ``Sample``, or
    ``(reason, detail)`` when it must be skipped. ``.json`` is parsed only when wanted or needed
    as the caption source, so training does not pay for (or fail on) unused metadata."""
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        return MISSING_IMAGE, f"members: {sorted(k for k in raw if not k.startswith('__'))}"
    info: dict = {}
    try:
        if "json" in raw and (want_info or "txt" not in raw):
            info = json.loads(raw["json"])
            info = info if isinstance(info, dict) else {"value": info}
        caption = _caption(raw, info)
    except (UnicodeDecodeError, ValueError) as exn:
        return CORRUPT_TEXT, str(exn)
    if not caption:
        return MISSING_CAPTION, ""
    try:
        image = decode_image(raw[ext], image_size)
    except Exception as exn:  # PIL: OSError, SyntaxError, ValueError, DecompressionBomb...
        return CORRUPT_IMAGE, f"{ext}: {type(exn).__name__}: {exn}"
    return Sample(raw["__key__"], raw.get("__url__", ""), image, caption, info)
