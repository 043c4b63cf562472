# Checkpoints that run no code, say what is damaged and fall back, and name the file when a write fails.
"""Replays items 1, 4, 6 and 10 of the Operations v2 issue.

* A pickle payload (``__reduce__`` -> ``exec`` that creates a marker file) planted in every
  file mmgen or a backend loads: no marker appears and the error is one line. meta.json's
  checksum is re-sealed after planting (an attacker who can write the file can write
  meta.json), so what stops the payload is the loader, not the checksum.
* Damaged newest checkpoints (the issue's probes) are set aside and the previous one is
  used; explicit ``checkpoint.resume=<path>`` of a damaged one is an error.
* A full disk (a real tmpfs) and OSErrors name the file and the cause in one line.
* DeepSpeed's ``latest`` file and the ``zero_to_fp32.py`` copied into each ZeRO checkpoint.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mmgen.safe_load import CheckpointError
from tests.conftest import BIN, data_overrides, run_cli
from tests.test_trainer import TINY, make_trainer

DS_ENV = {"DS_ACCELERATOR": "cpu"}
CKPT = ["checkpoint.every=4", "checkpoint.keep_last=3", "data.num_workers=0"]


class Payload:
    """Unpickling this runs ``exec``: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def reseal(ckpt: Path) -> None:
    """Re-record every file's size and sha256 in meta.json, as whoever changed a file could."""
    meta = json.loads((ckpt / "meta.json").read_text())
    if "files" in meta:
        for rel in meta["files"]:
            data = (ckpt / rel).read_bytes()
            meta["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (ckpt / "meta.json").write_text(json.dumps(meta))


def plant(path: Path, marker: Path, raw: bool = False) -> None:
    """Replace ``path`` by a torch.save file (or, ``raw``, a bare pickle) holding the payload."""
    if raw:
        path.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save({"state": Payload(marker)}, path)


def assert_payload_is_live(path: Path, marker: Path, raw: bool = False) -> None:
    """The control: plain unpickling of the planted file does create the marker."""
    assert not marker.exists()
    if raw:
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists(), "the payload is not live: the test would prove nothing"


def names_the_payload(msg: str) -> bool:
    """The refusal names the global the payload needs (torch writes builtins as bare names)."""
    return re.search(r"needs pickle for (builtins\.)?exec\b", msg) is not None


def one_line_error(r: subprocess.CompletedProcess, prog: str) -> str:
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert err[-1].startswith(f"{prog}: error: "), err[-3:]
    return err[-1]


def cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(args, cwd=cwd, timeout=300, env=env)


def train_args(shapes_dir: Path, name: str, *extra: str) -> list[str]:
    return [str(BIN / "mmgen-train"), *TINY, *data_overrides(shapes_dir), *CKPT, f"name={name}", *extra]


# -- runs made once per module -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_run(shapes_dir, tmp_path_factory) -> Path:
    """The issue's `runs/p3a`: 12 steps, checkpoints at 4, 8, 12 (one process, DDP backend)."""
    cwd = tmp_path_factory.mktemp("ddp")
    r = cli(train_args(shapes_dir, "p3a", "trainer.steps=12"), cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    run = cwd / "runs" / "p3a"
    assert [p.name for p in sorted((run / "checkpoints").glob("step_*"))] == [
        "step_0000004", "step_0000008", "step_0000012"]
    return run


@pytest.fixture
def ddp_copy(ddp_run, tmp_path) -> Path:
    run = tmp_path / "p3a"
    shutil.copytree(ddp_run, run)
    return run


def resume(shapes_dir, run: Path, *extra: str):
    return make_trainer(shapes_dir, run, ["trainer.steps=12", *CKPT, *extra])


@pytest.fixture(scope="module")
def zero_run(shapes_dir, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("zero")
    r = cli(train_args(shapes_dir, "z2", "parallel=zero2", "trainer.steps=4"), cwd, env=DS_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd / "runs" / "z2"


@pytest.fixture(scope="module")
def fsdp_run(shapes_dir, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("fsdp")
    r = cli(train_args(shapes_dir, "f", "parallel=fsdp2", "trainer.steps=4"), cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd / "runs" / "f"


# -- 1. nothing is unpickled without trust ----------------------------------------------------------
def test_mmgen_files_hold_only_what_weights_only_reads(ddp_run):
    ckpt = ddp_run / "checkpoints" / "step_0000012"
    for name in ("train_state.pt", "rank_00000.pt", "model.pt", "optimizer.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(ckpt / name) == [], name
        torch.load(ckpt / name, weights_only=True)
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert state["state"]["step"] == 12 and isinstance(state["state"], dict)


@pytest.mark.parametrize("name", ["train_state.pt", "rank_00000.pt", "model.pt", "optimizer.pt"])
def test_a_pickle_planted_in_any_mmgen_file_runs_nothing(shapes_dir, ddp_copy, tmp_path, name):
    ckpt = ddp_copy / "checkpoints" / "step_0000012"
    marker = tmp_path / "marker"
    plant(ckpt / name, marker)
    reseal(ckpt)
    with pytest.raises(CheckpointError) as e:
        resume(shapes_dir, ddp_copy)
    msg = str(e.value)
    assert "\n" not in msg and f"step_0000012/{name}" in msg and names_the_payload(msg), msg
    assert not marker.exists(), "unpickling ran the planted code"
    if name.startswith(("train_state", "rank_")):  # checkpoint.trust=true would unpickle them (v1 files)
        assert "checkpoint.trust=true" in msg
    else:  # DDP's files are never unpickled: mmgen never wrote pickled objects into them
        assert "it is not mmgen's" in msg and "trust" not in msg
    assert_payload_is_live(ckpt / name, marker)


def test_planted_pickle_stops_mmgen_train_with_one_line(shapes_dir, ddp_copy, tmp_path):
    ckpt = ddp_copy / "checkpoints" / "step_0000012"
    marker = tmp_path / "marker"
    plant(ckpt / "train_state.pt", marker)
    reseal(ckpt)
    r = cli([*train_args(shapes_dir, "p3a", "trainer.steps=16"), f"run_dir={ddp_copy}"], tmp_path)
    line = one_line_error(r, "mmgen-train")
    assert "train_state.pt" in line and "checkpoint.trust=true" in line
    assert not marker.exists()


def test_a_v1_checkpoint_is_refused_in_one_line_and_resumes_with_trust(shapes_dir, ddp_copy):
    """mmgen v1 pickled its TrainState dataclass and numpy's RNG tuple, and its meta.json had
    no format, checksums or writer."""
    from mmgen.trainer.trainer import TrainState

    ckpt = ddp_copy / "checkpoints" / "step_0000012"
    new = torch.load(ckpt / "train_state.pt", weights_only=True)
    torch.save({"state": TrainState(**new["state"]), "scheduler": new["scheduler"]}, ckpt / "train_state.pt")
    rank = torch.load(ckpt / "rank_00000.pt", weights_only=True)
    rank["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(rank, ckpt / "rank_00000.pt")
    meta = json.loads((ckpt / "meta.json").read_text())
    for key in ("format", "files", "run_dir"):
        meta.pop(key)
    (ckpt / "meta.json").write_text(json.dumps(meta))

    with pytest.raises(CheckpointError) as e:
        resume(shapes_dir, ddp_copy)
    msg = str(e.value)
    assert "\n" not in msg and "mmgen v1" in msg and "checkpoint.trust=true" in msg, msg
    t = resume(shapes_dir, ddp_copy, "checkpoint.trust=true")
    assert t.state.step == 12 and t.state.tokens_seen == new["state"]["tokens_seen"]


def test_own_run_rule_turns_a_refusal_into_a_warning(tmp_path, caplog):
    """The trust rule's second case, on the checker itself: a file this run wrote into its own
    directory is let through with a warning naming it; from anywhere else it is refused."""
    from mmgen.safe_load import UnsafeCheckpointError, check_restricted

    marker = tmp_path / "marker"
    plant(tmp_path / "shard.pt", marker)
    with pytest.raises(UnsafeCheckpointError):
        check_restricted(tmp_path / "shard.pt", [], what="a DeepSpeed shard")
    with caplog.at_level(logging.WARNING, logger="mmgen.checkpoint"):
        check_restricted(tmp_path / "shard.pt", [], what="a DeepSpeed shard", own=True)
    assert any("shard.pt" in r.getMessage() and "own run directory" in r.getMessage() for r in caplog.records)
    assert not marker.exists()  # the check itself never unpickles


def test_init_from_a_file_that_is_no_safetensors_runs_nothing(shapes_dir, tmp_path):
    marker = tmp_path / "marker"
    fake = tmp_path / "weights.safetensors"
    plant(fake, marker)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        make_trainer(shapes_dir, tmp_path / "run", ["trainer.steps=1", f"checkpoint.init_from={fake}"])
    assert not marker.exists()


def test_zero_shard_pickle_runs_nothing_on_export_or_init_from(shapes_dir, zero_run, tmp_path):
    run = tmp_path / "z2"
    shutil.copytree(zero_run, run)
    ckpt = run / "checkpoints" / "step_0000004"
    shard = ckpt / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "marker"
    plant(shard, marker)
    reseal(ckpt)

    r = cli([str(BIN / "mmgen"), "export", str(run), "--out", str(tmp_path / "o.safetensors")], tmp_path, env=DS_ENV)
    line = one_line_error(r, "mmgen")
    assert str(shard) in line and names_the_payload(line) and "--trust" in line, line
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()

    with pytest.raises(CheckpointError) as e:  # another run starting from the ZeRO run's weights
        make_trainer(shapes_dir, tmp_path / "other", ["trainer.steps=1", f"checkpoint.init_from={run}"])
    assert "\n" not in str(e.value) and str(shard) in str(e.value)
    assert not marker.exists()

    # --trust is the switch that unpickles it (the payload then runs: trust means trust)
    cli([str(BIN / "mmgen"), "export", str(run), "--out", str(tmp_path / "o.safetensors"), "--trust"], tmp_path,
        env=DS_ENV)
    assert marker.exists()


def test_unmodified_zero_shards_load_without_trust(zero_run, tmp_path):
    """DeepSpeed's own shards name only its loss scaler, stage enum and fragment records:
    they pass the restricted check, so export needs no --trust."""
    r = cli([str(BIN / "mmgen"), "export", str(zero_run), "--out", str(tmp_path / "z.safetensors")], tmp_path,
            env=DS_ENV)
    assert r.returncode == 0, r.stderr[-3000:]


def test_dcp_metadata_pickle_runs_nothing_on_export_or_resume(shapes_dir, fsdp_run, tmp_path):
    """DCP's .metadata is a bare pickle that torch reads with pickle.load."""
    run = tmp_path / "f"
    shutil.copytree(fsdp_run, run)
    ckpt = run / "checkpoints" / "step_0000004"
    meta_file = ckpt / "fsdp" / ".metadata"
    marker = tmp_path / "marker"
    plant(meta_file, marker, raw=True)
    reseal(ckpt)

    r = cli([str(BIN / "mmgen"), "export", str(run), "--out", str(tmp_path / "o.safetensors")], tmp_path)
    line = one_line_error(r, "mmgen")
    assert str(meta_file) in line and names_the_payload(line), line
    assert not marker.exists()

    # resuming it from another run directory (not this run's own checkpoint)
    r = cli([*train_args(shapes_dir, "g", "parallel=fsdp2", "trainer.steps=6"), f"checkpoint.resume={ckpt}"],
            tmp_path)
    line = one_line_error(r, "mmgen-train")
    assert ".metadata" in line and "checkpoint.trust=true" in line, line
    assert not marker.exists()
    assert_payload_is_live(meta_file, marker, raw=True)


def test_dcp_value_pickle_runs_nothing(tmp_path):
    """Non-tensor values of a DCP checkpoint are torch.save'd pickles that torch's planners
    read with weights_only=False."""
    import torch.distributed.checkpoint as dcp

    from mmgen.checkpoint.export import consolidated_state_dict

    marker = tmp_path / "marker"
    ckpt = tmp_path / "step_0000001"
    dcp.save({"model": {"w": torch.ones(3)}, "optimizer": {"param_groups": [{"hook": Payload(marker)}]}},
             checkpoint_id=str(ckpt / "fsdp"), no_dist=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 1, "backend": "fsdp2", "world_size": 1}))
    with pytest.raises(CheckpointError) as e:
        consolidated_state_dict(ckpt)
    assert "\n" not in str(e.value) and names_the_payload(str(e.value))
    assert not marker.exists()
    assert torch.equal(consolidated_state_dict(ckpt, trust=True)["w"], torch.ones(3)) and marker.exists()


# -- 2. checksums, damaged checkpoints set aside ------------------------------------------------------
def test_meta_json_records_every_file(ddp_run, zero_run):
    for ckpt in (ddp_run / "checkpoints" / "step_0000012", zero_run / "checkpoints" / "step_0000004"):
        meta = json.loads((ckpt / "meta.json").read_text())
        on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
        assert sorted(meta["files"]) == [f for f in on_disk if f != "meta.json"]
        for rel, rec in meta["files"].items():
            data = (ckpt / rel).read_bytes()
            assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel


def flip_inside_a_weight(path: Path) -> None:
    """Invert 4 bytes in the middle of the largest tensor record of a torch.save zip."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        b = f.read(4)
        f.seek(at)
        f.write(bytes(x ^ 0xFF for x in b))


def damage(ckpt: Path, how: str) -> None:
    if how == "truncated":
        os.truncate(ckpt / "model.pt", 300000)  # the issue's `truncate -s 300000`
    elif how == "zip_header":
        with open(ckpt / "optimizer.pt", "r+b") as f:
            f.write(b"\0\0\0\0")
    elif how == "empty_train_state":
        (ckpt / "train_state.pt").write_bytes(b"")
    elif how == "flipped_weight":
        before = torch.load(ckpt / "model.pt", weights_only=True)
        flip_inside_a_weight(ckpt / "model.pt")
        after = torch.load(ckpt / "model.pt", weights_only=True)  # torch itself notices nothing
        assert any(not torch.equal(before[k], after[k]) for k in before)
    elif how == "deleted_model":
        (ckpt / "model.pt").unlink()


WHAT = {"truncated": "model.pt has 300000 bytes, meta.json records",
        "zip_header": "optimizer.pt does not match its sha256",
        "empty_train_state": "train_state.pt has 0 bytes",
        "flipped_weight": "model.pt does not match its sha256",
        "deleted_model": "model.pt is missing"}


@pytest.mark.parametrize("how", list(WHAT))
def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_used(shapes_dir, ddp_copy, how, caplog):
    root = ddp_copy / "checkpoints"
    damage(root / "step_0000012", how)
    with caplog.at_level(logging.WARNING, logger="mmgen.checkpoint"):
        t = resume(shapes_dir, ddp_copy)
    assert t.state.step == 8
    assert (root / "step_0000012.damaged").is_dir() and not (root / "step_0000012").exists()
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("mmgen.checkpoint")
                and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and WHAT[how] in warnings[0] and "step_0000012" in warnings[0], warnings
    assert "sharded backend" not in warnings[0]


def test_a_checkpoint_without_checksums_is_checked_for_structure(shapes_dir, ddp_copy, caplog):
    """Written before meta.json had checksums: a truncated zip is still found and set aside."""
    ckpt = ddp_copy / "checkpoints" / "step_0000012"
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["files"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    os.truncate(ckpt / "model.pt", 300000)
    with caplog.at_level(logging.WARNING, logger="mmgen.checkpoint"):
        assert resume(shapes_dir, ddp_copy).state.step == 8
    assert any("model.pt is not a complete torch.save file" in r.getMessage() for r in caplog.records)


def test_a_missing_model_pt_is_named_without_checksums(shapes_dir, ddp_copy):
    (ddp_copy / "checkpoints" / "step_0000012" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError) as e:
        resume(shapes_dir, ddp_copy, "checkpoint.checksums=false")
    assert str(e.value).endswith("step_0000012: model.pt missing from this DDP checkpoint"), str(e.value)


def test_the_issue_probe_truncated_model_then_the_same_command(shapes_dir, ddp_copy, tmp_path):
    os.truncate(ddp_copy / "checkpoints" / "step_0000012" / "model.pt", 300000)
    r = cli([*train_args(shapes_dir, "p3a", "trainer.steps=12"), f"run_dir={ddp_copy}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ddp_copy}/checkpoints/step_0000008 at step 8" in r.stderr
    assert "model.pt has 300000 bytes" in r.stderr and "Traceback" not in r.stderr
    assert (ddp_copy / "checkpoints" / "step_0000012" / "meta.json").is_file()  # written again from step 8
    assert (ddp_copy / "checkpoints" / "step_0000012.damaged" / "model.pt").stat().st_size == 300000


def test_explicit_resume_of_a_damaged_checkpoint_is_an_error(shapes_dir, ddp_copy):
    ckpt = ddp_copy / "checkpoints" / "step_0000008"
    (ckpt / "model.pt").unlink()
    with pytest.raises(CheckpointError) as e:
        resume(shapes_dir, ddp_copy, f"checkpoint.resume={ckpt}")
    assert str(e.value) == f"checkpoint.resume={ckpt}: damaged: model.pt is missing"
    assert ckpt.is_dir()  # nothing set aside: the user named it


def test_no_intact_checkpoint_left_is_an_error(shapes_dir, ddp_copy):
    for ckpt in (ddp_copy / "checkpoints").glob("step_*"):
        (ckpt / "train_state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no intact checkpoint left"):
        resume(shapes_dir, ddp_copy)
    assert sorted(p.name for p in (ddp_copy / "checkpoints").iterdir()) == [
        "step_0000004.damaged", "step_0000008.damaged", "step_0000012.damaged"]


# -- 3. write errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("code, cause", [(errno.ENOSPC, "no space left on device"),
                                         (errno.EIO, "input/output error")])
def test_oserror_while_writing_names_file_and_cause(shapes_dir, tmp_path, monkeypatch, code, cause):
    make_trainer(shapes_dir, tmp_path, ["trainer.steps=8", *CKPT]).train(stop_at=4)
    t = make_trainer(shapes_dir, tmp_path, ["trainer.steps=8", *CKPT])
    assert t.state.step == 4
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        if str(f).endswith("rank_00000.pt"):
            raise OSError(code, os.strerror(code))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError) as e:
        t.train()
    assert str(e.value) == (f"checkpoint step 8: {cause} writing "
                            f"{tmp_path}/checkpoints/step_0000008.tmp/rank_00000.pt")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000004"]


def test_full_disk_names_the_file_and_keeps_earlier_checkpoints(shapes_dir, tmp_path):
    """The issue's probe: checkpoints on a small tmpfs (room for one ~2 MB checkpoint)."""
    mnt = tmp_path / "run" / "checkpoints"
    mnt.mkdir(parents=True)
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if m.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({m.stderr.strip() or 'not root'})")
    try:
        r = cli([*train_args(shapes_dir, "full", "trainer.steps=8"), f"run_dir={tmp_path / 'run'}"], tmp_path)
        line = one_line_error(r, "mmgen-train")
        assert line.startswith(f"mmgen-train: error: checkpoint step 8: no space left on device writing "
                               f"{mnt}/step_0000008.tmp/"), line
        assert sorted(p.name for p in mnt.iterdir()) == ["step_0000004"]
        from mmgen.checkpoint.export import verify_checkpoint

        verify_checkpoint(mnt / "step_0000004")  # intact, every checksum
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# -- 4. DeepSpeed's own tools ----------------------------------------------------------------------------
def test_zero_checkpoint_works_with_deepspeeds_own_zero_to_fp32(zero_run, tmp_path):
    ckpt = zero_run / "checkpoints" / "step_0000004"
    assert (ckpt / "latest").read_text() == "deepspeed"
    out = tmp_path / "fp32"
    r = subprocess.run([str(BIN / "python"), str(ckpt / "zero_to_fp32.py"), str(ckpt), str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, **DS_ENV})
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = torch.load(out / "pytorch_model.bin", weights_only=True)
    from mmgen.checkpoint.export import consolidated_state_dict

    ours = consolidated_state_dict(ckpt)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
