# Offline tool: train a byte-level BPE `tokenizer.json` on the texts of WebDataset shards.
"""``mmgen data train-tokenizer SHARDS... --out DIR``: a Hugging Face ``tokenizers`` byte-level
BPE learnt from the captions (``.txt``, else the ``.json`` caption) and interleaved texts of the
shards (:func:`mmgen.data.tools.check.caption_of`), saved as ``DIR/tokenizer.json`` for
``data.tokenizer=hf:DIR``. Byte-level means every string still encodes (unknown words fall back
to byte tokens), so a prompt outside the corpus is never refused; mmgen's specials (BOS, EOS,
BOI, ...) are appended above the learnt ids when the tokenizer is loaded
(``mmgen/models/tokenizers/hf.py``).

Why: a caption of the embedded shapes data is ~40 bytes but 8 words; as words the documents of
``experiment=shapes_fast_cpu`` are a third as long, so a CPU step costs a third as much.

Determinism: texts are read in the sorted order of the shards and of their members, and the
trainer is single-threaded (``RAYON_NUM_THREADS=1`` while it runs), so the same shards give
the same file byte for byte.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator


def shard_texts(paths: Iterable[str]) -> Iterator[str]:
    """Every text of the shards ``paths``, in order; a damaged shard raises one clear line."""
    from mmgen.data.tools.check import caption_of, group_samples, read_members

    for path in paths:
        members, error = read_members(path)
        if error:
            raise ValueError(f"{path}: {error} (run `mmgen data check` on it)")
        samples, _ = group_samples(path, members)
        for _, m in samples:
            text = caption_of(m)
            if text:
                yield text


def train_bpe(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512,
              min_frequency: int = 2) -> Path:
    """Train a byte-level BPE on ``texts`` and write ``out_dir/tokenizer.json``.

    Args:
        texts: the corpus (at least one non-empty text).
        out_dir: created if missing.
        vocab_size: at most this many ids (the 256 byte symbols included); training stops
            earlier when no pair occurs ``min_frequency`` times.
        min_frequency: pairs seen fewer times are not merged.

    Returns:
        The path of ``tokenizer.json``.
    """
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise ValueError("train-tokenizer needs the `tokenizers` package (pip install 'mmgen[hf]')") from None
    if vocab_size <= 256:
        raise ValueError(f"--vocab-size must exceed the 256 byte symbols, got {vocab_size}")
    corpus = [t for t in texts if t]
    if not corpus:
        raise ValueError("train-tokenizer: the shards hold no text (.txt captions or .json texts)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    before = os.environ.get("RAYON_NUM_THREADS")
    os.environ["RAYON_NUM_THREADS"] = "1"
    try:
        tok.train_from_iterator(corpus, trainer=trainer)
    finally:
        if before is None:
            os.environ.pop("RAYON_NUM_THREADS", None)
        else:
            os.environ["RAYON_NUM_THREADS"] = before
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.json"
    tmp = path.with_suffix(".json.tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return path
