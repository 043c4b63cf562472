# bench/multigpu_ddp.py end to end on CPU (2 gloo processes): the script that runs on GPUs.
from __future__ import annotations

import json
import statistics
import sys

import pytest

from tests.conftest import ROOT, run_cli


def test_multigpu_bench_runs_on_two_cpu_processes(tmp_path):
    out = tmp_path / "result.json"
    r = run_cli([sys.executable, str(ROOT / "bench" / "multigpu_ddp.py"), "--cpu",
                 "--parity-steps", "20", "--split-steps", "24", "--scaling-steps", "6",
                 "--warmup", "2", "--scaling-backends", "ddp,fsdp2", "--work", str(tmp_path / "work"), "--out", str(out)],
                cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    p = res["parity"]
    # fp32 on CPU, two summands per gradient: the two layouts give identical losses; another
    # data order does not (the comparison can tell them apart)
    d = p["diffs"]
    assert p["pass"] and p["identical"] and d["2x"]["steps"] == 20
    assert d["1x_nondet_repeat"]["max_rel"] == 0.0 and p["tolerance"] == [1e-5]
    assert p["control_exceeds"] and d["1x_other_data"]["max_rel"] > 1e-3
    s = res["split"]
    complete = [e for e in s["epochs"] if e["complete"]]
    assert complete and all(e["keys"] == 64 and e["duplicates"] == e["missing"] == 0
                            for e in complete)
    assert s["resume_same_keys"] and s["resumed"] and 1 <= s["preempted_at"] < 24
    assert s["resume_loss"]["max_rel"] == 0.0 and s["pass"]
    rows = res["scaling"]["rows"]
    assert [(row["backend"], row["gpus"]) for row in rows] == [
        ("ddp", 1), ("ddp", 2), ("fsdp2", 1), ("fsdp2", 2)]
    for row in rows:
        # each row reports its own run's medians after --warmup, read here from that run
        recs = [json.loads(line) for line in (tmp_path / "work" / "runs" / f"scaling_{row['backend']}_{row['gpus']}"
                                              / "metrics.jsonl").read_text().splitlines()]
        assert [rec["step"] for rec in recs] == list(range(1, 7))
        assert row["tokens_per_s"] == statistics.median(rec["perf/tokens_per_s"] for rec in recs[2:])
        assert row["final_loss"] == recs[-1]["loss/total"] and row["tokens_per_s"] > 0
        row["tokens_per_step"] = recs[-1]["progress/tokens_seen"] / recs[-1]["step"]
    # same seed, data and process count: the backend changes the speed, not the training
    assert [row["final_loss"] for row in rows[:2]] == pytest.approx([row["final_loss"] for row in rows[2:]], rel=1e-6)
    assert rows[0]["final_loss"] != rows[1]["final_loss"]    # 2 processes: another global batch
    for one, two in (rows[:2], rows[2:]):
        # weak scaling: a fixed micro-batch per process, so 2 processes train on about twice the
        # tokens per step (rank 0 reads the 1-process run's stream, rank 1 another one)
        assert 1.5 < two["tokens_per_step"] / one["tokens_per_step"] < 2.5, (one, two)
        # efficiency: per-process throughput against the 1-process row of the same backend
        assert one["efficiency"] == 1.0
        assert two["efficiency"] == pytest.approx(two["tokens_per_s"] / 2 / one["tokens_per_s"], rel=1e-12)
    assert "PASS" in r.stdout and "weak scaling" in r.stdout
