# Pixel and caption scorers for the captioned-shapes benchmark (mmgen.data.synthetic.shapes).
"""Read a generated image's attributes from its pixels, parse a generated caption, and score
both against ground-truth specs.

How an image is read (:func:`read_image`):

1. foreground = pixels farther than ``FG_DISTANCE`` from the background colour;
   colour = the palette colour whose background->colour segment passes nearest to the
   median of the strongest foreground pixels (so blending with the background, as blur or
   anti-aliasing does, keeps the colour);
2. the mask is re-thresholded at half the contrast of that colour (coverage > 0.5);
3. an *object* is found only when the largest 4-connected component of the mask holds at
   least ``DOMINANT_FRACTION`` of the foreground, is at most ``MAX_EXTENT`` of the side
   across, and has a roughly square bounding box. Otherwise shape, size, row and col are
   None, so colour sprinkled over the image or over several patches never counts as a
   shape or a position, even when the colour is right;
4. with coverage ``a`` per pixel (projection onto the background->colour line), each
   shape's anti-aliased template is fitted: extent from the area (circle pi/4 s^2, square
   s^2, triangle s^2/2), centre from the centroid; the shape with the least L1 misfit wins,
   and none is read when even that misfit exceeds ``MAX_FIT_ERROR`` of the area (real
   images after JPEG: <= 0.14; a Gaussian blur of 1.2 px: ~0.66);
5. size = small / large from the fitted extent; row, col = 3x3 cell of the fitted box
   centre.
"""
from __future__ import annotations

import re
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmgen.data.synthetic.shapes import (BACKGROUND, COLORS, POSITION_TO_CELL, SHAPES, SIZE_FRACTION,
                               SIZES, ShapeSpec)

FG_DISTANCE = 70.0            # RGB distance from the background that counts as foreground
DOMINANT_FRACTION = 0.8       # the object's share of all foreground pixels
MAX_EXTENT = 0.45             # of the side; a large shape is 0.31
MAX_ASPECT = 2.0              # bounding-box aspect (shapes are 1:1; tiny ones pixelate)
MAX_FIT_ERROR = 0.8           # L1 template misfit / area above which no shape is read
ATTRIBUTES = ("color", "shape", "size", "position")

_BG = np.asarray(BACKGROUND, dtype=np.float32)
_PALETTE_NAMES = list(COLORS)
_PALETTE = np.asarray([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)
_NONE = {"color": None, "shape": None, "size": None, "row": None, "col": None}


def _as_uint8(img) -> np.ndarray:
    """Accepts HWC uint8 arrays or CHW float tensors in [-1, 1] (mmgen.data.patches)."""
    if hasattr(img, "detach"):  # torch tensor
        from mmgen.data.patches import to_uint8
        return to_uint8(img)
    return np.asarray(img, dtype=np.uint8)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest 4-connected component (iterative flood fill)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, comp = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
_SUB = 4  # subsamples per pixel side when rasterising templates


def _template(shape: str, extent: float, cy: float, cx: float, side: int) -> np.ndarray:
    """Anti-aliased coverage of a shape as :func:`mmgen.data.synthetic.shapes.render` draws it, with
    bounding-box centre (cy, cx) and extent (diameter / side / base = height) in pixels."""
    g = (np.arange(side * _SUB) + 0.5) / _SUB
    y, x = g[:, None] - cy, g[None, :] - cx
    h = extent / 2.0
    if shape == "circle":
        inside = x * x + y * y <= h * h
    elif shape == "square":
        inside = (np.abs(x) <= h) & (np.abs(y) <= h)
    else:
        inside = (y <= h) & (np.abs(x) <= (y + h) / 2.0)
    return inside.reshape(side, _SUB, side, _SUB).mean(axis=(1, 3))


def _classify_color(rgb: np.ndarray) -> int:
    """Palette index whose background->colour segment passes nearest to ``rgb``: a shape
    blended with the background (anti-aliasing, a blurry generator) keeps its colour."""
    d = _PALETTE - _BG
    alpha = np.clip(d @ (rgb - _BG) / (d * d).sum(axis=1), 0.3, 1.2)[:, None]
    return int(np.argmin(np.linalg.norm(_BG + alpha * d - rgb, axis=-1)))


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation."""
    p = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)


def read_image(img) -> dict:
    """Attributes ``{color, shape, size, row, col}`` read from one image's pixels.

    Args:
        img: ``[H, W, 3]`` uint8 (or a CHW float tensor in [-1, 1]).

    Returns:
        The attributes; all None without foreground, and shape/size/row/col None when the
        foreground is not one compact dominant object (see the module docstring).
    """
    return locate_object(img)[0]


def locate_object(img) -> tuple[dict, tuple[float, float] | None]:
    """:func:`read_image`'s attributes and the fitted box centre ``(y, x)`` of the object as
    fractions of the side (None when no object is read): what the video scorer tracks.

    Args:
        img: as in :func:`read_image`.
    """
    px = _as_uint8(img).astype(np.float32)
    side = px.shape[0]
    dist = np.linalg.norm(px - _BG, axis=-1)
    fg = dist > FG_DISTANCE
    if not fg.any():
        return dict(_NONE), None
    ci = _classify_color(np.median(px[fg & (dist >= 0.5 * dist.max())], axis=0))
    out = dict(_NONE, color=_PALETTE_NAMES[ci])

    direction = _PALETTE[ci] - _BG
    coverage = np.clip((px - _BG) @ direction / float(direction @ direction), 0.0, 1.0)
    mask = coverage > 0.5
    if not mask.any():
        return out, None
    obj = _largest_component(mask)
    if obj.sum() < DOMINANT_FRACTION * mask.sum():
        return out, None
    if (fg & ~_dilate(obj)).sum() > (1.0 - DOMINANT_FRACTION) * obj.sum():
        return out, None
    ys, xs = np.nonzero(obj)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    bh, bw = y1 - y0, x1 - x0
    if max(bh, bw) > MAX_EXTENT * side or max(bh, bw) > MAX_ASPECT * min(bh, bw):
        return out, None
    # Fit each shape's template to the coverage map: its extent follows from the area
    # (circle pi/4 s^2, square s^2, triangle s^2 / 2), its centre from the centroid.
    a = np.where(_dilate(_dilate(obj)), coverage, 0.0)
    area = float(a.sum())
    gy, gx = np.mgrid[0:side, 0:side] + 0.5
    cy, cx = float((a * gy).sum()) / area, float((a * gx).sum()) / area
    fits = {}
    for shape in SHAPES:
        extent = (area / _FILL[shape]) ** 0.5
        box_cy = cy - extent / 6.0 if shape == "triangle" else cy  # triangle centroid is low
        err = np.abs(_template(shape, extent, box_cy, cx, side) - a).sum() / area
        fits[shape] = (err, extent, box_cy)
    shape = min(fits, key=lambda k: fits[k][0])
    err, extent, box_cy = fits[shape]
    if err > MAX_FIT_ERROR:
        return out, None
    small, large = SIZE_FRACTION["small"], SIZE_FRACTION["large"]
    out["shape"] = shape
    out["size"] = "large" if extent > (small + large) / 2 * side else "small"
    out["row"] = min(max(int(box_cy * 3 // side), 0), 2)
    out["col"] = min(max(int(cx * 3 // side), 0), 2)
    return out, (box_cy / side, cx / side)


_CAPTION_RE = re.compile(
    r"^a\s+(?P<size>{})\s+(?P<color>{})\s+(?P<shape>{})\s+(?:at|in)\s+the\s+(?P<pos>{})\.?$".format(
        "|".join(SIZES), "|".join(COLORS), "|".join(SHAPES),
        "|".join(sorted((p.replace(" ", r"\s+") for p in POSITION_TO_CELL), key=len,
                        reverse=True))))


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


def parse_caption(text: str) -> dict | None:
    """``{color, shape, size, row, col}`` from a caption of the dataset's grammar, or None.

    Tolerates case, surrounding / repeated whitespace and a final period.
    """
    m = _CAPTION_RE.match(_normalise(text))
    if m is None:
        return None
    row, col = POSITION_TO_CELL[" ".join(m["pos"].split())]
    return {"color": m["color"], "shape": m["shape"], "size": m["size"], "row": row, "col": col}


def _attribute_hits(pred: dict | None, spec: ShapeSpec) -> dict[str, bool]:
    if pred is None:
        return {k: False for k in ATTRIBUTES}
    return {"color": pred["color"] == spec.color, "shape": pred["shape"] == spec.shape,
            "size": pred["size"] == spec.size,
            "position": (pred["row"], pred["col"]) == (spec.row, spec.col)}


def _mean_hits(hits: list[dict[str, bool]]) -> dict[str, float]:
    n = max(len(hits), 1)
    out = {k: sum(h[k] for h in hits) / n for k in ATTRIBUTES}
    out["all"] = sum(all(h.values()) for h in hits) / n
    return out


def score_images(images, specs) -> dict:
    """Accuracy of each attribute read from generated ``images`` against ``specs``.

    Returns ``{color, shape, size, position, all, detected, n}``: ``all`` = every attribute
    right; ``detected`` = share of images with one compact object.
    """
    preds = [read_image(im) for im in images]
    out = _mean_hits([_attribute_hits(p, s) for p, s in zip(preds, specs, strict=True)])
    out["detected"] = sum(p["shape"] is not None for p in preds) / max(len(preds), 1)
    out["n"] = len(preds)
    return out


def score_captions(texts, specs) -> dict:
    """Caption accuracy: ``exact`` (normalised string equality), per-attribute accuracy of
    the parsed caption, ``all``, ``parsed`` (share matching the grammar), ``n``."""
    preds = [parse_caption(t) for t in texts]
    out = _mean_hits([_attribute_hits(p, s) for p, s in zip(preds, specs, strict=True)])
    out["exact"] = sum(_normalise(t) == s.caption() for t, s in zip(texts, specs)) / max(len(texts), 1)
    out["parsed"] = sum(p is not None for p in preds) / max(len(preds), 1)
    out["n"] = len(preds)
    return out


def save_grid(images, captions, path: str, ncols: int = 8, scale: int = 4) -> None:
    """Write a PNG grid of ``images`` (nearest-upscaled by ``scale``), each with its caption
    (may be None or empty) wrapped underneath."""
    images = [_as_uint8(im) for im in images]
    if not images:
        raise ValueError("no images")
    captions = list(captions) if captions is not None else [""] * len(images)
    h, w = images[0].shape[:2]
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default()
    chars = max(cw // 6, 8)
    lines = [textwrap.wrap(c or "", chars)[:4] for c in captions]
    text_h = 11 * max((len(l) for l in lines), default=0)
    pad = 4
    ncols = min(ncols, len(images))
    nrows = -(-len(images) // ncols)
    grid = Image.new("RGB", (ncols * (cw + pad) + pad, nrows * (ch + text_h + pad) + pad),
                     (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (im, ls) in enumerate(zip(images, lines)):
        x = pad + (i % ncols) * (cw + pad)
        y = pad + (i // ncols) * (ch + text_h + pad)
        grid.paste(Image.fromarray(im).resize((cw, ch), Image.Resampling.NEAREST), (x, y))
        for j, line in enumerate(ls):
            draw.text((x, y + ch + 11 * j), line, fill=(0, 0, 0), font=font)
    grid.save(path)
