# A Hugging Face `tokenizers` tokenizer (tokenizer.json) behind the text tokenizer protocol, mmgen's specials added.
"""``data.tokenizer=hf:<dir>``: the pretrained model's own vocabulary, so a run started from it
reads text as the model learnt to. mmgen's specials (``SPECIAL_NAMES``) take, in order of
preference: the tokenizer's own token for that role (``bos_token`` / ``eos_token`` /
``pad_token`` of ``tokenizer_config.json``, or a known name such as ``<|vision_start|>``), then
one of its reserved tokens (``<|reserved_special_token_N|>``), then a new id appended above
the vocabulary. The vocabulary here starts with the model's embedding rows when the directory
has a ``config.json`` (Qwen2.5 has more rows than tokens), so appended ids never collide with
a pretrained row. The model's ``vocab_size`` follows (``model=hf:<dir>`` reads it from here).
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from mmgen.models.tokenizers.base import SPECIAL_NAMES

# tokens that already play a role, by mmgen special (tried after tokenizer_config.json's)
KNOWN = {
    "bos": ("<|begin_of_text|>", "<s>", "<bos>"),
    "eos": ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>"),
    "pad": ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]"),
    "boi": ("<|vision_start|>", "<|begin_of_image|>", "<start_of_image>", "<boi>"),
    "eoi": ("<|vision_end|>", "<|end_of_image|>", "<end_of_image>", "<eoi>"),
    "bov": ("<|begin_of_video|>", "<bov>"),
    "eov": ("<|end_of_video|>", "<eov>"),
    "visual": ("<|image_pad|>", "<image>", "<image_soft_token>"),
}
_RESERVED = re.compile(r"reserved", re.IGNORECASE)
_CONFIG_ROLE = {"bos": "bos_token", "eos": "eos_token", "pad": "pad_token"}


def _content(token) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


class HFTokenizer:
    """``tokenizer.json`` via the ``tokenizers`` package (a :class:`TextTokenizer`).

    Args:
        path: a directory with ``tokenizer.json`` (and optionally ``tokenizer_config.json``
            and the model's ``config.json``).

    Attributes:
        base_size: ids below it belong to the pretrained vocabulary (or embedding rows).
        appended: specials given new ids above ``base_size``, by name.
        mapped: specials that reuse a token of the vocabulary, name -> token string.
    """

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError("data.tokenizer=hf:... needs the `tokenizers` package (pip install 'mmgen[hf]')") from None
        self.path = Path(path)
        f = self.path / "tokenizer.json"
        if not f.is_file():
            raise FileNotFoundError(f"{self.path}: no tokenizer.json (data.tokenizer=hf:<dir> reads a Hugging Face "
                                    f"`tokenizers` file)")
        self._tok = Tokenizer.from_file(str(f))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._num_tokens = max(vocab.values()) + 1
        rows = 0
        if (self.path / "config.json").is_file():
            rows = int(json.loads((self.path / "config.json").read_text()).get("vocab_size") or 0)
        self.base_size = max(self._num_tokens, rows)
        cfg_file = self.path / "tokenizer_config.json"
        tcfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self.ids, self.mapped, self.appended = self._assign(vocab, added, tcfg)

    def _assign(self, vocab: dict, added: dict, tcfg: dict):
        ids, mapped, appended, taken = {}, {}, {}, set()
        # eos first: Qwen names <|endoftext|> as both eos and pad, and mmgen's ids are distinct
        for name in ("eos", "bos", *(n for n in SPECIAL_NAMES if n not in ("eos", "bos"))):
            own = _content(tcfg.get(_CONFIG_ROLE.get(name, ""), None))
            for token in ((own,) if own else ()) + KNOWN[name]:
                if token in vocab and vocab[token] not in taken:
                    ids[name], mapped[name] = vocab[token], token
                    taken.add(vocab[token])
                    break
        reserved = sorted(i for t, i in added.items() if _RESERVED.search(t) and i not in taken)
        for name in SPECIAL_NAMES:
            if name in ids:
                continue
            if reserved:
                ids[name] = reserved.pop(0)
                mapped[name] = self._tok.id_to_token(ids[name])
            else:
                ids[name] = appended[name] = self.base_size + len(appended)
            taken.add(ids[name])
        return ids, mapped, appended

    @property
    def vocab_size(self) -> int:
        return self.base_size + len(self.appended)

    def __getattr__(self, name: str) -> int:
        ids = self.__dict__.get("ids")
        if ids is not None and name in ids:
            return ids[name]
        raise AttributeError(name)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        specials = set(self.ids.values())
        keep = [int(i) for i in ids if 0 <= int(i) < self._num_tokens and int(i) not in specials]
        return self._tok.decode(keep, skip_special_tokens=True)

    def describe(self) -> str:
        """One line: where each special went (logged at start-up)."""
        parts = [f"{n}={self.ids[n]}" + (f" ({self.mapped[n]})" if n in self.mapped else " (new)")
                 for n in SPECIAL_NAMES]
        return f"{self.path}: {self.base_size} ids + {len(self.appended)} new specials; " + ", ".join(parts)


@functools.lru_cache(maxsize=8)
def _cached(path: str, mtime: float) -> HFTokenizer:
    return HFTokenizer(path)


def load_hf_tokenizer(path: str) -> HFTokenizer:
    """The tokenizer of directory ``path``, read once per process (and again if it changes):
    config checks, resolvers and the trainer all ask for it."""
    f = Path(path) / "tokenizer.json"
    return _cached(str(Path(path)), f.stat().st_mtime if f.is_file() else 0.0)
