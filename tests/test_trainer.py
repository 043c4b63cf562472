# Training end to end on CPU: resume equals uninterrupted, DDP under torchrun, bad shards.
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from mmgen.cli.preflight import compose_job
from mmgen.parallel.dist import DistInfo
from tests.conftest import BIN, data_overrides, run_cli

TINY = ["experiment=smoke", "data.seq_len=128", "data.batch_size=4", "trainer.log_every=1",
        "metrics.progress=false", "optim.warmup_steps=2", "trainer.num_threads=1"]


def losses(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = {k: v for k, v in rec.items() if k.startswith(("loss/", "optim/"))}
    return out


def make_trainer(shapes_dir, run_dir, extra=()):
    from mmgen.trainer.trainer import Trainer

    job = compose_job([*TINY, *data_overrides(shapes_dir), f"run_dir={run_dir}", *extra])
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return Trainer(job, DistInfo())


def stopped_and_resumed(shapes_dir, run_dir, extra, stop_at: int):
    """A run interrupted after step ``stop_at`` (its checkpoint written), and the trainer that
    resumes it (at ``stop_at``, not yet trained further)."""
    make_trainer(shapes_dir, run_dir, extra).train(stop_at=stop_at)
    resumed = make_trainer(shapes_dir, run_dir, extra)
    assert resumed.state.step == stop_at
    return resumed


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_is_bitwise_equal_to_uninterrupted(shapes_dir, tmp_path, workers):
    extra = ["trainer.steps=8", "checkpoint.every=100", f"data.num_workers={workers}"]
    straight = make_trainer(shapes_dir, tmp_path / "a", extra)
    straight.train()
    resumed = stopped_and_resumed(shapes_dir, tmp_path / "b", extra, 3)
    resumed.train()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert a == b, "losses after resume differ from the uninterrupted run"
    for (n, p), q in zip(straight.engine.module.named_parameters(), resumed.engine.module.parameters()):
        assert torch.equal(p, q), n


def test_checkpoints_keep_last_and_ignore_incomplete(shapes_dir, tmp_path):
    t = make_trainer(shapes_dir, tmp_path, ["trainer.steps=6", "checkpoint.every=2", "checkpoint.keep_last=2"])
    t.train()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_0000004", "step_0000006"]
    # a crash between writing and renaming leaves a .tmp directory: never resumed from
    broken = tmp_path / "checkpoints" / "step_0000008.tmp"
    shutil.copytree(tmp_path / "checkpoints" / "step_0000006", broken)
    again = make_trainer(shapes_dir, tmp_path, ["trainer.steps=6", "checkpoint.every=2"])
    assert again.state.step == 6 and not broken.exists()


def test_ddp_two_processes_trains_and_resumes(shapes_dir, tmp_path):
    args = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "mmgen.train",
            *TINY, *data_overrides(shapes_dir), "name=ddp", "data.num_workers=0"]
    r = run_cli([*args, "trainer.steps=4", "checkpoint.every=2"], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    first = losses(run)
    assert sorted(first) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(v["loss/total"])) for v in first.values())
    assert (run / "checkpoints" / "step_0000004" / "rank_00001.pt").is_file()
    cfg = (run / "launch.json").read_text()
    assert '"world_size": 2' in cfg
    r = run_cli([*args, "trainer.steps=6", "checkpoint.every=2"], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and sorted(losses(run)) == [1, 2, 3, 4, 5, 6]
    # the same run continued on one process: the data stream is re-split, not restarted
    one = [str(BIN / "mmgen-train"), *args[6:], "trainer.steps=7", "checkpoint.every=2"]
    r = run_cli(one, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "re-splitting" in r.stderr and sorted(losses(run)) == list(range(1, 8))


def corrupt_copy(src: Path, dst: Path) -> list[str]:
    """Copy shards, truncating the first JPEG of every shard. Returns the damaged keys."""
    dst.mkdir(parents=True)
    victims = []
    for shard in sorted(src.glob("*.tar")):
        with tarfile.open(shard) as tin, tarfile.open(dst / shard.name, "w") as tout:
            done = False
            for m in tin.getmembers():
                data = tin.extractfile(m).read()
                if not done and m.name.endswith(".jpg"):
                    victims.append(m.name.split(".")[0])
                    data, done = data[: len(data) // 3], True
                info = tarfile.TarInfo(m.name)
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))
    return victims


def test_corrupt_jpeg_is_skipped_counted_and_logged(shapes_dir, tmp_path):
    keys = corrupt_copy(shapes_dir / "train", tmp_path / "bad")
    r = run_cli([str(BIN / "mmgen-train"), *TINY, f"data.train_shards={tmp_path}/bad",
                 f"data.val_shards={shapes_dir}/val", "trainer.steps=30", "data.num_workers=0",
                 "data.shuffle_samples=false", "name=bad"], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(l) for l in (tmp_path / "runs" / "bad" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == 30
    skipped = max(rec.get("data/skipped/corrupt_image", 0) for rec in recs)
    assert skipped >= 1 and recs[-1]["data/skipped_total"] == skipped
    assert any(k in r.stderr for k in keys) and "corrupt" in r.stderr
