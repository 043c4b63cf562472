# The text tokenizer protocol: the byte tokenizer's ids, round trips, and the config asking it.
from __future__ import annotations

import pytest

from mmgen.cli.preflight import compose_job
from mmgen.errors import ConfigError
from mmgen.data import DataConfig
from mmgen.models.tokenizers import (SPECIAL_NAMES, TOKENIZERS, ByteTokenizer, TextTokenizer,
                                     build_tokenizer, special_ids)


def test_byte_tokenizer_is_a_text_tokenizer():
    tok = build_tokenizer("bytes")
    assert isinstance(tok, TextTokenizer) and isinstance(tok, ByteTokenizer)
    from mmgen.trainer import trainer as trainer_module

    assert trainer_module.build_tokenizer("bytes") == tok     # the trainer's import path
    assert tok.vocab_size == 264 and set(TOKENIZERS) == {"bytes"}
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt2'.*bytes"):
        build_tokenizer("gpt2")


def test_special_ids_are_distinct_and_above_the_bytes():
    tok = ByteTokenizer()
    ids = special_ids(tok)
    assert list(ids) == list(SPECIAL_NAMES)
    assert len(set(ids.values())) == len(ids)
    assert all(256 <= i < tok.vocab_size for i in ids.values())
    assert ids["visual"] == tok.visual and ids["boi"] == tok.boi


def test_encode_decode_round_trip():
    tok = ByteTokenizer()
    for text in ["", "a red circle", "größer ▲ 三角形"]:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
    assert tok.decode([tok.bos, *tok.encode("hi"), tok.eos, tok.pad]) == "hi"   # specials dropped


def test_config_asks_the_tokenizer():
    with pytest.raises(ValueError, match="tokenizer='nope' is not one of bytes"):
        DataConfig(tokenizer="nope").validate()
    with pytest.raises(ConfigError, match="vocab_size=200 is smaller than the bytes tokenizer's 264 ids"):
        compose_job(["model.vocab_size=200"])
    assert compose_job(["model.vocab_size=264"]).model.vocab_size == 264
