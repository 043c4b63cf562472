# Pixel and grid helpers under their old import path; each has one home, re-exported here.
"""Patch geometry lives in the codec (``mmgen.models.codecs``): new code asks a
``VisualCodec`` (``encode`` / ``decode`` / ``grid`` / ``payload_dim``) instead of patching
itself. The evaluation, CLI and sampler modules still import these names from here."""
from __future__ import annotations

from mmgen.documents import grid_coords
from mmgen.models.codecs.base import to_uint8, to_unit
from mmgen.models.codecs.pixel import patchify, unpatchify

__all__ = ["grid_coords", "patchify", "to_uint8", "to_unit", "unpatchify"]
