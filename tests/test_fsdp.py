# parallel=fsdp2 on CPU (2 gloo processes): parity with DDP, DCP resume (also onto 1 process),
# export, and the refusals.
from __future__ import annotations


import pytest
import torch

from mmgen.cli.preflight import compose_job
from mmgen.errors import ConfigError
from tests.conftest import BIN, data_overrides, run_cli
from tests.test_trainer import TINY, losses

# constant LR after warm-up: a 4-step run resumed to 8 follows the same schedule as 8 steps
COMMON = [*TINY, "trainer.precision=fp32", "data.num_workers=0", "optim.decay=constant",
          "checkpoint.every=4"]


def torchrun(tmp_path, shapes_dir, name, extra, nproc=2):
    head = ([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), "-m",
             "mmgen.train"] if nproc > 1 else [str(BIN / "mmgen-train")])
    r = run_cli([*head, *COMMON, *data_overrides(shapes_dir), f"name={name}", *extra],
                cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_fsdp2_matches_ddp_resumes_reshards_and_exports(shapes_dir, tmp_path):
    torchrun(tmp_path, shapes_dir, "ddp", ["trainer.steps=8"])
    torchrun(tmp_path, shapes_dir, "fsdp", ["trainer.steps=8", "parallel=fsdp2"])
    runs = tmp_path / "runs"
    ddp, fsdp = losses(runs / "ddp"), losses(runs / "fsdp")
    assert sorted(ddp) == sorted(fsdp) == list(range(1, 9))
    for step in ddp:   # fp32: only the order of the gradient reductions differs
        for key in ("loss/total", "optim/grad_norm"):
            assert fsdp[step][key] == pytest.approx(ddp[step][key], rel=1e-5), (step, key)
    shards = sorted(p.name for p in (runs / "fsdp" / "checkpoints" / "step_0000008" / "fsdp").iterdir())
    assert [s for s in shards if s.endswith(".distcp")] == ["__0_0.distcp", "__1_0.distcp"]

    # interrupted after 4 steps, resumed to 8: the same losses as the straight run
    torchrun(tmp_path, shapes_dir, "again", ["trainer.steps=4", "parallel=fsdp2"])
    r = torchrun(tmp_path, shapes_dir, "again", ["trainer.steps=8", "parallel=fsdp2"])
    assert "resumed from" in r.stderr
    again = losses(runs / "again")
    for step in range(5, 9):
        assert again[step]["loss/total"] == pytest.approx(fsdp[step]["loss/total"], rel=1e-6)

    # the 2-rank checkpoint continued by one process: DCP reshards the parameters and the
    # optimizer states; the data stream is re-split
    r = torchrun(tmp_path, shapes_dir, "again", ["trainer.steps=10", "parallel=fsdp2"], nproc=1)
    assert "resumed from" in r.stderr and "re-splitting" in r.stderr
    assert sorted(losses(runs / "again")) == list(range(1, 11))

    # export: the plain model's weights, equal to DDP's after the same 8 steps
    out = tmp_path / "fsdp.safetensors"
    r = run_cli([str(BIN / "mmgen"), "export", str(runs / "fsdp"), "--out", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    from safetensors.torch import load_file

    exported = load_file(str(out))
    reference = torch.load(runs / "ddp" / "checkpoints" / "step_0000008" / "model.pt")
    assert exported.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(exported[k], reference[k], atol=1e-5, rtol=1e-4, msg=k)

    # ... and initialise a DDP run (one process) from the FSDP run's shards
    r = torchrun(tmp_path, shapes_dir, "from_fsdp",
                 ["trainer.steps=1", f"checkpoint.init_from={runs / 'fsdp'}"], nproc=1)
    first = losses(runs / "from_fsdp")[1]["loss/total"]
    assert first < ddp[1]["loss/total"] - 0.05     # starts from trained weights, not from init

    # a DDP run cannot resume an FSDP checkpoint (and vice versa): one line naming the fix
    r = run_cli([str(BIN / "mmgen-train"), *COMMON, *data_overrides(shapes_dir), "name=fsdp",
                 "trainer.steps=9"], cwd=tmp_path)
    assert r.returncode == 2 and "not a DDP checkpoint" in r.stderr
    assert "checkpoint.init_from" in r.stderr.strip().splitlines()[-1]


def test_fsdp2_refuses_rank0_sampling_and_bad_dtype(shapes_dir):
    base = [*TINY, *data_overrides(shapes_dir), "parallel=fsdp2"]
    with pytest.raises(ConfigError, match="not available under parallel=fsdp2"):
        compose_job([*base, "trainer.sample_every=5"])
    with pytest.raises((ConfigError, ValueError), match="fsdp_param_dtype"):
        compose_job([*base, "parallel.fsdp_param_dtype=fp16"])
    assert compose_job(base).parallel.reshard_after_forward is True
