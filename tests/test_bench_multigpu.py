# bench/multigpu_ddp.py end to end on CPU (2 gloo processes): the script that runs on GPUs.
from __future__ import annotations

import json
import sys

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
    assert rows[0]["efficiency"] == rows[2]["efficiency"] == 1.0
    assert all(row["tokens_per_s"] > 0 for row in rows)
    assert "PASS" in r.stdout and "weak scaling" in r.stdout
