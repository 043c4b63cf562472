# Two `mmgen-launch local` node agents on one machine train one job, are preempted together, resume; a node that never joins times out.
"""Each agent is one node of a 2-node job (c10d rendezvous on 127.0.0.1, one gloo worker per
node), started the way an operator starts nodes by hand: ``--nnodes 2 --node-rank R
--rdzv-endpoint 127.0.0.1:PORT``. SIGTERM to both agents goes the trainer's preemption way
(checkpoint on every rank, exit 3 through torchrun); the same two commands again resume from
that checkpoint and finish. Meanwhile a third agent waits for a partner that never comes and
must end, after ``--rdzv-timeout``, with one line and a non-zero exit."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from mmgen.launch import REQUEUE_EXIT_CODE
from tests.conftest import BIN, data_overrides, logged_records

TINY = ["experiment=smoke", "data.seq_len=128", "data.batch_size=4", "trainer.log_every=1",
        "metrics.progress=false", "optim.warmup_steps=2", "trainer.num_threads=1", "data.num_workers=0"]
STEPS = 40  # enough that the SIGTERM lands before the end on a fast machine (~0.05 s a step)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    """One ``mmgen-launch local`` process (its own session, so cleanup reaches its workers)."""

    def __init__(self, cwd: Path, log: Path, argv: list[str]):
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([str(BIN / "mmgen-launch"), "local", *argv], cwd=cwd, env=ENV, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.log.name} still running after {timeout:.0f}s:\n{self.text()[-3000:]}")

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def node_args(rank: int, port: int) -> list[str]:
    return ["--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
            "--rdzv-endpoint", f"127.0.0.1:{port}"]


def metric_steps(run: Path) -> list[int]:
    return [r["step"] for r in logged_records(run)]


def test_two_node_agents_train_are_preempted_resume_and_a_missing_node_times_out(shapes_dir, tmp_path):
    port, lonely_port = free_port(), free_port()
    overrides = ["--", *TINY, *data_overrides(shapes_dir), "name=mn", f"trainer.steps={STEPS}",
                 "checkpoint.every=100000"]
    run = tmp_path / "runs" / "mn"
    agents: list[Agent] = []
    try:
        # a node whose partner never starts: waits --rdzv-timeout, then one line (runs alongside)
        lonely = Agent(tmp_path, tmp_path / "lonely.log",
                       [*node_args(0, lonely_port), "--rdzv-timeout", "10", "--", "experiment=smoke", "name=alone"])
        agents.append(lonely)

        # -- phase 1: both nodes train, then SIGTERM to both agents -> checkpoint, exit 3
        nodes = [Agent(tmp_path, tmp_path / f"node{r}.log", [*node_args(r, port), *overrides]) for r in (0, 1)]
        agents += nodes
        end = time.time() + 180
        while len(metric_steps(run)) < 3 and time.time() < end and all(n.proc.poll() is None for n in nodes):
            time.sleep(0.2)
        assert len(metric_steps(run)) >= 3, "\n".join(n.text()[-2000:] for n in nodes)
        for n in nodes:
            n.proc.send_signal(signal.SIGTERM)
        codes = [n.wait(120) for n in nodes]
        logs = "\n".join(n.text() for n in nodes)
        assert codes == [REQUEUE_EXIT_CODE] * 2, logs[-4000:]
        assert logs.count("forwarded to 1 worker(s)") == 2 and "preempted by SIGTERM" in logs, logs[-4000:]
        ckpts = sorted((run / "checkpoints").glob("step_*"))
        assert len(ckpts) == 1 and (ckpts[0] / "meta.json").is_file(), ckpts
        assert {p.name for p in ckpts[0].glob("rank_*.pt")} == {"rank_00000.pt", "rank_00001.pt"}
        stopped = int(ckpts[0].name.split("_")[1])
        assert stopped < STEPS, "the job finished before the SIGTERM arrived"
        assert json.loads((run / "launch.json").read_text())["world_size"] == 2

        # the lonely node gave up in one line, no traceback
        assert lonely.wait(120) == 1, lonely.text()[-3000:]
        text = lonely.text()
        errors = [l for l in text.splitlines() if "error" in l.lower()]
        assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
        assert errors[0] == (f"mmgen-launch node: error: rendezvous 'mmgen-alone' at 127.0.0.1:{lonely_port} timed out "
                             "after 10 s: not all of the 2 nodes joined (start the same command on every node; "
                             "--rdzv-timeout S waits longer)"), errors[0]

        # -- phase 2: the same two commands resume from the checkpoint and finish
        nodes = [Agent(tmp_path, tmp_path / f"node{r}-again.log", [*node_args(r, port), *overrides]) for r in (0, 1)]
        agents += nodes
        codes = [n.wait(180) for n in nodes]
        logs = "\n".join(n.text() for n in nodes)
        assert codes == [0, 0], logs[-4000:]
        assert f"resumed from {ckpts[0]} at step {stopped}" in logs and f"finished at step {STEPS}" in logs, logs[-4000:]
        assert metric_steps(run) == list(range(1, STEPS + 1))
    finally:
        for a in agents:
            a.stop()
    # node 0 alone writes the launch records (node 1 would race on the same files): two launches
    rec = json.loads((run / "launch" / "launch.json").read_text())
    assert len(rec["submissions"]) == 2 and "is_host=1" in rec["torchrun"], rec
