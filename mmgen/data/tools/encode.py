# `mmgen data encode`: pair shards -> latent shards of a frozen codec, keyed by the source keys.
"""Every sample is decoded exactly as the training loader decodes it (``decode_sample`` at
``image_size``), encoded by the codec in batches, and written to a shard of the same name
under ``out``: ``{key}.txt`` / ``{key}.json`` copied byte for byte, ``{key}.latent.npy`` (or
``{key}.codes.npy``). Samples the loader would skip are skipped (and counted) here too.
``out/codec.json`` tags the directory with the codec's fingerprint (``mmgen/data/latents.py``).
Not the training path: the loader only reads what this writes.
"""
from __future__ import annotations

import io
import os
import tarfile
import time
from collections import Counter

import numpy as np
import torch

from mmgen.batch import CONTINUOUS
from mmgen.data import decode as dec
from mmgen.data.latents import CODES, LATENT, MANIFEST, write_manifest
from mmgen.data.sources import ShardFile, expand_shards
from mmgen.models.codecs import LatentCodec, to_unit


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644   # mtime 0: reproducible shards
    tar.addfile(info, io.BytesIO(data))


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def encode_shards(shards: str, codec: LatentCodec, image_size: int, out: str,
                  batch_size: int = 32, device: str = "cpu", log=print) -> dict:
    """Encode every pair sample of ``shards`` into latent shards under ``out``.

    Args:
        shards: shard files, directories, globs or brace patterns ("::"-joined).
        codec: a frozen codec with latents (``LatentCodec``: a VAE or VQ tokenizer).
        image_size: side the images are decoded at (must equal the training ``data.image_size``).
        out: output directory (created; must not hold a different codec's ``codec.json``).
        batch_size: images per encoder call.
        device: where the codec runs ("cpu", "cuda").
        log: called with one progress line per shard.
    Returns:
        the manifest written to ``out/codec.json`` plus ``skipped`` counts by reason.
    """
    if not isinstance(codec, LatentCodec):
        raise ValueError(f"mmgen data encode: codec {codec.name} has no latents to cache "
                         f"(pixels are read from the raw shards)")
    paths = expand_shards(shards)
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) != len(names):
        raise ValueError("mmgen data encode: two input shards share a file name; encode each "
                         "directory into its own --out")
    os.makedirs(out, exist_ok=True)
    if os.path.isfile(os.path.join(out, MANIFEST)):
        raise ValueError(f"mmgen data encode: {out} already holds latent shards ({MANIFEST}); "
                         f"use an empty --out")
    codec.to(device)
    member = LATENT if codec.kind == CONTINUOUS else CODES
    skipped: Counter[str] = Counter()
    total, t0 = 0, time.time()
    for path in paths:
        sf = ShardFile(path)
        target = os.path.join(out, os.path.basename(path))
        with tarfile.open(target + ".tmp", "w") as tar:
            pending: list[tuple[dict, torch.Tensor]] = []

            def flush() -> None:
                if not pending:
                    return
                latents = codec.encode_latents(torch.stack([p for _, p in pending])).cpu()
                for (raw, _), z in zip(pending, latents):
                    key = raw["__key__"]
                    for ext in ("txt", "json"):
                        if ext in raw:
                            _add(tar, f"{key}.{ext}", raw[ext])
                    z = z.numpy().astype(np.float32 if codec.kind == CONTINUOUS else np.int32)
                    _add(tar, f"{key}.{member}", _npy(z))
                pending.clear()

            for i in range(len(sf)):
                raw = sf.load(i)
                sample = dec.decode_sample(raw, image_size)
                if isinstance(sample, tuple):
                    skipped[sample[0]] += 1
                    continue
                pending.append((raw, to_unit(sample.image)))
                total += 1
                if len(pending) == batch_size:
                    flush()
            flush()
        sf.close()
        if sf.error is not None:
            skipped[dec.SHARD_ERROR] += 1
        os.replace(target + ".tmp", target)   # a crashed run leaves no half shard under its name
        log(f"{path} -> {target} ({time.time() - t0:.1f} s)")
    manifest = write_manifest(out, codec, image_size, shards, total)
    return {**manifest, "skipped": dict(skipped)}
