# Pixel and caption scorers for the moving-shapes clips (mmgen.data.synthetic.shapes_video).
"""Read a generated clip's shape, colour and motion from its frames, parse a generated motion
caption, and score both against the clips' ground truth (:class:`MotionSpec`).

How a clip is read (:func:`read_clip`):

1. every frame is read as a still image (:func:`mmgen.evaluation.shapes.locate_object`: colour,
   shape, size and the fitted centre of one compact object, or no object);
2. colour, shape and size are each the majority vote over the frames that read one (ties go to
   the earliest frame's value);
3. the centre track of the frames with an object is fitted by least squares against the frame
   index (the shape moves in a straight line at constant speed), and the start and end cells
   are the 3x3 cells of the fitted centre at the first and the last frame, so one misread frame
   does not move an end; at least ``MIN_TRACK`` frames with an object are needed, otherwise no
   motion is read;
4. the direction is the sign pattern ``(sign d_row, sign d_col)`` of the fitted displacement
   from the first to the last frame, in cells, with displacements under ``STILL_CELLS`` of a
   cell counted as 0: a clip played backwards reverses it, a still shape has (0, 0).

A clip is scored against its spec on colour, shape, size, start cell, end cell and direction
(equal to ``(sign(row1 - row0), sign(col1 - col0))``); a caption is parsed by the dataset's
grammar ("a large red circle moving from the top left to the bottom right") and scored on the
same attributes, plus exact match.
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np

from mmgen.data.synthetic.shapes import COLORS, POSITION_TO_CELL, SHAPES, SIZES
from mmgen.data.synthetic.shapes_video import MotionSpec
from mmgen.evaluation.shapes import _as_uint8, _normalise, locate_object, save_grid

MIN_TRACK = 2          # frames with an object needed to read a motion
STILL_CELLS = 0.5      # a fitted displacement below this many cells has sign 0
VIDEO_ATTRIBUTES = ("color", "shape", "size", "start", "end", "direction")
SPEC_FIELDS = ("shape", "color", "size", "row0", "col0", "row1", "col1")


def _frames(clip) -> list[np.ndarray]:
    """``[T, H, W, 3]`` uint8 (array or list of frames) or a ``[T, C, H, W]`` float tensor in
    [-1, 1] -> T HWC uint8 frames."""
    return [_as_uint8(f) for f in clip]


def _vote(values: list) -> str | None:
    """The most common non-None value; ties go to the one seen first."""
    seen = [v for v in values if v is not None]
    if not seen:
        return None
    counts = Counter(seen)
    best = max(counts.values())
    return next(v for v in seen if counts[v] == best)


def _cell(frac: float) -> int:
    return min(max(int(frac * 3), 0), 2)


def _sign(d: float) -> int:
    return 0 if abs(d) < STILL_CELLS else (1 if d > 0 else -1)


def read_clip(clip) -> dict:
    """What a clip shows, read from its frames (module docstring).

    Args:
        clip: ``[T, H, W, 3]`` uint8 frames, or a ``[T, C, H, W]`` float tensor in [-1, 1].

    Returns:
        ``{color, shape, size, row0, col0, row1, col1, d_row, d_col, detected}``: the votes,
        the start and end cells, the direction signs (None without a track) and the share of
        frames with one compact object.
    """
    reads = [locate_object(f) for f in _frames(clip)]
    attrs = [a for a, _ in reads]
    out = {"color": _vote([a["color"] for a in attrs]), "shape": _vote([a["shape"] for a in attrs]),
           "size": _vote([a["size"] for a in attrs]),
           "row0": None, "col0": None, "row1": None, "col1": None, "d_row": None, "d_col": None,
           "detected": sum(c is not None for _, c in reads) / max(len(reads), 1)}
    track = [(k, c) for k, (_, c) in enumerate(reads) if c is not None]
    if len(track) < MIN_TRACK or len({k for k, _ in track}) < 2:
        return out
    k = np.array([k for k, _ in track], dtype=np.float64)
    yx = np.array([c for _, c in track], dtype=np.float64)
    # straight line at constant speed: centre = a + b k, fitted per axis
    design = np.stack([np.ones_like(k), k], axis=1)
    (a_y, a_x), (b_y, b_x) = np.linalg.lstsq(design, yx, rcond=None)[0]
    last = len(reads) - 1
    y0, x0, y1, x1 = a_y, a_x, a_y + b_y * last, a_x + b_x * last
    out.update(row0=_cell(y0), col0=_cell(x0), row1=_cell(y1), col1=_cell(x1),
               d_row=_sign(3 * (y1 - y0)), d_col=_sign(3 * (x1 - x0)))
    return out


def spec_direction(spec: MotionSpec) -> tuple[int, int]:
    """The caption's direction: ``(sign(row1 - row0), sign(col1 - col0))``."""
    return int(np.sign(spec.row1 - spec.row0)), int(np.sign(spec.col1 - spec.col0))


def motion_spec(info: dict) -> MotionSpec:
    """A clip's ground truth from its ``.json`` (``mmgen data make-shapes-video``)."""
    return MotionSpec(shape=info["shape"], color=info["color"], size=info["size"],
                      row0=int(info["row0"]), col0=int(info["col0"]),
                      row1=int(info["row1"]), col1=int(info["col1"]))


def _hits(pred: dict | None, spec: MotionSpec) -> dict[str, bool]:
    if pred is None:
        return {k: False for k in VIDEO_ATTRIBUTES}
    direction = (pred["d_row"], pred["d_col"])
    return {"color": pred["color"] == spec.color, "shape": pred["shape"] == spec.shape,
            "size": pred["size"] == spec.size,
            "start": (pred["row0"], pred["col0"]) == (spec.row0, spec.col0),
            "end": (pred["row1"], pred["col1"]) == (spec.row1, spec.col1),
            "direction": direction == spec_direction(spec)}


def _mean_hits(hits: list[dict[str, bool]]) -> dict[str, float]:
    n = max(len(hits), 1)
    out = {k: sum(h[k] for h in hits) / n for k in VIDEO_ATTRIBUTES}
    out["all"] = sum(all(h.values()) for h in hits) / n
    return out


def score_clips(clips, specs) -> dict:
    """Accuracy of each attribute read from generated ``clips`` against their ``specs``.

    Returns ``{color, shape, size, start, end, direction, all, detected, n}``: ``all`` = every
    attribute right; ``detected`` = mean share of frames with one compact object.
    """
    preds = [read_clip(c) for c in clips]
    out = _mean_hits([_hits(p, s) for p, s in zip(preds, specs, strict=True)])
    out["detected"] = sum(p["detected"] for p in preds) / max(len(preds), 1)
    out["n"] = len(preds)
    return out


_PLACE = "|".join(sorted((p.replace(" ", r"\s+") for p in POSITION_TO_CELL), key=len, reverse=True))
_MOTION_RE = re.compile(
    r"^a\s+(?P<size>{})\s+(?P<color>{})\s+(?P<shape>{})\s+moving\s+from\s+(?:the\s+)?(?P<p0>{})"
    r"\s+to\s+(?:the\s+)?(?P<p1>{})\.?$".format("|".join(SIZES), "|".join(COLORS), "|".join(SHAPES),
                                                 _PLACE, _PLACE))


def parse_motion_caption(text: str) -> dict | None:
    """``{color, shape, size, row0, col0, row1, col1, d_row, d_col}`` from a caption of the
    clips' grammar, or None. Tolerates case, whitespace, a missing or extra "the" and a final
    period."""
    m = _MOTION_RE.match(_normalise(text))
    if m is None:
        return None
    (r0, c0), (r1, c1) = (POSITION_TO_CELL[" ".join(m[p].split())] for p in ("p0", "p1"))
    return {"color": m["color"], "shape": m["shape"], "size": m["size"], "row0": r0, "col0": c0,
            "row1": r1, "col1": c1, "d_row": int(np.sign(r1 - r0)), "d_col": int(np.sign(c1 - c0))}


def score_motion_captions(texts, specs) -> dict:
    """Caption accuracy: ``exact`` (normalised string equality), per-attribute accuracy of
    the parsed caption (as :func:`score_clips`), ``all``, ``parsed`` (share matching the
    grammar), ``n``."""
    preds = [parse_motion_caption(t) for t in texts]
    out = _mean_hits([_hits(p, s) for p, s in zip(preds, specs, strict=True)])
    out["exact"] = sum(_normalise(t) == s.caption() for t, s in zip(texts, specs)) / max(len(texts), 1)
    out["parsed"] = sum(p is not None for p in preds) / max(len(preds), 1)
    out["n"] = len(preds)
    return out


def save_clip_grid(clips, captions, path: str, ncols: int = 2, scale: int = 4) -> None:
    """A PNG of ``clips``, each as its frames side by side (one tile, nearest-upscaled by
    ``scale``) with its caption (may be None or empty) underneath.

    Args:
        clips: each ``[T, H, W, 3]`` uint8 or a ``[T, C, H, W]`` float tensor in [-1, 1].
        captions: one per clip, or None.
        path: the PNG written.
        ncols: clips per grid row.
        scale: pixel upscaling.
    """
    strips = []
    for clip in clips:
        frames = _frames(clip)
        gap = np.full((frames[0].shape[0], 1, 3), 255, np.uint8)   # a white line between frames
        strips.append(np.concatenate([x for f in frames for x in (f, gap)][:-1], axis=1))
    save_grid(strips, captions, path, ncols=ncols, scale=scale)
