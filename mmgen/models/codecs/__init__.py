# Visual codecs by name (``data.codec``): the protocol, the registry and the pixel convention.
"""``data.codec`` is either a registered name (``pixels``) or ``<kind>:<path>``, a codec read
from disk by the loader registered for ``kind`` (``CODEC_LOADERS``: ``vae`` and ``vq`` read
mmgen's own trained codecs, see :mod:`mmgen.models.codecs.load`)."""
from __future__ import annotations

from typing import Callable

from mmgen.models.codecs.base import LatentCodec, VisualCodec, to_uint8, to_unit
from mmgen.models.codecs.pixel import PixelCodec

# name -> class taking (patch_size); VAE / VQ codecs join here (DESIGN.md contract 5)
CODECS: dict[str, type] = {"pixels": PixelCodec}


def _load_diffusers(path: str, patch_size: int) -> VisualCodec:
    from mmgen.models.codecs.pretrained import load_diffusers_codec  # reads files: on demand

    return load_diffusers_codec(path, patch_size)


# codecs loaded from files, named ``<kind>:<path>`` in ``data.codec``: kind -> loader taking
# (path, patch_size) (``diffusers:<dir>``; mmgen's own checkpoints register their kinds here)
def _load_mmgen(kind: str) -> Callable[[str, int], VisualCodec]:
    def load(path: str, patch_size: int) -> VisualCodec:
        from mmgen.models.codecs.load import load_codec  # reads files: on demand

        return load_codec(kind, path, patch_size)
    return load


CODEC_LOADERS: dict[str, Callable[[str, int], VisualCodec]] = {
    "diffusers": _load_diffusers, "vae": _load_mmgen("vae"), "vq": _load_mmgen("vq")}

__all__ = ["CODECS", "CODEC_LOADERS", "LatentCodec", "PixelCodec", "VisualCodec", "as_codec",
           "build_codec", "codec_known", "to_uint8", "to_unit"]

# a loaded codec is built once per (name, patch size) and process: configs ask for geometry
# many times, and the weights are read once
_LOADED: dict[tuple[str, int], VisualCodec] = {}


def codec_known(name: str) -> bool:
    """Whether ``name`` is a registered codec or ``<kind>:<path>`` of a registered loader."""
    kind, sep, path = name.partition(":")
    return name in CODECS or (bool(sep) and kind in CODEC_LOADERS and bool(path))


def build_codec(name: str, patch_size: int) -> VisualCodec:
    """The codec registered as ``name``, or loaded from ``<kind>:<path>``.

    Args:
        name: a key of ``CODECS``, or ``<kind>:<path>`` with ``kind`` a key of
            ``CODEC_LOADERS`` (``data.codec``).
        patch_size: patch side on the codec's grid (``data.patch_size``).
    """
    if name in CODECS:
        return CODECS[name](patch_size)
    kind, sep, path = name.partition(":")
    if not sep or kind not in CODEC_LOADERS:
        loaders = ", ".join(f"{k}:<path>" for k in sorted(CODEC_LOADERS))
        raise ValueError(f"unknown codec {name!r} (available: {', '.join(sorted(CODECS))}); "
                         f"or from files: {loaders}")
    if not path:
        raise ValueError(f"codec {name!r}: no path after '{kind}:'")
    key = (name, int(patch_size))
    if key not in _LOADED:
        _LOADED[key] = CODEC_LOADERS[kind](path, patch_size)
    return _LOADED[key]


def as_codec(codec: VisualCodec | int) -> VisualCodec:
    """``codec`` itself, or for an int the pixel codec of that patch size (samplers and tests
    that only know a patch size)."""
    return build_codec("pixels", codec) if isinstance(codec, int) else codec
