# The `mmgen` tools on a trained run: export, sample, eval shapes, and their bad-input errors.
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmgen.cli.preflight import compose_job
from tests.conftest import BIN, data_overrides, run_cli


@pytest.fixture(scope="module")
def trained_run(shapes_dir, tmp_path_factory) -> Path:
    from mmgen.trainer.run import run_training

    run = tmp_path_factory.mktemp("cli") / "runs" / "tiny"
    job = compose_job(["experiment=smoke", "trainer.steps=6", "checkpoint.every=3", "metrics.progress=false",
                       "trainer.num_threads=1", *data_overrides(shapes_dir), f"run_dir={run}"])
    run_training(job, argv=["test"])
    return run


def test_export_loads_into_the_plain_model_and_reproduces_logits(trained_run, tmp_path):
    from mmgen.checkpoint.export import load_model_weights
    from mmgen.models import build_model
    from tests.test_model import make_batch

    out = tmp_path / "model.safetensors"
    r = run_cli([str(BIN / "mmgen"), "export", str(trained_run), "--out", str(out)], cwd=tmp_path)
    assert r.returncode == 0 and out.is_file(), r.stderr
    job = compose_job(["experiment=smoke"])
    a, b = build_model(job.model), build_model(job.model)
    load_model_weights(a, out)
    load_model_weights(b, trained_run / "checkpoints" / "step_0000006")
    fresh = build_model(job.model)
    batch = make_batch()
    with torch.no_grad():
        la, lb, lf = (m(batch)["lm"] for m in (a, b, fresh))
    assert torch.equal(la, lb) and not torch.allclose(la, lf)


def test_sample_writes_images_and_captions(trained_run, shapes_dir, tmp_path):
    png = tmp_path / "s.png"
    img = next((shapes_dir / "val").glob("*.tar"))
    import tarfile

    with tarfile.open(img) as t:
        member = next(m for m in t.getmembers() if m.name.endswith(".jpg"))
        (tmp_path / "x.jpg").write_bytes(t.extractfile(member).read())
    r = run_cli([str(BIN / "mmgen"), "sample", str(trained_run), "--prompt", "a small red circle at the top",
                 "--prompt", "a large blue square in the center", "--image", str(tmp_path / "x.jpg"),
                 "--out", str(png), "--set", "sampler.steps=4"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert Image.open(png).size[0] > 64 and "x.jpg:" in r.stdout


def test_eval_shapes_prints_scores_and_grid(trained_run, tmp_path):
    r = run_cli([str(BIN / "mmgen"), "eval", "shapes", str(trained_run), "--num-samples", "8",
                 "--out", str(tmp_path / "ev"), "--set", "sampler.steps=4"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    scores = json.loads((tmp_path / "ev" / "scores.json").read_text())
    assert scores["num_samples"] == 8 and 0 <= scores["image"]["color"] <= 1
    assert "sample grid:" in r.stdout and (tmp_path / "ev" / "grid.png").is_file()


def test_eval_shapes_reads_the_shards_given(trained_run, shapes_dir, tmp_path):
    """--shards replaces the run's held-out shards: its own train split here (a missing one is
    one error line)."""
    r = run_cli([str(BIN / "mmgen"), "eval", "shapes", str(trained_run), "--num-samples", "4",
                 "--shards", str(shapes_dir / "train"), "--out", str(tmp_path / "ev"),
                 "--set", "sampler.steps=2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "ev" / "scores.json").read_text())["num_samples"] == 4
    r = run_cli([str(BIN / "mmgen"), "eval", "shapes", str(trained_run), "--shards", str(tmp_path / "none")],
                cwd=tmp_path)
    assert r.returncode == 2 and str(tmp_path / "none") in r.stderr.strip().splitlines()[-1], r.stderr


@pytest.mark.parametrize("args", [["export", "/nonexistent", "--out", "x.safetensors"],
                                  ["eval", "shapes", "/nonexistent"],
                                  ["sample", "/nonexistent", "--prompt", "a"]])
def test_missing_run_is_one_line_exit_2(args, tmp_path):
    r = run_cli([str(BIN / "mmgen"), *args], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "error" in r.stderr, r.stderr


def _one_line_exit_2(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    return r.stderr


def test_sample_without_prompt_or_image_is_an_error(trained_run, tmp_path):
    """v1 exited 0 having done nothing."""
    err = _one_line_exit_2(run_cli([str(BIN / "mmgen"), "sample", str(trained_run)], cwd=tmp_path))
    assert "--prompt" in err and "--image" in err


@pytest.mark.parametrize("image", ["/etc/passwd", "/nonexistent.png"])
def test_sample_with_a_file_that_is_no_image_is_one_line(trained_run, tmp_path, image):
    """v1: PIL's UnidentifiedImageError traceback."""
    err = _one_line_exit_2(run_cli([str(BIN / "mmgen"), "sample", str(trained_run), "--image", image], cwd=tmp_path))
    assert image in err


def test_eval_shapes_on_data_that_is_not_shapes_names_the_sample(trained_run, tmp_path):
    """Held-out photos carry no shape spec: v1 raised KeyError: 'shape'."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    val = tmp_path / "photos"
    val.mkdir()
    with tarfile.open(val / "000000.tar", "w") as tar:
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", b"a photo"), ("json", json.dumps({"url": "x"}).encode())):
                info = tarfile.TarInfo(f"photo{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    r = run_cli([str(BIN / "mmgen"), "eval", "shapes", str(trained_run), "--num-samples", "2",
                 "--out", str(tmp_path / "ev"), "--set", f"data.val_shards={val}"], cwd=tmp_path)
    err = _one_line_exit_2(r)
    assert "photo000" in err and "shape" in err
