# Visual codecs by name (``data.codec``): the protocol, the registry and the pixel convention.
"""``data.codec`` is either a registered name (``pixels``) or ``<kind>:<path>``, a codec read
from disk by the loader registered for ``kind`` (``CODEC_LOADERS``: ``vae`` and ``vq`` read
mmgen's own trained codecs, see :mod:`mmgen.models.codecs.load`)."""
from __future__ import annotations

from mmgen.models.codecs.base import VisualCodec, to_uint8, to_unit
from mmgen.models.codecs.pixel import PixelCodec

# name -> class taking (patch_size); VAE / VQ codecs join here (DESIGN.md contract 5)
CODECS: dict[str, type] = {"pixels": PixelCodec}


def _load_mmgen(kind: str):
    def load(path: str, patch_size: int) -> VisualCodec:
        from mmgen.models.codecs.load import load_codec

        return load_codec(kind, path, patch_size)
    return load


# kind -> loader(path, patch_size) for ``data.codec=<kind>:<path>``
CODEC_LOADERS: dict = {"vae": _load_mmgen("vae"), "vq": _load_mmgen("vq")}

__all__ = ["CODECS", "CODEC_LOADERS", "PixelCodec", "VisualCodec", "as_codec", "build_codec",
           "codec_known", "to_uint8", "to_unit"]


def codec_known(name: str) -> bool:
    """``name`` is a registered codec or ``<kind>:<path>`` of a registered loader kind (the path
    is checked when the codec is built)."""
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
    if sep and kind in CODEC_LOADERS and path:
        return CODEC_LOADERS[kind](path, patch_size)
    raise ValueError(f"unknown codec {name!r} (available: {', '.join(sorted(CODECS))}) nor "
                     f"<kind>:<path> with kind one of {', '.join(sorted(CODEC_LOADERS))}")


def as_codec(codec: VisualCodec | int) -> VisualCodec:
    """``codec`` itself, or for an int the pixel codec of that patch size (samplers and tests
    that only know a patch size)."""
    return build_codec("pixels", codec) if isinstance(codec, int) else codec
