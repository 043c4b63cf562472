# Text tokenizers by name (``data.tokenizer``): the protocol and the registry.
from __future__ import annotations

from mmgen.models.tokenizers.base import SPECIAL_NAMES, TextTokenizer, special_ids
from mmgen.models.tokenizers.text import ByteTokenizer

# name -> class built without arguments; a Hugging Face `tokenizer.json` reader joins here
TOKENIZERS: dict[str, type] = {"bytes": ByteTokenizer}

__all__ = ["SPECIAL_NAMES", "TOKENIZERS", "ByteTokenizer", "TextTokenizer", "build_tokenizer",
           "special_ids"]


def build_tokenizer(name: str = "bytes") -> TextTokenizer:
    """The tokenizer registered as ``name`` (``data.tokenizer``)."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer '{name}' (available: {', '.join(sorted(TOKENIZERS))})")
    return TOKENIZERS[name]()
