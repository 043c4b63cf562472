# trainer.fp8 (torchao Float8Linear in the trunk): what is converted, emulated training on CPU, checkpoints, refusals.
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

pytest.importorskip("torchao.float8")   # the fp8 extra: pip install 'mmgen[fp8]' (CI installs it)

from torchao.float8.float8_linear import Float8Linear

from mmgen.cli.preflight import compose_job
from mmgen.errors import ConfigError
from mmgen.models import FLAVORS, build_model
from mmgen.models.moe import Experts, Router
from mmgen.parallel.float8 import apply_float8
from tests.conftest import BIN, data_overrides, run_cli
from tests.test_trainer import TINY, losses, make_trainer

ROOT = Path(__file__).resolve().parents[1]
EMULATED = ["trainer.fp8_emulate=true"]
# measured over 8 steps, fp32 CPU, relative per-step difference at most: debug tensorwise 4.3e-4,
# rowwise 2.8e-4; moe_debug 4.2e-4, mot_debug 1.6e-4 (6 steps, tensorwise); the bound leaves ~5x
LOSS_RTOL = 2e-3


def plain_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def meta_model(flavor: str, **changes):
    with torch.device("meta"):
        return build_model(dataclasses.replace(FLAVORS[flavor], **changes))


# ---------------------------------------------------------------- what is converted

@pytest.mark.parametrize("flavor", ["debug", "moe_debug", "mot_debug"])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_trunk_linears_convert_and_the_edges_stay_high_precision(flavor, recipe):
    model = meta_model(flavor)
    before = plain_linears(model)
    names = set(model.state_dict().keys())
    converted = apply_float8(model, recipe, emulate=True)
    after = plain_linears(model)
    trunk = {n for n in before if n.startswith("layers.")}
    assert set(converted) == trunk and trunk   # every trunk linear of the debug shapes is a multiple of 16
    for n, m in after.items():
        if n in trunk:
            assert isinstance(m, Float8Linear), n
            assert m.config.emulate and m.weight is before[n].weight   # same parameter, not a copy
        else:   # embedders, timestep MLP, heads: exactly nn.Linear
            assert type(m) is nn.Linear, n
    edges = {n for n in before if not n.startswith("layers.")}
    assert {"patch_in", "t_embedder.fc1", "t_embedder.fc2", "output", "visual_out"} <= edges
    assert set(model.state_dict().keys()) == names   # checkpoints and export keep their keys
    if flavor == "moe_debug":   # router and routed experts are not linears: untouched, bf16
        assert any(isinstance(m, Router) for m in model.modules())
        assert any(isinstance(m, Experts) for m in model.modules())
        assert any(".shared." in n for n in converted)   # the shared expert is a dense SwiGLU


def test_linears_whose_dims_are_not_multiples_of_16_stay():
    model = meta_model("debug", ffn_dim=200)   # SwiGLU 64 -> 200 -> 64
    converted = apply_float8(model, "tensorwise", emulate=True)
    ffn = {n for n in plain_linears(model) if ".feed_forward." in n}
    assert ffn and not ffn & set(converted)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in ffn)
    assert {n.rsplit(".", 1)[-1] for n in converted} == {"wq", "wk", "wv", "wo"}


def test_a_model_with_no_eligible_linear_is_refused():
    model = meta_model("debug", dim=72, n_heads=4, n_kv_heads=2, ffn_dim=200)
    with pytest.raises(ConfigError, match="no linear of model.layers"):
        apply_float8(model, "tensorwise", emulate=True)


def test_an_empty_input_passes_through_like_nn_linear():
    """A modality tower can get no rows in a micro-batch: torchao's amax would fail on it."""
    model = build_model(FLAVORS["mot_debug"])
    apply_float8(model, "tensorwise", emulate=True)
    lin = model.get_submodule("layers.0.towers.1.attention.wq")
    x = torch.zeros(0, lin.in_features, requires_grad=True)
    y = lin(x)
    assert y.shape == (0, lin.out_features)
    y.sum().backward()
    assert lin.weight.grad is not None and not lin.weight.grad.any()
    x = torch.randn(5, lin.in_features)
    out = lin(x)
    ref = nn.functional.linear(x, lin.weight, lin.bias)
    assert not torch.equal(out, ref) and torch.allclose(out, ref, rtol=0.1, atol=0.05)   # rounded to float8


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("flavor, recipe", [("debug", "tensorwise"), ("debug", "rowwise"),
                                            ("moe_debug", "tensorwise"), ("mot_debug", "tensorwise")])
def test_emulated_fp8_trains_like_fp32(shapes_dir, tmp_path, flavor, recipe):
    extra = ["trainer.steps=8", "checkpoint.enabled=false", f"model={flavor}"]
    ref_trainer = make_trainer(shapes_dir, tmp_path / "ref", extra)
    trunk = [n for n in plain_linears(ref_trainer.engine.module) if n.startswith("layers.")]
    ref_trainer.train()
    fp8 = make_trainer(shapes_dir, tmp_path / "fp8", [*extra, f"trainer.fp8={recipe}", *EMULATED])
    assert sum(isinstance(m, Float8Linear) for m in fp8.engine.module.modules()) == len(trunk) > 0
    fp8.train()
    ref, got = losses(tmp_path / "ref"), losses(tmp_path / "fp8")
    assert sorted(ref) == sorted(got) == list(range(1, 9))
    rel = [abs(got[s]["loss/total"] - ref[s]["loss/total"]) / ref[s]["loss/total"] for s in ref]
    assert all(math.isfinite(got[s]["loss/total"]) for s in got)
    assert 0 < max(rel) < LOSS_RTOL, rel   # rounded (not a no-op), and close


def test_fp8_resume_and_export_into_a_plain_model(shapes_dir, tmp_path):
    from mmgen.checkpoint.export import export_safetensors, load_model_weights

    extra = ["trainer.steps=6", "checkpoint.every=3", "trainer.fp8=tensorwise", *EMULATED]
    straight = make_trainer(shapes_dir, tmp_path / "a", extra)
    straight.train()
    make_trainer(shapes_dir, tmp_path / "b", extra).train(stop_at=3)
    resumed = make_trainer(shapes_dir, tmp_path / "b", extra)
    assert resumed.state.step == 3
    resumed.train()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    # model.pt of a Float8Linear model is a plain state dict: export, then load into nn.Linear
    out = export_safetensors(tmp_path / "a", tmp_path / "a.safetensors")
    plain = build_model(straight.job.model)
    load_model_weights(plain, out)
    assert not any(isinstance(m, Float8Linear) for m in plain.modules())
    for (n, p), q in zip(straight.engine.module.named_parameters(), plain.parameters()):
        assert torch.equal(p.detach(), q.detach()), n
    # the fp8 run's checkpoint resumes without fp8 too (only the matmuls change)
    bf16 = make_trainer(shapes_dir, tmp_path / "b", ["trainer.steps=7", "checkpoint.every=3"])
    assert bf16.state.step == 6
    bf16.train()
    assert sorted(losses(tmp_path / "b")) == list(range(1, 8))


@pytest.mark.slow
def test_fp8_under_fsdp2_matches_ddp_and_exports(shapes_dir, tmp_path):
    """One process: FSDP2 shards the Float8Linear weights as DTensors (all-gathered in fp32)."""
    common = [*TINY, *data_overrides(shapes_dir), "trainer.precision=fp32", "data.num_workers=0",
              "trainer.steps=4", "checkpoint.every=4", "trainer.fp8=tensorwise", *EMULATED]
    for name, extra in (("ddp", []), ("fsdp", ["parallel=fsdp2"])):
        r = run_cli([str(BIN / "mmgen-train"), *common, f"name={name}", *extra], cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "14 of 14 trunk linears in float8" in r.stderr
    ddp, fsdp = losses(tmp_path / "runs" / "ddp"), losses(tmp_path / "runs" / "fsdp")
    for step in ddp:
        assert fsdp[step]["loss/total"] == pytest.approx(ddp[step]["loss/total"], rel=1e-5), step
    r = run_cli([str(BIN / "mmgen"), "export", str(tmp_path / "runs" / "fsdp"), "--out", str(tmp_path / "f.st")],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("extra, match", [
    (["trainer.fp8=float8"], "trainer.fp8='float8' must be one of none, tensorwise, rowwise"),
    (["trainer.fp8=tensorwise", "trainer.device=cpu"], "trainer.fp8_emulate=true"),
    (["trainer.fp8=tensorwise", *EMULATED, "parallel=zero2"], "not parallel=zero2"),
    (["trainer.fp8=rowwise", *EMULATED, "parallel=megatron"], "not parallel=megatron"),
    (["experiment=codec_vae_shapes", "trainer.fp8=tensorwise", *EMULATED], "fp8=tensorwise"),
])
def test_bad_fp8_configs_are_one_line(shapes_dir, extra, match):
    base = [] if extra[0].startswith("experiment=") else TINY   # a codec family brings its own experiment
    with pytest.raises(ConfigError, match=match) as e:
        compose_job([*base, *data_overrides(shapes_dir), *extra])
    assert "\n" not in str(e.value)


def test_missing_torchao_is_one_line(shapes_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)   # how Python marks a module unimportable
    with pytest.raises(ConfigError, match=r"trainer.fp8 needs torchao: pip install 'mmgen\[fp8\]'"):
        compose_job([*TINY, *data_overrides(shapes_dir), "trainer.fp8=tensorwise", *EMULATED])


def test_fp8_on_a_cpu_without_emulation_stops_at_start_up(shapes_dir, tmp_path):
    """trainer.device=auto resolves to the CPU here: refused when the engine is built."""
    with pytest.raises(ConfigError, match="needs a CUDA GPU with FP8 tensor cores.*this run is on cpu"):
        make_trainer(shapes_dir, tmp_path, ["trainer.fp8=tensorwise"])


# ---------------------------------------------------------------- the benchmark, at a debug size

@pytest.mark.slow
def test_bench_fp8_training_tiny_on_cpu(tmp_path):
    out = tmp_path / "fp8.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "fp8_training.py"), "--tiny", "--device", "cpu",
                        "--steps", "3", "--warmup", "1", "--curve-steps", "4", "--block", "2",
                        "--data", str(tmp_path / "shapes"), "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["torchao"] and res["torch"] and res["commit"]
    tp = res["throughput"]
    assert set(tp["arms"]) == {"bf16", "tensorwise", "rowwise"} and tp["same_work"]
    assert tp["arms"]["bf16"]["fp8_linears"] == 0 and tp["arms"]["tensorwise"]["fp8_linears"] == 14
    assert all(math.isfinite(x) and x > 0 for x in tp["ratio_tokens_per_s"].values())
    curve = res["curve"]
    assert len(curve["curves"]["bf16"]) == len(curve["curves"]["tensorwise"]) == 4
    assert len(curve["block_means"]["bf16"]) == 2
    c = curve["vs_bf16"]["tensorwise"]
    assert 0 < c["mean_rel_diff"] <= c["max_rel_diff"] < LOSS_RTOL


# ---------------------------------------------------------------- the real FP8 GEMMs

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)")
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_trains_on_the_gpu_close_to_bf16(shapes_dir, tmp_path, recipe):
    """torch._scaled_mm in every trunk linear (no emulation), compiled blocks, bf16 autocast."""
    extra = ["trainer.steps=20", "checkpoint.enabled=false", "trainer.device=cuda", "trainer.precision=bf16",
             "trainer.compile=true", "model.attention=sdpa", "data.batch_size=8"]
    make_trainer(shapes_dir, tmp_path / "bf16", extra).train()
    fp8 = make_trainer(shapes_dir, tmp_path / "fp8", [*extra, f"trainer.fp8={recipe}"])
    linears = [m for m in fp8.engine.module.modules() if isinstance(m, Float8Linear)]
    assert len(linears) == 14 and not any(m.config.emulate for m in linears)
    fp8.train()
    ref, got = losses(tmp_path / "bf16"), losses(tmp_path / "fp8")
    assert all(math.isfinite(got[s]["loss/total"]) for s in got)
    # bf16 vs fp8 on real GEMMs: a looser bound than the fp32-vs-emulated one on CPU
    for s in ref:
        assert got[s]["loss/total"] == pytest.approx(ref[s]["loss/total"], rel=3e-2), s
    assert got[20]["loss/total"] < got[1]["loss/total"]
