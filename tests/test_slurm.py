# A real one-node Slurm (.ci/slurm_up.sh): submit through mmgen-launch, preempt, requeue, resume.
"""These tests need slurmctld + slurmd running and the node idle; ``bash .ci/slurm_up.sh``
(root) brings them up and ``.ci/run`` calls it before the suite. Without them the tests skip
and say why, except where ``MMGEN_REQUIRE_SLURM=1`` (``.ci/run`` sets it under ``CI=true``):
there a missing Slurm is an error, so CI cannot pass without running them. Job state comes
from ``squeue``/``scontrol`` (no ``sacct``: no accounting here)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, ROOT, data_overrides, run_cli, logged_records

TINY = ["experiment=smoke", "data.seq_len=128", "data.batch_size=4", "trainer.log_every=1",
        "metrics.progress=false", "optim.warmup_steps=2", "trainer.num_threads=1", "data.num_workers=0"]
# 2 torchrun workers on the one node; the job gets both cores; no time-limit signal here
JOB = ["--nproc-per-node", "2", "--cpus-per-task", "2", "--time", "10", "--signal-seconds", "0",
       "--env", "OMP_NUM_THREADS=1", "--env", "WANDB_MODE=offline"]


def _slurm_state() -> str:
    if shutil.which("sinfo") is None:
        return "sinfo not found: Slurm is not installed (run `bash .ci/slurm_up.sh` as root)"
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30)
    states = r.stdout.split()
    if r.returncode != 0 or not states:
        return f"sinfo failed ({' '.join(r.stderr.split())[:200]}): slurmctld not running (bash .ci/slurm_up.sh)"
    if "idle" not in states:
        return f"no idle Slurm node (states: {', '.join(states)})"
    return ""


REQUIRE = "MMGEN_REQUIRE_SLURM"


# session scope: set up before the session-scoped shapes_dir, so a missing Slurm is reported
# before any data is made
@pytest.fixture(scope="session")
def slurm():
    reason = _slurm_state()
    if reason and os.environ.get(REQUIRE) == "1":
        pytest.fail(f"{REQUIRE}=1 (CI) but Slurm is not usable: {reason}", pytrace=False)
    if reason:
        pytest.skip(reason)


def test_missing_slurm_fails_the_suite_when_required(tmp_path):
    """The switch itself: with no Slurm (an empty PATH hides sinfo), this file's Slurm tests
    skip, and with MMGEN_REQUIRE_SLURM=1 they error with the reason and pytest exits non-zero."""
    base = {k: v for k, v in os.environ.items() if k != REQUIRE}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rsE",
           str(Path(__file__)), "-k", "not test_missing_slurm_fails"]
    runs = {}
    for require in ("", "1"):
        env = {**base, "PATH": str(tmp_path), **({REQUIRE: require} if require else {})}
        runs[require] = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                       timeout=120)
    skipped, required = runs[""], runs["1"]
    assert skipped.returncode == 0 and "3 skipped" in skipped.stdout, skipped.stdout[-2000:]
    assert required.returncode == 1 and "3 errors" in required.stdout, required.stdout[-2000:]
    assert f"{REQUIRE}=1 (CI) but Slurm is not usable: sinfo not found" in required.stdout


def scontrol_job(job_id: str) -> dict:
    """``scontrol show job`` as a dict (empty once Slurm forgot the job)."""
    r = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    fields = {}
    for word in r.stdout.split():
        key, _, value = word.partition("=")
        fields.setdefault(key, value)
    return fields


def wait_for(predicate, timeout: float, what: str, period: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(period)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def job_done(job_id: str) -> bool:
    r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return r.stdout.strip() == ""


def cancel(job_id: str) -> None:
    """Cancel until gone (a cancelled trainer exits 3 and might requeue itself)."""
    for _ in range(30):
        if job_done(job_id):
            return
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
        time.sleep(1)


def submit(tmp_path: Path, args: list[str]) -> str:
    r = run_cli([str(BIN / "mmgen-launch"), "slurm", *args], cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("submitted job "), r.stdout
    return r.stdout.split()[2]


def steps(run: Path) -> list[int]:
    return [r["step"] for r in logged_records(run)]


def test_two_process_job_trains_and_records_its_launch(slurm, shapes_dir, tmp_path):
    job_id = submit(tmp_path, [*JOB, "--", *TINY, *data_overrides(shapes_dir), "name=sl",
                               "trainer.steps=6", "checkpoint.every=3"])
    try:
        wait_for(lambda: job_done(job_id), 150, f"job {job_id} to finish")
    finally:
        cancel(job_id)
    run = tmp_path / "runs" / "sl"
    out = (run / "launch" / f"slurm-{job_id}.out").read_text()
    info = scontrol_job(job_id)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (info, out[-3000:])
    assert "finished at step 6" in out and "training step exited with code 0" in out, out[-3000:]
    assert steps(run) == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]
    assert (run / "checkpoints" / "step_0000006" / "rank_00001.pt").is_file()
    assert json.loads((run / "launch.json").read_text())["world_size"] == 2
    # the launch records: enough to resubmit the job as it was
    rec = json.loads((run / "launch" / "launch.json").read_text())
    assert rec["mode"] == "slurm" and [s["job_id"] for s in rec["submissions"]] == [job_id]
    assert rec["git_sha"] and rec["overrides"][0] == "experiment=smoke"
    script = (run / "launch" / "job.sbatch").read_text()
    assert "#SBATCH --requeue" in script and "--nproc-per-node 2" in script
    assert "name: sl" in (run / "launch" / "config.yaml").read_text()

    # resubmitted as it was: the stored script, a new job that resumes from step 6 and ends
    r = run_cli([str(BIN / "mmgen-launch"), "--resubmit", str(run)], cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("submitted job "), r.stderr[-3000:]
    again = r.stdout.split()[2]
    try:
        wait_for(lambda: job_done(again), 150, f"job {again} to finish")
    finally:
        cancel(again)
    out = (run / "launch" / f"slurm-{again}.out").read_text()
    assert "at step 6" in out and "resumed from" in out and "exited with code 0" in out, out[-3000:]
    rec = json.loads((run / "launch" / "launch.json").read_text())
    assert [s["job_id"] for s in rec["submissions"]] == [job_id, again]


def test_preempted_job_checkpoints_requeues_and_resumes(slurm, shapes_dir, tmp_path):
    from mmgen.launch import REQUEUE_EXIT_CODE

    job_id = submit(tmp_path, [*JOB, "--", *TINY, *data_overrides(shapes_dir), "name=pre",
                               "trainer.steps=100000", "checkpoint.every=100000", "checkpoint.keep_last=5"])
    run = tmp_path / "runs" / "pre"
    log = run / "launch" / f"slurm-{job_id}.out"
    try:
        wait_for(lambda: len(steps(run)) >= 3, 120, "the first training steps")
        # what Slurm does before a time limit with --signal=B:USR1@N: USR1 to the batch shell
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=30)
        wait_for(lambda: log.is_file() and "restart 1 " in log.read_text(), 120, "the requeued job to start")
        wait_for(lambda: "resumed from" in log.read_text().split("restart 1 ")[1], 120, "the resume")
        ckpts = sorted((run / "checkpoints").glob("step_*"))
        assert len(ckpts) == 1, ckpts
        stopped = int(ckpts[0].name.split("_")[1])
        wait_for(lambda: max(steps(run)) > stopped + 2, 120, "training to go on after the resume")
        # scancel: SIGTERM everywhere -> a checkpoint again, but no requeue
        subprocess.run(["scancel", job_id], check=True, timeout=30)
        wait_for(lambda: job_done(job_id), 60, "the cancelled job to end")
        info = scontrol_job(job_id)
    finally:
        cancel(job_id)
    first, second = log.read_text().split("restart 1 ")
    assert "batch shell got SIGUSR1" in first, first[-3000:]
    assert f"training step exited with code {REQUEUE_EXIT_CODE}" in first, first[-3000:]
    assert "requeueing job" in first
    assert f"resumed from {ckpts[0]} at step {stopped}" in second, second[-3000:]
    assert "not requeueing" in second and "restart 2 " not in second, second[-3000:]
    assert info.get("Restarts") == "1" and info.get("JobState") == "CANCELLED", info
    # metrics.jsonl continues from the checkpoint step: 1..stopped, then stopped+1, ...
    seq = steps(run)
    assert seq[:stopped] == list(range(1, stopped + 1)), seq
    assert seq[stopped] == stopped + 1 and seq == sorted(set(seq)), seq
    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert int(last.name.split("_")[1]) == seq[-1] and (last / "meta.json").is_file()


def test_submitit_sweep_runs_each_point_as_an_array_job(slurm, shapes_dir, tmp_path):
    """``-m hydra/launcher=mmgen_slurm``: a 2-point sweep as a Slurm array. submitit polls
    ``sacct`` (absent here: it warns and falls back to squeue); a timeout guards the wait."""
    args = [str(BIN / "mmgen-train"), "-m", "hydra/launcher=mmgen_slurm", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.name=mmgen-sweep-test", *TINY, *data_overrides(shapes_dir), "name=sw",
            "trainer.steps=3", "optim.lr=1e-3,2e-3"]
    try:
        r = run_cli(args, cwd=tmp_path, timeout=180)
    finally:
        subprocess.run(["scancel", "--name", "mmgen-sweep-test"], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = tmp_path / "runs" / "sw-sweep"
    lrs = []
    for point in ("0", "1"):
        assert steps(sweep / point) == [1, 2, 3], point
        lrs += [l.split()[1] for l in (sweep / point / "config.yaml").read_text().splitlines()
                if l.strip().startswith("lr:")]
    assert sorted(lrs) == ["0.001", "0.002"]
    assert any((sweep / ".submitit").iterdir())
