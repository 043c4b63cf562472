# checkpoint.resume=<dir> and checkpoint.init_from=<file.safetensors> through the Trainer.
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import BIN, run_cli
from tests.test_trainer import losses, make_trainer

SOURCE = ["trainer.steps=8", "checkpoint.every=4", "checkpoint.keep_last=3", "data.num_workers=0"]


@pytest.fixture(scope="module")
def source_run(shapes_dir, tmp_path_factory) -> Path:
    """Run A: 8 steps with checkpoints at steps 4 and 8."""
    run = tmp_path_factory.mktemp("source")
    make_trainer(shapes_dir, run, SOURCE).train()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000004", "step_0000008"]
    return run


def test_resume_from_another_runs_checkpoint_reproduces_its_steps(shapes_dir, source_run, tmp_path):
    """Run B (its own run directory) resumes from A's step-4 checkpoint: steps 5-8 give A's
    losses bit for bit (model, optimizer, schedule, data position and noise all come from the
    checkpoint), and B writes only into its own directory."""
    a_lines = (source_run / "metrics.jsonl").read_text()
    step4 = source_run / "checkpoints" / "step_0000004"
    b = make_trainer(shapes_dir, tmp_path, [*SOURCE, f"checkpoint.resume={step4}"])
    assert b.state.step == 4
    b.train()
    a_loss, b_loss = losses(source_run), losses(tmp_path)
    assert sorted(b_loss) == [5, 6, 7, 8], "B must continue at step 5, not start over"
    assert {s: a_loss[s] for s in b_loss} == b_loss
    # A's run directory is read, never written
    assert (source_run / "metrics.jsonl").read_text() == a_lines
    assert sorted(p.name for p in (source_run / "checkpoints").iterdir()) == ["step_0000004", "step_0000008"]
    a8 = torch.load(source_run / "checkpoints" / "step_0000008" / "model.pt", weights_only=True)
    b8 = torch.load(tmp_path / "checkpoints" / "step_0000008" / "model.pt", weights_only=True)
    assert a8.keys() == b8.keys() and all(torch.equal(a8[k], b8[k]) for k in a8)


def test_init_from_an_exported_file_starts_a_new_run_from_its_weights(shapes_dir, source_run, tmp_path):
    """``mmgen export`` writes A's step-8 weights; run C with ``init_from`` that file starts at
    step 0 with exactly those weights (not the seed's initialisation), a fresh optimizer and
    schedule, and on its first batch has a lower loss than a fresh run D on the same batch."""
    from safetensors.torch import load_file

    out = tmp_path / "a.safetensors"
    r = run_cli([str(BIN / "mmgen"), "export", str(source_run), "--out", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    exported = load_file(str(out))
    a8 = torch.load(source_run / "checkpoints" / "step_0000008" / "model.pt", weights_only=True)
    assert exported.keys() == a8.keys() and all(torch.equal(exported[k], a8[k]) for k in a8)

    one_step = ["trainer.steps=1", "checkpoint.enabled=false", "data.num_workers=0"]
    c = make_trainer(shapes_dir, tmp_path / "c", [*one_step, f"checkpoint.init_from={out}"])
    d = make_trainer(shapes_dir, tmp_path / "d", one_step)
    assert c.state.step == d.state.step == 0
    c_init = {k: v.clone() for k, v in c.engine.module.state_dict().items()}
    d_init = d.engine.module.state_dict()
    assert c_init.keys() == exported.keys()
    for k, v in exported.items():
        assert torch.equal(c_init[k], v), f"{k}: not the exported weights"
    # the fresh run's visual head is zero-initialised; A's trained head is not
    assert not torch.equal(c_init["visual_out.weight"], d_init["visual_out.weight"])
    c.train()
    d.train()
    c_loss, d_loss = losses(tmp_path / "c")[1], losses(tmp_path / "d")[1]
    assert c_loss["optim/lr"] == d_loss["optim/lr"], "init_from must not carry A's LR schedule"
    assert c_loss["loss/total"] < d_loss["loss/total"], (c_loss, d_loss)
