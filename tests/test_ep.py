# Expert parallelism (mmgen/parallel/ep.py, parallel.ep): EP=2 on 2 gloo processes matches EP=1, in one torchrun launch.
"""Layer cases (dropless loop, dropless grouped GEMM with sigmoid scores and a shared expert,
capacity dropping, a router that leaves rank 1's experts without tokens) and trainer cases
(moe_debug, 4 steps, under ddp, fsdp2 and DeepSpeed ZeRO-2, parallel.ep=1 and 2, both 2
data-parallel ranks) are run by tests/ep_worker.py in one launch.

Tolerances. Layer: outputs and input gradients must be bit-equal (every row meets the same
weights in the same kernel); expert-weight gradients within 1e-6 of the largest gradient,
because EP sums the two ranks' rows inside one matmul while the reference adds two per-rank
matmuls (fp32 epsilon 1.2e-7; measured 1.3e-7 to 3.3e-7). Trainer: the same fp32 summation-order
difference reaches the weights through 4 AdamW steps (and, at EP=2, a gradient norm summed from
per-rank squares), so losses and grad norms of EP=2 must be within 1e-5 relative of EP=1's
(measured: losses <= 6.4e-8, grad norms <= 1.7e-7); a wrong expert-gradient factor or a norm
that counted experts twice or not at all moves them by >1e-3 (the clip at 0.05 binds every
step: norms are ~1.5). Resume at EP=2 and the export are bitwise. ZeRO-2 at EP=2 is held to the same
1e-5 against ZeRO-2 at EP=1 and against DDP at EP=2 (measured: losses bit-equal, grad norms
7.4e-8 and 2.9e-7 relative: ZeRO sums its norm's squares in another order): DeepSpeed reduces its expert grads over the expert-data-parallel group and sums the
experts' squared norms once, so a wrong group, scale or norm moves them by far more.
"""
from __future__ import annotations

import json

import pytest

from mmgen.cli.preflight import compose_job
from mmgen.errors import ConfigError
from mmgen.parallel.dims import ParallelDims
from tests.conftest import BIN, ROOT, run_cli

TOL = 1e-5


def test_ep2_matches_ep1(tmp_path, shapes_dir):
    r = run_cli([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2",
                 str(ROOT / "tests" / "ep_worker.py"), "--out", str(tmp_path), "--shapes", str(shapes_dir)],
                cwd=tmp_path, timeout=400)
    results = tmp_path / "results.json"
    assert results.is_file(), f"worker wrote no results (rc {r.returncode}):\n{r.stderr[-4000:]}"
    data = json.loads(results.read_text())
    assert data["_failed"] is None, data["_failed"]
    train = data["cases"].pop("train")
    assert len(data["cases"]) == 4
    for name, ranks in data["cases"].items():
        for rank, res in enumerate(ranks):
            assert res["y"] == 0.0 and res["x_grad"] == 0.0, (name, rank, res)
            assert res["expert_grad_rel"] < 1e-6, (name, rank, res)
            assert res["scale"] > 1.0, (name, rank, res)       # outputs are not trivially zero
            assert res["expert_params"] == ["experts.w1", "experts.w3", "experts.w2"]

    for backend in ("ddp", "fsdp2", "zero2"):
        one, two = train[f"{backend}_ep1"], train[f"{backend}_ep2"]
        assert one["expert_shape"][0] == 4 and two["expert_shape"][0] == 2   # the experts really are split
        assert [c["step"] for c in one["curve"]] == [c["step"] for c in two["curve"]] == [1, 2, 3, 4]
        for a, b in zip(one["curve"], two["curve"]):
            for key in ("loss/total", "loss/text", "loss/visual", "loss/moe_balance", "optim/grad_norm"):
                assert abs(a[key] - b[key]) <= TOL * abs(a[key]), (backend, a["step"], key, a[key], b[key])
        assert one["curve"][-1]["optim/grad_norm"] > 0.05 * 10        # the clip binds
        assert two["resumed_at"] == 2
        assert two["resume_curve"] == two["curve"], f"{backend}: resumed losses differ from the uninterrupted run"
        assert two["resume_weights_equal"] is True
        assert two["export_equal"] is True and two["export_w1_shape"][0] == 4   # one file, every expert
        assert two["init_from_ep1_equal"] is True      # zero2: the EP export merge read by init_from
        if backend != "zero2":                         # DeepSpeed shards resume on their own layout only
            assert two["resume_at_ep1_equal"] is True  # a checkpoint of EP=2 resumes at EP=1
    # DeepSpeed's ZeRO-2 with mmgen's experts as its expert params trains what DDP trains at EP=2
    for a, b in zip(train["ddp_ep2"]["curve"], train["zero2_ep2"]["curve"]):
        for key in ("loss/total", "optim/grad_norm"):
            assert abs(a[key] - b[key]) <= TOL * abs(a[key]), ("zero2 vs ddp", a["step"], key, a[key], b[key])


def _job(extra: list[str]):
    return compose_job(["experiment=smoke", "model=moe_debug", "trainer.device=cpu", *extra])


@pytest.mark.parametrize("extra, words", [
    (["model=debug", "parallel.ep=2"], "has no MoE layer"),
    (["parallel.ep=3"], "moe_experts=4 is not divisible by parallel.ep=3"),
    (["parallel=zero3", "parallel.ep=2"], ("parallel.ep=2 is implemented for parallel=ddp, fsdp2, megatron, "
                                           "zero1, zero2, not parallel=zero3")),
    (["parallel=zero2", "parallel.ep=2", "parallel.contiguous_gradients=false"], "contiguous_gradients=true"),
    (["parallel=fsdp2", "parallel.ep=2", "parallel.fsdp_param_dtype=bf16"], "fsdp_param_dtype=fp32"),
    (["parallel.ep=0"], "parallel.ep=0 must be >= 1"),
])
def test_ep_config_errors_are_one_line(extra, words):
    with pytest.raises(ConfigError, match=words) as e:
        _job(extra)
    assert "\n" not in str(e.value)


def test_ep_must_divide_the_data_parallel_size():
    cfg = _job(["parallel.ep=2"]).parallel
    assert ParallelDims.from_config(cfg, 4, 1).ep == 2
    with pytest.raises(ConfigError, match=r"parallel.ep=2 does not divide the 3 ranks of a pipeline stage \(dp=3 x tp=1\)"):
        ParallelDims.from_config(cfg, 3, 0)


def test_ep_refuses_rank0_sampling():
    # a forward on rank 0 alone would wait forever for its EP peer's all-to-all
    with pytest.raises(ConfigError, match="parallel=ddp parallel.ep=2"):
        _job(["parallel.ep=2", "trainer.eval_at_end=true"])
