# One training per run directory: the lock, resume=none refused, start-over, resume-time config comparison.
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mmgen.cli.preflight import compose_job
from mmgen.errors import ConfigError
from tests.conftest import BIN, data_overrides, run_cli
from tests.test_faults import popen, steps_logged, wait_for_step
from tests.test_trainer import TINY, losses

FAST = [*TINY, "data.num_workers=0", "trainer.steps=4", "checkpoint.every=2"]


def train(shapes_dir, run_dir: Path, *extra: str) -> None:
    """One launch of ``mmgen-train`` in this process (run_training: lock, checks, records)."""
    from mmgen.trainer.run import run_training

    job = compose_job([*FAST, *data_overrides(shapes_dir), f"run_dir={run_dir}", *extra])
    run_training(job, argv=["mmgen-train", *extra])


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with a hash of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def log_text(run: Path) -> str:
    return (run / "logs" / "rank_0.log").read_text()


def write_lock(run: Path, **fields) -> None:
    """A lock file as another process would have left it (this process's record, changed)."""
    from mmgen.trainer.lock import this_process

    run.mkdir(parents=True, exist_ok=True)
    (run / ".lock").write_text(json.dumps(dataclasses.asdict(dataclasses.replace(this_process(), **fields))))


@pytest.fixture(scope="module")
def base_run(shapes_dir, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(shapes_dir, run)
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_0000002", "step_0000004"]
    return run


@pytest.fixture
def run_copy(base_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


# -- the lock --------------------------------------------------------------------------------
def test_a_second_training_in_the_same_directory_is_refused_and_the_first_is_untouched(shapes_dir, tmp_path):
    """The probe of issue 11 item 2: two trainings a moment apart. The second stops in one line
    (exit 2) naming the first, writes nothing; the first trains on, checkpoints, is preempted
    (exit 3, lock released) and the next launch continues its run."""
    args = [str(BIN / "mmgen-train"), *TINY, *data_overrides(shapes_dir), "name=p3d", "data.num_workers=0",
            "checkpoint.every=5"]
    first = popen([*args, "trainer.steps=400"], tmp_path)
    run = tmp_path / "runs" / "p3d"
    try:
        wait_for_step(run, 2, first)
        second = run_cli([*args, "trainer.steps=400"], cwd=tmp_path, timeout=180)
        assert first.poll() is None, "the first training must still be running"
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert second.returncode == 2, second.stderr[-2000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert f"{run} is in use by a training on this host" in lines[0] and f"pid {first.pid}" in lines[0]
    assert first.returncode == 3, err[-2000:]
    assert not (run / ".lock").exists(), "the lock must be released at the preemption exit"
    # the second launch wrote nothing: one launch recorded, one run's metrics, in order
    assert len((run / "command.txt").read_text().splitlines()) == 1
    assert len((run / "configs" / "launches.jsonl").read_text().splitlines()) == 1
    stopped = steps_logged(run)
    assert sorted(losses(run)) == list(range(1, stopped + 1))
    assert len((run / "metrics.jsonl").read_text().splitlines()) == stopped
    assert (run / "checkpoints" / f"step_{stopped:07d}" / "meta.json").is_file()
    assert not list((run / "checkpoints").glob("*.tmp"))
    train(shapes_dir, run, f"trainer.steps={stopped + 1}")
    assert "resumed from" in log_text(run) and sorted(losses(run)) == list(range(1, stopped + 2))


def test_refused_under_torchrun_every_rank_stops_and_nothing_is_written(shapes_dir, tmp_path):
    """Rank 0 decides; rank 1 learns the outcome (no hang, no second message)."""
    from mmgen.trainer.lock import RunLock

    run = tmp_path / "runs" / "ddp"
    held, _ = RunLock.acquire(run)
    try:
        r = run_cli([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "mmgen.train", *FAST,
                     *data_overrides(shapes_dir), "name=ddp"], cwd=tmp_path, timeout=180)
    finally:
        held.release()
    assert r.returncode != 0
    refusals = [line for line in r.stderr.splitlines() if line.startswith("mmgen-train: error:")]
    assert len(refusals) == 1 and "is in use by a training on this host" in refusals[0], r.stderr[-3000:]
    assert "exitcode  : 2" in r.stderr  # both workers exited 2, none crashed
    assert sorted(p.name for p in run.iterdir()) == []


@pytest.mark.parametrize("how", ["dead pid", "reused pid"])
def test_a_stale_lock_on_this_host_is_taken_over(shapes_dir, tmp_path, how):
    """Left by a process that died (SIGKILL, OOM, a crash): taken over with one log line; a
    live PID that started later than the lock's owner is a reused PID, not the owner."""
    run = tmp_path / "run"
    if how == "dead pid":
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        write_lock(run, pid=gone.pid)
    else:
        write_lock(run, pid=os.getpid(), proc_start=1)
    train(shapes_dir, run)
    took = [line for line in log_text(run).splitlines() if "took over the lock" in line]
    assert len(took) == 1 and "on this host is gone" in took[0], log_text(run)[-2000:]
    assert sorted(losses(run)) == [1, 2, 3, 4]
    assert not (run / ".lock").exists()


def _contend(run: str, start, results, hold) -> None:
    from mmgen.trainer.lock import RunDirLocked, RunLock

    start.wait()
    try:
        lock, notes = RunLock.acquire(Path(run))
    except RunDirLocked as e:
        results.put(("refused", str(e)))
        return
    results.put(("won", notes))
    hold.wait(60)
    lock.release()


def test_of_several_starters_that_find_one_stale_lock_exactly_one_wins(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_lock(tmp_path, pid=gone.pid)
    start, hold, results = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), start, results, hold)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    outcomes = [results.get(timeout=60) for _ in procs]
    hold.set()
    for p in procs:
        p.join(30)
    won = [o for o in outcomes if o[0] == "won"]
    assert len(won) == 1, outcomes  # the winner took the stale lock over, or the name it freed meanwhile
    assert all("in use by a training on this host" in o[1] for o in outcomes if o[0] == "refused"), outcomes
    assert not (tmp_path / ".lock").exists() and not list(tmp_path.glob(".lock*"))


def test_a_requeued_slurm_job_takes_over_its_own_lock_and_another_owner_is_honoured(shapes_dir, tmp_path,
                                                                                     monkeypatch):
    """A lock from another node cannot be checked: honoured (one line naming the owner and the
    override, nothing written) unless it is this Slurm job's before its requeue, or forced."""
    run = tmp_path / "run"
    crashed = {"host": "node-17", "boot_id": "b", "pid": 4321, "slurm_job_id": "4242", "since": 1.8e9}
    write_lock(run, **crashed)
    before = snapshot(run)
    monkeypatch.setenv("SLURM_JOB_ID", "5151")  # another job
    with pytest.raises(ConfigError) as refused:
        train(shapes_dir, run)
    msg = str(refused.value)
    assert "\n" not in msg and "host node-17, pid 4321, Slurm job 4242, since 2027-01-15" in msg, msg
    assert "trainer.force_unlock=true" in msg
    assert snapshot(run) == before
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same job, same restart count: another step
    with pytest.raises(ConfigError):
        train(shapes_dir, run)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the same job after a requeue
    train(shapes_dir, run)
    took = [line for line in log_text(run).splitlines() if "took over the lock" in line]
    assert len(took) == 1 and "Slurm job 4242 was requeued (restart 1)" in took[0]
    assert sorted(losses(run)) == [1, 2, 3, 4] and not (run / ".lock").exists()
    # without Slurm: only trainer.force_unlock=true takes it
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    write_lock(run, **crashed)
    train(shapes_dir, run, "trainer.force_unlock=true", "trainer.steps=5")
    took = [line for line in log_text(run).splitlines() if "took over the lock" in line]
    assert len(took) == 2 and took[-1].endswith("host node-17, pid 4321, Slurm job 4242, since 2027-01-15 "
                                                 "08:00:00 UTC: trainer.force_unlock=true"), took
    assert sorted(losses(run)) == [1, 2, 3, 4, 5]


def test_a_live_owner_on_this_host_is_refused_even_with_force_unlock(shapes_dir, tmp_path):
    from mmgen.trainer.lock import RunLock

    run = tmp_path / "run"
    held, _ = RunLock.acquire(run)  # this process: provably alive
    before = snapshot(run)
    for extra in ([], ["trainer.force_unlock=true"]):
        with pytest.raises(ConfigError, match=f"in use by a training on this host .*pid {os.getpid()}"):
            train(shapes_dir, run, *extra)
    assert snapshot(run) == before
    held.release()
    assert not (run / ".lock").exists()


def test_the_lock_is_released_when_the_training_fails(shapes_dir, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError):
        train(shapes_dir, run, "data.train_shards=/nonexistent/shards")
    assert run.is_dir() and not (run / ".lock").exists()


# -- resume=none, start over -----------------------------------------------------------------
def test_resume_none_in_a_directory_with_checkpoints_is_refused_in_one_line(run_copy, tmp_path):
    """Issue 11 item 3: would mix two runs (new checkpoints pruned as older, step 2 overwritten,
    the next auto-resume continuing the old run)."""
    before = snapshot(run_copy)
    r = run_cli([str(BIN / "mmgen-train"), *FAST, f"run_dir={run_copy}", "checkpoint.resume=none"], cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "checkpoint.resume=none" in r.stderr and "checkpoint.start_over=true" in r.stderr
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("which", ["older own", "another run's"])
def test_resuming_a_checkpoint_other_than_the_newest_is_refused(shapes_dir, base_run, run_copy, which):
    """Continuing another checkpoint in a directory with checkpoints of its own mixes two
    histories just the same."""
    src = (run_copy if which == "older own" else base_run) / "checkpoints" / "step_0000002"
    before = snapshot(run_copy)
    with pytest.raises(ConfigError, match="holds checkpoints of its own, up to step_0000004"):
        train(shapes_dir, run_copy, f"checkpoint.resume={src}")
    assert snapshot(run_copy) == before


def test_start_over_moves_the_old_run_aside_once_per_job(shapes_dir, base_run, run_copy, monkeypatch):
    """``checkpoint.start_over=true``: the old run's checkpoints, metrics and W&B id move into
    previous-<time>/ unchanged (itself a run directory), the new run trains from step 1 with
    its checkpoints kept; the same command after a Slurm requeue continues the new run."""
    from mmgen.cli.main import _load_run

    (run_copy / "wandb_id.txt").write_text("old-id\n")
    old = snapshot(run_copy / "checkpoints")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    start_over = ["checkpoint.resume=none", "checkpoint.start_over=true", "model.dim=128"]  # a new model too
    train(shapes_dir, run_copy, *start_over, "trainer.steps=2")
    aside = list(run_copy.glob("previous-*"))
    assert len(aside) == 1
    aside = aside[0]
    assert snapshot(aside / "checkpoints") == old
    assert sorted(losses(aside)) == [1, 2, 3, 4] and (aside / "wandb_id.txt").read_text() == "old-id\n"
    assert (aside / "config.yaml").read_text() == (base_run / "config.yaml").read_text()
    assert json.loads((aside / "moved.json").read_text())["by"]["slurm_job_id"] == "77"
    assert sorted(losses(run_copy)) == [1, 2] and not (run_copy / "wandb_id.txt").exists()
    assert [p.name for p in (run_copy / "checkpoints").iterdir()] == ["step_0000002"]
    assert "moved to" in log_text(run_copy)
    job, _, ckpt = _load_run(str(aside))  # `mmgen sample` / `export` on the old run still work
    assert job.model.dim == 64 and ckpt.parent == aside / "checkpoints"
    # requeued (same job, restart 1), same command: continues the new run, moves nothing
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    train(shapes_dir, run_copy, *start_over, "trainer.steps=3")
    assert list(run_copy.glob("previous-*")) == [aside]
    assert sorted(losses(run_copy)) == [1, 2, 3] and "resumed from" in log_text(run_copy)
    assert "continuing this job's run" in log_text(run_copy)


# -- config comparison on resume ---------------------------------------------------------------
def test_resuming_with_another_architecture_is_one_line_and_overwrites_nothing(run_copy, tmp_path):
    """Issue 11 item 5: was a 57-line size-mismatch traceback after config.yaml had been
    overwritten, so `mmgen sample RUN` failed on a healthy checkpoint. The run here has no
    launch history (as written by an older mmgen): config.yaml is the reference."""
    from mmgen.cli.main import _load_run

    shutil.rmtree(run_copy / "configs")
    before = snapshot(run_copy)
    r = run_cli([str(BIN / "mmgen-train"), *FAST, f"run_dir={run_copy}", "trainer.steps=6", "model.dim=128",
                 "data.patch_size=8"], cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    for change in ("model.dim 64 -> 128", "model.patch_dim 48 -> 192", "data.patch_size 4 -> 8"):
        assert change in r.stderr, r.stderr
    assert "trainer.steps" not in r.stderr  # a schedule change is no reason to refuse
    assert snapshot(run_copy) == before
    job, _, ckpt = _load_run(str(run_copy))
    assert job.model.dim == 64 and ckpt.name == "step_0000004"


@pytest.mark.parametrize("extra,listed", [
    (["objective=next_token"], ["objective.name transfusion -> next_token", 'model.heads ["lm", "flow"] -> ["lm"]']),
    (["data.seed=3"], ["data order", "data.seed 0 -> 3"]),
])
def test_resuming_with_another_objective_or_data_order_is_refused(shapes_dir, run_copy, extra, listed):
    before = snapshot(run_copy)
    with pytest.raises(ConfigError) as refused:
        train(shapes_dir, run_copy, *extra)
    for text in listed:
        assert text in str(refused.value), str(refused.value)
    assert snapshot(run_copy) == before


def test_changed_data_and_schedule_warn_in_one_line_and_every_config_is_kept(shapes_dir, run_copy):
    first = (run_copy / "config.yaml").read_text()
    # a launch that changes the LR and fails after writing its records (no such shards) ...
    with pytest.raises(FileNotFoundError):
        train(shapes_dir, run_copy, "optim.lr=0.01", "data.train_shards=/nonexistent/shards")
    # ... is not what the checkpoint was trained with: the next comparison ignores it
    train(shapes_dir, run_copy, "trainer.steps=6", "optim.lr=0.0005", "data.caption_dropout=0.2",
          "trainer.log_every=2")
    warned = [line for line in log_text(run_copy).splitlines() if "with settings other than" in line]
    assert len(warned) == 2, log_text(run_copy)[-3000:]  # one line per launch: the failed one, this one
    assert "configs/config_0001.yaml" in warned[1]
    for change in ("trainer.steps 4 -> 6", "optim.lr 0.001 -> 0.0005", "data.caption_dropout 0.1 -> 0.2"):
        assert change in warned[1], warned[1]
    assert "log_every" not in warned[1] and "train_shards" not in warned[1] and "0.01" not in warned[1]
    assert sorted(losses(run_copy)) == [1, 2, 3, 4, 6]  # resumed at 4, logged every 2
    kept = sorted(p.name for p in (run_copy / "configs").glob("config_*.yaml"))
    assert kept == ["config_0001.yaml", "config_0002.yaml", "config_0003.yaml"]
    assert (run_copy / "configs" / "config_0001.yaml").read_text() == first
    assert (run_copy / "config.yaml").read_text() == (run_copy / "configs" / "config_0003.yaml").read_text()
    assert "lr: 0.0005" in (run_copy / "config.yaml").read_text()
    launches = (run_copy / "configs" / "launches.jsonl").read_text().splitlines()
    assert [json.loads(line)["config"] for line in launches] == ["config_0001.yaml", "config_0002.yaml",
                                                                 "config_0003.yaml"]
