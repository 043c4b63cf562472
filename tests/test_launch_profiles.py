# Cluster profiles (launch/clusters/*.yaml): every example renders a script that lints; flags override; bad profiles are one line.
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from mmgen.launch.profile import clusters_dir, load_profile
from tests.test_launch import launch, lint_script

EXAMPLES = sorted(clusters_dir().glob("*.yaml"))


def test_the_repository_ships_example_profiles():
    assert {p.stem for p in EXAMPLES} >= {"example_apptainer", "example_bare", "example_pyxis"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_profile_renders_a_script_that_lints(path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    profile = load_profile(path)
    code, script, err = launch(["slurm", "--dry-run", "--cluster", path.stem, "--nodes", "2", "--",
                                "experiment=smoke", "name=prof"], capsys)
    assert code == 0, err
    for key in ("partition", "account", "qos", "time", "mem", "constraint"):
        value = getattr(profile, key)
        if value:
            assert f"#SBATCH --{key}={value}\n" in script, key
    assert f"#SBATCH --gpus-per-node={profile.gpus_per_node}\n" in script
    assert ("#SBATCH --exclusive\n" in script) == profile.exclusive
    for line in profile.setup:
        assert f"\n{line}\n" in script, line
    for name, value in {**profile.nccl, **profile.env}.items():
        assert f"\nexport {name}=" in script and value in script, name
    c = profile.container
    if c.runtime == "apptainer":
        binds = "".join(f"    --bind {m} \\\n" for m in c.mounts)
        assert f"    apptainer exec \\\n    --nv \\\n{binds}" in script
        assert f"{c.image} {c.python} \\\n    -m mmgen.launch.node" in script
    elif c.runtime == "pyxis":
        assert f"    --container-image={c.image} \\\n" in script
        assert f"    --container-mounts={','.join(c.mounts)} \\\n" in script
        assert f"    --container-workdir={tmp_path.resolve()} \\\n" in script
        assert f"    {c.python} \\\n    -m mmgen.launch.node" in script
    else:
        assert f"    {profile.python} \\\n    -m mmgen.launch.node" in script
    out = tmp_path / "job.sbatch"
    out.write_text(script)
    lint_script(out)


def test_command_line_flags_override_the_profile(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    profile = load_profile(clusters_dir() / "example_bare.yaml")
    assert profile.exclusive and profile.nccl["NCCL_IB_HCA"] == "mlx5" and profile.cpus_per_task == 64
    code, script, err = launch(["slurm", "--dry-run", "--cluster", "example_bare", "--partition", "debug",
                                "--no-exclusive", "--time", "1:00:00", "--gpus-per-node", "4", "--python", "py3",
                                "--env", "NCCL_IB_HCA=mlx5_0", "--setup", "echo extra", "--",
                                "experiment=smoke"], capsys)
    assert code == 0, err
    assert "#SBATCH --partition=debug\n" in script and "--exclusive" not in script
    assert "#SBATCH --time=1:00:00\n" in script and "#SBATCH --gpus-per-node=4\n" in script
    assert "#SBATCH --cpus-per-task=64\n" in script and "#SBATCH --account=my_project\n" in script  # kept
    assert script.count("export NCCL_IB_HCA=") == 1 and "export NCCL_IB_HCA=mlx5_0\n" in script
    assert "export NCCL_SOCKET_IFNAME=ib0\n" in script
    # the profile's set-up lines first, then the command line's
    assert script.index(profile.setup[-1]) < script.index("echo extra")
    assert "    py3 \\\n    -m mmgen.launch.node" in script


BAD = [
    ("partiton: gpu\n", "unknown key 'partiton' (did you mean 'partition'?"),
    ("container:\n  imag: x.sif\n", "unknown key 'container.imag' (did you mean 'image'?"),
    ("gpus_per_node: eight\n", "gpus_per_node: expected an integer, got str 'eight'"),
    ("gpus_per_node: -1\n", "gpus_per_node: -1 must be >= 0"),
    ("time: 48:00:00\n", "time: expected a string, got int 172800: quote the value"),
    ("time: forever\n", "time: 'forever' is not a Slurm time limit"),
    ("exclusive: 'yes'\n", "exclusive: expected true or false, got str 'yes'"),
    ("setup: module load cuda\n", "setup: expected a list of strings"),
    ("setup: [module load cuda, 3]\n", "setup[1]: expected a string, got int 3"),
    ('account: "proj\\n#SBATCH --wrap=id"\n', "account: 'proj\\n#SBATCH --wrap=id' contains a newline"),
    ("sbatch_args: [--gres gpu:8]\n", "sbatch_args[0]: '--gres gpu:8' must be one long sbatch option"),
    ("nccl:\n  NCCL_IB_DISABLE: true\n", "nccl.NCCL_IB_DISABLE: expected a string or a number, got bool True"),
    ("nccl:\n  IB_HCA: mlx5\n", "nccl.IB_HCA: not an NCCL setting"),
    ("env:\n  1BAD: x\n", "env.1BAD: '1BAD=x' must look like NAME=value"),
    ("container:\n  runtime: pyxis\n  image: x.sqsh\n  mounts: [data:/data]\n",
     "container.mounts[0]: 'data:/data' must be SRC:DST or SRC:DST:FLAGS with absolute paths"),
    ("container:\n  runtime: apptainer\n  image: x.sif\n  mounts: [/d:/d:ro+rprivate]\n",
     "apptainer does not take"),
    ("container:\n  runtime: docker\n  image: x\n", "container.runtime: 'docker' is not one of apptainer, pyxis"),
    ("container:\n  image: /x.sif\n", "container.runtime: missing"),
    ("container:\n  mounts: [/a:/a]\n", "container.image: missing"),
    ("partition: [gpu\n", ":2: not valid YAML"),
    ("- gpu\n", "expected a mapping of keys to values, got list"),
]


@pytest.mark.parametrize("text,needle", BAD, ids=[n.split(":")[0] + f"-{i}" for i, (t, n) in enumerate(BAD)])
def test_bad_profile_is_one_line_exit_2_naming_file_and_key(tmp_path, capsys, monkeypatch, text, needle):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    code, out, err = launch(["slurm", "--cluster", str(path), "--", "experiment=smoke"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"mmgen-launch: error: {path}"), err
    assert needle in lines[0], lines[0]
    assert not out and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name,needle", [
    ("nosuch", "available: example_apptainer, example_bare, example_pyxis"),
    ("/nowhere/x.yaml", "no such file"),
])
def test_unknown_cluster_is_one_line_exit_2(tmp_path, capsys, monkeypatch, name, needle):
    monkeypatch.chdir(tmp_path)
    code, out, err = launch(["slurm", "--cluster", name, "--", "experiment=smoke"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_profile_from_clusters_dir_is_submitted_and_recorded(tmp_path, capsys, monkeypatch):
    """A profile in ``$MMGEN_CLUSTERS_DIR`` through the real sbatch (held, then cancelled):
    Slurm takes its directives, and launch.json records which profile and its values."""
    from tests.test_slurm import _slurm_state, cancel, scontrol_job

    reason = _slurm_state()
    if reason:
        pytest.skip(reason)
    folder = tmp_path / "clusters"
    folder.mkdir()
    (folder / "ci.yaml").write_text('partition: debug\ntime: "7"\ncpus_per_task: 1\nsetup: [echo set up]\n'
                                    "nccl: {NCCL_DEBUG: INFO}\nsbatch_args: [--hold]\n")
    monkeypatch.setenv("MMGEN_CLUSTERS_DIR", str(folder))
    monkeypatch.chdir(tmp_path)
    code, out, err = launch(["slurm", "--cluster", "ci", "--", "experiment=smoke", "name=held"], capsys)
    assert code == 0 and out.startswith("submitted job "), err
    job_id = out.split()[2]
    try:
        info = scontrol_job(job_id)
    finally:
        cancel(job_id)
    assert info.get("Partition") == "debug" and info.get("TimeLimit") == "00:07:00", info
    assert info.get("JobState") == "PENDING" and info.get("Reason") == "JobHeldUser", info
    rec = json.loads((tmp_path / "runs" / "held" / "launch" / "launch.json").read_text())
    assert rec["cluster"]["name"] == "ci" and rec["cluster"]["path"] == str((folder / "ci.yaml").resolve())
    assert rec["cluster"]["profile"]["nccl"] == {"NCCL_DEBUG": "INFO"}
    script = (tmp_path / "runs" / "held" / "launch" / "job.sbatch").read_text()
    assert "export NCCL_DEBUG=INFO\necho set up\n" in script
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    assert Path(rec["cluster"]["path"]).is_file()
