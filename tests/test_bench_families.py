# bench/families.py end to end at debug sizes: equal FLOP budgets, the trainer's counts, every row's fields.
import json
import math
import subprocess
import sys
from pathlib import Path

from tests.test_vqar import vq_file  # noqa: F401  (the tiny VQ tokenizer fixture)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=2", "model.ffn_dim=64",
        "data.batch_size=4", "data.num_workers=0", "trainer.log_every=1", "sampler.steps=2",
        "sampler.max_caption_len=8"]


def test_two_families_at_equal_training_flops(tmp_path, shapes_dir, vq_file):  # noqa: F811
    """A continuous (Transfusion on pixels) and a discrete (VQ-AR) arm, 5 reference steps each
    (~35 s on 2 shared cores): steps inversely proportional to each arm's FLOPs per step, the
    trainer's logged FLOPs within one step of the budget, every field of every row."""
    out = tmp_path / "families.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "families.py"), "--arms", "transfusion,vq_ar",
                        "--reference-steps", "5", "--samples", "4", "--threads", "1", "--flop-batches", "3",
                        "--time-steps", "3", "--cost-batch", "2", "--data", str(shapes_dir),
                        "--vq-codec", f"vq:{vq_file}", "--runs", str(tmp_path / "runs"), "--prefix", "t",
                        "--out", str(out), *TINY], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {row["arm"]: row for row in res["rows"]}
    assert list(rows) == ["transfusion", "vq_ar"] and res["commit"]
    budget = res["budget_flops"]
    assert budget == 5 * rows["transfusion"]["flops_per_step"] and res["budget_basis"].startswith("5 steps")
    for arm, row in rows.items():
        per = row["flops_per_step"]
        # steps = round(budget / per step): within half a step of the budget, and the run did them
        assert row["steps"] == row["steps_planned"] == max(1, round(budget / per))
        assert abs(row["steps"] * per - budget) <= per / 2
        # the trainer's own count (its logged windows) of the steps it ran
        assert abs(row["training_flops"] - budget) <= per, (arm, row["training_flops"], budget, per)
        assert row["params_total"] > row["params_heads"] > 0
        for k in ("color", "shape", "size", "position"):
            assert 0 <= row["image"][k] <= 1
        assert 0 <= row["caption"]["exact"] <= 1 and row["image"]["n"] == row["caption"]["n"] == 4
        s = row["sampling"]
        assert s["flops_per_image"] > 0 and s["seconds_per_image"] > 0 and s["batch"] == 2
        assert s["seconds_per_caption"] > 0 and row["samples_per_s"] > 0
        assert math.isclose(row["t2i_mean"], sum(row["image"][k] for k in ("color", "shape", "size", "position")) / 4)
        assert res["probes"][arm]["step_s"] > 0
        assert f"| {row['family']} |" in res["table"] and f"| {row['steps']} |" in res["table"]
    assert rows["transfusion"]["representation"] == "continuous" and rows["vq_ar"]["representation"] == "discrete"
    assert rows["transfusion"]["sampling"]["sampler"] == "flow_t2i" and rows["vq_ar"]["sampling"]["sampler"] == "ar_t2i"
    assert rows["vq_ar"]["heads"] == ["lm"] and "flow" in rows["transfusion"]["heads"]
    # the arms' per-step costs differ, so do their steps (inversely)
    a, b = rows["transfusion"], rows["vq_ar"]
    assert a["flops_per_step"] != b["flops_per_step"]
    assert (a["steps"] - b["steps"]) * (a["flops_per_step"] - b["flops_per_step"]) <= 0
    assert res["verdict"].split(":")[0] in ("agrees", "contradicts the claim", "inconclusive (within two standard errors)")
    assert "this run:" in r.stdout and res["expected_seconds"] > 0
