# A user's own data (Operations v2, item 8): sources from the command line and a config dir, tools.
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmgen.cli.preflight import compose_job, one_line
from tests.conftest import BIN, run_cli


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """Small shards of the three sample types, in folders a user would have."""
    from mmgen.data.synthetic.shapes import make_splits
    from mmgen.data.synthetic.shapes_docs import write_document_shards
    from mmgen.data.synthetic.shapes_video import make_video_splits

    root = tmp_path_factory.mktemp("media")
    make_splits(str(root / "photos"), num_train=80, num_val=10, samples_per_shard=40, seed=0)
    make_video_splits(str(root / "clips"), 20, 4, samples_per_shard=5, num_frames=16, fps=8, seed=0)
    write_document_shards(str(root / "docs"), 20, 10, seed=0, prefix="docs")
    return root


def test_sources_from_the_command_line_and_a_config_dir_train_together(media, tmp_path):
    """An experiment in the user's --config-dir picks the user's data config (images +
    interleaved documents); a video source and a not-yet-downloaded one (weight 0) are added on
    the command line; the run reads all three present sources."""
    mine = tmp_path / "my_configs"
    (mine / "data").mkdir(parents=True)
    (mine / "experiment").mkdir()
    (mine / "data" / "my_data.yaml").write_text(f"""\
name: my_data
sources:
  photos: {{shards: {media}/photos/train, val_shards: {media}/photos/val, type: pair}}
  docs: {{shards: "{media}/docs/docs-{{000000..000001}}.tar", type: interleaved}}
weights: {{photos: 2, docs: 1}}
seq_len: 1024
batch_size: 2
num_workers: 0
""")
    (mine / "experiment" / "my_run.yaml").write_text("""\
# @package _global_
defaults:
  - override /data: my_data
  - override /model: debug
name: my_run
trainer: {steps: 4, log_every: 4, num_threads: 1}
checkpoint: {every: 4}
optim: {warmup_steps: 1}
metrics: {progress: false}
""")
    clips = f"{media}/clips/train/shapes-video-train-{{000000..000003}}.tar"
    cmd = [str(BIN / "mmgen-train"), "--config-dir", str(mine), "experiment=my_run",
           f"+data.sources.clips={{type:video,shards:'{clips}',weight:1}}",
           "+data.sources.later={type:video,shards:'/data/not_downloaded/{000..099}.tar',weight:0}"]
    r = run_cli(cmd, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "my_run"
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(last[f"data/source/{s}/documents"] > 0 for s in ("photos", "docs", "clips"))
    assert "data/source/later/documents" not in last
    # per-source losses of the mixture (loss/<name>/<source>); a source without positions of a
    # loss in the step logs nothing for it rather than a 0
    assert any(k.startswith("loss/text/") for k in last), sorted(last)
    assert all(last[f"loss/text/{s}"] > 0 for s in ("photos", "docs", "clips") if f"loss/text/{s}" in last)
    assert not any(k.startswith("loss/text/later") for k in last)
    log = (run / "logs" / "rank_0.log").read_text()
    assert "source 'later' has weight 0: not read" in log
    job = compose_job(["experiment=my_run", *cmd[4:]], config_dirs=[mine])
    assert job.data.sources["clips"].type == "video" and job.data.sources["clips"].weight == 1.0
    assert job.data.source_weights() == {"clips": 0.25, "docs": 0.25, "later": 0.0, "photos": 0.5}
    assert (run / "command.txt").read_text().strip().endswith(cmd[-1]), "the command as typed"


def test_added_source_fields_are_type_checked():
    assert compose_job(["+data.sources.v.shards=/x/a.tar", "+data.sources.v.type=video",
                        "data.seq_len=1024"]).data.sources["v"].shards == "/x/a.tar"
    for override, needle in [
            ("+data.sources.v={shards:/x/a.tar,wieght:1}", "Key 'wieght' not in 'SourceConfig'"),
            ("+data.sources.v={shards:/x/a.tar,weight:lots}", "could not be converted to Float"),
            ("+data.sources.v={shards:/x/a.tar,type:film}", "sources.v.type='film' is not one of"),
            ("+data.sources.v={shards:/x/a.tar,weight:-1}", "sources.v.weight=-1.0 must be >= 0")]:
        with pytest.raises(Exception) as e:
            compose_job([override])
        assert needle in one_line(e.value), (override, one_line(e.value))


def test_unquoted_brace_pattern_gets_a_quoting_hint(tmp_path):
    r = run_cli([str(BIN / "mmgen-train"), "+data.sources.v={type:video,shards:/x/{0..3}.tar}"],
                cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "needs quotes: key='/data/{000..099}.tar'" in r.stderr


def test_config_dir_that_does_not_exist_is_one_line(tmp_path):
    r = run_cli([str(BIN / "mmgen-train"), "--config-dir", str(tmp_path / "nope"), "experiment=smoke"],
                cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"mmgen-train: error: --config-dir {tmp_path / 'nope'}: no such directory"


def test_weight_zero_source_needs_no_shards(media):
    from mmgen.data.config import DataConfig, SourceConfig
    from mmgen.data.factory import build_dataloader
    from mmgen.models.tokenizers.text import ByteTokenizer

    # seq_len 128 is too short for a clip: no matter while the video source has weight 0
    cfg = DataConfig(name="mine", seq_len=128, batch_size=2, num_workers=0,
                     sources={"photos": SourceConfig(f"{media}/photos/train"),
                              "gone": SourceConfig("/nowhere/{0..9}.tar", type="video", weight=0.0)})
    batch = next(iter(build_dataloader(cfg, ByteTokenizer(), 0, 1)))
    assert set(batch.meta["source"]) == {"photos"}
    with pytest.raises(ValueError, match="with a weight above 0 has val shards"):
        cfg.sources["gone"].val_shards = "/nowhere/val-{0..9}.tar"   # photos has no val split
        build_dataloader(cfg, ByteTokenizer(), 0, 1, split="val")
    with pytest.raises(ValueError, match="source weights sum to 0"):
        DataConfig(name="none", sources={"gone": SourceConfig("/nowhere/x.tar", weight=0.0)}).validate()


# -- mmgen data check / stats with many paths ---------------------------------------------------

def _mmgen(capsys, *args) -> tuple[int, str]:
    from mmgen.cli.main import main

    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().out


def test_data_check_takes_a_shell_expanded_list(media, capsys):
    """`mmgen data check /data/x/{000000..000002}.tar` reaches the command as three arguments;
    the one that does not exist is reported as an unusable shard, the others are checked."""
    names = [f"{media}/photos/train/shapes-train-{i:06d}.tar" for i in range(3)]
    code, out = _mmgen(capsys, "data", "check", *names)
    assert f"{names[2]}: missing_shard:" in out and f"{names[0]}: 40 samples, 40 ok" in out
    assert out.splitlines()[-1] == ("checked 3 shards, 80 samples: 80 ok, 0 with problems; "
                                    "1 unusable shard(s): shapes-train-000002.tar") and code == 1
    code, out = _mmgen(capsys, "data", "check", *names[:2], f"{media}/docs")
    assert code == 0 and "checked 4 shards, 100 samples: 100 ok" in out


def test_data_stats_show_video_resolution_fps_and_duration(media, capsys):
    code, out = _mmgen(capsys, "data", "stats", f"{media}/clips/train/shapes-video-train-000000.tar",
                       f"{media}/clips/train/shapes-video-train-00000[12].tar", f"{media}/photos/val",
                       "--sample", "3")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("shards: 4 ") and "samples: 25" in lines[0]
    assert "video clips read: 9" in lines
    assert "video resolution (px): 32x32 (9)" in lines
    assert "video fps (frames/s): median 8, min 8, max 8" in lines
    assert "video duration (s): median 2.00, min 2.00, max 2.00" in lines
    assert "video frames (count): median 16, min 16, max 16" in lines
    assert "image sizes (px): 32x32 (3)" in lines


def test_data_stats_refuses_a_file_that_is_not_a_shard(capsys):
    from mmgen.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["data", "stats", "/etc/passwd"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "'/etc/passwd' is not a tar shard" in err[0]
