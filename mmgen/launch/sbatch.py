# The sbatch script: N nodes x G processes, one torchrun per node, preemption -> requeue.
"""``render_sbatch`` is a pure function of ``SlurmOptions`` and the training overrides, so the
script can be printed (``--dry-run``), tested, stored in the run directory and resubmitted.

What happens at run time (the comments in the script say the same):

1. ``#SBATCH --signal=B:USR1@<secs>`` makes Slurm send SIGUSR1 to the batch shell that many
   seconds before the time limit; ``--requeue`` allows the job to be requeued.
2. The batch shell runs ``srun`` in the background and waits, so its traps run at once; a
   trapped USR1 or TERM is forwarded to the step as USR1 (srun would answer a TERM by killing
   the step), and Slurm delivers it to every process of the step on every node.
3. The trainer finishes its step, all ranks agree, it checkpoints and exits with the requeue
   code; ``mmgen.launch.node`` passes the code through torchrun and ``srun`` returns it.
4. On that code the batch shell calls ``scontrol requeue $SLURM_JOB_ID``; the requeued job
   starts again with ``SLURM_RESTART_COUNT`` one higher and resumes from the checkpoint.
   Not when the batch shell itself got SIGTERM: that is ``scancel`` (the user wants the job
   gone) or preemption, where Slurm's own ``PreemptMode`` (REQUEUE or CANCEL) decides. The
   checkpoint is written either way.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from mmgen.launch import REQUEUE_EXIT_CODE


@dataclass
class SlurmOptions:
    """Args:
        nodes: nodes in the job (one torchrun each).
        gpus_per_node: GPUs requested per node (0: a CPU job, no ``--gpus-per-node`` line).
        nproc_per_node: training processes per node (default: gpus_per_node, or 1).
        cpus_per_task: CPUs per node for the one task (torchrun and its workers).
        time, partition, account, qos, mem, constraint, exclusive: the usual sbatch fields.
        signal_seconds: SIGUSR1 reaches the batch shell this long before the time limit.
        requeue: allow requeue (and requeue on the trainer's requeue code).
        max_restarts: torchrun restarts of crashed workers inside the job.
        master_port: rendezvous port (0: 20000 + job id mod 20000).
        python: interpreter that runs mmgen on the nodes.
        container: Apptainer image; runs ``apptainer exec --nv IMAGE python ...`` per node.
        setup: shell lines run before srun (``module load ...``, ``source venv/bin/activate``).
        env: extra ``KEY=VALUE`` exports.
        sbatch_args: extra ``#SBATCH`` options, e.g. ``--reservation=x``.
    """

    job_name: str
    output_dir: str
    workdir: str
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int = 0
    cpus_per_task: int = 0
    time: str = "24:00:00"
    partition: str = ""
    account: str = ""
    qos: str = ""
    mem: str = ""
    constraint: str = ""
    exclusive: bool = False
    signal_seconds: int = 120
    requeue: bool = True
    max_restarts: int = 0
    master_port: int = 0
    python: str = "python"
    container: str = ""
    setup: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    sbatch_args: list[str] = field(default_factory=list)

    @property
    def procs(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1

    @property
    def cpus(self) -> int:
        """CPUs for the node's task: as asked, else 8 per GPU (data workers) or 1 per process."""
        return self.cpus_per_task or (8 * self.gpus_per_node if self.gpus_per_node else self.procs)

    def validate(self) -> None:
        if self.nodes < 1 or self.procs < 1:
            raise ValueError(f"--nodes and --nproc-per-node must be >= 1 (got {self.nodes}, {self.procs})")
        if self.gpus_per_node < 0 or self.cpus_per_task < 0 or self.max_restarts < 0:
            raise ValueError("--gpus-per-node, --cpus-per-task and --max-restarts must be >= 0")
        if self.signal_seconds < 0:
            raise ValueError(f"--signal-seconds must be >= 0 (got {self.signal_seconds})")
        for kv in self.env:
            if "=" not in kv or not kv.split("=", 1)[0].isidentifier():
                raise ValueError(f"--env '{kv}' must look like NAME=value")
        for a in self.sbatch_args:
            if not a.startswith("--"):
                raise ValueError(f"--sbatch-arg '{a}' must be a long sbatch option like --reservation=x")


def _directives(o: SlurmOptions) -> list[str]:
    lines = [f"--job-name={o.job_name}", f"--nodes={o.nodes}", "--ntasks-per-node=1",
             f"--cpus-per-task={o.cpus}", f"--time={o.time}",
             f"--output={o.output_dir}/slurm-%j.out",  # stdout and stderr
             "--open-mode=append"]  # a requeued job appends to the same log
    if o.gpus_per_node:
        lines.append(f"--gpus-per-node={o.gpus_per_node}")
    for flag, value in (("partition", o.partition), ("account", o.account), ("qos", o.qos),
                        ("mem", o.mem), ("constraint", o.constraint)):
        if value:
            lines.append(f"--{flag}={value}")
    if o.exclusive:
        lines.append("--exclusive")
    if o.signal_seconds:
        lines.append(f"--signal=B:USR1@{o.signal_seconds}")
    lines.append("--requeue" if o.requeue else "--no-requeue")
    lines.extend(o.sbatch_args)
    return [f"#SBATCH {line}" for line in lines]


def node_command(o: SlurmOptions, overrides: list[str]) -> list[str]:
    """The command srun starts once per node (shell words; $VARS expand at run time)."""
    python = ["apptainer", "exec", "--nv", o.container, "python"] if o.container else [o.python]
    return [*python, "-m", "mmgen.launch.node", "--nnodes", "$SLURM_NNODES",
            "--nproc-per-node", str(o.procs), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "$MASTER_ADDR:$MASTER_PORT", "--rdzv-id", "$SLURM_JOB_ID",
            "--max-restarts", str(o.max_restarts), "-m", "mmgen.launch.worker", *overrides]


def _shell_word(word: str) -> str:
    """Quote for bash, leaving the $SLURM_*/$MASTER_* variables of node_command to expand."""
    if word.startswith("$") or word == "$MASTER_ADDR:$MASTER_PORT":
        return f'"{word}"'
    return shlex.quote(word)


def _format_command(words: list[str], num_overrides: int) -> str:
    """One flag (with its value) or one override per line, for a readable script."""
    lines: list[list[str]] = [[]]
    body, tail = words[: len(words) - num_overrides], words[len(words) - num_overrides:]
    for w in body:
        if w.startswith("-") and lines[-1]:
            lines.append([])
        lines[-1].append(_shell_word(w))
    lines.extend([_shell_word(w)] for w in tail)
    return " \\\n    ".join(" ".join(line) for line in lines)


def render_sbatch(o: SlurmOptions, overrides: list[str], header: str = "") -> str:
    """The whole batch script as text."""
    o.validate()
    threads = max(1, o.cpus // o.procs)
    port = (f"MASTER_PORT={o.master_port}" if o.master_port
            else "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))")
    env = "\n".join(f"export {kv.split('=', 1)[0]}={shlex.quote(kv.split('=', 1)[1])}" for kv in o.env)
    setup = "\n".join(o.setup)
    cmd = _format_command(node_command(o, overrides), len(overrides))
    code = REQUEUE_EXIT_CODE
    requeue = ('  echo "mmgen: checkpoint written after a preemption signal; requeueing job $SLURM_JOB_ID"\n'
               '  scontrol requeue "$SLURM_JOB_ID"' if o.requeue
               else '  echo "mmgen: checkpoint written; requeue is off (--no-requeue): mmgen-launch --resubmit RUN_DIR"')
    return f"""#!/bin/bash
{header}
{chr(10).join(_directives(o))}

# -- environment ------------------------------------------------------------------------
set -uo pipefail   # no -e: a failing step must reach the requeue logic below
cd {shlex.quote(o.workdir)} || exit 1
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{threads}}}
export NCCL_DEBUG=${{NCCL_DEBUG:-WARN}}
# a failed or hung NCCL collective raises (after parallel.timeout_minutes) instead of hanging
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${{TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}}
export MMGEN_LAUNCH_DIR={shlex.quote(o.output_dir)}
{env}
{setup}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
{port}
export MASTER_ADDR MASTER_PORT
echo "mmgen: job $SLURM_JOB_ID restart ${{SLURM_RESTART_COUNT:-0}} on $SLURM_JOB_NODELIST (rendezvous $MASTER_ADDR:$MASTER_PORT) at $(date -Is)"

# -- preemption: forward USR1/TERM to the step as USR1 -----------------------------------
STEP_PID=""
GOT_TERM=0
# shellcheck disable=SC2317  # called from the traps
forward() {{
  echo "mmgen: batch shell got SIG$1 at $(date -Is); asking the trainer to checkpoint and stop"
  if [[ $1 == TERM ]]; then GOT_TERM=1; fi
  if [[ -n $STEP_PID ]]; then kill -s USR1 "$STEP_PID" 2>/dev/null; fi
}}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# -- one torchrun per node ----------------------------------------------------------------
srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" \\
    {cmd} &
STEP_PID=$!
while true; do  # wait returns early when a trapped signal arrives: wait again
  wait "$STEP_PID"
  rc=$?
  kill -0 "$STEP_PID" 2>/dev/null || break
done
echo "mmgen: training step exited with code $rc at $(date -Is)"

if [[ $rc -eq {code} && $GOT_TERM -eq 1 ]]; then
  # scancel or preemption: the user wants the job gone, or Slurm's PreemptMode requeues it
  echo "mmgen: checkpoint written after SIGTERM; not requeueing (scancel, or Slurm's PreemptMode decides)"
elif [[ $rc -eq {code} ]]; then
{requeue}
fi
exit "$rc"
"""
