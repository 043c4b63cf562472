# Text tokenizers by name (``data.tokenizer``): the protocol and the registry.
from __future__ import annotations

from mmgen.models.tokenizers.base import SPECIAL_NAMES, TextTokenizer, special_ids
from mmgen.models.tokenizers.text import ByteTokenizer

# name -> class built without arguments
TOKENIZERS: dict[str, type] = {"bytes": ByteTokenizer}


def _hf(path: str):
    from mmgen.models.tokenizers.hf import load_hf_tokenizer

    return load_hf_tokenizer(path)


# "<prefix>:<argument>" -> a builder of the argument: `data.tokenizer=hf:/models/Qwen2.5-1.5B`
TOKENIZER_PREFIXES: dict[str, object] = {"hf": _hf}

__all__ = ["SPECIAL_NAMES", "TOKENIZERS", "TOKENIZER_PREFIXES", "ByteTokenizer", "TextTokenizer",
           "build_tokenizer", "is_tokenizer_name", "special_ids"]


def is_tokenizer_name(name: str) -> bool:
    """``name`` is a registered tokenizer or ``<prefix>:<argument>`` of a registered prefix."""
    prefix, sep, arg = name.partition(":")
    return name in TOKENIZERS or bool(sep and arg and prefix in TOKENIZER_PREFIXES)


def build_tokenizer(name: str = "bytes") -> TextTokenizer:
    """The tokenizer registered as ``name`` (``data.tokenizer``), or ``hf:<dir>``."""
    if name in TOKENIZERS:
        return TOKENIZERS[name]()
    if is_tokenizer_name(name):
        prefix, _, arg = name.partition(":")
        return TOKENIZER_PREFIXES[prefix](arg)
    raise ValueError(f"unknown tokenizer '{name}' (available: {', '.join(sorted(TOKENIZERS))}, "
                     f"{', '.join(p + ':<dir>' for p in TOKENIZER_PREFIXES)})")
