# bench/gpu_perf.py at debug sizes on CPU: every part writes its JSON with the rows and sane fields.
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_perf.py"


def run(tmp_path, *args, timeout=240):
    r = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--work", str(tmp_path), "--out-dir",
                        str(tmp_path / "results"), "--tag", "test", *args],
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def load(tmp_path, part):
    res = json.loads((tmp_path / "results" / f"gpu_perf_{part}_test.json").read_text())
    assert res["part"] == part and res["tag"] == "test" and res["tiny"] is True
    assert res["device"].startswith("cpu") and res["torch"] and res["commit"] and "--smoke" in res["command"]
    return res, {row["label"]: row for row in res["rows"]}


def assert_perf_row(row, steps, warmup):
    assert "error" not in row and "skipped" not in row, row
    assert row["steps"] == steps and row["steps_timed"] == steps - warmup
    assert row["command"].startswith("python -m mmgen.train ") and f"trainer.steps={steps}" in row["command"]
    assert all(o in row["command"] for o in row["overrides"])
    assert row["positions_per_s"] >= row["tokens_per_s"] > 0 and row["model_tflops"] > 0
    assert row["mfu"] is None   # no peak FLOP/s on a CPU
    assert 0 <= row["data_wait_frac"] < 1 and 0 <= row["data_wait_frac_mean"] < 1
    assert row["step_s"] > 0 and row["startup_s"] > 0 and row["losses_finite"]
    # the first step is timed apart; the whole run starts before it
    assert row["time_to_first_step_s"] >= row["first_step_s"] > 0
    assert math.isfinite(row["compile_s"]) and row["tokens_seen"] > 0


@pytest.mark.slow
def test_every_part_tiny_on_cpu(tmp_path):
    """All five parts in one call, one row each where a part has several: 9 training / encode /
    eval processes (58-76 s on 2 shared cores)."""
    r = run(tmp_path, "--parts", "real,backends,sparse,latents,quality", "--real-log-every", "1",
            "--backends", "ddp", "--sparse-rows", "moe_debug_grouped", "--num-samples", "4")

    res, rows = load(tmp_path, "real")
    assert res["settings"]["steps"] == 6 and res["settings"]["warmup"] == 2
    row = rows["gpu_1b"]
    assert_perf_row(row, 6, 2)
    assert "experiment=gpu_1b" in row["overrides"] and "model=debug" in row["overrides"]
    assert row["params_total"] == row["params_active"] > 0     # dense: every parameter is active
    assert 0 < row["padding_fraction"] < 1
    assert res["summary"]["rows"]["gpu_1b"]["data_wait_goal_met"] in (True, False)

    res, rows = load(tmp_path, "backends")
    assert_perf_row(rows["ddp_eager"], 4, 1)
    assert rows["ddp_eager"]["backend"] == "ddp" and "trainer.compile=false" in rows["ddp_eager"]["overrides"]
    q = res["summary"]["ratios"]["ddp_eager"]
    assert q["tokens_per_s_ratio_vs_ddp"] == 1.0 and q["first_loss_diff_vs_ddp"] == 0.0

    res, rows = load(tmp_path, "sparse")
    assert list(rows) == ["moe_debug_grouped"]
    row = rows["moe_debug_grouped"]
    assert_perf_row(row, 4, 1)
    assert "model.moe_experts_impl=grouped" in row["overrides"]
    assert 0 < row["params_active"] < row["params_total"]   # top-2 of 4 experts
    router = row["router"]
    assert router["imbalance_max_median"] >= router["imbalance_mean_over_layers_last"] >= 1.0
    assert router["dropped_frac_mean_last"] == 0.0 and 0 < router["entropy_mean_last"] <= math.log(4) + 1e-6

    res, rows = load(tmp_path, "latents")
    for label in ("encode_on_device", "cached_latents"):
        assert_perf_row(rows[label], 4, 1)
    assert "data.encode_on=device" in rows["encode_on_device"]["overrides"]
    s = res["summary"]
    assert s["codec"]["latent_shape"] == [4, 8, 8] and s["codec"]["encoder_gflop_per_image"] > 0
    # the same images, encoded before or during the step: same tokens, the same first loss (fp32)
    assert s["same_tokens_seen"] and abs(s["first_loss_diff"]) < 1e-4
    assert math.isfinite(s["encode_share_of_step"]) and res["encode"]["train_command"].startswith("python -m mmgen.cli.main data encode")

    res, rows = load(tmp_path, "quality")
    row = rows["shapes_gpu"]
    assert "error" not in row and "eval_error" not in row, row
    assert row["checkpoint_step"] == 4 and row["train_minutes"] > 0
    assert set(row["image"]) >= {"color", "shape", "size", "position"} and row["image"]["n"] == 4
    assert all(0 <= v <= 1 for k, v in row["image"].items() if k != "n")
    assert row["min_score"] == min(min(row["image"][k] for k in ("color", "shape", "size", "position")),
                                   min(row["caption"][k] for k in ("color", "shape", "size", "position", "exact")))
    assert "gpu_1b" in r.stdout and "shapes_gpu" in r.stdout


def test_refused_row_records_its_error_and_the_call_goes_on(tmp_path):
    """A row that stops (megatron refuses trainer.compile=true at start-up) is one line in the
    JSON; the call still exits 0 and writes the part's file."""
    run(tmp_path, "--parts", "backends", "--backends", "megatron", "--backend-modes", "compiled", timeout=120)
    res, rows = load(tmp_path, "backends")
    row = rows["megatron_compiled"]
    assert row["error"] == "mmgen-train: error: parallel=megatron: trainer.compile=true is not supported yet"
    assert Path(row["log"]).is_file() and "tokens_per_s" not in row
    assert res["summary"]["ratios"]["megatron_compiled"] == {"error": row["error"]}


HYDRA_TAIL = "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n"


@pytest.mark.parametrize("text,line", [
    ("x\nTraceback (most recent call last):\n  File ...\nValueError: bad shape\n\n" + HYDRA_TAIL,
     "ValueError: bad shape"),
    ("noise\nmmgen-train: error: image_size 36 does not fit\n", "mmgen-train: error: image_size 36 does not fit"),
])
def test_one_line_error(text, line):
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_perf import one_line

    assert one_line(text) == line


def test_dry_run_validates_every_gpu_row(tmp_path):
    """--dry-run composes and validates each GPU row's configuration (the full-size rows, which
    this machine cannot train): every backend in both compile settings, the sparse flavors with
    their eager fallbacks, both latents rows with the SD-like VAE file made here."""
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--work", str(tmp_path), "--tag", "dry",
                        "--parts", "backends,sparse,latents", "--backend-modes", "eager,compiled"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "gpu_perf" / "dry_run"
    rows = {}
    for part in ("backends", "sparse", "latents"):
        rows.update({row["label"]: row for row in json.loads((out / f"gpu_perf_{part}_dry.json").read_text())["rows"]})
    assert len(rows) == 10 + 6 + 2
    bad = {k: v["dry_run_error"] for k, v in rows.items() if "dry_run_error" in v}
    assert not bad
    assert rows["zero3_compiled"]["dry_run"] == "validates: model 1b, parallel zero3, compile True"
    assert rows["moe_8x_loop"]["dry_run"] == "validates: model moe_8x, parallel ddp, compile True"
    assert "data.encode_on=device" in rows["encode_on_device"]["command"]
