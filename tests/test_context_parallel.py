# parallel.cp (Ulysses sequence parallelism): start-up checks, slicing, and the 2-rank parity cases.
"""In-process tests: the one-line start-up checks, the layout arithmetic, the KV-head
replication rule and the batch slicing. The 2-rank cases run in ONE launch of
tests/cp_worker.py (~20 s on 2 cores) and are asserted here:

* the Ulysses exchange around ``attend`` equals unsharded ``attend`` with a packed
  segment-table mask (a FULL span across the slice boundary, a CAUSAL hidden span, two
  documents, padding), forward and q/k/v gradients in fp32. Tolerance ``ATTN_ATOL = 1e-5``
  absolute on values of order 1: with 4 and 2 KV heads the per-head arithmetic is the
  unsharded one (measured bit-equal); with 1 KV head (replicated, 1 < cp) the key/value
  gradient sums its two copies in another order than SDPA's GQA reduction (measured 1.4e-6);
  a wrong head or position mapping gives errors of order 1;
* a 20-step debug-flavor run at cp=2 (dp=1: the one-process data stream) with parallel=ddp,
  and 5 steps with parallel=fsdp2, reproduce tests/goldens/single.json within
  ``PARITY_RTOL = 1e-6`` relative (losses and grad norm). Weights, data and noise are
  identical (the noise is drawn for the whole batch, each rank keeps its rows); what differs
  is fp32 summation order (matmuls over half the rows, the loss summed from two halves, the
  gradient from two ranks): measured worst 1.9e-7 (ddp) and 3.0e-7 (fsdp2), about 3 ulps.
  Attention that does not cross the slice boundary (the bug Ulysses exists to avoid)
  moved the step-1 loss by 2.6e-4 and the grad norm by 1.4e-2 here.
"""
from __future__ import annotations

import json

import pytest
import torch

from mmgen.cli.preflight import compose_job
from mmgen.errors import ConfigError
from mmgen.parallel import ParallelDims
from mmgen.parallel.config import ParallelConfig
from mmgen.parallel.context import kv_repeats
from mmgen.sequence_shard import shard_of, slice_batch
from tests.conftest import BIN, ROOT, run_cli

ATTN_ATOL = 1e-5
PARITY_RTOL = 1e-6
KEYS = ("loss/text", "loss/visual", "loss/total", "optim/grad_norm")


# -- start-up checks: one line, exit 2 -----------------------------------------------------------
@pytest.mark.parametrize("overrides,needle", [
    (["parallel.cp=2", "data.seq_len=129"], "data.seq_len=129 is not divisible by the context-parallel degree"),
    (["parallel.cp=8", "data.seq_len=128"], "model.n_heads=4 is not divisible by parallel.cp=8"),
    (["parallel=megatron", "parallel.cp=2"], "needs Transformer Engine"),
    (["parallel=zero2", "parallel.cp=2"], "parallel.cp=2 runs with parallel=ddp or parallel=fsdp2"),
    (["parallel.cp_impl=ring", "parallel.cp=2"], "parallel.cp_impl='ring' must be one of ulysses"),
])
def test_cp_start_up_checks_are_one_line(overrides, needle):
    with pytest.raises(ConfigError) as e:
        compose_job(["experiment=smoke", "model=debug", *overrides])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_megatron_refusal_names_the_ulysses_alternative():
    with pytest.raises(ConfigError, match=r"parallel=ddp \(or fsdp2\) parallel.cp=2 parallel.cp_impl=ulysses"):
        compose_job(["experiment=smoke", "model=debug", "parallel=megatron", "parallel.cp=2"])


def test_cp_layout_shares_data_ranks_and_divides_the_world():
    cfg = ParallelConfig(name="ddp", cp=2)
    dims = [ParallelDims.from_config(cfg, world_size=4, rank=r) for r in range(4)]
    assert [d.dp_rank for d in dims] == [0, 0, 1, 1] and [d.cp_rank for d in dims] == [0, 1, 0, 1]
    assert dims[0].degrees() == {"dp": 2, "tp": 1, "pp": 1, "ep": 1, "cp": 2}
    assert ParallelDims.from_config(ParallelConfig(), 4, 0).degrees() == {"dp": 4, "tp": 1, "pp": 1, "ep": 1}
    with pytest.raises(ConfigError, match="parallel.cp=2 x tp=1 x pp=1 = 2 does not divide the world size 3"):
        ParallelDims.from_config(cfg, world_size=3, rank=0)


def test_kv_heads_are_replicated_only_when_cp_does_not_divide_them():
    assert kv_repeats(8, 8, 4) == 1 and kv_repeats(8, 4, 2) == 1
    assert kv_repeats(4, 1, 2) == 2 and kv_repeats(8, 2, 4) == 2 and kv_repeats(8, 1, 8) == 8
    assert kv_repeats(12, 2, 4) == 2          # 2 KV heads x 2 copies over 4 ranks, groups of 3
    assert kv_repeats(12, 3, 4) == 4          # 3 x 4 = 12 copies: one per query head


def test_slices_of_a_real_batch_reassemble_it(shapes_dir):
    from mmgen.data import build_dataloader
    from mmgen.models.tokenizers import build_tokenizer

    job = compose_job(["experiment=smoke", "model=debug", "data.seq_len=128", "data.batch_size=2",
                       "data.num_workers=0", f"data.train_shards={shapes_dir}/train",
                       f"data.val_shards={shapes_dir}/val"])
    batch = next(iter(build_dataloader(job.data, build_tokenizer(job.data.tokenizer), 0, 1, split="train")))
    parts = [slice_batch(batch, r, 2, exchange=None) for r in range(2)]
    assert all(p.shape == (2, 64) for p in parts)
    for name in ("tokens", "targets", "positions", "document_ids", "span_ids", "coords"):
        assert torch.equal(torch.cat([getattr(p, name) for p in parts], dim=1), getattr(batch, name)), name
    # each slice's patches are the whole batch's rows of its continuous positions, in order
    rows = torch.cat([shard_of(p).patch_rows for p in parts]).sort().values
    assert torch.equal(rows, torch.arange(batch.patches.shape[0]))
    for p in parts:
        assert torch.equal(p.patches, batch.patches[shard_of(p).patch_rows])
        assert p.patches.shape[0] == int(p.continuous_mask().sum()) and shard_of(p).full is batch
    assert sum(int(p.continuous_mask().sum()) for p in parts) == int(batch.continuous_mask().sum()) > 0


# -- the 2-rank cases: one torchrun launch -------------------------------------------------------
@pytest.fixture(scope="module")
def cp_results(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cp")
    r = run_cli([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2",
                 str(ROOT / "tests" / "cp_worker.py"), "--shapes", str(shapes_dir), "--out", str(out)],
                cwd=out, timeout=600)
    results = out / "results.json"
    assert results.is_file(), f"worker wrote no results (rc {r.returncode}):\n{r.stderr[-4000:]}"
    data = json.loads(results.read_text())
    assert data["_failed"] is None, data["_failed"]
    assert r.returncode == 0, r.stderr[-3000:]
    print("cp worker case timings (s):", data["_timings"])
    return data


def test_ulysses_attention_equals_unsharded_attention(cp_results):
    worst = cp_results["attention"]["worst"]
    assert sorted(worst) == ["1", "2", "4"]       # KV heads: split (4, 2) and replicated (1)
    for n_kv, errs in worst.items():
        assert max(errs) <= ATTN_ATOL, f"{n_kv} KV heads: max |err| out, dq, dk, dv = {errs}"


@pytest.mark.parametrize("case,steps", [("ddp_cp2", 20), ("fsdp2_cp2", 5)])
def test_cp2_training_matches_the_one_process_curve(cp_results, case, steps):
    res = cp_results[case]
    assert res["dims"] == {"dp": 1, "tp": 1, "pp": 1, "ep": 1, "cp": 2}
    golden = json.loads((ROOT / "tests" / "goldens" / "single.json").read_text())["curve"][:steps]
    got = res["curve"]
    assert [r["step"] for r in got] == [r["step"] for r in golden]
    for a, b in zip(got, golden):
        for k in KEYS:
            assert a[k] == pytest.approx(b[k], rel=PARITY_RTOL), f"{case} step {a['step']} {k}: {a[k]} vs {b[k]}"
