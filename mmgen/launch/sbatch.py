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

How values reach the script (checked against Slurm 22.05's sbatch): sbatch reads ``#SBATCH``
lines up to the first command; it splits each at unquoted whitespace, honours single and
double quotes (inside them a backslash escapes the next character) and ignores the rest of a
line after an unquoted ``#``. So a value with whitespace, a quote, a backslash or ``#`` is
written double-quoted, ``\\`` and ``"`` escaped (``directive_word``). A newline or another
control character is refused in every option: in a directive it would end the line, make the
rest a shell command and stop directive parsing (dropping ``--signal`` and ``--requeue`` below
it). In ``--output``, ``%`` is Slurm's pattern character, so a ``%`` of the run directory is
written ``%%``; a backslash there would switch the patterns off and is refused.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field, fields

from mmgen.launch import REQUEUE_EXIT_CODE

RUNTIMES = ("apptainer", "pyxis")
# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, or no limit
_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|infinite|unlimited", re.IGNORECASE)
_MEM = re.compile(r"\d+[KMGT]?")
_OPTION = re.compile(r"--[A-Za-z][A-Za-z0-9-]*")
_PLAIN = re.compile(r"[^\s\"'\\#]+")   # a directive value sbatch reads back unchanged
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MOUNT_FLAGS = re.compile(r"[a-z]+(\+[a-z]+)*")
# the command-line flag of each SlurmOptions field, for error messages (default: --field-name)
_WHO = {"sbatch_args": "--sbatch-arg", "container_mounts": "--container-mount", "container_args": "--container-arg",
        "output_dir": "the run directory", "workdir": "the working directory"}


def option_name(name: str) -> str:
    """How an error names the SlurmOptions field ``name`` (its command-line flag)."""
    return _WHO.get(name, "--" + name.replace("_", "-"))


def problem(name: str, value, runtime: str = "") -> str:
    """What is wrong with ``value`` for the SlurmOptions field ``name`` ("" if nothing); the
    command line and cluster profiles (mmgen/launch/profile.py) give the same reasons.

    Args:
        name: a SlurmOptions field (one item, for the list fields).
        value: its value.
        runtime: the container runtime, which decides the mount flags.
    """
    if isinstance(value, str) and _CONTROL.search(value):
        return "contains a newline or another control character (it would end its line of the sbatch script)"
    if name in ("nodes",) and value < 1:
        return "must be >= 1"
    if name in ("nproc_per_node", "gpus_per_node", "cpus_per_task", "max_restarts", "signal_seconds") and value < 0:
        return "must be >= 0"
    if name == "master_port" and not 0 <= value < 65536:
        return "must be a TCP port (0: 20000 + job id mod 20000)"
    if name == "time" and not _TIME.fullmatch(value):
        return "is not a Slurm time limit (minutes, H:M:S, D-H, D-H:M:S)"
    if name == "mem" and value and not _MEM.fullmatch(value):
        return "is not a Slurm memory size per node such as 480G (0: all of it)"
    if name == "output_dir" and "\\" in value:
        return "contains a backslash, which turns off Slurm's %j in --output: choose another run name or directory"
    if name == "sbatch_args" and not _OPTION.fullmatch(value.partition("=")[0]):
        return "must be one long sbatch option, --name or --name=value (repeat --sbatch-arg for more)"
    if name == "env" and ("=" not in value or not value.partition("=")[0].isidentifier()):
        return "must look like NAME=value"
    if name == "container_runtime" and value not in ("", *RUNTIMES):
        return f"is not one of {', '.join(RUNTIMES)}"
    if name == "container_args" and not value.startswith("-"):
        return "must be an option of the container runtime, such as --cleanenv"
    if name == "container_mounts":
        parts = value.split(":")
        if not 2 <= len(parts) <= 3 or not all(p.startswith("/") for p in parts[:2]) or "," in value:
            return "must be SRC:DST or SRC:DST:FLAGS with absolute paths and no comma"
        flags = parts[2] if len(parts) == 3 else ""
        ok = flags in ("", "ro", "rw") if runtime == "apptainer" else not flags or _MOUNT_FLAGS.fullmatch(flags)
        if not ok:
            return f"has mount flags {flags!r} that {runtime} does not take ({'ro or rw' if runtime == 'apptainer' else 'e.g. ro+rprivate'})"
    return ""


@dataclass
class SlurmOptions:
    """Args:
        job_name: sbatch ``--job-name``.
        output_dir: the run's ``launch/`` folder; Slurm writes ``slurm-<jobid>.out`` there.
        workdir: the directory the job runs in (where mmgen-launch ran).
        nodes: nodes in the job (one torchrun each).
        gpus_per_node: GPUs requested per node (0: a CPU job, no ``--gpus-per-node`` line).
        nproc_per_node: training processes per node (default: gpus_per_node, or 1).
        cpus_per_task: CPUs per node for the one task (torchrun and its workers).
        time, partition, account, qos, mem, constraint, exclusive: the usual sbatch fields.
        signal_seconds: SIGUSR1 reaches the batch shell this long before the time limit.
        requeue: allow requeue (and requeue on the trainer's requeue code).
        max_restarts: torchrun restarts of crashed workers inside the job.
        master_port: rendezvous port (0: 20000 + job id mod 20000).
        python: interpreter that runs mmgen on the nodes (outside a container).
        container: image to run each node's torchrun in (none: run on the host).
        container_runtime: ``apptainer`` (``apptainer exec IMAGE python ...``; the default with
            an image) or ``pyxis`` (``srun --container-image IMAGE ...``, pyxis/enroot).
        container_mounts: ``SRC:DST[:FLAGS]`` bind mounts (``--bind`` / ``--container-mounts``).
        container_args: more options for ``apptainer exec`` or, with pyxis, for ``srun``.
        container_python: the interpreter inside the image.
        setup: shell lines run before srun (``module load ...``, ``source venv/bin/activate``).
        env: extra ``KEY=VALUE`` exports (NCCL settings among them).
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
    container_runtime: str = ""
    container_mounts: list[str] = field(default_factory=list)
    container_args: list[str] = field(default_factory=list)
    container_python: str = "python"
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

    @property
    def runtime(self) -> str:
        return self.container_runtime or ("apptainer" if self.container else "")

    def validate(self) -> None:
        """Raise ValueError (one line naming the option) for the first bad value."""
        for f in fields(self):
            value = getattr(self, f.name)
            for item in value if isinstance(value, list) else [value]:
                msg = problem(f.name, item, self.runtime)
                if msg:
                    raise ValueError(f"{option_name(f.name)} {item!r} {msg}")
        if self.runtime and not self.container:
            raise ValueError(f"--container-runtime {self.runtime} needs --container IMAGE")
        if (self.container_mounts or self.container_args) and not self.container:
            raise ValueError("--container-mount and --container-arg need --container IMAGE")


def directive_word(value: str) -> str:
    """``value`` in the form sbatch's directive parser reads back unchanged (module docstring)."""
    if _PLAIN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _directives(o: SlurmOptions) -> list[str]:
    lines = [f"--job-name={directive_word(o.job_name)}", f"--nodes={o.nodes}", "--ntasks-per-node=1",
             f"--cpus-per-task={o.cpus}", f"--time={o.time}",
             # stdout and stderr; % is Slurm's pattern character (%j: the job id)
             f"--output={directive_word(o.output_dir.replace('%', '%%') + '/slurm-%j.out')}",
             "--open-mode=append"]  # a requeued job appends to the same log
    if o.gpus_per_node:
        lines.append(f"--gpus-per-node={o.gpus_per_node}")
    for flag, value in (("partition", o.partition), ("account", o.account), ("qos", o.qos),
                        ("mem", o.mem), ("constraint", o.constraint)):
        if value:
            lines.append(f"--{flag}={directive_word(value)}")
    if o.exclusive:
        lines.append("--exclusive")
    if o.signal_seconds:
        lines.append(f"--signal=B:USR1@{o.signal_seconds}")
    lines.append("--requeue" if o.requeue else "--no-requeue")
    for arg in o.sbatch_args:
        name, eq, value = arg.partition("=")
        lines.append(f"{name}={directive_word(value)}" if eq else name)
    return [f"#SBATCH {line}" for line in lines]


def srun_options(o: SlurmOptions) -> list[str]:
    """srun's options after the task layout: pyxis takes the container here."""
    if o.runtime != "pyxis":
        return []
    mounts = [f"--container-mounts={','.join(o.container_mounts)}"] if o.container_mounts else []
    return [f"--container-image={o.container}", *mounts, f"--container-workdir={o.workdir}", *o.container_args]


def node_command(o: SlurmOptions, overrides: list[str]) -> list[str]:
    """The command srun starts once per node (shell words; $VARS expand at run time)."""
    if o.runtime == "apptainer":
        # --nv binds the host's NVIDIA driver; without GPUs it only warns
        binds = [w for m in o.container_mounts for w in ("--bind", m)]
        python = ["apptainer", "exec", *(["--nv"] if o.gpus_per_node else []), *binds, *o.container_args,
                  o.container, o.container_python]
    elif o.runtime == "pyxis":
        python = [o.container_python]
    else:
        python = [o.python]
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
    """The whole batch script as text; ValueError (one line) for a bad option."""
    o.validate()
    threads = max(1, o.cpus // o.procs)
    port = (f"MASTER_PORT={o.master_port}" if o.master_port
            else "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))")
    env = "\n".join(f"export {kv.split('=', 1)[0]}={shlex.quote(kv.split('=', 1)[1])}" for kv in o.env)
    setup = "\n".join(o.setup)
    srun = " \\\n    ".join(['srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK"',
                             *(shlex.quote(w) for w in srun_options(o))])
    cmd = _format_command(node_command(o, overrides), len(overrides))
    code = REQUEUE_EXIT_CODE
    requeue = ('  echo "mmgen: checkpoint written after a preemption signal; requeueing job $SLURM_JOB_ID"\n'
               '  scontrol requeue "$SLURM_JOB_ID"' if o.requeue
               else '  echo "mmgen: checkpoint written; requeue is off (--no-requeue): mmgen-launch --resubmit RUN_DIR"')
    # file-wide, so it must follow the shebang: setup lines source files that only the nodes have
    lint = "\n# shellcheck disable=SC1091" if o.setup else ""
    return f"""#!/bin/bash{lint}
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
{srun} \\
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
