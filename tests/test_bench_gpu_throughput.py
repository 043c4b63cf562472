# bench/gpu_throughput.py --like-for-like at a tiny size on CPU: mmgen's Trainer step and the baseline on the same work.
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_like_for_like_tiny_on_cpu(tmp_path):
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_throughput.py"), "--like-for-like", "--tiny",
                        "--device", "cpu", "--steps", "5", "--warmup", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    shape, ours, base = res["shape"], res["mmgen"], res["baseline"]
    ref = base["eager_sdpa_transfusion_mask"]
    assert res["reference"] == "eager_sdpa_transfusion_mask" and res["device"] == "cpu"
    # the baseline's own layout: two images of T/8 at T/8 and T/2, one document per row
    t, b = shape["T"], shape["B"]
    assert (t, b) == (128, 2) and ref["layout"]["image_spans"] == [[16, 32], [64, 80]]
    # same model shape: the one parameter difference is mmgen's second timestep layer
    # (d x d + bias); qk-norm, GQA, a width or a patch size left unmatched would show here
    d = shape["d"]
    assert res["model"]["qk_norm"] is False and res["model"]["n_kv_heads"] == res["model"]["n_heads"]
    assert ours["num_params"] - ref["params"] == d * d + d
    # the work the trainer counted on the batches it consumed equals the work counted from the
    # layout the baseline reported: the ratio compares like with like
    assert res["same_work"] and ours["flops_per_step"] == ref["flops_per_step"] > 0
    assert ours["trainer_perf"]["perf/model_tflops"] > 0
    # no padding in this layout: tokens and positions per step are the whole batch
    assert ours["tokens_per_s"] == ours["positions_per_s"]
    assert ours["trainer_perf"]["perf/tokens_per_s"] == ours["trainer_perf"]["perf/positions_per_s"]
    assert ours["tokens_per_s"] * ours["step_s"] == pytest.approx(b * t)
    # the causal baseline skips the bidirectional pairs inside the 2 images of 16 positions in
    # each of 2 rows: 2 * 2 * 16 * 15 / 2 = 480 pairs x 4 d FLOPs x 2 layers x 3 (training)
    causal = base["eager_sdpa_causal"]
    assert ref["flops_per_step"] - causal["flops_per_step"] == 480 * 4 * d * shape["L"] * 3
    for key in ("ratio_tokens_per_s", "ratio_model_tflops"):
        assert math.isfinite(res[key]) and res[key] > 0
    assert res["ratio_tokens_per_s"] == pytest.approx(res["ratio_model_tflops"])  # same work per token
    assert all(math.isfinite(x) for x in ours["losses"])
    assert "same counted work: True" in r.stdout
