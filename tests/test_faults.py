# Faults on CPU: preemption signals, a rank killed mid-run, non-finite losses, hung collectives.
from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mmgen.trainer import REQUEUE_EXIT_CODE
from tests.conftest import BIN, data_overrides, logged_records
from tests.test_trainer import TINY, losses, make_trainer


def steps_logged(run: Path) -> int:
    recs = logged_records(run)
    return recs[-1]["step"] if recs else 0


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    t0 = time.time()
    while steps_logged(run) < step:
        assert proc.poll() is None, "training ended before the fault was injected"
        assert time.time() - t0 < timeout, "training made no progress"
        time.sleep(0.2)


def popen(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_and_exits_with_requeue_code(shapes_dir, tmp_path, sig):
    args = [str(BIN / "mmgen-train"), *TINY, *data_overrides(shapes_dir), "name=pre",
            "trainer.steps=400", "checkpoint.every=1000", "data.num_workers=0"]
    proc = popen(args, tmp_path)
    run = tmp_path / "runs" / "pre"
    wait_for_step(run, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-2000:]
    stopped = steps_logged(run)
    assert (run / "checkpoints" / f"step_{stopped:07d}" / "meta.json").is_file()
    assert "preempted" in err
    # the requeued job resumes from there and finishes
    done = subprocess.run([*args[:-2], "trainer.steps=" + str(stopped + 2)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and "resumed from" in done.stderr
    assert sorted(losses(run)) == list(range(1, stopped + 3))


def rank_pids(parent: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().split()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[3]) == parent:
            for kv in env:
                if kv.startswith(b"RANK="):
                    out[int(kv[5:])] = int(pid)
    return out


def test_sigkill_of_one_rank_then_restart_gives_the_same_final_weights(shapes_dir, tmp_path):
    """Rank 1 of 2 is SIGKILLed at a random step; the job fails, is resubmitted as it was, resumes
    from the last complete checkpoint and ends with the same weights as an uninterrupted run.
    (Resubmission rather than torchrun's in-place --max-restarts: with gloo on torch 2.13 the
    restarted workers intermittently hang in the process group's connectFullMesh.)"""
    base = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2",
            "-m", "mmgen.train", *TINY, *data_overrides(shapes_dir), "data.num_workers=0",
            "trainer.steps=10", "checkpoint.every=2", "parallel.timeout_minutes=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    clean = subprocess.run([*base, "name=clean"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert clean.returncode == 0, clean.stderr[-2000:]
    proc = popen([*base, "name=killed"], tmp_path)
    run = tmp_path / "runs" / "killed"
    kill_at = random.Random().randint(3, 7)
    wait_for_step(run, kill_at, proc)
    victims = rank_pids(proc.pid)
    assert 1 in victims, victims
    os.kill(victims[1], signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0, "the job must fail when a rank dies"
    again = subprocess.run([*base, "name=killed"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr, "the resubmitted job must resume from the last checkpoint"
    a = torch.load(tmp_path / "runs" / "clean" / "checkpoints" / "step_0000010" / "model.pt")
    b = torch.load(run / "checkpoints" / "step_0000010" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"killed at step {kill_at}"


def poison_steps(t, steps: set[int]) -> None:
    """Make trainer ``t``'s losses NaN at the optimizer steps in ``steps`` (1-based)."""
    real = t.objective

    def objective(model, batch, denominators, generator):
        out = real(model, batch, denominators, generator)
        if t.state.step + 1 in steps:
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    t.objective = objective
    t.objective.local_counts = real.local_counts


def test_nonfinite_losses_are_skipped_then_abort(shapes_dir, tmp_path):
    from mmgen.trainer.trainer import NonFiniteLossError

    t = make_trainer(shapes_dir, tmp_path, ["trainer.steps=20", "trainer.max_nonfinite_steps=2",
                                            "checkpoint.enabled=false"])
    poison_steps(t, {3, 6, 7, 8})  # one isolated bad step, then three in a row (limit 2)
    before = {}
    t.metrics.log = lambda step, values: before.update({step: {k: p.clone() for k, p in t.engine.module.named_parameters()}})
    t.job.trainer.log_every = 1
    with pytest.raises(NonFiniteLossError, match="3 consecutive"):
        t.train()
    assert t.state.nonfinite_steps == 4
    assert all(torch.equal(before[2][k], before[3][k]) for k in before[2]), "a NaN step must not update weights"
    assert not all(torch.equal(before[3][k], before[4][k]) for k in before[3]), "training continues after it"


def alive(pid: int) -> bool:
    """True while ``pid`` runs or is stopped; False once it exited (gone or a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_hung_collective_in_the_loop_becomes_an_error_naming_the_rank(shapes_dir, tmp_path):
    """The README's claim, in mmgen's own loop: rank 0 of 2 is frozen (SIGSTOP) after the first
    logged step, so rank 1's next collective waits for a peer that never comes. With
    ``parallel.timeout_minutes=0.1`` gloo gives up after 6 s and rank 1 exits 1 with mmgen's
    one-line error naming it, instead of hanging for the default 10 minutes."""
    logs = tmp_path / "torchrun_logs"
    # --redirects 3: each rank's stdout/stderr in its own file, so rank 1's output is its own
    args = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--log-dir", str(logs),
            "--redirects", "3", "-m", "mmgen.train", *TINY, *data_overrides(shapes_dir),
            "data.num_workers=0", "name=hung", "trainer.steps=10000", "checkpoint.enabled=false",
            "parallel.timeout_minutes=0.1"]
    proc = popen(args, tmp_path)
    pids: dict[int, int] = {}
    try:
        wait_for_step(tmp_path / "runs" / "hung", 1, proc)
        pids = rank_pids(proc.pid)
        assert sorted(pids) == [0, 1], pids
        os.kill(pids[0], signal.SIGSTOP)
        frozen = time.time()
        while alive(pids[1]):
            assert time.time() - frozen < 90, "rank 1 still waits in its collective after 90 s"
            time.sleep(0.2)
        waited = time.time() - frozen
    finally:
        # the frozen rank ignores torchrun's SIGTERM (torchrun would wait 30 s, then SIGKILL)
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode != 0
    # torchrun's summary: rank 1 (the one that waited) exited with mmgen's code 1, not a signal
    assert re.search(rf"exitcode\s*:\s*1 \(pid: {pids[1]}\)", err), err[-3000:]
    [stderr1] = logs.glob("*/attempt_0/1/stderr.log")
    text = stderr1.read_text()
    errors = [line for line in text.splitlines() if "collective failed" in line]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert "rank1" in errors[0] and "rank 1: collective failed after parallel.timeout_minutes=0.1" in errors[0]
    # gloo names the timeout it waited: the configured 0.1 minutes reached the process group
    assert "6000ms" in errors[0], errors[0]
    assert waited < 60, f"rank 1 took {waited:.0f} s to give up (timeout 6 s)"


def test_only_collective_errors_are_reported_as_collective_failures():
    """Other errors escape run_training with their traceback (``raise`` in its handler)."""
    from mmgen.trainer.run import is_collective_failure

    assert not is_collective_failure(RuntimeError("a plain bug"))
    assert not is_collective_failure(ValueError("shapes [2, 3] and [4] do not match"))
    assert is_collective_failure(torch.distributed.DistBackendError("[gloo] connection closed by peer"))
