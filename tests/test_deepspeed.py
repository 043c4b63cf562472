# DeepSpeed ZeRO backend on CPU: config mapping, DDP parity, exact resume, export, offload, bad JSON.
"""Distributed cases run in ONE torchrun launch of tests/deepspeed_worker.py (2 ranks, gloo,
DS_ACCELERATOR=cpu): each launch plus `import deepspeed` costs ~15 s on 2 cores, so the
worker trains every case through the real Trainer and writes what it measured; the tests
below assert on it.

Tolerances (fp32, 2 ranks, 20 steps, debug flavor, AdamW lr 1e-3, clipping at 1.0):
ZeRO and DDP do the same math except for the order of fp32 additions in the global grad
norm (DeepSpeed sums squares over flat partitions, torch takes the norm of per-tensor norms)
and the clip coefficient (DeepSpeed divides by ((norm + 1e-6) / clip), torch multiplies by
clip / (norm + 1e-6)). Both are 1-ulp effects (measured: losses within 1.6e-7 and grad norms
within 3.8e-7 relative over 20 steps; most steps bit-equal), so RTOL = 1e-5 leaves two orders
of margin for another CPU while still failing on any real mistake: a missing data-parallel
factor or an extra 1/grad_accum shows up as a factor 2 in ``optim/grad_norm``.
bf16: ZeRO keeps bf16 parameters with fp32 master weights, DDP fp32 parameters under bf16
autocast: both round to 8-bit mantissas (2^-9 = 2e-3 relative) in different places (measured
3.5e-4 on losses, 1.5e-3 on grad norms after 10 steps), hence RTOL_BF16 = 1e-2 and 3e-2.
Resume and export are exact (bitwise): same code on the same data, restored state.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from mmgen.cli.preflight import compose_job
from mmgen.errors import ConfigError
from tests.conftest import BIN, ROOT, data_overrides, run_cli

os.environ.setdefault("DS_ACCELERATOR", "cpu")

RTOL = 1e-5
RTOL_BF16 = {"loss": 1e-2, "optim/grad_norm": 3e-2}
KEYS = ("loss/total", "loss/text", "loss/visual", "optim/grad_norm")
DS_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


# -- config: typed fields -> DeepSpeed JSON, user overrides, unknown keys ------------------------
def zero_job(*extra):
    return compose_job(["parallel=zero3", *extra])


def test_ds_json_is_built_from_the_typed_config():
    from mmgen.parallel.ds_config import build_ds_config

    job = zero_job("parallel=zero3_offload", "parallel.reduce_bucket_size=1000", "optim.grad_clip=0.5")
    ds = build_ds_config(job.parallel, micro_batch_size=4, grad_accum=3, bf16=True, grad_clip=job.optim.grad_clip)
    z = ds["zero_optimization"]
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (4, 3)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert z["stage"] == 3 and z["reduce_bucket_size"] == 1000
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_param_persistence_threshold"] == job.parallel.stage3_param_persistence_threshold
    assert "optimizer" not in ds and "scheduler" not in ds  # mmgen's AdamW and LR schedule
    ds2 = build_ds_config(compose_job(["parallel=zero2"]).parallel, micro_batch_size=1, grad_accum=1,
                          bf16=False, grad_clip=0.0)
    assert ds2["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in ds2["zero_optimization"]
    assert "stage3_prefetch_bucket_size" not in ds2["zero_optimization"]


def test_user_json_overrides_are_reported_field_by_field():
    from mmgen.parallel.ds_config import merge_user_config

    base = {"gradient_clipping": 1.0, "zero_optimization": {"stage": 2, "overlap_comm": True}}
    merged, conflicts = merge_user_config(base, {"gradient_clipping": 0.5, "steps_per_print": 10,
                                                 "zero_optimization": {"overlap_comm": False, "stage": 2}})
    assert merged == {"gradient_clipping": 0.5, "steps_per_print": 10,
                      "zero_optimization": {"stage": 2, "overlap_comm": False}}
    assert conflicts == ["gradient_clipping: mmgen 1.0 -> file 0.5",
                         "zero_optimization.overlap_comm: mmgen true -> file false"]


def test_known_keys_match_the_installed_deepspeed():
    """DS_TOP_LEVEL_KEYS must list what this DeepSpeed reads: record every key its config
    parser looks up on a minimal config."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from mmgen.parallel.ds_config import DS_TOP_LEVEL_KEYS

    seen: set[str] = set()

    class Keys(set):
        def __contains__(self, k):
            seen.add(k)
            return super().__contains__(k)

    class Recording(dict):
        def get(self, k, d=None):
            seen.add(k)
            return super().get(k, d)

        def __getitem__(self, k):
            seen.add(k)
            return super().__getitem__(k)

        def __contains__(self, k):
            seen.add(k)
            return super().__contains__(k)

        def keys(self):
            return Keys(super().keys())

        def __copy__(self):
            return self

    DeepSpeedConfig(Recording(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1))
    assert seen - DS_TOP_LEVEL_KEYS == set(), "DeepSpeed reads keys mmgen would reject"
    assert DS_TOP_LEVEL_KEYS - seen <= {"sequence_parallel_size"}, "keys this DeepSpeed no longer reads"


@pytest.mark.parametrize("overrides,needle", [
    (["parallel=ddp", "parallel.offload=cpu"], "parallel.offload=cpu needs a ZeRO backend"),
    (["parallel=ddp", "parallel.activation_checkpointing=deepspeed"], "needs a ZeRO backend"),
    (["parallel=zero2", "parallel.activation_checkpointing=sometimes"], "parallel.activation_checkpointing"),
    (["parallel=ddp", "parallel.ds_config=x.json"], "parallel.ds_config is a DeepSpeed JSON"),
    (["parallel=zero2", "parallel.ds_config=missing.json"], "parallel.ds_config=missing.json: no such file"),
    (["parallel=zero2", "parallel.offload=cpu", "parallel.offload_params=true"],
     "offload_params=true needs parallel=zero3"),
    (["parallel=zero3", "parallel.reduce_bucket_size=0"], "parallel.reduce_bucket_size must be >= 1"),
])
def test_parallel_fields_are_validated(overrides, needle):
    with pytest.raises(ConfigError) as e:
        compose_job(overrides)
    assert needle in str(e.value)


BAD_JSON = {
    "typo": ({"zero_optimisation": {"stage": 2}},
             "unknown DeepSpeed key 'zero_optimisation' (did you mean 'zero_optimization'?)"),
    "nested_typo": ({"zero_optimization": {"stage3_prefetch_bucket_sizee": 5}},
                    "zero_optimization.stage3_prefetch_bucket_sizee: Extra inputs are not permitted"),
    "bad_value": ({"zero_optimization": {"reduce_bucket_size": "big"}}, "zero_optimization.reduce_bucket_size: Input"),
    "owned_stage": ({"zero_optimization": {"stage": 3}}, "'zero_optimization.stage' is set by mmgen; use parallel="),
    "ac_typo": ({"activation_checkpointing": {"partition_activation": True}},
                "unknown DeepSpeed key 'activation_checkpointing.partition_activation'"),
    "owned_batch": ({"train_batch_size": 64}, "'train_batch_size' is set by mmgen; use data.batch_size"),
    "owned_optimizer": ({"optimizer": {"type": "Adam"}}, "'optimizer' is set by mmgen"),
    "not_json": ("{'stage': 2", "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_bad_ds_json_is_a_config_error(tmp_path, case):
    content, needle = BAD_JSON[case]
    bad = tmp_path / "ds.json"
    bad.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError) as e:
        compose_job(["parallel=zero2", f"parallel.ds_config={bad}"])
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["typo", "nested_typo"])
def test_bad_ds_json_stops_mmgen_train_with_one_line_exit_2(tmp_path, case):
    content, needle = BAD_JSON[case]
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps(content))
    # without DS_ACCELERATOR, as most CPU users run: importing deepspeed to check a section must
    # not add its "Setting accelerator" warning to the one-line report
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    r = subprocess.run([str(BIN / "mmgen-train"), "parallel=zero2", f"parallel.ds_config={bad}"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env={**env, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("mmgen-train: error:"), r.stderr
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()


# -- activation checkpointing and the ZeRO-3 compile guard (no process group needed) ------------
def test_activation_checkpointing_is_the_same_math_with_the_same_keys():
    from mmgen.models import FLAVORS, build_model
    from mmgen.parallel.activation_checkpointing import apply_activation_checkpointing
    from tests.test_model import make_batch

    grads = []
    for mode in ("none", "torch"):
        torch.manual_seed(0)
        model = build_model(FLAVORS["debug"])
        keys = list(model.state_dict())
        assert apply_activation_checkpointing(model, mode) == (0 if mode == "none" else len(model.layers))
        assert list(model.state_dict()) == keys  # nothing wrapped: checkpoints and exports unchanged
        out = model(make_batch())
        (out["lm"].float().logsumexp(-1).mean() + out["flow"].square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    with pytest.raises(RuntimeError, match="already checkpointed"):
        apply_activation_checkpointing(model, "torch")


def test_zero3_refuses_compiled_blocks_with_flex_attention():
    import dataclasses

    from mmgen.models import FLAVORS, build_model
    from mmgen.parallel.deepspeed import check_zero3_compile

    model = build_model(dataclasses.replace(FLAVORS["debug"], attention="flex"))
    check_zero3_compile(model, torch.device("cpu"))  # not compiled: fine
    for block in model.layers:
        block.compile()  # lazy: nothing is compiled until a call
    with pytest.raises(ConfigError, match="trainer.compile=false"):
        check_zero3_compile(model, torch.device("cpu"))


# -- one process: CLI run with a user JSON, then `mmgen export` -> plain model ------------------------
def test_single_process_zero3_with_user_json_then_export(shapes_dir, tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"gradient_clipping": 0.5, "zero_optimization": {"overlap_comm": False}}))
    args = [str(BIN / "mmgen-train"), "experiment=smoke", "data.seq_len=128", "data.batch_size=4",
            "trainer.log_every=1", "metrics.progress=false", "trainer.num_threads=1", "data.num_workers=0",
            *data_overrides(shapes_dir), "name=z3", "parallel=zero3", f"parallel.ds_config={user}",
            "trainer.steps=3", "checkpoint.every=100"]
    r = run_cli(args, cwd=tmp_path, timeout=300, env=DS_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "runs" / "z3" / "logs" / "rank_0.log").read_text()
    assert "overrides gradient_clipping: mmgen 1.0 -> file 0.5" in log
    assert "overrides zero_optimization.overlap_comm: mmgen true -> file false" in log
    ckpt = tmp_path / "runs" / "z3" / "checkpoints" / "step_0000003"
    assert (ckpt / "meta.json").is_file() and list((ckpt / "deepspeed").glob("*_model_states.pt"))
    assert not list(ckpt.parent.glob("*.tmp"))

    out = tmp_path / "z3.safetensors"
    r = run_cli([str(BIN / "mmgen"), "export", str(tmp_path / "runs" / "z3"), "--out", str(out)], cwd=tmp_path,
                timeout=120, env=DS_ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines() == [f"exported {out.resolve()}"]  # DeepSpeed's chatter kept out
    from mmgen.checkpoint.export import load_model_weights
    from mmgen.models import build_model

    job = compose_job(["experiment=smoke", *data_overrides(shapes_dir)])
    model = build_model(job.model, device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_model_weights(model, out)  # strict: every key of the plain model, nothing else
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- two ranks: everything else in one torchrun launch ----------------------------------------------
@pytest.fixture(scope="module")
def ds_results(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_worker")
    r = run_cli([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2",
                 str(ROOT / "tests" / "deepspeed_worker.py"), "--shapes", str(shapes_dir), "--out", str(out)],
                cwd=out, timeout=600, env=DS_ENV)
    results = out / "results.json"
    assert results.is_file(), f"worker wrote no results (rc {r.returncode}):\n{r.stderr[-4000:]}"
    data = json.loads(results.read_text())
    assert data["_failed"] is None, data["_failed"]
    assert r.returncode == 0, r.stderr[-3000:]
    print("deepspeed worker case timings (s):", data["_timings"])
    return data


def assert_close(res: dict, a: str, b: str, rtol) -> None:
    la, lb = res[a]["losses"], res[b]["losses"]
    assert sorted(la, key=int) == sorted(lb, key=int) and la
    for step in la:
        assert la[step]["optim/lr"] == lb[step]["optim/lr"], (a, b, step)
        for key in KEYS:
            tol = rtol if isinstance(rtol, float) else rtol["optim/grad_norm" if "grad" in key else "loss"]
            x, y = la[step][key], lb[step][key]
            assert abs(x - y) <= tol * abs(x), f"{b} vs {a}, step {step}, {key}: {y} vs {x}"


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_zero_stage_matches_ddp_for_20_steps(ds_results, stage):
    assert len(ds_results[stage]["losses"]) == 20
    assert_close(ds_results, "ddp", stage, RTOL)
    # mmgen's LambdaLR drives the optimizer DeepSpeed steps: same LR in its param groups
    assert ds_results[stage]["final_lr"] == ds_results["ddp"]["final_lr"]
    first = ds_results[stage]["losses"]["1"]["loss/total"]
    assert ds_results[stage]["losses"]["20"]["loss/total"] < first - 1.0  # it learns


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_grad_accumulation_keeps_global_normalisation(ds_results, stage):
    assert_close(ds_results, "ddp_ga2", f"{stage}_ga2", RTOL)


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_resume_is_bitwise_equal_to_uninterrupted(ds_results, stage):
    run = ds_results[f"{stage}_resume"]
    assert run["resumed_at"] == 7
    assert run["losses"] == ds_results[stage]["losses"], "losses after resume differ from the uninterrupted run"
    assert run["weights_equal"]


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_export_loads_into_the_plain_model_and_reproduces_logits(ds_results, stage):
    e = ds_results[f"export_{stage}"]
    assert e["weights_equal"]  # the file holds the engine's fp32 master weights, bit for bit
    assert e["logits_max_abs_diff"] <= 1e-6 * e["logits_scale"]  # measured: 0.0


def test_export_reads_a_stage0_deepspeed_checkpoint(ds_results):
    assert ds_results["export_stage0"]["weights_equal"]


@pytest.mark.parametrize("stage", ["zero1", "zero2"])
def test_bf16_trains_close_to_ddp_autocast_and_exports_fp32_master(ds_results, stage):
    assert_close(ds_results, "ddp_bf16", f"{stage}_bf16", RTOL_BF16)
    assert ds_results[f"export_{stage}_bf16"]["weights_equal"]


def test_offload_trains_like_ddp(ds_results):
    assert_close(ds_results, "ddp", "zero2_offload", RTOL)
    assert_close(ds_results, "ddp", "zero3_offload", RTOL)  # params offloaded, torch activation ckpt


def test_activation_checkpointing_and_tied_head_under_zero3(ds_results):
    assert ds_results["ddp_ac_torch"]["losses"] == ds_results["ddp"]["losses"]  # recompute = same math
    assert_close(ds_results, "ddp_tied", "zero3_tied_ac_ds", RTOL)
    assert_close(ds_results, "ddp_tied", "zero3_tied_ac_torch", RTOL)


def test_init_from_crosses_backends(ds_results):
    assert ds_results["init_from"] == {"ddp_to_zero3": True, "zero2_to_ddp": True}


@pytest.mark.parametrize("case", ["zero2", "zero3", "zero2_bf16"])
def test_nonfinite_loss_skip_leaves_no_trace(ds_results, case):
    r = ds_results[f"skip_{case}"]
    assert r["unchanged"] and r["same_after"]
    assert r["next_step"][0] == r["next_step"][1]
