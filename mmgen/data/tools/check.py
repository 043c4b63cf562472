# Shard checks for `mmgen data check|index|stats`: read every member, decode every sample, report.
"""Checks shards made outside mmgen (img2dataset, video2dataset, OpenFlamingo's MMC4 converter,
a hand-written script) before a run meets them. Every problem is one line naming the shard, the
sample key and what is wrong; the loader would skip such samples (counting them), so they are
*sample problems*. A shard is **unusable** when it cannot be read to its end (damaged or
truncated tar, not a tar) or holds no usable sample.

Problem kinds (``Problem.kind``):

* tar structure: ``damaged_tar``, ``no_extension`` (a member whose name has no dot: ignored by
  webdataset), ``duplicate_member`` (the same ``key.ext`` twice in a row: webdataset stops the
  shard there), ``non_contiguous_key`` (a key's members are split by another key: webdataset
  makes two partial samples of it), ``duplicate_key`` (the same key again, later, with new members).
* content, per sample type (``pair``, ``video``, ``interleaved``, detected per sample): the
  loader's skip reasons (``missing_image``, ``missing_caption``, ``corrupt_image``,
  ``corrupt_text``, ``missing_video``, ``corrupt_video``, ``bad_document``, ``empty_document``),
  plus ``corrupt_json`` (metadata that is not JSON, even where a ``.txt`` caption makes it
  unnecessary) and ``missing_member`` (an interleaved image entry with no member; the loader drops
  that image).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image

from mmgen.data import decode as dec
from mmgen.data.config import INTERLEAVED, PAIR, VIDEO
from mmgen.data.sources import _has_end_marker, split_member_name



@dataclass
class Problem:
    shard: str
    key: str | None          # None: about the shard as a whole
    kind: str
    detail: str

    def line(self) -> str:
        where = f"{self.shard}: key {self.key}" if self.key is not None else self.shard
        return f"{where}: {self.kind}: {self.detail}"


@dataclass
class ShardReport:
    path: str
    bytes: int = 0
    members: int = 0
    samples: int = 0
    ok: int = 0
    types: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)
    unusable: str | None = None       # why the shard cannot be used, or None

    def summary(self) -> str:
        kinds = Counter(p.kind for p in self.problems if p.key is not None)
        bad = self.samples - self.ok
        text = f"{self.path}: {self.samples} samples, {self.ok} ok"
        if bad:
            text += f", {bad} with problems ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})"
        if self.unusable:
            text += f"; UNUSABLE: {self.unusable}"
        return text

    def to_json(self) -> dict:
        return {"path": self.path, "bytes": self.bytes, "members": self.members,
                "samples": self.samples, "ok": self.ok, "types": dict(self.types),
                "unusable": self.unusable,
                "problems": [{"key": p.key, "kind": p.kind, "detail": p.detail}
                             for p in self.problems]}


# ----------------------------------------------------------------------------------------------
# Reading every member in order (a damaged tar keeps what came before the damage)
# ----------------------------------------------------------------------------------------------

def read_members(path: str) -> tuple[list[tuple[str, bytes]], str | None]:
    """Every regular member ``(name, data)`` in tar order, and a one-line error on damage."""
    members: list[tuple[str, bytes]] = []
    try:
        with tarfile.open(path, "r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                if len(data) != info.size:
                    return members, f"truncated tar: member {info.name} has {len(data)} of {info.size} bytes"
                members.append((info.name, data))
    except (tarfile.TarError, OSError, EOFError, ValueError) as exn:
        after = f" after member {members[-1][0]}" if members else " at the first member"
        return members, f"{type(exn).__name__}: {exn}{after}"
    if path.endswith(".tar") and not _has_end_marker(path):
        last = f" (last complete member: {members[-1][0]})" if members else ""
        return members, f"truncated tar: no end-of-archive marker{last}"
    return members, None


def group_samples(path: str, members: list[tuple[str, bytes]]
                  ) -> tuple[list[tuple[str, dict[str, bytes]]], list[Problem]]:
    """Samples as webdataset groups them (consecutive members with one key), plus the
    structural problems: names without an extension, repeated members, split or repeated keys."""
    problems: list[Problem] = []
    samples: list[tuple[str, dict[str, bytes]]] = []
    runs: dict[str, list[int]] = {}          # key -> member indices where a run of it starts
    for i, (name, data) in enumerate(members):
        base = os.path.basename(name)
        if base.startswith("__") and base.split(".")[0].endswith("__"):
            continue
        key, ext = split_member_name(name)
        if key is None:
            problems.append(Problem(path, None, "no_extension",
                                    f"member {i} '{name}' has no extension (webdataset ignores it)"))
            continue
        ext = ext.lower()
        if samples and samples[-1][0] == key:
            if ext in samples[-1][1]:
                problems.append(Problem(path, key, "duplicate_member",
                                        f"{key}.{ext} appears twice in a row (member {i}); "
                                        f"webdataset stops reading the shard here"))
                samples.append((key, {ext: data}))
                runs[key].append(i)
            else:
                samples[-1][1][ext] = data
            continue
        if key in runs:
            earlier = runs[key]
            before_ext = sorted({e for k, m in samples if k == key for e in m})
            kind = "duplicate_key" if ext in before_ext else "non_contiguous_key"
            problems.append(Problem(
                path, key, kind,
                f"members of key {key} are not contiguous: run at member {i} ('{name}') after "
                f"another key; earlier run(s) at member(s) {', '.join(map(str, earlier))} "
                f"with .{', .'.join(before_ext)}"))
        runs.setdefault(key, []).append(i)
        samples.append((key, {ext: data}))
    return samples, problems


# ----------------------------------------------------------------------------------------------
# Content checks per sample type
# ----------------------------------------------------------------------------------------------

def detect_type(members: dict[str, bytes]) -> str:
    if any(e in members for e in dec.VIDEO_EXTS):
        return VIDEO
    if "json" in members and not any(e in members for e in dec.IMAGE_EXTS + ("txt",)):
        return INTERLEAVED
    if "json" in members and ("txt" not in members):
        try:
            info = json.loads(members["json"])
            if isinstance(info, dict) and ("texts" in info or "text_list" in info):
                return INTERLEAVED
        except ValueError:
            pass
    return PAIR


def _full_decode_image(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        size = im.size
        im.convert("RGB")            # decodes every pixel: truncation raises here
    return size


def _check_caption(key: str, m: dict[str, bytes], path: str) -> list[Problem]:
    out: list[Problem] = []
    info = None
    if "json" in m:
        try:
            info = json.loads(m["json"])
        except (UnicodeDecodeError, ValueError) as exn:
            out.append(Problem(path, key, "corrupt_json", f".json is not valid JSON: {exn}"))
    if "txt" in m:
        try:
            text = m["txt"].decode("utf-8")
        except UnicodeDecodeError as exn:
            return out + [Problem(path, key, "corrupt_text", f".txt is not UTF-8: {exn}")]
        if not text.strip():
            out.append(Problem(path, key, "missing_caption", ".txt is empty"))
        return out
    if "json" not in m:
        return out + [Problem(path, key, "missing_caption", "no .txt member and no .json member")]
    if isinstance(info, dict):
        cap = info.get("caption")
        if not isinstance(cap, str):
            out.append(Problem(path, key, "missing_caption",
                               "no .txt member and the .json has no 'caption' field"
                               + (f" (fields: {', '.join(sorted(info)[:8])})" if info else "")))
        elif not cap.strip():
            out.append(Problem(path, key, "missing_caption",
                               "no .txt member and the .json 'caption' is empty"))
    elif info is not None:
        out.append(Problem(path, key, "missing_caption",
                           "no .txt member and the .json is not an object"))
    return out


def _count_frames(data: bytes) -> int:
    import av

    with av.open(io.BytesIO(data)) as c:
        if not c.streams.video:
            raise ValueError("no video stream")
        return sum(1 for _ in c.decode(c.streams.video[0]))


def video_info(data: bytes) -> dict | None:
    """Width, height, frame rate (frames/s), duration (s) and frame count of a clip, from the
    container and stream headers (nothing decoded); None if it cannot be opened. A value the
    headers do not give is 0 (duration falls back to frames / fps)."""
    import av

    try:
        with av.open(io.BytesIO(data)) as c:
            if not c.streams.video:
                return None
            st = c.streams.video[0]
            rate = st.average_rate or st.guessed_rate or st.base_rate
            fps = float(rate) if rate else 0.0
            if st.duration is not None and st.time_base is not None:
                duration = float(st.duration * st.time_base)
            elif c.duration is not None:
                duration = c.duration / 1_000_000   # microseconds (av.time_base)
            else:
                duration = 0.0
            frames = int(st.frames or 0)
            if not duration and frames and fps:
                duration = frames / fps
            return {"width": st.codec_context.width, "height": st.codec_context.height,
                    "fps": fps, "duration": duration, "frames": frames}
    except Exception:  # noqa: BLE001 - av raises FFmpegError subclasses; `check` reports them
        return None


def check_sample(path: str, key: str, m: dict[str, bytes], kind: str) -> list[Problem]:
    """Every problem of one sample (empty list: the loader would use it)."""
    if kind == PAIR:
        out = []
        ext = next((e for e in dec.IMAGE_EXTS if e in m), None)
        if ext is None:
            out.append(Problem(path, key, "missing_image",
                               f"no .jpg/.jpeg/.png/.webp member (members: .{', .'.join(sorted(m))})"))
        else:
            try:
                _full_decode_image(m[ext])
            except Exception as exn:  # noqa: BLE001 - PIL raises many types
                out.append(Problem(path, key, "corrupt_image",
                                   f".{ext} ({len(m[ext])} bytes): {type(exn).__name__}: {exn}"))
        return out + _check_caption(key, m, path)
    if kind == VIDEO:
        out = []
        ext = next(e for e in dec.VIDEO_EXTS if e in m)
        try:
            if _count_frames(m[ext]) == 0:
                out.append(Problem(path, key, "corrupt_video", f".{ext}: no frame decodes"))
        except Exception as exn:  # noqa: BLE001 - av raises FFmpegError subclasses
            out.append(Problem(path, key, "corrupt_video",
                               f".{ext} ({len(m[ext])} bytes): {type(exn).__name__}: {exn}"))
        return out + _check_caption(key, m, path)
    # interleaved
    try:
        info = json.loads(m["json"])
        if not isinstance(info, dict):
            raise ValueError("the .json is not an object")
        entries = dec._document_entries(info)
    except KeyError:
        return [Problem(path, key, "bad_document", "no .json member")]
    except (UnicodeDecodeError, ValueError) as exn:
        return [Problem(path, key, "bad_document", str(exn))]
    out = []
    ordinal = usable = 0
    for kind_, value in entries:
        if kind_ == "text":
            usable += 1
            continue
        raw = {"__key__": key, **m}
        data = dec._image_member(raw, key, value, ordinal)
        label = value if isinstance(value, str) else f"#{ordinal}"
        ordinal += 1
        if data is None:
            out.append(Problem(path, key, "missing_member",
                               f"image {ordinal - 1} ({label!r}) has no member in the sample"))
            continue
        try:
            _full_decode_image(data)
            usable += 1
        except Exception as exn:  # noqa: BLE001
            out.append(Problem(path, key, "corrupt_image",
                               f"image {ordinal - 1} ({label!r}): {type(exn).__name__}: {exn}"))
    if not usable:
        out.append(Problem(path, key, "empty_document", "no text and no usable image"))
    return out


def caption_of(m: dict) -> str | None:
    """The caption of a raw sample (.txt, else the .json caption), or the joined text of an
    interleaved document; None if there is none."""
    if "txt" in m:
        return m["txt"].decode("utf-8", "replace")
    if "json" in m:
        try:
            info = json.loads(m["json"])
        except ValueError:
            return None
        if isinstance(info, dict):
            if isinstance(info.get("caption"), str):
                return info["caption"]
            if isinstance(info.get("texts"), list):
                return " ".join(t for t in info["texts"] if isinstance(t, str))
            if isinstance(info.get("text_list"), list):
                return " ".join(t for t in info["text_list"] if isinstance(t, str))
    return None


# minor problems: the loader still uses the sample (drops one image, ignores the metadata)
MINOR = ("missing_member", "corrupt_json")


def check_shard(path: str, sample_type: str = "auto") -> ShardReport:
    """Read and decode every member of one shard. ``sample_type``: auto (per sample), pair,
    video or interleaved."""
    rep = ShardReport(path)
    try:
        rep.bytes = os.path.getsize(path)
    except OSError as exn:
        rep.unusable = f"cannot read: {exn}"
        rep.problems.append(Problem(path, None, "damaged_tar", rep.unusable))
        return rep
    members, error = read_members(path)
    rep.members = len(members)
    if error is not None:
        rep.unusable = f"damaged tar ({error})"
        rep.problems.append(Problem(path, None, "damaged_tar", error))
    samples, structural = group_samples(path, members)
    rep.problems += structural
    bad_keys = {p.key for p in structural if p.key is not None}
    rep.samples = len(samples)
    if sample_type == "auto":   # the loader reads a source as one type: take the shard's majority
        votes = Counter(detect_type(m) for _, m in samples)
        sample_type = votes.most_common(1)[0][0] if votes else PAIR
    for key, m in samples:
        kind = sample_type
        if kind == VIDEO and not any(e in m for e in dec.VIDEO_EXTS):
            probs = [Problem(path, key, "missing_video", f"members: .{', .'.join(sorted(m))}")]
        else:
            probs = check_sample(path, key, m, kind)
        rep.types[kind] += 1
        rep.problems += probs
        if not [p for p in probs if p.kind not in MINOR] and key not in bad_keys:
            rep.ok += 1
    if rep.unusable is None and rep.ok == 0:
        rep.unusable = "no usable sample" if rep.samples else "no samples"
        rep.problems.append(Problem(path, None, "no_samples", rep.unusable))
    return rep


# ----------------------------------------------------------------------------------------------
# Index: sample counts per shard (wids shard-index format), next to the shards
# ----------------------------------------------------------------------------------------------

INDEX_NAME = "shardindex.json"


def count_samples(path: str) -> tuple[int, str | None]:
    """Samples of one shard from its tar headers only (fast), and any damage found."""
    from mmgen.data.sources import ShardFile

    sf = ShardFile(path)
    return len(sf), sf.error


def shard_offsets(path: str) -> dict:
    """Byte ranges of the samples of an uncompressed tar, for reading a remote copy by ranges
    (``mmgen.data.remote_shards.RangeShard``): ``{"filesize", "samples": [[key, start, end], ...],
    "error"?}``, ``start`` the first member's header, ``end`` past the last member's data
    (rounded to the 512-byte block), in the order ``ShardFile`` numbers the samples."""
    import tarfile

    from mmgen.data.sources import ShardFile

    sf = ShardFile(path)
    headers: dict[int, int] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if info.isreg():
                    headers[info.offset_data] = info.offset
    except (tarfile.TarError, EOFError, OSError):   # damaged: the samples before it are listed
        pass
    size = os.path.getsize(path)
    samples = []
    for s in sf.samples:
        ms = list(s.members.values())
        start = min(headers[m.offset] for m in ms)
        end = max(m.offset + m.size for m in ms)
        samples.append([s.key, start, min(size, -(-end // 512) * 512)])
    out = {"filesize": size, "samples": samples}
    if sf.error:
        out["error"] = sf.error
    return out


def build_index(paths: list[str], name: str = "", offsets: bool = False) -> dict:
    """A wids ``wids-shard-index-v1`` description of ``paths`` (urls relative to their folder),
    with mmgen's extra ``error`` field for damaged shards.

    Args:
        paths: local shard files of one folder.
        name: a dataset name recorded in the index.
        offsets: also write ``<shard>.offsets.json`` (sample byte ranges) next to every
            uncompressed ``.tar`` and name it in the entry's ``offsets`` field, so a remote copy
            of the folder is read by byte ranges.
    """
    shardlist = []
    for p in paths:
        n, error = count_samples(p)
        entry = {"url": os.path.basename(p), "nsamples": n, "filesize": os.path.getsize(p)}
        if error:
            entry["error"] = error
        if offsets and p.endswith(".tar"):
            from mmgen.data.remote import OFFSETS_SUFFIX

            side = p + OFFSETS_SUFFIX
            with open(side + ".tmp", "w") as f:
                json.dump(shard_offsets(p), f, separators=(",", ":"))
            os.replace(side + ".tmp", side)
            entry["offsets"] = os.path.basename(side)
        shardlist.append(entry)
    out = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": shardlist}
    if name:
        out["name"] = name
    return out


def read_index(folder: str) -> dict[str, dict]:
    """``basename -> entry`` of the index stored in ``folder`` ({} if none or unreadable)."""
    path = os.path.join(folder, INDEX_NAME)
    try:
        with open(path) as f:
            data = json.load(f)
        return {e["url"]: e for e in data.get("shardlist", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
