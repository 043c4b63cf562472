# Expert parallelism (mmgen/parallel/ep.py): EP=2 on 2 gloo processes matches EP=1, in one torchrun launch.
"""Each case (dropless loop, dropless grouped GEMM with sigmoid scores and a shared expert,
capacity dropping, a router that leaves rank 1's experts without tokens) is run by
tests/ep_worker.py on both ranks. Tolerances: outputs and input gradients must be bit-equal
(every row meets the same weights in the same kernel); expert-weight gradients within 1e-6 of
the largest gradient, because EP sums the two ranks' rows inside one matmul while the reference
adds two per-rank matmuls (fp32 epsilon 1.2e-7; measured 1.3e-7 to 3.3e-7)."""
from __future__ import annotations

import json

from tests.conftest import BIN, ROOT, run_cli


def test_ep2_matches_ep1(tmp_path):
    r = run_cli([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2",
                 str(ROOT / "tests" / "ep_worker.py"), "--out", str(tmp_path)], cwd=tmp_path, timeout=300)
    results = tmp_path / "results.json"
    assert results.is_file(), f"worker wrote no results (rc {r.returncode}):\n{r.stderr[-4000:]}"
    data = json.loads(results.read_text())
    assert data["_failed"] is None, data["_failed"]
    assert len(data["cases"]) == 4
    for name, ranks in data["cases"].items():
        for rank, res in enumerate(ranks):
            assert res["y"] == 0.0 and res["x_grad"] == 0.0, (name, rank, res)
            assert res["expert_grad_rel"] < 1e-6, (name, rank, res)
            assert res["scale"] > 1.0, (name, rank, res)       # outputs are not trivially zero
            assert res["expert_params"] == ["experts.w1", "experts.w3", "experts.w2"]
