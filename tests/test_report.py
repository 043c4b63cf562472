# Dashboards: `mmgen report` curves from metrics.jsonl (no W&B), and W&B run placement.
from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest
from PIL import Image

from mmgen.cli.main import main as mmgen_main
from mmgen.metrics.report import read_metrics
from tests.conftest import BIN

BLUE = np.array([0x1F, 0x77, 0xB4])  # matplotlib's first line colour (C0)


def write_run(run, steps, nan_at=None, torn=False):
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "metrics.jsonl", "w") as f:
        for s in steps:
            loss = float("nan") if s == nan_at else 8 * math.exp(-s / 30) + 0.5
            f.write(json.dumps({"step": s, "time": 1.0 * s, "loss/total": loss, "loss/text": loss / 2,
                                "optim/lr": 1e-3 * min(1.0, s / 10), "optim/grad_norm": 1.0 + 1.0 / s,
                                "perf/tokens_per_s": 1000.0 + s}, allow_nan=True) + "\n")
        if torn:
            f.write('{"step": 99, "loss/to')


def test_report_draws_png_with_resumed_steps(tmp_path, capsys):
    run = tmp_path / "run"
    # 1..40, a restart from the checkpoint at 30, then 31..60; a NaN loss and a torn last line
    write_run(run, [*range(1, 41), *range(31, 61)], nan_at=45, torn=True)
    by_step, restarts = read_metrics(run / "metrics.jsonl")
    assert list(by_step) == list(range(1, 61)) and restarts == [31]
    out = tmp_path / "curves.png"
    mmgen_main(["report", str(run), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "60 steps (60 records)" in printed and str(out) in printed
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape == (800, 1200, 3)
    line_pixels = (np.abs(img - BLUE).sum(axis=2) < 30).sum()
    assert line_pixels > 500, "no curves drawn"
    # the four panels each hold a curve: blue pixels in every quadrant
    h, w = img.shape[0] // 2, img.shape[1] // 2
    for q in (img[:h, :w], img[:h, w:], img[h:, :w], img[h:, w:]):
        assert (np.abs(q - BLUE).sum(axis=2) < 30).sum() > 50


def test_report_default_out_is_in_the_run(tmp_path, capsys):
    write_run(tmp_path / "r", range(1, 4))
    mmgen_main(["report", str(tmp_path / "r")])
    assert (tmp_path / "r" / "report.png").is_file()


@pytest.mark.parametrize("content,needle", [(None, "no metrics.jsonl"), ("", "no records"),
                                            ("garbage\n{}\n", "not a JSON record"),
                                            ('{"loss": 1}\n', "no integer 'step'")])
def test_bad_run_is_one_line_exit_2(tmp_path, capsys, content, needle):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(SystemExit) as e:
        mmgen_main(["report", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and needle in err[0], err


def test_wandb_sweep_runs_are_grouped_named_and_typed(tmp_path, monkeypatch):
    """A run of a -m sweep (runs/<name>-sweep/<N>) gets group <name>-sweep, name <name>-<N> and
    job type train; the record read back from the offline file has them, plus system stats."""
    from mmgen.metrics.config import MetricsConfig
    from mmgen.metrics.logger import MetricsLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "runs" / "lr-sweep" / "3"
    run.mkdir(parents=True)
    m = MetricsLogger(MetricsConfig(wandb=True, progress=False), run, True, name="lr",
                      config={"model": {"name": "debug"}}, tags=["debug", "transfusion", "ddp"])
    m.log(1, {"loss/total": 2.5})
    m.close()
    offline = next((run / "wandb").glob("offline-run-*"))
    out = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--json", str(offline)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    info = next(r["run"] for r in records if r["type"] == "run")
    assert (info["run_group"], info["display_name"], info["job_type"]) == ("lr-sweep", "lr-3", "train")
    assert info["tags"] == ["debug", "transfusion", "ddp"] and info["config"]["update"]["model"]["name"] == "debug"
    assert any(r["type"] == "stats" for r in records), "wandb's system metrics are on by default"
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert history and history[-1]["loss/total"] == 2.5


def test_explicit_group_wins_and_plain_runs_keep_their_name():
    from mmgen.metrics.config import MetricsConfig
    from mmgen.metrics.logger import wandb_placement

    assert wandb_placement(MetricsConfig(), "runs/foo", "foo") == (None, "foo")
    assert wandb_placement(MetricsConfig(wandb_group="ablations"), "runs/foo-sweep/0", "foo") == ("ablations", "foo-0")
