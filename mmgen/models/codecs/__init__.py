# Visual codecs by name (``data.codec``): the protocol, the registry and the pixel convention.
from __future__ import annotations

from mmgen.models.codecs.base import VisualCodec, to_uint8, to_unit
from mmgen.models.codecs.pixel import PixelCodec

# name -> class taking (patch_size); VAE / VQ codecs join here (DESIGN.md contract 5)
CODECS: dict[str, type] = {"pixels": PixelCodec}

__all__ = ["CODECS", "PixelCodec", "VisualCodec", "as_codec", "build_codec", "to_uint8", "to_unit"]


def build_codec(name: str, patch_size: int) -> VisualCodec:
    """The codec registered as ``name``.

    Args:
        name: a key of ``CODECS`` (``data.codec``).
        patch_size: patch side on the codec's grid (``data.patch_size``).
    """
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r} (available: {', '.join(sorted(CODECS))})")
    return CODECS[name](patch_size)


def as_codec(codec: VisualCodec | int) -> VisualCodec:
    """``codec`` itself, or for an int the pixel codec of that patch size (samplers and tests
    that only know a patch size)."""
    return build_codec("pixels", codec) if isinstance(codec, int) else codec
