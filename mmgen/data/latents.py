# Cached latents in shards (written by `mmgen data encode`): the manifest check and the sample decoder.
"""A latent shard holds, per source key, the source's caption (``{key}.txt``), metadata
(``{key}.json``, when it had one) and the codec's latent of its image: ``{key}.latent.npy``
(continuous: the scaled latent ``[c, h, w]`` float32) or ``{key}.codes.npy`` (discrete:
``[h, w]`` codes). Unpatched, so one cache serves any ``data.patch_size`` of the codec.

The directory holding the shards has a ``codec.json`` manifest: the codec's fingerprint (a hash
of its config, weights and latent convention), its name, kind and the image size the sources
were decoded at. A source whose shard directories hold a manifest is a *cached* source; the
loader refuses it (one line) unless fingerprint and image size equal the configured codec's, so
latents of another codec never train silently. Cached and raw sources mix in one run.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from mmgen.batch import CONTINUOUS
from mmgen.errors import ConfigError

MANIFEST = "codec.json"
LATENT, CODES = "latent.npy", "codes.npy"
CACHE_VERSION = 1


@dataclass
class CachedLatent:
    """A decoded sample's visual payload read from the cache, in place of its image: the
    span's ``rows`` (as the codec's ``encode`` gives them, zero-padded to the worker payload
    width under ``encode_on=device``) on ``grid``."""

    rows: torch.Tensor
    grid: tuple[int, int, int]


def write_manifest(out_dir: str, codec, image_size: int, source: str, samples: int) -> dict:
    """The ``codec.json`` of a directory of latent shards (``mmgen data encode``).

    Args:
        out_dir: the directory.
        codec: the :class:`~mmgen.models.codecs.base.LatentCodec` that encoded them.
        image_size: side the images were decoded at.
        source: the shards they came from (for people).
        samples: samples written.
    """
    manifest = {"version": CACHE_VERSION, "fingerprint": codec.fingerprint(), "codec": codec.name,
                "kind": "continuous" if codec.kind == CONTINUOUS else "discrete",
                "channels": codec.channels, "downsample": codec.downsample,
                "image_size": int(image_size), "source": source, "samples": int(samples)}
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def source_manifest(name: str, shards: list[str]) -> dict | None:
    """The manifest of a source's shards, None for a raw source; ConfigError (one line) when
    only some of its directories hold one or they disagree.

    Args:
        name: the source's name (for the message).
        shards: its shard paths.
    """
    dirs = sorted({os.path.dirname(os.path.abspath(s)) for s in shards})
    found = {d: os.path.join(d, MANIFEST) for d in dirs if os.path.isfile(os.path.join(d, MANIFEST))}
    if not found:
        return None
    if len(found) != len(dirs):
        raw = sorted(set(dirs) - set(found))
        raise ConfigError(f"data: source {name!r} mixes latent shards (with {MANIFEST}) and raw "
                         f"ones ({raw[0]}): give them as two sources")
    manifests = []
    for path in found.values():
        try:
            with open(path) as f:
                manifests.append(json.load(f))
        except (OSError, ValueError) as e:
            raise ConfigError(f"data: source {name!r}: unreadable {path} ({e})") from None
    fps = sorted({m.get("fingerprint") for m in manifests})
    if len(fps) > 1:
        raise ConfigError(f"data: source {name!r} holds latents of {len(fps)} codecs "
                         f"(fingerprints {', '.join(map(str, fps))})")
    return manifests[0]


def check_manifest(name: str, manifest: dict, codec, image_size: int) -> None:
    """Refuse (one-line ConfigError: the entry exits 2) latents that the configured codec did not make.

    Args:
        name: the source's name.
        manifest: its ``codec.json``.
        codec: the configured codec (``data.codec``).
        image_size: the configured ``data.image_size``.
    """
    mine = codec.fingerprint() if hasattr(codec, "fingerprint") else codec.name
    if manifest.get("fingerprint") != mine:
        raise ConfigError(f"data: source {name!r} holds latents of codec fingerprint "
                         f"{manifest.get('fingerprint')} ({manifest.get('codec')}), but data.codec="
                         f"{codec.name} has fingerprint {mine}: re-encode the shards with "
                         f"`mmgen data encode` or configure the codec that made them")
    if int(manifest.get("image_size", -1)) != int(image_size):
        raise ConfigError(f"data: source {name!r} holds latents of {manifest.get('image_size')}-px "
                         f"images, data.image_size is {image_size}: re-encode or set data.image_size")


def load_array(data: bytes) -> np.ndarray:
    """A ``.npy`` member (no pickled objects: ``allow_pickle=False``)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def cached_visual(raw: dict, codec, width: int) -> CachedLatent | tuple[str, str]:
    """The cached payload of one raw sample, or a skip ``(reason, detail)``.

    Args:
        raw: the webdataset sample.
        codec: the configured codec (``latent_rows``).
        width: the payload width the batch carries (``worker_codec().payload_dim``); latent
            rows narrower than it are zero-padded (``encode_on=device``).
    """
    from mmgen.data.decode import CORRUPT_IMAGE, MISSING_IMAGE

    member = LATENT if codec.kind == CONTINUOUS else CODES
    if member not in raw:
        return MISSING_IMAGE, f"no {member} in a latent shard (members: {sorted(k for k in raw if not k.startswith('__'))})"
    try:
        arr = load_array(raw[member])
    except (ValueError, OSError) as e:
        return CORRUPT_IMAGE, f"{member}: {e}"
    latent = torch.from_numpy(np.ascontiguousarray(arr))
    want = 3 if codec.kind == CONTINUOUS else 2
    if latent.dim() != want or (codec.kind == CONTINUOUS and latent.shape[0] != codec.channels):
        return CORRUPT_IMAGE, f"{member}: shape {list(latent.shape)} does not fit codec {codec.name}"
    h, w = latent.shape[-2:]
    p = codec.patch_size
    if h % p or w % p:
        return CORRUPT_IMAGE, f"{member}: latent {h}x{w} is not divisible by patch size {p}"
    rows = codec.latent_rows(latent)
    if codec.kind == CONTINUOUS and rows.shape[1] < width:
        rows = torch.nn.functional.pad(rows, (0, width - rows.shape[1]))
    return CachedLatent(rows, (1, h // p, w // p))


def decode_cached_sample(raw: dict, codec, width: int):
    """A pair sample of a latent shard -> ``decode.Sample`` whose ``image`` is a
    :class:`CachedLatent`, or a skip ``(reason, detail)``; arguments as :func:`cached_visual`."""
    from mmgen.data import decode as dec

    visual = cached_visual(raw, codec, width)
    if isinstance(visual, tuple):
        return visual
    text = dec._read_text(raw, parse_json="txt" not in raw)
    if isinstance(text[0], str):
        return text
    info, caption = text
    return dec.Sample(raw["__key__"], raw.get("__url__", ""), visual, caption, info)
