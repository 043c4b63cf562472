# The text tokenizer protocol (DESIGN.md contract 5): what the data pipeline and samplers may use.
"""Everything above the protocol (document building, samplers, config checks) uses these
members only, so a Hugging Face ``tokenizers`` vocabulary can replace the byte tokenizer
without touching them. Framing and placeholder ids are part of the vocabulary; discrete visual
codes sit above ``vocab_size`` in the model's shared vocabulary.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

SPECIAL_NAMES = ("pad", "bos", "eos", "boi", "eoi", "bov", "eov", "visual")


@runtime_checkable
class TextTokenizer(Protocol):
    """A text tokenizer.

    Attributes:
        vocab_size: ids are ``0 .. vocab_size - 1`` (specials included).
        pad, bos, eos: padding, begin and end of a document.
        boi, eoi, bov, eov: open / close an image span, a video span.
        visual: the placeholder id stored in ``tokens`` at continuous visual positions.
    """

    @property
    def vocab_size(self) -> int: ...
    @property
    def pad(self) -> int: ...
    @property
    def bos(self) -> int: ...
    @property
    def eos(self) -> int: ...
    @property
    def boi(self) -> int: ...
    @property
    def eoi(self) -> int: ...
    @property
    def bov(self) -> int: ...
    @property
    def eov(self) -> int: ...
    @property
    def visual(self) -> int: ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no specials added)."""
        ...

    def decode(self, ids) -> str:
        """Text of ``ids``; special ids are dropped."""
        ...


def special_ids(tokenizer: TextTokenizer) -> dict[str, int]:
    """``{name: id}`` of every special of ``SPECIAL_NAMES``."""
    return {name: int(getattr(tokenizer, name)) for name in SPECIAL_NAMES}
