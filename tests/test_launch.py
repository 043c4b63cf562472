# mmgen-launch: the sbatch script it writes (and what sbatch reads back), bad input, torchrun here with SIGTERM.
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mmgen.launch import REQUEUE_EXIT_CODE
from mmgen.launch.cli import main as launch_main
from tests.conftest import BIN, data_overrides

TINY = ["experiment=smoke", "data.seq_len=128", "data.batch_size=4", "trainer.log_every=1",
        "metrics.progress=false", "optim.warmup_steps=2", "trainer.num_threads=1", "data.num_workers=0"]


def lint_script(path: Path) -> None:
    """``bash -n`` always; shellcheck when installed (``.ci/run`` installs it), else skip saying so."""
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (.ci/run installs it with apt-get): only bash -n ran")
    r = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def launch(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        launch_main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_dry_run_prints_a_multi_node_sbatch_script(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, script, err = launch(["slurm", "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu",
                                "--account", "proj", "--time", "2:00:00", "--signal-seconds", "300",
                                "--env", "NCCL_SOCKET_IFNAME=ib0", "--setup", "module load cuda",
                                "--", "experiment=gpu_1b", "name=big"], capsys)
    assert code == 0, err
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=64", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --time=2:00:00", "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue",
                 f"#SBATCH --output={tmp_path.resolve()}/runs/big/launch/slurm-%j.out",
                 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                 "export NCCL_SOCKET_IFNAME=ib0", "module load cuda", "--nproc-per-node 8",
                 "--rdzv-backend c10d", '--rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"', "trap 'forward USR1' USR1",
                 f"if [[ $rc -eq {REQUEUE_EXIT_CODE} ]]", 'scontrol requeue "$SLURM_JOB_ID"']:
        assert line in script, line
    assert not (tmp_path / "runs").exists(), "--dry-run writes nothing"
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    lint_script(path)


@pytest.mark.parametrize("argv,needle", [
    (["slurm", "--", "model.dimm=3"], "dimm"),
    (["slurm", "--nodes", "0", "--", "experiment=smoke"], "--nodes"),
    (["slurm", "--env", "NOEQUALS", "--", "experiment=smoke"], "NAME=value"),
    (["slurm", "--", "-m", "optim.lr=1,2"], "submitit_slurm"),
    (["local", "--nnodes", "2", "--", "experiment=smoke"], "--rdzv-endpoint"),
    (["local", "--nnodes", "2", "--rdzv-endpoint", "nohost", "--", "experiment=smoke"], "HOST:PORT"),
    (["local", "--nnodes", "2", "--rdzv-endpoint", "h:1", "--node-rank", "2", "--", "experiment=smoke"], "0..1"),
    (["local", "--nnodes", "2", "--rdzv-endpoint", "h:1", "--rdzv-timeout", "0", "--", "experiment=smoke"], "> 0"),
    (["local", "--nnodes", "two", "--rdzv-endpoint", "h:1", "--", "experiment=smoke"], "MIN:MAX"),
    (["local", "--node-rank", "1", "--", "experiment=smoke"], "multi-node"),
    (["local", "--bogus"], "unrecognized arguments"),
    (["--resubmit", "nowhere"], "launch.json"),
    ([], "sub-command"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    code, out, err = launch(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("mmgen-launch: error:"), err
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()


# Item 9 of the Operations v2 issue: every value that reaches an #SBATCH line is checked. Run
# without --dry-run: were a value let through, the job would be written and submitted (sbatch is
# on PATH where Slurm is up), so "exit 2 and no runs/" also means "nothing submitted".
@pytest.mark.parametrize("flags,needle", [
    (["--account", "proj\n#SBATCH --wrap=id"], "--account 'proj\\n#SBATCH --wrap=id' contains a newline"),
    (["--sbatch-arg=--reservation=r\nrm -rf ~"], "--sbatch-arg"),
    (["--job-name", "a\tb"], "--job-name 'a\\tb' contains a newline or another control character"),
    (["--partition", "gpu\r"], "--partition"),
    (["--qos", "q\x00"], "--qos"),
    (["--setup", "module load a\nmodule load b"], "--setup"),
    (["--env", "A=1\n"], "--env"),
    (["--sbatch-arg=--gres gpu:8"], "one long sbatch option"),
    (["--sbatch-arg=-x"], "one long sbatch option"),
    (["--time", "forever"], "not a Slurm time limit"),
    (["--mem", "4 GB"], "memory size"),
    (["--container", "x.sif", "--container-mount", "data:/data"], "absolute paths"),
    (["--container", "x.sif", "--container-mount", "/d:/d:ro+x"], "apptainer does not take"),
    (["--container", "x.sif", "--container-runtime", "docker"], "is not one of apptainer, pyxis"),
    (["--container-mount", "/d:/d"], "need --container IMAGE"),
    (["--", "experiment=smoke", "name=a\\b"], "backslash"),
])
def test_bad_sbatch_value_is_one_line_exit_2_nothing_written_or_submitted(tmp_path, capsys, monkeypatch, flags,
                                                                           needle):
    monkeypatch.chdir(tmp_path)
    argv = ["slurm", *flags] if "--" in flags else ["slurm", *flags, "--", "experiment=smoke"]
    code, out, err = launch(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("mmgen-launch: error:"), err
    assert needle in lines[0], lines[0]
    assert not out and not (tmp_path / "runs").exists()


def test_working_directory_with_a_newline_is_refused(tmp_path, capsys, monkeypatch):
    odd = tmp_path / "a\nb"
    odd.mkdir()
    monkeypatch.chdir(odd)
    code, out, err = launch(["slurm", "--", "experiment=smoke"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "directory" in err and "contains a newline" in err, err
    assert not (odd / "runs").exists()


# values sbatch's directive parser would split (space), end (#) or unquote (quotes, backslash)
ODD = {"job_name": 'odd "job" #1 it\'s', "account": "a b", "comment": "c\\d 'e' \"f\" #g", "name": "my run %x"}


def odd_script(tmp_path: Path, capsys, extra: list[str]) -> tuple[int, str, str]:
    return launch(["slurm", "--job-name", ODD["job_name"], "--account", ODD["account"],
                   f"--sbatch-arg=--comment={ODD['comment']}", "--no-requeue", "--time", "10",
                   "--signal-seconds", "0", *extra], capsys)


def test_odd_values_are_quoted_for_sbatch_and_the_script_lints(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, script, err = odd_script(tmp_path, capsys, ["--dry-run", "--", "experiment=smoke", f"name={ODD['name']}"])
    assert code == 0, err
    assert '#SBATCH --job-name="odd \\"job\\" #1 it\'s"' in script
    assert '#SBATCH --account="a b"' in script
    assert '#SBATCH --comment="c\\\\d \'e\' \\"f\\" #g"' in script
    # % is Slurm's pattern character in --output: the run name's % is written %%
    assert f'#SBATCH --output="{tmp_path.resolve()}/runs/my run %%x/launch/slurm-%j.out"' in script
    assert "'name=my run %x'" in script and "--resubmit '" in script
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    lint_script(path)


def test_sbatch_reads_odd_values_back_and_the_job_runs_in_a_run_dir_with_a_space(shapes_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    """The real sbatch (a one-node Slurm, .ci/slurm_up.sh) parses the quoted directives into the
    values given, goes on past them (--no-requeue comes after --account), writes the log into
    ``runs/my run %x/launch/`` and the job trains there."""
    from tests.test_slurm import _slurm_state, cancel, job_done, scontrol_job, wait_for

    reason = _slurm_state()
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    code, out, err = odd_script(tmp_path, capsys, ["--env", "OMP_NUM_THREADS=1", "--", *TINY,
                                                   *data_overrides(shapes_dir), f"name={ODD['name']}",
                                                   "trainer.steps=1"])
    assert code == 0 and out.startswith("submitted job "), err
    job_id = out.split()[2]
    try:
        wait_for(lambda: job_done(job_id), 150, f"job {job_id} to finish")
        info = scontrol_job(job_id)
    finally:
        cancel(job_id)
    run = tmp_path / "runs" / ODD["name"]
    log = (run / "launch" / f"slurm-{job_id}.out").read_text()
    assert info.get("JobState") == "COMPLETED" and "finished at step 1" in log, (info, log[-3000:])
    r = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    shown = r.stdout  # scontrol -o would run fields with spaces together
    assert f"JobName={ODD['job_name']}\n" in shown and f"Account={ODD['account']} QOS" in shown, shown
    assert f"Comment={ODD['comment']} " in shown and "Requeue=0" in shown, shown
    assert (run / "checkpoints" / "step_0000001").is_dir()


def test_local_sigterm_checkpoints_exits_with_requeue_code_and_resubmit_resumes(shapes_dir, tmp_path):
    """Without Slurm the node agent forwards SIGTERM to its workers and passes their exit code 3 on."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    args = [str(BIN / "mmgen-launch"), "local", "--nproc-per-node", "2", "--", *TINY, *data_overrides(shapes_dir),
            "name=loc", "trainer.steps=100000", "checkpoint.every=100000"]
    run = tmp_path / "runs" / "loc"

    def start_and_stop(argv: list[str], after_step: int) -> tuple[int, str]:
        with open(tmp_path / "out.txt", "w") as out:
            p = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                end = time.time() + 120
                while time.time() < end and p.poll() is None:
                    f = run / "metrics.jsonl"
                    if f.is_file() and len(f.read_text().splitlines()) >= after_step:
                        break
                    time.sleep(0.3)
                p.send_signal(signal.SIGTERM)
                return p.wait(timeout=120), (tmp_path / "out.txt").read_text()
            finally:
                if p.poll() is None:
                    p.kill()

    code, out = start_and_stop(args, 2)
    assert code == REQUEUE_EXIT_CODE, out[-3000:]
    assert "forwarded to 2 worker(s)" in out, out[-3000:]
    ckpt = sorted((run / "checkpoints").glob("step_*"))
    assert len(ckpt) == 1 and (ckpt[0] / "meta.json").is_file()
    stopped = int(ckpt[0].name.split("_")[1])
    rec = json.loads((run / "launch" / "launch.json").read_text())
    assert rec["mode"] == "local" and rec["torchrun"][:1] == ["--standalone"]

    code, out = start_and_stop([str(BIN / "mmgen-launch"), "--resubmit", str(run)], stopped + 2)
    assert code == REQUEUE_EXIT_CODE, out[-3000:]
    assert f"at step {stopped}" in out and "resumed from" in out, out[-3000:]
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > stopped, steps
    assert len(json.loads((run / "launch" / "launch.json").read_text())["submissions"]) == 2


def test_node_exit_code_follows_the_first_failing_worker():
    from types import SimpleNamespace as F

    from mmgen.launch.node import requeue_code

    # the first worker out exited with the requeue code; torchrun then SIGTERMed the other
    assert requeue_code({0: F(exitcode=-15, timestamp=2.0), 1: F(exitcode=REQUEUE_EXIT_CODE, timestamp=1.0)}) \
        == REQUEUE_EXIT_CODE
    assert requeue_code({0: F(exitcode=REQUEUE_EXIT_CODE, timestamp=2.0), 1: F(exitcode=1, timestamp=1.0)}) == 1
    assert requeue_code({}) == 1


def test_worker_restarted_after_preemption_exits_with_requeue_code_at_once(tmp_path):
    r = subprocess.run([str(BIN / "python"), "-m", "mmgen.launch.worker", "experiment=smoke"], cwd=tmp_path,
                       env={**os.environ, "MMGEN_PREEMPTED": "1"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == REQUEUE_EXIT_CODE and "preempted" in r.stderr
    assert not (tmp_path / "runs").exists()
