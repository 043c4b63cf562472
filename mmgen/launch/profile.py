# Cluster profiles: launch/clusters/<NAME>.yaml holds a cluster's defaults for `mmgen-launch slurm`.
"""``mmgen-launch slurm --cluster NAME`` reads ``launch/clusters/NAME.yaml`` (or
``$MMGEN_CLUSTERS_DIR/NAME.yaml``, or a path ending in ``.yaml``): what is the same for every
job on one cluster (partition, account, QoS, GPUs, CPUs and memory per node, time limit, a
container image with its mounts, environment set-up lines, NCCL settings). The command line
overrides a profile: a flag that is given replaces the profile's value; the repeatable flags
(``--setup``, ``--env``, ``--sbatch-arg``, ``--container-mount``, ``--container-arg``) add to
the profile's lists, and ``--env NAME=value`` replaces the profile's ``NAME``.

Loading is strict, like a Hydra override: an unknown key (with the nearest known one), a value
of the wrong type, or a bad value stops mmgen-launch with one line that names the file and the
key (exit 2). Values are checked by the same rules as the command line's flags
(``mmgen.launch.sbatch.problem``), so a profile cannot put a newline into an ``#SBATCH`` line.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mmgen.launch.sbatch import RUNTIMES, SlurmOptions, problem

NCCL_PREFIXES = ("NCCL_", "TORCH_NCCL_")


@dataclass
class ContainerProfile:
    """Args:
        runtime: ``apptainer`` (``apptainer exec IMAGE python ...`` per node) or ``pyxis``
            (``srun --container-image IMAGE --container-mounts ...``, pyxis/enroot).
        image: the image: a ``.sif`` file for Apptainer; for pyxis a ``.sqsh`` file or an
            enroot URI such as ``nvcr.io#nvidia/pytorch:25.01-py3``.
        mounts: ``SRC:DST[:FLAGS]`` bind mounts (absolute paths). With pyxis the job's working
            directory must be among them (it is ``--container-workdir``).
        args: more options for ``apptainer exec`` (e.g. ``--cleanenv``) or, with pyxis, for
            ``srun`` (e.g. ``--no-container-mount-home``).
        python: the interpreter inside the image (mmgen installed there).
    """

    runtime: str = ""
    image: str = ""
    mounts: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    python: str = SlurmOptions.container_python


@dataclass
class ClusterProfile:
    """Args:
        description: free text (the cluster, who maintains the profile).
        partition, account, qos, constraint: the sbatch options of the same name.
        gpus_per_node: GPUs per node (0: CPU nodes); also the default processes per node.
        cpus_per_task: CPUs per node (mmgen runs one task per node; 0: 8 per GPU).
        mem: memory per node, e.g. ``480G`` (``0``: all of it; empty: the cluster default).
        time: the time limit, e.g. ``"48:00:00"`` (quoted: YAML reads 48:00:00 as a number).
        exclusive: whole nodes.
        signal_seconds: SIGUSR1 this long before the time limit (checkpoint + requeue).
        python: the interpreter on the nodes without a container (empty: the one running
            mmgen-launch, which then must be on a shared filesystem).
        setup: shell lines before srun (``module load cuda/12.4``, ``source /x/venv/bin/activate``).
        env: variables to export, NAME: value.
        nccl: NCCL settings, exported like ``env``; names start with NCCL_ or TORCH_NCCL_.
        sbatch_args: more ``#SBATCH`` options, ``--name=value`` each.
        container: the image each node's torchrun runs in (ContainerProfile).
    """

    description: str = ""
    partition: str = ""
    account: str = ""
    qos: str = ""
    gpus_per_node: int = SlurmOptions.gpus_per_node
    cpus_per_task: int = SlurmOptions.cpus_per_task
    mem: str = ""
    time: str = SlurmOptions.time
    constraint: str = ""
    exclusive: bool = False
    signal_seconds: int = SlurmOptions.signal_seconds
    python: str = ""
    setup: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    nccl: dict[str, str] = field(default_factory=dict)
    sbatch_args: list[str] = field(default_factory=list)
    container: ContainerProfile = field(default_factory=ContainerProfile)

    def as_options(self) -> dict:
        """The SlurmOptions fields this profile sets (before the command line's flags)."""
        c = self.container
        return {"partition": self.partition, "account": self.account, "qos": self.qos, "mem": self.mem,
                "gpus_per_node": self.gpus_per_node, "cpus_per_task": self.cpus_per_task, "time": self.time,
                "constraint": self.constraint, "exclusive": self.exclusive, "signal_seconds": self.signal_seconds,
                "python": self.python, "setup": list(self.setup),
                "env": [f"{k}={v}" for k, v in {**self.nccl, **self.env}.items()],
                "sbatch_args": list(self.sbatch_args), "container": c.image, "container_runtime": c.runtime,
                "container_mounts": list(c.mounts), "container_args": list(c.args), "container_python": c.python}


# the SlurmOptions field whose rules check a profile key (default: the same name)
_OPTION_OF = {"container.image": "container", "container.runtime": "container_runtime",
              "container.mounts": "container_mounts", "container.args": "container_args",
              "container.python": "container_python"}


def clusters_dir() -> Path:
    """``$MMGEN_CLUSTERS_DIR``, else the repository's ``launch/clusters/``."""
    env = os.environ.get("MMGEN_CLUSTERS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "launch" / "clusters"


def find_profile(name: str) -> Path:
    """The file of ``--cluster NAME``: a path (``*.yaml``, or with a ``/``) or a profile name.

    Args:
        name: a profile name in clusters_dir(), or a path to a YAML file.
    """
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"--cluster {name}: no such file")
        return path
    folder = clusters_dir()
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none"
        raise ValueError(f"--cluster {name}: no profile {name}.yaml in {folder} (available: {known}; "
                         "or give a path to a .yaml file)")
    return path


def load_profile(path: Path) -> ClusterProfile:
    """Read and check a profile; ValueError with one line naming the file and key.

    Args:
        path: the profile's YAML file.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror})") from None
    profile = _build(ClusterProfile, {} if data is None else data, f"{path}: ", "")
    _check_values(profile, f"{path}: ")
    return profile


# ---- typed loading ---------------------------------------------------------------------------
def _build(cls, data, where: str, prefix: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where}{prefix.rstrip('.') or 'the file'}: expected a mapping of keys to values, "
                         f"got {_shown(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise ValueError(f"{where}unknown key '{prefix}{key}' ({hint}known: {', '.join(names)})")
    return cls(**{k: _value(hints[k], v, where, f"{prefix}{k}") for k, v in data.items()})


def _value(tp, value, where: str, key: str):
    def wrong(expected: str, hint: str = ""):
        return ValueError(f"{where}{key}: expected {expected}, got {_shown(value)}{hint}")

    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, f"{key}.")
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise wrong("a list of strings")
        return [_value(str, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong("a mapping NAME: value")
        out = {}
        for name, v in value.items():
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                hint = " (YAML reads true/false/yes/no as booleans: write 1 or 0, or quote it)" \
                    if isinstance(v, bool) else ""
                raise ValueError(f"{where}{key}.{name}: expected a string or a number, got {_shown(v)}{hint}")
            out[str(name)] = str(v)
        return out
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # YAML 1.1 reads 48:00:00 as the base-60 number 172800
            raise wrong("a string", ": quote the value (YAML reads 48:00:00 or 0100 unquoted as a number)")
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    raise TypeError(f"{key}: unsupported schema type {tp}")


def _shown(value) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


def _check_values(p: ClusterProfile, where: str) -> None:
    """The command line's rules for every value (mmgen.launch.sbatch.problem), with the key."""
    runtime = p.container.runtime

    def check(key: str, option: str, value) -> None:
        msg = problem(option, value, runtime)
        if msg:
            raise ValueError(f"{where}{key}: {value!r} {msg}")

    for f in dataclasses.fields(ClusterProfile):
        value = getattr(p, f.name)
        if f.name in ("description", "container", "env", "nccl"):
            continue
        for i, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
            check(f.name if i is None else f"{f.name}[{i}]", f.name, item)
    for group in ("env", "nccl"):
        for name, v in getattr(p, group).items():
            check(f"{group}.{name}", "env", f"{name}={v}")
            if group == "nccl" and not name.startswith(NCCL_PREFIXES):
                raise ValueError(f"{where}nccl.{name}: not an NCCL setting (names start with "
                                 f"{' or '.join(NCCL_PREFIXES)}; other variables go under env)")
    c = p.container
    for f in dataclasses.fields(ContainerProfile):
        key = f"container.{f.name}"
        value = getattr(c, f.name)
        for i, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
            check(key if i is None else f"{key}[{i}]", _OPTION_OF[key], item)
    if c.image and not c.runtime:
        raise ValueError(f"{where}container.runtime: missing (the image needs one of {', '.join(RUNTIMES)})")
    if (c.runtime or c.mounts or c.args) and not c.image:
        raise ValueError(f"{where}container.image: missing (container.runtime, mounts and args need an image)")
