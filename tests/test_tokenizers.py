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


def test_train_tokenizer_on_shards(shapes_dir, tmp_path):
    """`mmgen data train-tokenizer`: the same shards give the same file, every caption word is
    one token (so a shapes caption is as many tokens as words), any other text still
    round-trips through the byte fallback, and the shards' text is what it learnt from."""
    from tests.conftest import BIN, ROOT, run_cli

    from mmgen.data.synthetic.shapes import all_specs
    from mmgen.models.tokenizers import build_tokenizer, special_ids

    outs = []
    for name in ("a", "b"):
        r = run_cli([str(BIN / "mmgen"), "data", "train-tokenizer", f"{shapes_dir}/train",
                     "--out", str(tmp_path / name)], ROOT)
        assert r.returncode == 0, r.stderr
        assert "data.tokenizer=hf:" in r.stdout
        outs.append((tmp_path / name / "tokenizer.json").read_bytes())
    assert outs[0] == outs[1]
    tok = build_tokenizer(f"hf:{tmp_path / 'a'}")
    for spec in all_specs()[::7]:
        caption = spec.caption()
        assert len(tok.encode(caption)) == len(caption.split())
        assert tok.decode(tok.encode(caption)) == caption
    odd = "an unseen wörd, 42!"
    assert tok.decode(tok.encode(odd)) == odd
    assert len(set(special_ids(tok).values())) == len(SPECIAL_NAMES) and tok.vocab_size <= 512 + len(SPECIAL_NAMES)


def test_train_tokenizer_bad_input_is_one_line(tmp_path):
    import tarfile

    from tests.conftest import BIN, ROOT, run_cli

    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w") as tar:      # a shard with an image member only: no text
        info = tarfile.TarInfo("k.png")
        info.size = 0
        tar.addfile(info)
    for args, want in (([str(empty)], "hold no text"), ([str(tmp_path / "missing.tar")], "missing.tar"),
                       ([str(empty), "--vocab-size", "100"], "must exceed the 256 byte symbols")):
        r = run_cli([str(BIN / "mmgen"), "data", "train-tokenizer", *args, "--out", str(tmp_path / "t")], ROOT)
        assert r.returncode != 0
        lines = [ln for ln in r.stderr.strip().splitlines() if ln]
        assert len(lines) == 1 and want in lines[0], r.stderr


def test_demo_preset_trains_and_scores_with_the_caption_bpe(shapes_dir, tmp_path):
    """`make demo`'s path at toy length: train-tokenizer, experiment=shapes_fast_cpu (caption BPE,
    8x8 patches, 32 positions a row) for 3 steps, then `mmgen eval shapes` draws and captions."""
    import json

    from tests.conftest import BIN, ROOT, data_overrides, run_cli

    tok = tmp_path / "tok"
    assert run_cli([str(BIN / "mmgen"), "data", "train-tokenizer", f"{shapes_dir}/train", "--out", str(tok)],
                   ROOT).returncode == 0
    run = tmp_path / "runs"
    r = run_cli([str(BIN / "mmgen-train"), "experiment=shapes_fast_cpu", f"data.tokenizer=hf:{tok}",
                 *data_overrides(shapes_dir), "trainer.steps=3", "data.batch_size=4", "data.num_workers=0",
                 "trainer.num_threads=1", f"run_dir={run}", "metrics.progress=false",
                 "name=demo"], ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert records and records[-1]["step"] == 3
    out = tmp_path / "eval"
    r = run_cli([str(BIN / "mmgen"), "eval", "shapes", str(run), "--num-samples", "4", "--out", str(out)], ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    scores = json.loads((out / "scores.json").read_text())
    assert scores["num_samples"] == 4 and {"image", "caption"} <= set(scores)
