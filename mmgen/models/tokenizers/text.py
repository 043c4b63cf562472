# Byte-level text tokenizer: the default, needs no vocabulary file and no download.
"""Byte-level tokenizer (a :class:`~mmgen.models.tokenizers.base.TextTokenizer`): ids 0..255
are UTF-8 bytes, then the special tokens, 264 ids in all.

Visual spans are framed by BOI/EOI (images) and BOV/EOV (videos); discrete visual codes,
when a model uses them, live above ``vocab_size`` in the shared vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ByteTokenizer:
    num_bytes: int = 256

    @property
    def pad(self) -> int: return 256
    @property
    def bos(self) -> int: return 257
    @property
    def eos(self) -> int: return 258
    @property
    def boi(self) -> int: return 259
    @property
    def eoi(self) -> int: return 260
    @property
    def bov(self) -> int: return 261
    @property
    def eov(self) -> int: return 262
    @property
    def visual(self) -> int:
        """Placeholder id stored in ``tokens`` at continuous visual positions."""
        return 263

    @property
    def vocab_size(self) -> int:
        return 264

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        out = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return out.decode("utf-8", errors="replace")
