# Contact sheets of shard samples (`mmgen data preview`): tiles with key and caption below.
"""Pairs show their image, video clips four frames (2 x 2: start, 1/3, 2/3, end), interleaved
documents their first image; the caption (or the start of the document's text) is wrapped under
each tile. A sample that does not decode gets a dark red tile naming the problem."""
from __future__ import annotations

import math
import textwrap

import numpy as np
from PIL import Image, ImageDraw

from mmgen.data import decode as dec
from mmgen.data.tools.check import caption_of, detect_type
from mmgen.data.sources import ShardFile

TEXT_LINES = 4
LINE_PX = 11


def _tile(m: dict, kind: str, size: int) -> tuple[np.ndarray, str]:
    """(tile [size, size, 3], caption) of one raw sample; raises on undecodable media."""
    if kind == "video":
        ext = next(e for e in dec.VIDEO_EXTS if e in m)
        frames, _, _ = dec.decode_video(m[ext], size // 2, 64, 8.0, "start")
        n = len(frames)
        picks = [frames[min(n - 1, round(i * (n - 1) / 3))] for i in range(4)]
        top, bottom = np.concatenate(picks[:2], 1), np.concatenate(picks[2:], 1)
        tile = np.concatenate([top, bottom], 0)
        return tile, _text(m) or ""
    if kind == "interleaved":
        out = dec.decode_interleaved({"__key__": "k", **m}, size, 1)
        if isinstance(out, tuple):
            raise ValueError(f"{out[0]}: {out[1]}")
        img = next((s for s in out.segments if isinstance(s, np.ndarray)), None)
        text = " ".join(s for s in out.segments if isinstance(s, str))
        return (img if img is not None else np.zeros((size, size, 3), np.uint8)), text
    ext = next((e for e in dec.IMAGE_EXTS if e in m), None)
    if ext is None:
        raise ValueError("no image member")
    return dec.decode_image(m[ext], size), _text(m) or "(no caption)"


def _text(m: dict) -> str | None:
    return caption_of(m)


def contact_sheet(paths: list[str], out: str, num: int = 16, size: int = 128,
                  sample_type: str = "auto") -> str:
    """Write a PNG of the first ``num`` samples of ``paths`` (in order) to ``out``."""
    cells: list[tuple[np.ndarray, str]] = []
    for path in paths:
        sf = ShardFile(path)
        for i in range(len(sf)):
            if len(cells) >= num:
                break
            m = sf.load(i)
            key = m.pop("__key__")
            m.pop("__url__", None)
            kind = sample_type if sample_type != "auto" else detect_type(m)
            try:
                tile, text = _tile(m, kind, size)
            except Exception as exn:  # noqa: BLE001 - shown, not fatal
                tile = np.full((size, size, 3), (90, 10, 10), np.uint8)
                text = f"UNDECODABLE {type(exn).__name__}: {exn}"
            cells.append((tile, f"{key}: {text}"))
        sf.close()
        if len(cells) >= num:
            break
    if not cells:
        raise ValueError(f"no samples in {len(paths)} shard(s)")
    cols = math.ceil(math.sqrt(len(cells)))
    rows = math.ceil(len(cells) / cols)
    cell_h = size + TEXT_LINES * LINE_PX + 6
    sheet = Image.new("RGB", (cols * (size + 4), rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    chars = max(8, size // 6)
    for n, (tile, text) in enumerate(cells):
        x, y = (n % cols) * (size + 4), (n // cols) * cell_h
        sheet.paste(Image.fromarray(tile), (x, y))
        for j, line in enumerate(textwrap.wrap(text, chars)[:TEXT_LINES]):
            draw.text((x + 1, y + size + 2 + j * LINE_PX), line, fill=(0, 0, 0))
    sheet.save(out)
    return out
