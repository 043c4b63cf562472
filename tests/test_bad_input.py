# Bad input gives one line and exit 2 (Operations v2, item 7): non-tar shards, export --out, NaN, YAML.
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from mmgen.cli.preflight import compose_job, one_line
from mmgen.errors import ConfigError
from tests.conftest import BIN, ROOT, data_overrides, run_cli


def _one_error_line(r, *needles: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and all(n in lines[0] for n in needles), lines
    return lines[0]


# -- a file that is not a shard -----------------------------------------------------------------

def test_train_shards_naming_a_text_file_say_it_is_not_a_tar(tmp_path):
    r = run_cli([str(BIN / "mmgen-train"), "experiment=smoke", "data.train_shards=/etc/passwd",
                 "metrics.progress=false", "trainer.steps=2"], cwd=tmp_path, timeout=120)
    line = _one_error_line(r, "'/etc/passwd'", "is not a tar shard")
    assert "fewer samples than readers" not in line


def test_shard_patterns_check_files_without_a_tar_suffix(shapes_dir, tmp_path):
    from mmgen.data.sources import expand_shards

    shard = next((shapes_dir / "train").glob("*.tar"))
    renamed = tmp_path / "shard-0"                     # a tar without the suffix is still a shard
    shutil.copy(shard, renamed)
    (tmp_path / "notes.md").write_text("not a shard")
    assert expand_shards(str(renamed)) == [str(renamed)]
    with pytest.raises(ConfigError, match=r"notes.md' is not a tar shard"):
        expand_shards(f"{tmp_path}/*")


# -- mmgen export --out --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(shapes_dir, tmp_path_factory) -> Path:
    from mmgen.trainer.run import run_training

    run = tmp_path_factory.mktemp("export") / "runs" / "tiny"
    job = compose_job(["experiment=smoke", "trainer.steps=2", "checkpoint.every=2", "metrics.progress=false",
                       "trainer.num_threads=1", *data_overrides(shapes_dir), f"run_dir={run}"])
    run_training(job, argv=["test"])
    return run


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_export_to_a_directory_is_one_line_and_leaves_nothing(tiny_run, tmp_path):
    out = tmp_path / "exports"
    out.mkdir()
    r = run_cli([str(BIN / "mmgen"), "export", str(tiny_run), "--out", str(out)], cwd=tmp_path, timeout=120)
    _one_error_line(r, str(out), "is a directory", "model.safetensors")
    assert _listing(tmp_path) == ["exports"], "no stray exports.tmp"


def test_export_to_an_unwritable_path_is_one_line_and_leaves_nothing(tiny_run, tmp_path):
    (tmp_path / "file").write_text("a regular file cannot hold a directory")
    out = tmp_path / "file" / "sub" / "model.safetensors"
    r = run_cli([str(BIN / "mmgen"), "export", str(tiny_run), "--out", str(out)], cwd=tmp_path, timeout=120)
    _one_error_line(r, "cannot write", str(out), "Not a directory")
    assert _listing(tmp_path) == ["file"]


def test_export_that_fails_while_loading_removes_what_it_created(tiny_run, tmp_path):
    """The output is prepared before the (long) load; a load that fails takes it back."""
    from mmgen.checkpoint.export import export_safetensors

    ckpt = tmp_path / "ckpt"
    shutil.copytree(next((tiny_run / "checkpoints").glob("step_*")), ckpt)
    data = (ckpt / "model.pt").read_bytes()
    (ckpt / "model.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(Exception):
        export_safetensors(ckpt, tmp_path / "new" / "dir" / "model.safetensors")
    assert not (tmp_path / "new").exists()
    good = export_safetensors(tiny_run, tmp_path / "new" / "dir" / "model.safetensors")
    assert good.is_file() and _listing(tmp_path / "new") == ["dir", "dir/model.safetensors"]


# -- NaN and inf in config values ----------------------------------------------------------------

@pytest.mark.parametrize("override,key", [
    ("optim.lr=nan", "optim.lr"), ("optim.lr=inf", "optim.lr"), ("optim.betas=[0.9,nan]", "optim.betas[1]"),
    ("optim.weight_decay=nan", "optim.weight_decay"), ("optim.eps=inf", "optim.eps"),
    ("optim.grad_clip=inf", "optim.grad_clip"), ("data.video_fps=inf", "data.video_fps"),
    ("metrics.peak_tflops=nan", "metrics.peak_tflops"), ("model.norm_eps=nan", "model.norm_eps"),
    ("objective.weights.text=nan", "objective.weights.text"),
])
def test_non_finite_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match="is not a finite number") as e:
        compose_job([override])
    assert str(e.value).startswith(f"{key}=")


def test_optim_validation_refuses_non_finite_values_built_in_code():
    from mmgen.optim import OptimConfig

    for bad in (dict(lr=math.nan), dict(lr=math.inf), dict(eps=-1.0), dict(weight_decay=math.nan),
                dict(grad_clip=math.inf), dict(betas=[math.nan, 0.9])):
        with pytest.raises(ValueError, match="optim."):
            OptimConfig(**bad).validate()
    OptimConfig(grad_clip=0.0, weight_decay=0.0).validate()


def test_nan_learning_rate_stops_the_command_in_one_line(tmp_path):
    r = run_cli([str(BIN / "mmgen-train"), "experiment=smoke", "optim.lr=nan"], cwd=tmp_path, timeout=120)
    _one_error_line(r, "optim.lr=nan is not a finite number")
    assert not (tmp_path / "runs").exists()


# -- YAML syntax errors ------------------------------------------------------------------------

def test_yaml_error_in_a_config_dir_experiment_names_file_and_line(tmp_path):
    mine = tmp_path / "my_configs" / "experiment"
    mine.mkdir(parents=True)
    (mine / "broken.yaml").write_text("# @package _global_\ntrainer:\n  steps: 3\n  log_every: [1\nname: x\n")
    r = run_cli([str(BIN / "mmgen-train"), "--config-dir", str(tmp_path / "my_configs"), "experiment=broken"],
                cwd=tmp_path, timeout=120)
    _one_error_line(r, "YAML syntax error in", str(mine / "broken.yaml"), "line 5, column 5",
                    "flow sequence at line 4")


def test_yaml_error_in_a_copied_config_tree_names_file_and_line(tmp_path, monkeypatch):
    tree = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", tree)
    (tree / "data" / "shapes.yaml").write_text("name: shapes\n\tseq_len: 64\n")
    monkeypatch.setenv("MMGEN_CONFIG_DIR", str(tree))
    with pytest.raises(Exception) as e:
        compose_job([])
    assert one_line(e.value) == (f"YAML syntax error in {tree / 'data' / 'shapes.yaml'}, line 2, column 1: "
                                 "found character '\\t' that cannot start any token "
                                 "(while scanning for the next token)")
