# Faults on CPU: preemption signals, a rank killed mid-run, non-finite losses, hung collectives.
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmgen.trainer import REQUEUE_EXIT_CODE
from tests.conftest import BIN, data_overrides
from tests.test_trainer import TINY, losses, make_trainer


def steps_logged(run: Path) -> int:
    f = run / "metrics.jsonl"
    if not f.is_file():
        return 0
    lines = f.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


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
    assert done.returncode == 0 and f"resumed from" in done.stderr
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


def test_nonfinite_losses_are_skipped_then_abort(shapes_dir, tmp_path):
    from mmgen.trainer.trainer import NonFiniteLossError

    t = make_trainer(shapes_dir, tmp_path, ["trainer.steps=20", "trainer.max_nonfinite_steps=2",
                                            "checkpoint.enabled=false"])
    real = t.objective
    poison = {3, 6, 7, 8}  # one isolated bad step, then three in a row (limit 2)

    def objective(model, batch, denominators, generator):
        out = real(model, batch, denominators, generator)
        if t.state.step + 1 in poison:
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    t.objective = objective
    t.objective.local_counts = real.local_counts
    before = {}
    t.metrics.log = lambda step, values: before.update({step: {k: p.clone() for k, p in t.engine.module.named_parameters()}})
    t.job.trainer.log_every = 1
    with pytest.raises(NonFiniteLossError, match="3 consecutive"):
        t.train()
    assert t.state.nonfinite_steps == 4
    assert all(torch.equal(before[2][k], before[3][k]) for k in before[2]), "a NaN step must not update weights"
    assert not all(torch.equal(before[3][k], before[4][k]) for k in before[3]), "training continues after it"


WORKER = """
import datetime, sys, torch, torch.distributed as dist
from mmgen.trainer.run import is_collective_failure
rank = int(sys.argv[1]); port = sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=3))
if rank == 0:
    try:
        dist.all_reduce(torch.ones(1))
    except Exception as e:
        print("FAILURE", is_collective_failure(e), type(e).__name__, str(e).splitlines()[0][:200])
        sys.stdout.flush()
        raise SystemExit(0)
    print("NO_ERROR")
else:
    import time; time.sleep(8)  # never joins the all_reduce
"""


def test_hung_collective_becomes_an_error(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(WORKER)
    port = str(29500 + random.Random().randint(100, 5000))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port], stdout=subprocess.PIPE, text=True)
             for r in (0, 1)]
    out0, _ = procs[0].communicate(timeout=60)
    procs[1].kill()
    assert out0.startswith("FAILURE True"), out0


def test_errors_escaping_the_loop_keep_their_type(shapes_dir, tmp_path, monkeypatch):
    """Non-collective errors propagate unchanged; collective ones become exit 1 with the rank named."""
    from mmgen.cli.preflight import compose_job
    from mmgen.trainer import run as run_mod
    from mmgen.trainer.trainer import Trainer

    job = compose_job([*TINY, *data_overrides(shapes_dir), f"run_dir={tmp_path}", "trainer.steps=2"])

    def boom(self, stop_at=None):
        raise RuntimeError("a plain bug")

    monkeypatch.setattr(Trainer, "train", boom)
    with pytest.raises(RuntimeError, match="a plain bug"):
        run_mod.run_training(job, argv=["t"])

    def hung(self, stop_at=None):
        raise RuntimeError("[gloo] Timed out waiting 3000ms for recv operation to complete")

    monkeypatch.setattr(Trainer, "train", hung)
    with pytest.raises(SystemExit) as e:
        run_mod.run_training(job, argv=["t"])
    assert e.value.code == 1
    assert "collective failed" in (tmp_path / "logs" / "rank_0.log").read_text()
