# TensorBoard backend: event files read back with TensorBoard's own reader hold metrics.jsonl's keys.
from __future__ import annotations

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import BIN, data_overrides, run_cli


def _read(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_with_wandb_records_the_jsonl_scalars_and_the_sample_grid(shapes_dir, tmp_path):
    r = run_cli([str(BIN / "mmgen-train"), "experiment=smoke", "metrics=[wandb,tensorboard]", "name=tb",
                 "trainer.steps=10", "trainer.log_every=5", "trainer.sample_every=10", "trainer.num_samples=2",
                 "metrics.progress=false", "trainer.num_threads=1", "checkpoint.enabled=false",
                 *data_overrides(shapes_dir)], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "tb"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert next((run / "wandb").glob("offline-run-*")).is_dir(), "W&B stays on beside TensorBoard"

    acc = _read(run / "tensorboard")
    numeric = {k for rec in recs for k, v in rec.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
    assert len(numeric) > 10 and set(acc.Tags()["scalars"]) == numeric
    for key in numeric:
        got = {e.step: e.value for e in acc.Scalars(key)}
        want = {rec["step"]: rec[key] for rec in recs if key in rec}
        assert got.keys() == want.keys(), key
        assert all(abs(got[s] - want[s]) <= 1e-6 * max(1.0, abs(want[s])) for s in want), key
    # the objective's samplers (Transfusion: both directions) each log their grid
    assert sorted(acc.Tags()["images"]) == ["samples/image_to_text", "samples/text_to_image"]
    img = acc.Images("samples/text_to_image")
    assert [i.step for i in img] == [10] and img[0].width > 64


def test_resumed_run_replaces_the_steps_it_logs_again(tmp_path):
    """A restart from a checkpoint re-logs the steps after it: the reader shows each step once,
    with the values of the run that continued."""
    from mmgen.metrics.config import MetricsConfig
    from mmgen.metrics.logger import MetricsLogger

    cfg = MetricsConfig(tensorboard=True, progress=False)
    first = MetricsLogger(cfg, tmp_path, True)
    for step in range(1, 7):
        first.log(step, {"loss/total": float(step), "note": "strings are not scalars"})
    first.close()
    resumed = MetricsLogger(cfg, tmp_path, True)  # crashed after step 6, resumed from step 4
    for step in (5, 6, 7):
        resumed.log(step, {"loss/total": 100.0 + step})
    resumed.close()
    acc = _read(tmp_path / "tensorboard")
    assert acc.Tags()["scalars"] == ["loss/total"]
    assert [(e.step, e.value) for e in acc.Scalars("loss/total")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0), (6, 106.0), (7, 107.0)]


def test_other_ranks_and_default_config_write_no_event_files(tmp_path):
    from mmgen.metrics.config import MetricsConfig
    from mmgen.metrics.logger import MetricsLogger

    for cfg, main in ((MetricsConfig(progress=False), True), (MetricsConfig(tensorboard=True, progress=False), False)):
        m = MetricsLogger(cfg, tmp_path, main)
        m.log(1, {"loss/total": 1.0})
        m.close()
    assert not (tmp_path / "tensorboard").exists()
