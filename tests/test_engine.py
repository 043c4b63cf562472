# The engine owns the step: layout, micro-batch loop, meta-model parallelize + init, registry, meta.json.
"""In-process tests use tiny models and one process (no process group). The distributed
cases (2 ranks, gloo) run in ONE torchrun launch of tests/engine_worker.py and are asserted
here: DDP, FSDP2 and ZeRO-3 start from the initial weights of one process bit for bit; two
ranks forming one data-parallel rank (TP=2's data layout) reproduce the one-process golden,
so counts and losses are reduced over the data-parallel group, not over all ranks; every
backend's meta.json names its layout and ``mmgen export`` reads it.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from mmgen.cli.preflight import compose_job
from mmgen.errors import ConfigError
from mmgen.optim import OptimConfig
from mmgen.parallel import BACKENDS, EngineContext, ParallelDims, build_engine, get_backend
from mmgen.parallel.config import ParallelConfig
from mmgen.parallel.dist import DistInfo
from tests.conftest import BIN, ROOT, run_cli


# -- the layout --------------------------------------------------------------------------------
def test_parallel_dims_place_ranks_pp_major_tp_minor():
    # rank = (pp_i * dp + dp_i) * tp + tp_i on 8 ranks = pp 2 x dp 2 x tp 2
    dp_ranks = [ParallelDims(world_size=8, rank=r, dp=2, tp=2, pp=2).dp_rank for r in range(8)]
    assert dp_ranks == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [ParallelDims(world_size=4, rank=r, dp=4).dp_rank for r in range(4)] == [0, 1, 2, 3]
    dims = ParallelDims.from_config(ParallelConfig(name="fsdp2"), world_size=4, rank=3)
    assert dims.degrees() == {"dp": 4, "tp": 1, "pp": 1, "ep": 1} and dims.dp_rank == 3
    assert dims.dp_group("cpu") is None  # every rank a data-parallel peer: the default group


@pytest.mark.parametrize("kwargs,needle", [
    ({"world_size": 4, "rank": 0, "dp": 2}, "must multiply to the world size 4"),
    ({"world_size": 4, "rank": 0, "dp": 4, "ep": 3}, "ep=3 must divide dp=4"),
    ({"world_size": 2, "rank": 2, "dp": 2}, "rank 2 outside world size 2"),
    ({"world_size": 2, "rank": 0, "dp": 2, "tp": 0}, "must be >= 1"),
])
def test_parallel_dims_refuse_impossible_layouts(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ParallelDims(**kwargs)


# -- the registry --------------------------------------------------------------------------------
def test_every_registered_backend_implements_the_protocol():
    for name in BACKENDS:
        module = get_backend(name)
        for fn in ("parallelize", "build_engine", "checkpoint_state_dict"):
            assert callable(getattr(module, fn, None)), (name, fn)


def test_unknown_backend_is_one_config_line_naming_the_registry():
    with pytest.raises(ConfigError) as e:
        compose_job(["parallel.name=zero4"])
    assert "parallel.name='zero4' is not a backend (available: ddp, fsdp2, zero1, zero2, zero3, megatron)" in str(e.value)
    assert "\n" not in str(e.value)


# -- build_engine on a meta model, forward_backward --------------------------------------------------
class Tiny(nn.Module):
    """Two blocks in ``layers`` (what the parallelize steps walk) and a head."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.head = nn.Linear(4, 1)

    def init_weights(self):
        for p in self.parameters():
            nn.init.normal_(p)

    def forward(self, x):
        for block in self.layers:
            x = torch.tanh(block(x))
        return self.head(x).squeeze(-1)


def tiny_engine(seed: int = 0):
    with torch.device("meta"):
        model = Tiny()

    def init(m):
        torch.manual_seed(seed)
        m.init_weights()

    ctx = EngineContext(DistInfo(), ParallelDims(world_size=1, rank=0, dp=1), precision="fp32")
    return build_engine(model, ParallelConfig(), OptimConfig(lr=0.1, weight_decay=0.0), ctx, init=init)


def test_build_engine_materialises_the_meta_model_with_the_init_weights():
    engine = tiny_engine(seed=3)
    plain = Tiny()
    torch.manual_seed(3)
    plain.init_weights()
    assert all(not p.is_meta for p in engine.module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(engine.module.state_dict().values(), plain.state_dict().values()))
    assert engine.layout() == {"backend": "ddp", "parallel": {"dp": 1, "tp": 1, "pp": 1, "ep": 1}, "world_size": 1,
                               "versions": {"torch": torch.__version__}}
    with pytest.raises(ValueError, match="meta-device model"):
        build_engine(Tiny(), ParallelConfig(), OptimConfig(), engine.ctx, init=lambda m: None)


def test_forward_backward_accumulates_every_micro_batch_and_hands_loss_fn_its_index():
    engine = tiny_engine()
    reference = tiny_engine()
    batches = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    seen = []

    def loss_fn(model, batch, micro):
        seen.append(micro)
        out = model(batch)
        return {"mse": out.square().mean(), "total": (micro + 1) * out.square().mean()}

    sums = engine.forward_backward(batches, loss_fn)
    assert seen == [0, 1, 2]
    # the same gradients as one backward of the weighted sum, and detached sums of every name
    total = sum((i + 1) * reference.model(b).square().mean() for i, b in enumerate(batches))
    total.backward()
    for p, q in zip(engine.module.parameters(), reference.module.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sums["total"], total.detach())
    assert set(sums) == {"mse", "total"} and not sums["total"].requires_grad


# -- meta.json's backend decides how export reads a checkpoint -------------------------------------
def test_export_refuses_a_backend_it_does_not_have(tmp_path):
    from mmgen.checkpoint.export import consolidated_state_dict

    (tmp_path / "meta.json").write_text(json.dumps({"step": 1, "backend": "colossal", "world_size": 2}))
    with pytest.raises(ValueError, match="written by backend 'colossal', which this mmgen does not have"):
        consolidated_state_dict(tmp_path)


def test_export_follows_meta_json_not_the_file_names(tmp_path):
    """A DDP checkpoint whose meta.json says fsdp2 is read as FSDP (and fails): the files
    are not guessed at when the layout is recorded."""
    from mmgen.checkpoint.export import checkpoint_backend, consolidated_state_dict

    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    (tmp_path / "meta.json").write_text(json.dumps({"step": 1, "world_size": 1}))
    assert checkpoint_backend(tmp_path) == "ddp"  # old checkpoint: from its files
    assert torch.equal(consolidated_state_dict(tmp_path)["w"], torch.ones(2))
    (tmp_path / "meta.json").write_text(json.dumps({"step": 1, "world_size": 1, "backend": "fsdp2"}))
    assert checkpoint_backend(tmp_path) == "fsdp2"
    with pytest.raises(FileNotFoundError, match="not an FSDP checkpoint"):
        consolidated_state_dict(tmp_path)


# -- two ranks, one launch --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_results(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine_worker")
    r = run_cli([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2",
                 str(ROOT / "tests" / "engine_worker.py"), "--shapes", str(shapes_dir), "--out", str(out)],
                cwd=out, timeout=600, env={"DS_ACCELERATOR": "cpu"})
    results = out / "results.json"
    assert results.is_file(), f"worker wrote no results (rc {r.returncode}):\n{r.stderr[-4000:]}"
    data = json.loads(results.read_text())
    assert data["_failed"] is None, data["_failed"]
    assert r.returncode == 0, r.stderr[-3000:]
    print("engine worker case timings (s):", data["_timings"])
    return data


@pytest.mark.parametrize("backend", ["ddp", "fsdp2", "zero3"])
def test_initial_weights_equal_one_process_under_every_layout(engine_results, backend):
    init = engine_results["init"]
    assert init[f"{backend}_keys_equal"] and init[f"{backend}_equal"]
    assert not init["other_seed_equal"]  # the comparison tells weights apart
    # really sharded: each of 2 ranks stores about half of FSDP2's and ZeRO-3's parameters
    want = 1.0 if backend == "ddp" else 0.5
    assert init[f"{backend}_local_fraction"] == pytest.approx(want, abs=0.01)


def test_fsdp2_shards_after_activation_checkpointing_and_compile(engine_results):
    assert engine_results["init"]["fsdp2_compiled"] and engine_results["init"]["fsdp2_checkpointed"]
    assert not engine_results["init"]["ddp_compiled"]


def test_reductions_use_the_data_parallel_group(engine_results):
    r = engine_results["dp_subgroup"]
    for rank in ("rank0", "rank1"):
        assert r[rank] == {"dp_rank": 0, "dp_size": 1, "group_sum": 1.0, "world_sum": 2.0, "stream0": 0,
                           "wrapped": "UnifiedTransformer"}
    golden = json.loads((ROOT / "tests" / "goldens" / "single.json").read_text())["curve"]
    assert [s["step"] for s in r["curve"]] == [s["step"] for s in golden] == list(range(1, 21))
    for got, want in zip(r["curve"], golden):
        for key in ("loss/text", "loss/visual", "loss/total", "optim/grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=2e-5), (got["step"], key)  # goldens' RTOL
    assert r["ranks_equal"]


@pytest.mark.parametrize("backend", ["ddp", "fsdp2", "zero2", "zero3"])
def test_meta_json_records_the_layout_and_export_reads_it(engine_results, backend):
    r = engine_results[f"meta_{backend}"]
    assert r["meta"] == {"backend": backend, "parallel": {"dp": 2, "tp": 1, "pp": 1, "ep": 1}, "world_size": 2}
    assert r["versions"]["torch"] == torch.__version__ and r["versions"]["mmgen"]
    assert ("deepspeed" in r["versions"]) == backend.startswith("zero")
    assert r["export_equal"] and r["legacy_export_equal"]


def test_moe_under_zero3_trains_like_ddp(engine_results):
    r = engine_results["moe_zero3"]
    ddp, zero3 = r["moe_ddp"], r["moe_zero3"]
    assert len(ddp) == len(zero3) == 3
    # same weights, data and noise; ZeRO-3 only reorders fp32 sums (the goldens' ZeRO bound)
    for a, b in zip(ddp, zero3):
        for key in a:
            if isinstance(a[key], float):
                assert abs(a[key] - b[key]) <= 2e-5 * max(abs(a[key]), 1e-3), (key, a, b)
