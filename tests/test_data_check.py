# `mmgen data check|index|stats|preview|prepare` on shards written here with Python's tarfile.
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmgen.cli.main import main
from mmgen.data.synthetic.shapes_video import encode_mp4
from tests.conftest import BIN, run_cli
from tests.test_data_pipeline import timeout_fixture

_deadline = timeout_fixture(120)


def _jpeg(seed=0, size=48) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tar(path, members) -> None:
    """Write members [(name, bytes)] in this exact order, as a tool outside mmgen would."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def img2dataset_dir(tmp_path):
    """Shards in img2dataset layout: {key}.jpg, {key}.txt, {key}.json; one of them dirty, one
    truncated by an interrupted copy."""
    good = _jpeg()
    meta = lambda k, **kw: json.dumps({"key": k, "status": "success", **kw}).encode()  # noqa: E731
    _tar(tmp_path / "00000.tar", [
        ("000000000.jpg", good), ("000000000.txt", b"a photo"), ("000000000.json", meta("0")),
        ("000000001.jpg", good[: len(good) // 2]), ("000000001.txt", b"cut"),     # truncated JPEG
        ("000000001.json", meta("1")),
        ("000000002.jpg", good), ("000000002.json", meta("2", url="http://x")),  # .json, no caption
        ("000000003.jpg", good), ("000000004.jpg", good),                         # 003 split by 004
        ("000000003.txt", b"three"), ("000000004.txt", b"four"),
        ("000000005.jpg", good), ("000000005.jpg", good), ("000000005.txt", b"dup"),  # twice
        ("000000006.txt", b"an orphan caption"),                                   # no image
        ("000000007.jpg", good), ("000000007.json", b"{not json"),               # bad metadata
    ])
    _tar(tmp_path / "00001.tar", [(f"{i:09d}.{e}", d) for i in range(10, 14)
                                   for e, d in (("jpg", _jpeg(i)), ("txt", b"fine"))])
    return tmp_path


def _run(capsys, *args) -> tuple[int, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_check_reports_each_problem_precisely(img2dataset_dir, capsys):
    code, out = _run(capsys, "data", "check", str(img2dataset_dir), "--json",
                     str(img2dataset_dir / "report.json"))
    shard = str(img2dataset_dir / "00000.tar")
    lines = out.splitlines()

    def line_for(key, kind):
        hits = [l for l in lines if l.startswith(f"{shard}: key {key}: {kind}: ")]
        assert hits, f"no {kind} line for {key}:\n{out}"
        return hits[0]

    assert "image file is truncated" in line_for("000000001", "corrupt_image") \
        or "cannot identify" in line_for("000000001", "corrupt_image")
    assert "no .txt member and the .json has no 'caption' field" in \
        line_for("000000002", "missing_caption")
    assert "run at member 10 ('000000003.txt')" in line_for("000000003", "non_contiguous_key")
    assert "appears twice" in line_for("000000005", "duplicate_member")
    assert "members: .txt" in line_for("000000006", "missing_image")
    assert "not valid JSON" in line_for("000000007", "corrupt_json")
    assert not [l for l in lines if "000000000" in l]              # the clean sample is silent
    assert f"{img2dataset_dir / '00001.tar'}: 4 samples, 4 ok" in out
    assert "corrupt_image 1" in out and "missing_caption" in out
    assert code == 0          # dirty samples are skipped by the loader: the shards are usable
    report = json.loads((img2dataset_dir / "report.json").read_text())
    kinds = {p["kind"] for s in report["shards"] for p in s["problems"]}
    assert {"corrupt_image", "missing_caption", "non_contiguous_key", "duplicate_member",
            "missing_image", "corrupt_json"} <= kinds
    code, _ = _run(capsys, "data", "check", str(img2dataset_dir), "--strict")
    assert code == 1


def test_check_exits_non_zero_on_an_unusable_shard(img2dataset_dir, capsys):
    data = (img2dataset_dir / "00001.tar").read_bytes()
    (img2dataset_dir / "00002.tar").write_bytes(data[: len(data) // 2 + 100])   # cut mid-member
    (img2dataset_dir / "00003.tar").write_bytes(b"this is not a tar file" * 30)
    code, out = _run(capsys, "data", "check", str(img2dataset_dir))
    assert code == 1
    assert f"{img2dataset_dir / '00002.tar'}: damaged_tar: " in out
    assert f"{img2dataset_dir / '00003.tar'}: damaged_tar: " in out
    assert "2 unusable shard(s): 00002.tar, 00003.tar" in out.splitlines()[-1]


def test_check_video_and_interleaved_shards(tmp_path, capsys):
    frames = np.zeros((4, 16, 16, 3), np.uint8)
    mp4 = encode_mp4(frames, 4)
    _tar(tmp_path / "v.tar", [("a.mp4", mp4), ("a.txt", b"dark"), ("b.mp4", mp4[:200]),
                              ("b.txt", b"cut")])
    doc = json.dumps({"texts": ["hello", None, None], "images": [None, "0.jpg", "1.jpg"]})
    _tar(tmp_path / "d.tar", [("x.json", doc.encode()), ("x.0.jpg", _jpeg())])
    code, out = _run(capsys, "data", "check", str(tmp_path))
    assert f"{tmp_path / 'v.tar'}: key b: corrupt_video: .mp4 (200 bytes)" in out
    assert f"{tmp_path / 'd.tar'}: key x: missing_member: image 1 ('1.jpg') has no member" in out
    assert "v.tar: 2 samples, 1 ok" in out and "d.tar: 1 samples, 1 ok" in out and code == 0


def test_check_entry_point_and_bad_pattern(tmp_path, img2dataset_dir):
    r = run_cli([str(BIN / "mmgen"), "data", "check", str(tmp_path / "none-*.tar")], cwd=tmp_path,
                timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("mmgen: error:") and "none-*" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli([str(BIN / "mmgen"), "data", "check", str(img2dataset_dir / "00001.tar")],
                cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "1 shards, 4 samples: 4 ok" in r.stdout


def test_index_stats_and_preview(img2dataset_dir, tmp_path, capsys):
    code, out = _run(capsys, "data", "index", str(img2dataset_dir))
    index = json.loads((img2dataset_dir / "shardindex.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1"
    counts = {e["url"]: e["nsamples"] for e in index["shardlist"]}
    assert counts == {"00000.tar": 11, "00001.tar": 4} and code == 0   # 003, 004, 005 split
    code, out = _run(capsys, "data", "stats", str(img2dataset_dir), "--sample", "0")
    assert "samples: 15" in out and "2 from shardindex.json" in out
    code, out = _run(capsys, "data", "stats", str(img2dataset_dir))
    assert "samples: 15" in out and ".jpg" in out and "caption characters" in out
    png = tmp_path / "sheet.png"
    code, out = _run(capsys, "data", "preview", str(img2dataset_dir), "--out", str(png), "--num",
                     "6", "--size", "64")
    assert code == 0
    with Image.open(png) as im:
        assert im.size[0] == 3 * (64 + 4) and im.size[1] > 2 * 64


def test_prepare_prints_commands_and_converts_metadata(tmp_path, capsys):
    code, out = _run(capsys, "data", "prepare", "cc3m", "--out", str(tmp_path / "cc3m"))
    assert code == 0
    assert "img2dataset --url_list" in out and "--output_format webdataset" in out
    assert f"mmgen data check {tmp_path / 'cc3m'}" in out
    meta = tmp_path / "docs.jsonl"
    meta.write_text("\n".join(json.dumps({"images": ["http://a/1.jpg", None, "http://a/2.jpg"],
                                          "texts": [None, "t", None], "id": i})
                              for i in range(3)))
    dst = tmp_path / "urls.csv"
    code, out = _run(capsys, "data", "prepare", "obelics", "--out", str(tmp_path / "o"),
                     "--metadata", str(meta), "--convert-to", str(dst), "--map", "id=id",
                     "--explode", "images")
    assert code == 0 and "(6 rows" in out
    rows = dst.read_text().splitlines()
    assert rows[0] == "file,doc,index,images,id" and rows[1] == "docs.jsonl,0,0,http://a/1.jpg,0"
    code, out = _run(capsys, "data", "prepare", "no-such-recipe")
    assert code == 2 and "no recipe 'no-such-recipe'" in out
