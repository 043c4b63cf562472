# Stage 6: decode a raw tar sample (pair, video clip, interleaved document); bad ones are skipped.
"""Decoding follows img2dataset / video2dataset conventions:

* pair: ``{key}.jpg|jpeg|png|webp`` (first present wins), ``{key}.txt`` for the caption (else
  the ``caption`` field of ``{key}.json``), ``{key}.json`` metadata.
* video: ``{key}.mp4|webm|mkv|mov|avi`` decoded with PyAV, caption as for pairs; ``num_frames``
  frames sampled at ``fps`` from a clip start (random from a hash of (seed, key), the start, or
  the centre of the video).
* interleaved document: ``{key}.json`` with parallel ``texts`` / ``images`` lists (OBELICS
  layout: at each index one of them is null), image entries naming a member of the sample
  (``"0.jpg"``); or OpenFlamingo's MMC4 layout (``text_list`` + ``image_info`` with
  ``matched_text_index`` and ``image_base64`` or an image member name).

A sample that cannot be used returns a skip reason (one of ``SKIP_REASONS``); the caller
counts and logs it, and iteration goes on.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
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
UNREACHABLE_SHARD = "unreachable_shard"   # remote shard failed after retries (or missing): skipped this epoch
MISSING_VIDEO = "missing_video"
CORRUPT_VIDEO = "corrupt_video"      # PyAV cannot open it, no video stream, or no frame decodes
BAD_DOCUMENT = "bad_document"        # interleaved: no/invalid .json, lists missing or unequal
EMPTY_DOCUMENT = "empty_document"    # interleaved: neither a text nor a usable image
SKIP_REASONS = (MISSING_IMAGE, MISSING_CAPTION, CORRUPT_IMAGE, CORRUPT_TEXT, TOO_LONG, SHARD_ERROR,
                MISSING_VIDEO, CORRUPT_VIDEO, BAD_DOCUMENT, EMPTY_DOCUMENT)
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")


@dataclass
class Sample:
    """A decoded image-caption pair."""
    key: str
    shard: str
    image: np.ndarray        # [H, W, 3] uint8, H = W = image_size
    caption: str
    info: dict = field(default_factory=dict)   # the .json metadata ({} if absent)


@dataclass
class VideoSample:
    """A decoded clip and its caption. ``frames`` were sampled at ``fps`` from ``clip_start``
    seconds; ``held`` of them repeat the last frame because the video ended first."""
    key: str
    shard: str
    frames: np.ndarray       # [T, S, S, 3] uint8
    caption: str
    fps: float
    clip_start: float
    held: int = 0
    info: dict = field(default_factory=dict)


@dataclass
class InterleavedSample:
    """A decoded interleaved document: text and images in reading order."""
    key: str
    shard: str
    segments: list           # str (text) or np.ndarray [S, S, 3] uint8 (image)
    info: dict = field(default_factory=dict)
    images_dropped: int = 0  # image entries without a usable member (failed download, corrupt)


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
        # JPEG only: decode at 1/2, 1/4 or 1/8 scale in the DCT when the image is at least that
        # much larger than needed (never below image_size): ~2x faster for 256 -> 128 px
        im.draft("RGB", (image_size, image_size))
        im = im.convert("RGB")   # forces a full decode: a truncated file raises here
    return square_crop(im, image_size)


def square_crop(im: Image.Image, image_size: int) -> np.ndarray:
    """Short-side resize (bicubic) + centre crop of an RGB image to ``image_size``."""
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


def _read_text(raw: dict, parse_json: bool) -> tuple[dict, str] | tuple[str, str]:
    """(json info, caption) of a sample, or the ``(reason, detail)`` to skip it with."""
    info: dict = {}
    try:
        if "json" in raw and parse_json:
            info = json.loads(raw["json"])
            info = info if isinstance(info, dict) else {"value": info}
        caption = _caption(raw, info)
    except (UnicodeDecodeError, ValueError) as exn:
        return CORRUPT_TEXT, str(exn)
    if not caption:
        return MISSING_CAPTION, ""
    return info, caption


def decode_sample(raw: dict, image_size: int, want_info: bool = False) -> Sample | tuple[str, str]:
    """One raw webdataset sample (``{"__key__", "__url__", ext: bytes}``) -> ``Sample``, or
    ``(reason, detail)`` when it must be skipped. ``.json`` is parsed only when wanted or needed
    as the caption source, so training does not pay for (or fail on) unused metadata."""
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        return MISSING_IMAGE, f"members: {sorted(k for k in raw if not k.startswith('__'))}"
    text = _read_text(raw, parse_json=want_info or "txt" not in raw)
    if isinstance(text[0], str):
        return text
    info, caption = text
    try:
        image = decode_image(raw[ext], image_size)
    except Exception as exn:  # PIL: OSError, SyntaxError, ValueError, DecompressionBomb...
        return CORRUPT_IMAGE, f"{ext}: {type(exn).__name__}: {exn}"
    return Sample(raw["__key__"], raw.get("__url__", ""), image, caption, info)


# ----------------------------------------------------------------------------------------------
# Video clips (PyAV)
# ----------------------------------------------------------------------------------------------

def clip_start_time(mode: str, duration: float | None, clip_len: float, seed: int, key: str
                    ) -> float:
    """Start of the sampled clip in seconds: a deterministic function of (seed, key), so a resumed
    run samples the same frames."""
    from mmgen.data.sources import unit_hash

    if duration is None or duration <= clip_len or mode == "start":
        return 0.0
    room = duration - clip_len
    if mode == "center":
        return room / 2
    return unit_hash("clip", seed, key) * room


def decode_video(data: bytes, size: int, num_frames: int, fps: float, clip_start: str = "start",
                 seed: int = 0, key: str = "") -> tuple[np.ndarray, float, int]:
    """Encoded video -> ``(frames [T, S, S, 3] uint8, clip start in s, frames held)``.

    Frame ``k`` is the last decoded frame at or before ``start + k / fps`` (the first frame if
    none is); past the end of the video the last frame is held. Frames are scaled by the decoder
    (short side to ``size``) and centre-cropped. Raises on undecodable data.
    """
    import av

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000   # AV_TIME_BASE
        start = clip_start_time(clip_start, duration, num_frames / fps, seed, key)
        targets = [start + k / fps for k in range(num_frames)]
        if start > 0 and stream.time_base is not None:
            container.seek(int(start / stream.time_base), stream=stream, backward=True,
                           any_frame=False)
        picked: list = [None] * num_frames
        k, prev = 0, None
        for frame in container.decode(stream):
            t = frame.time if frame.time is not None else 0.0
            while k < num_frames and t > targets[k] + 1e-6:
                picked[k] = prev if prev is not None else frame
                k += 1
            if k >= num_frames:
                break
            prev = frame
        if prev is None and picked[0] is None:
            raise ValueError("no frame decodes")
        # targets after the last frame: that frame is shown until one frame interval after it;
        # later targets are past the end of the video (held)
        rate = float(stream.average_rate) if stream.average_rate else 0.0
        end = (prev.time or 0.0) + (1.0 / rate if rate else 0.0) if prev is not None else 0.0
        held = 0
        for j in range(k, num_frames):
            picked[j] = prev if prev is not None else picked[0]
            held += targets[j] >= end - 1e-6
        converted: dict[int, np.ndarray] = {}
        out = np.empty((num_frames, size, size, 3), np.uint8)
        for j, frame in enumerate(picked):
            if id(frame) not in converted:
                converted[id(frame)] = _frame_to_square(frame, size)
            out[j] = converted[id(frame)]
    return out, start, held


# One reformatter per process: it caches the swscale context across frames (~6x faster than a
# context per frame). Never inherited through fork: swscale's worker threads do not survive it,
# and a DataLoader worker scaling with its parent's context waits for them forever.
_REFORMATTER: tuple[int, object] | None = None


def _frame_to_square(frame, size: int) -> np.ndarray:
    global _REFORMATTER
    from av.video.reformatter import Interpolation, VideoReformatter

    if _REFORMATTER is None or _REFORMATTER[0] != os.getpid():
        _REFORMATTER = (os.getpid(), VideoReformatter())
    w, h = frame.width, frame.height
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    # AREA averages source pixels when shrinking (no aliasing), as Pillow's decode path does
    arr = _REFORMATTER[1].reformat(frame, nw, nh, "rgb24",
                                   interpolation=Interpolation.AREA).to_ndarray()
    top, left = (nh - size) // 2, (nw - size) // 2
    return arr[top:top + size, left:left + size]


def decode_video_sample(raw: dict, size: int, num_frames: int, fps: float, clip_start: str,
                        seed: int, hash_key: str | None = None) -> VideoSample | tuple[str, str]:
    """One raw video sample -> ``VideoSample`` or ``(reason, detail)``; a random clip start is a
    hash of (seed, ``hash_key`` or the sample key)."""
    ext = next((e for e in VIDEO_EXTS if e in raw), None)
    if ext is None:
        return MISSING_VIDEO, f"members: {sorted(k for k in raw if not k.startswith('__'))}"
    text = _read_text(raw, parse_json=True)
    if isinstance(text[0], str):
        return text
    info, caption = text
    key = raw["__key__"]
    try:
        frames, start, held = decode_video(raw[ext], size, num_frames, fps, clip_start, seed,
                                           hash_key or key)
    except Exception as exn:  # av.FFmpegError (OSError/ValueError subclasses), ValueError
        return CORRUPT_VIDEO, f"{ext}: {type(exn).__name__}: {exn}"
    return VideoSample(key, raw.get("__url__", ""), frames, caption, fps, start, held, info)


# ----------------------------------------------------------------------------------------------
# Interleaved documents
# ----------------------------------------------------------------------------------------------

def _image_member(raw: dict, key: str, entry, ordinal: int) -> bytes | None:
    """The bytes of an image entry: a member named by the entry (``"0.jpg"`` or
    ``"<key>.0.jpg"``), else the member ``<ordinal>.<ext>`` for the image's ordinal."""
    if isinstance(entry, str):
        name = entry[len(key) + 1:] if entry.startswith(key + ".") else entry
        if name.lower() in raw:
            return raw[name.lower()]
    if isinstance(entry, dict) and isinstance(entry.get("image_base64"), str):
        text = entry["image_base64"]
        if text.startswith(("b'", 'b"')):  # OpenFlamingo's converter stores str(bytes): "b'...'"
            text = text[2:-1]
        return base64.b64decode(text)
    for ext in IMAGE_EXTS:
        if f"{ordinal}.{ext}" in raw:
            return raw[f"{ordinal}.{ext}"]
    return None


def _document_entries(info: dict) -> list[tuple[str, object]]:
    """``[("text", str) | ("image", entry)]`` in reading order, from either layout."""
    if "texts" in info or "images" in info:
        texts, images = info.get("texts"), info.get("images")
        if not isinstance(texts, list) or not isinstance(images, list):
            raise ValueError("'texts' and 'images' must both be lists")
        if len(texts) != len(images):
            raise ValueError(f"'texts' ({len(texts)}) and 'images' ({len(images)}) differ in length")
        out: list[tuple[str, object]] = []
        for t, im in zip(texts, images):
            if im is not None:
                out.append(("image", im))
            elif isinstance(t, str) and t:
                out.append(("text", t))
        return out
    if "text_list" in info:   # MMC4 / OpenFlamingo: an image goes before its matched sentence
        texts = info["text_list"]
        if not isinstance(texts, list):
            raise ValueError("'text_list' must be a list")
        by_sentence: dict[int, list] = {}
        for im in info.get("image_info") or []:
            if isinstance(im, dict) and isinstance(im.get("matched_text_index"), int):
                by_sentence.setdefault(im["matched_text_index"], []).append(im)
        out = []
        for i, t in enumerate(texts):
            out += [("image", im.get("image_name") if "image_base64" not in im else im)
                    for im in by_sentence.get(i, [])]
            if isinstance(t, str) and t:
                out.append(("text", t))
        return out
    raise ValueError("no 'texts'/'images' lists (OBELICS layout) nor 'text_list' (MMC4 layout)")


def decode_interleaved(raw: dict, image_size: int, max_images: int
                       ) -> InterleavedSample | tuple[str, str]:
    """One raw interleaved sample -> ``InterleavedSample`` or ``(reason, detail)``. Images
    that are missing (failed downloads) or corrupt are dropped and counted, not fatal."""
    key = raw["__key__"]
    if "json" not in raw:
        return BAD_DOCUMENT, "no .json member"
    try:
        info = json.loads(raw["json"])
        if not isinstance(info, dict):
            raise ValueError("the .json is not an object")
        entries = _document_entries(info)
    except (UnicodeDecodeError, ValueError) as exn:
        return BAD_DOCUMENT, str(exn)
    segments: list = []
    dropped = ordinal = 0
    for kind, value in entries:
        if kind == "text":
            segments.append(value)
            continue
        data = _image_member(raw, key, value, ordinal)
        ordinal += 1
        if data is None or sum(isinstance(s, np.ndarray) for s in segments) >= max_images:
            dropped += 1
            continue
        try:
            segments.append(decode_image(data, image_size))
        except Exception:  # noqa: BLE001 - one bad image does not spoil the document
            dropped += 1
    if not segments:
        return EMPTY_DOCUMENT, f"{len(entries)} entries, {dropped} images dropped"
    return InterleavedSample(key, raw.get("__url__", ""), segments, info, dropped)
