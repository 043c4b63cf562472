# Metrics: metrics.jsonl always, W&B offline files that wandb's own reader reads back.
from __future__ import annotations

import json
import subprocess

from tests.conftest import BIN, data_overrides, run_cli

KEYS = {"loss/total", "loss/text", "loss/visual", "optim/grad_norm", "optim/lr",
        "perf/tokens_per_s", "perf/data_wait_frac", "data/skipped_total", "data/padding_fraction"}


def test_jsonl_and_wandb_offline_record_the_same_metrics(shapes_dir, tmp_path):
    r = run_cli([str(BIN / "mmgen-train"), "experiment=smoke", "metrics=wandb", "name=wb",
                 "trainer.steps=10", "trainer.log_every=5", "trainer.sample_every=10", "trainer.num_samples=2",
                 "metrics.progress=false", "trainer.num_threads=1", *data_overrides(shapes_dir)], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "wb"
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [5, 10] and KEYS <= set(recs[-1])
    assert (run / "samples" / "step_0000010.png").is_file()
    assert (run / "logs" / "rank_0.log").is_file()

    offline = next((run / "wandb").glob("offline-run-*"))
    out = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--json", str(offline)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    history = [json.loads(l)["history"]["item"] for l in out.stdout.splitlines() if '"history"' in l]
    assert [h["_step"] for h in history] == [5, 10]
    assert KEYS <= set(history[-1])
    assert history[-1]["loss/total"] == recs[-1]["loss/total"]
    assert history[-1]["samples/text_to_image.format"] == "png"
    summary = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--summary", "--json", str(offline)],
                             capture_output=True, text=True, timeout=120)
    cfg = json.loads(summary.stdout)["config"]
    assert cfg["model"]["name"] == "debug" and cfg["name"] == "wb"
