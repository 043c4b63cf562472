# `mmgen-launch`: validate the overrides, record the launch, run torchrun here or submit to Slurm.
"""Usage::

    mmgen-launch local --nproc-per-node 2 -- experiment=smoke name=foo
    mmgen-launch local --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-endpoint host0:29400 -- experiment=gpu_1b
    mmgen-launch slurm --nodes 2 --gpus-per-node 8 --partition gpu --time 48:00:00 -- experiment=gpu_1b name=foo
    mmgen-launch slurm --cluster example_pyxis --nodes 4 -- experiment=gpu_1b name=foo   # launch/clusters/
    mmgen-launch slurm --dry-run ... -- ...      # print the sbatch script, write and submit nothing
    mmgen-launch --resubmit runs/foo             # the stored script / command, as it was

Launcher options are this command's own flags; everything after ``--`` is a Hydra override,
exactly as for ``mmgen-train``. The overrides are composed and validated first: a bad one
stops here with one line and exit code 2, before anything is written or submitted. Then
``runs/<name>/launch/`` gets ``launch.json`` (mode, command line, git SHA, submission command,
job ids), ``config.yaml`` (resolved), ``job.sbatch`` (Slurm) and ``git_diff.patch`` (when the
checkout has uncommitted changes).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmgen.launch.sbatch import SlurmOptions

PROG = "mmgen-launch"
HYDRA_FLAGS_HINT = ("Hydra flags are not launcher options; for -m sweeps on Slurm use "
                    "mmgen-train -m hydra/launcher=submitit_slurm ... (docs/launch.md)")


class UsageError(Exception):
    """Bad input: reported as one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UsageError(message)


# ---- arguments ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Launch mmgen training with torchrun or Slurm "
                "(launcher options, then -- and Hydra overrides as for mmgen-train).")
    p.add_argument("--resubmit", metavar="RUN_DIR", help="launch again what RUN_DIR/launch/ recorded")
    p.add_argument("--dry-run", action="store_true", help="print the script or command; write and run nothing")
    sub = p.add_subparsers(dest="mode", parser_class=_Parser)

    loc = sub.add_parser("local", help="torchrun on this machine (one node of a multi-node job)")
    loc.add_argument("--nproc-per-node", type=int, default=0, help="processes here (default: GPUs, or 1)")
    loc.add_argument("--nnodes", default="1", help="nodes, or MIN:MAX for elastic jobs")
    loc.add_argument("--node-rank", type=int, default=None,
                     help="this node's rank (multi-node): 0 hosts the rendezvous store and writes the launch records")
    loc.add_argument("--rdzv-endpoint", default="", help="HOST:PORT of the c10d rendezvous (multi-node)")
    loc.add_argument("--rdzv-id", default="", help="rendezvous id shared by the nodes (default: mmgen-<name>)")
    loc.add_argument("--rdzv-timeout", type=int, default=None,
                     help="seconds to wait for all nodes to join (torchrun's join_timeout, default 600)")
    loc.add_argument("--max-restarts", type=int, default=0, help="restart crashed workers this often")

    # None: not given, so the --cluster profile's value (or the built-in default) applies
    sl = sub.add_parser("slurm", help="write and submit an sbatch script")
    sl.add_argument("--cluster", default="", help="profile launch/clusters/NAME.yaml (or a path): the cluster's defaults")
    sl.add_argument("--nodes", type=int, default=1)
    sl.add_argument("--gpus-per-node", type=int, default=None, help="0: a CPU job")
    sl.add_argument("--nproc-per-node", type=int, default=0, help="processes per node (default: GPUs, or 1)")
    sl.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node (default: 8 per GPU)")
    sl.add_argument("--time", default=None, help="time limit (default 24:00:00)")
    sl.add_argument("--partition", default=None)
    sl.add_argument("--account", default=None)
    sl.add_argument("--qos", default=None)
    sl.add_argument("--mem", default=None, help="memory per node, e.g. 480G")
    sl.add_argument("--constraint", default=None)
    sl.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=None)
    sl.add_argument("--job-name", default="", help="default: mmgen-<name>")
    sl.add_argument("--signal-seconds", type=int, default=None,
                    help="SIGUSR1 this long before the time limit (checkpoint + requeue; default 120); 0: none")
    sl.add_argument("--no-requeue", dest="requeue", action="store_false")
    sl.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts of crashed workers")
    sl.add_argument("--master-port", type=int, default=0, help="default: 20000 + job id mod 20000")
    sl.add_argument("--python", default=None, help="interpreter on the nodes (default: this one)")
    sl.add_argument("--container", default=None, help="image to run in (Apptainer .sif unless --container-runtime pyxis)")
    sl.add_argument("--container-runtime", default=None, help="apptainer (default) or pyxis")
    sl.add_argument("--container-mount", dest="container_mounts", action="append", default=[],
                    help="SRC:DST[:FLAGS] bind mount (repeatable)")
    sl.add_argument("--container-arg", dest="container_args", action="append", default=[],
                    help="option for apptainer exec, or for srun with pyxis (repeatable)")
    sl.add_argument("--container-python", default=None, help="interpreter inside the image (default: python)")
    sl.add_argument("--setup", action="append", default=[], help="shell line before srun (repeatable)")
    sl.add_argument("--env", action="append", default=[], help="NAME=value to export (repeatable)")
    sl.add_argument("--sbatch-arg", dest="sbatch_args", action="append", default=[],
                    help="extra #SBATCH option, e.g. --reservation=x (repeatable)")

    for s in (loc, sl):
        # SUPPRESS: a sub-command must not reset a --dry-run given before it
        s.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS)
        s.add_argument("overrides", nargs="*", help="Hydra overrides, after --")
    return p


# ---- records --------------------------------------------------------------------------------
def _compose(overrides: list[str]):
    from mmgen.cli.preflight import compose_job, one_line

    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        raise UsageError(f"'{bad[0]}': {HYDRA_FLAGS_HINT}")
    try:
        return compose_job(overrides)
    except Exception as e:  # noqa: BLE001 - every config problem is one line + exit 2
        raise UsageError(one_line(e)) from e


def _run_dir(job) -> Path:
    return Path(job.run_dir or Path("runs") / job.name).resolve()


def _git_diff() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        return subprocess.run(["git", "-C", str(root), "diff", "HEAD"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def write_records(launch_dir: Path, record: dict, job, script: str | None = None) -> None:
    """launch.json, config.yaml and (Slurm) job.sbatch; earlier submissions are kept."""
    from mmgen.trainer.job import to_yaml

    launch_dir.mkdir(parents=True, exist_ok=True)
    old = launch_dir / "launch.json"
    if old.is_file():
        record["submissions"] = json.loads(old.read_text()).get("submissions", []) + record["submissions"]
    _atomic_write(launch_dir / "config.yaml", to_yaml(job))
    if script is not None:
        _atomic_write(launch_dir / "job.sbatch", script)
        (launch_dir / "job.sbatch").chmod(0o755)
    diff = _git_diff()
    if diff:
        _atomic_write(launch_dir / "git_diff.patch", diff)
    _atomic_write(old, json.dumps(record, indent=2))


def _add_submission(launch_dir: Path, entry: dict) -> None:
    path = launch_dir / "launch.json"
    record = json.loads(path.read_text())
    record["submissions"].append(entry)
    _atomic_write(path, json.dumps(record, indent=2))


def _base_record(mode: str, argv: list[str], overrides: list[str]) -> dict:
    from mmgen.trainer.provenance import git_sha

    return {"mode": mode, "argv": [PROG, *argv], "overrides": overrides, "cwd": os.getcwd(),
            "git_sha": git_sha(), "python": sys.executable, "host": os.uname().nodename,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "submissions": []}


# ---- local: torchrun here -------------------------------------------------------------------
def torchrun_args(a, name: str) -> list[str]:
    procs = a.nproc_per_node
    if procs <= 0:
        import torch

        procs = torch.cuda.device_count() or 1
    if a.max_restarts < 0:
        raise UsageError("--max-restarts must be >= 0")
    if str(a.nnodes) == "1" and not a.rdzv_endpoint:
        if a.node_rank or a.rdzv_timeout is not None:
            raise UsageError("--node-rank and --rdzv-timeout are for multi-node jobs (--nnodes N --rdzv-endpoint HOST:PORT)")
        return ["--standalone", "--nproc-per-node", str(procs), "--max-restarts", str(a.max_restarts)]
    if not a.rdzv_endpoint:
        raise UsageError(f"--nnodes {a.nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node)")
    host, _, port = a.rdzv_endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--rdzv-endpoint '{a.rdzv_endpoint}' must be HOST:PORT")
    if not all(p.isdigit() and int(p) > 0 for p in str(a.nnodes).split(":")) or str(a.nnodes).count(":") > 1:
        raise UsageError(f"--nnodes '{a.nnodes}' must be N or MIN:MAX")
    max_nodes = str(a.nnodes).rpartition(":")[2]
    conf = []
    if a.node_rank is not None:
        if not 0 <= a.node_rank < int(max_nodes):
            raise UsageError(f"--node-rank {a.node_rank} must be in 0..{int(max_nodes) - 1} for --nnodes {a.nnodes}")
        # node 0 hosts the rendezvous store, the others connect to it; without --node-rank
        # torchrun guesses from the hostname (on one machine both would match)
        conf.append(f"is_host={int(a.node_rank == 0)}")
    if a.rdzv_timeout is not None:
        if a.rdzv_timeout <= 0:
            raise UsageError(f"--rdzv-timeout {a.rdzv_timeout} must be > 0 seconds")
        conf.append(f"join_timeout={a.rdzv_timeout}")
    return ["--nnodes", str(a.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", a.rdzv_endpoint,
            "--rdzv-id", a.rdzv_id or f"mmgen-{name}", *(["--rdzv-conf", ",".join(conf)] if conf else []),
            "--nproc-per-node", str(procs), "--max-restarts", str(a.max_restarts)]


def run_local(node_args: list[str], overrides: list[str]) -> int:
    from mmgen.launch.node import main as node_main

    return node_main([*node_args, "-m", "mmgen.launch.worker", *overrides])


def cmd_local(a, argv: list[str]) -> int:
    job = _compose(a.overrides)
    node_args = torchrun_args(a, job.name)
    command = [sys.executable, "-m", "mmgen.launch.node", *node_args, "-m", "mmgen.launch.worker", *a.overrides]
    if a.dry_run:
        print(shlex.join(command))
        return 0
    launch_dir = _run_dir(job) / "launch"
    if a.node_rank:
        # one record per job: node 0 writes it (the others would race on the same files)
        print(f"{PROG}: node {a.node_rank}: {shlex.join(command)}  (records: node 0's, in {launch_dir})",
              file=sys.stderr, flush=True)
        return run_local(node_args, a.overrides)
    record = {**_base_record("local", argv, a.overrides), "torchrun": node_args, "command": command}
    write_records(launch_dir, record, job)
    _add_submission(launch_dir, {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_sha": record["git_sha"]})
    print(f"{PROG}: {shlex.join(command)}  (records in {launch_dir})", file=sys.stderr, flush=True)
    return run_local(node_args, a.overrides)


# ---- slurm: sbatch ----------------------------------------------------------------------------
# flags a --cluster profile can set: given on the command line, they replace its value
_PROFILE_SCALARS = ("gpus_per_node", "cpus_per_task", "time", "partition", "account", "qos", "mem", "constraint",
                    "exclusive", "signal_seconds", "python", "container", "container_runtime", "container_python")
# repeatable flags: added to the profile's list
_PROFILE_LISTS = ("setup", "sbatch_args", "container_mounts", "container_args")


def load_cluster(name: str):
    """(profile file, ClusterProfile) for --cluster NAME; UsageError (one line) if bad."""
    from mmgen.launch.profile import ClusterProfile, find_profile, load_profile

    if not name:
        return None, ClusterProfile()
    try:
        path = find_profile(name)
        return path, load_profile(path)
    except ValueError as e:
        raise UsageError(str(e)) from e


def slurm_options(a, job, profile) -> SlurmOptions:
    """The command line over the cluster profile over the built-in defaults."""
    from mmgen.launch.sbatch import SlurmOptions

    values = profile.as_options()
    for key in _PROFILE_SCALARS:
        if getattr(a, key) is not None:
            values[key] = getattr(a, key)
    for key in _PROFILE_LISTS:
        values[key] = values[key] + getattr(a, key)
    given = {kv.partition("=")[0] for kv in a.env}
    values["env"] = [kv for kv in values["env"] if kv.partition("=")[0] not in given] + a.env
    values["python"] = values["python"] or sys.executable
    launch_dir = _run_dir(job) / "launch"
    return SlurmOptions(
        job_name=a.job_name or f"mmgen-{job.name}", output_dir=str(launch_dir), workdir=os.getcwd(),
        nodes=a.nodes, nproc_per_node=a.nproc_per_node, requeue=a.requeue, max_restarts=a.max_restarts,
        master_port=a.master_port, **values)


def sbatch(script: Path) -> str:
    """Submit ``script``; return the job id."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise UsageError("sbatch not found: run on a Slurm login node (or use --dry-run)")
    r = subprocess.run([exe, "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        msg = " ".join(r.stderr.split()) or f"exit code {r.returncode}"
        raise RuntimeError(f"sbatch failed: {msg}")
    return r.stdout.strip().split(";")[0]


def cmd_slurm(a, argv: list[str]) -> int:
    from mmgen.launch.sbatch import render_sbatch

    path, profile = load_cluster(a.cluster)
    job = _compose(a.overrides)
    opts = slurm_options(a, job, profile)
    launch_dir = Path(opts.output_dir)
    record = _base_record("slurm", argv, a.overrides)
    if path is not None:
        from dataclasses import asdict

        record["cluster"] = {"name": a.cluster, "path": str(Path(path).resolve()), "profile": asdict(profile)}
    header = (f"# Written by mmgen-launch at {record['created']} from git {record['git_sha']}.\n"
              f"# Resubmit as it was: mmgen-launch --resubmit {shlex.quote(str(launch_dir.parent))}")
    try:
        script = render_sbatch(opts, a.overrides, header=header)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if a.dry_run:
        print(script, end="")
        return 0
    record.update({"script": "job.sbatch", "submit_command": ["sbatch", "--parsable", str(launch_dir / "job.sbatch")]})
    write_records(launch_dir, record, job, script)
    return _submit(launch_dir, record["git_sha"])


def _submit(launch_dir: Path, sha: str) -> int:
    job_id = sbatch(launch_dir / "job.sbatch")
    _add_submission(launch_dir, {"job_id": job_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_sha": sha})
    print(f"submitted job {job_id} (log: {launch_dir}/slurm-{job_id}.out)")
    return 0


# ---- resubmit -------------------------------------------------------------------------------------
def cmd_resubmit(run: str, dry_run: bool) -> int:
    from mmgen.trainer.provenance import git_sha

    launch_dir = Path(run) / "launch"
    path = launch_dir / "launch.json"
    if not path.is_file():
        raise UsageError(f"{run} has no launch/launch.json (was it started with mmgen-launch?)")
    record = json.loads(path.read_text())
    now = git_sha()
    if now != record["git_sha"]:
        print(f"{PROG}: warning: the code changed since this launch (git {record['git_sha']}, now {now}); "
              f"the diff of that launch is in {launch_dir}/git_diff.patch if it had one", file=sys.stderr)
    if record["mode"] == "slurm":
        if dry_run:
            print((launch_dir / "job.sbatch").read_text(), end="")
            return 0
        return _submit(launch_dir, now)
    if dry_run:
        print(shlex.join(record["command"]))
        return 0
    os.chdir(record["cwd"])
    _add_submission(launch_dir, {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_sha": now})
    return run_local(record["torchrun"], record["overrides"])


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a = build_parser().parse_args(argv)
        if a.resubmit:
            if a.mode:
                raise UsageError("--resubmit takes no sub-command: it relaunches what was recorded")
            code = cmd_resubmit(a.resubmit, a.dry_run)
        elif a.mode == "local":
            code = cmd_local(a, argv)
        elif a.mode == "slurm":
            code = cmd_slurm(a, argv)
        else:
            raise UsageError("choose a sub-command (local or slurm) or --resubmit RUN_DIR")
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)


if __name__ == "__main__":
    main()
