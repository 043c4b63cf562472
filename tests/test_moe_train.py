# The moe_debug flavor end to end on CPU: trains, logs router metrics (jsonl + W&B), resumes bitwise, exports, upcycles.
from __future__ import annotations

import json
import subprocess

import torch

from mmgen.checkpoint.export import export_safetensors, load_model_weights
from mmgen.metrics.report import draw_report
from mmgen.models import FLAVORS, build_model
from tests.conftest import BIN
from tests.test_model import make_batch
from tests.test_trainer import losses, make_trainer, stopped_and_resumed

MOE = ["model=moe_debug", "trainer.steps=6", "checkpoint.every=100", "metrics.router_heatmap_every=3",
       "trainer.log_every=3"]


def test_moe_debug_trains_resumes_bitwise_logs_router_metrics_and_exports(shapes_dir, tmp_path):
    straight = make_trainer(shapes_dir, tmp_path / "a", [*MOE, "metrics=wandb"])
    straight.train()
    resumed = stopped_and_resumed(shapes_dir, tmp_path / "b", MOE, 3)
    # the aux-free bias is part of the checkpoint
    bias = [b for n, b in resumed.engine.module.named_buffers() if n.endswith("expert_bias")]
    assert bias and any(float(b.abs().sum()) > 0 for b in bias)
    resumed.train()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == [3, 6] and a == b, "losses after resume differ from the uninterrupted run"
    for (n, p), q in zip(straight.engine.module.state_dict().items(), resumed.engine.module.state_dict().values()):
        assert torch.equal(p, q), n

    recs = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    last = recs[-1]
    # the aux losses reach the total with model.moe_*_weight and are logged apart
    assert last["loss/moe_balance"] > 0 and last["loss/moe_z"] > 0
    want_total = last["loss/text"] + last["loss/visual"] + 0.01 * last["loss/moe_balance"] + 0.001 * last["loss/moe_z"]
    assert abs(last["loss/total"] - want_total) < 1e-5 * want_total
    for layer in (0, 1):
        assert abs(sum(last[f"router/L{layer}/load/e{j}"] for j in range(4)) - 1) < 1e-6
        assert last[f"router/L{layer}/imbalance"] >= 1.0 and f"router/L{layer}/bias/e0" in last
        assert last[f"router/L{layer}/dropped_frac"] == 0.0
    assert (tmp_path / "a" / "router" / "step_0000006.png").is_file()

    offline = next((tmp_path / "a" / "wandb").glob("offline-run-*"))
    out = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--json", str(offline)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    history = [json.loads(line)["history"]["item"] for line in out.stdout.splitlines() if '"history"' in line]
    final = [h for h in history if h.get("_step") == 6 and "router/L0/imbalance" in h]
    assert final and final[-1]["router/L0/imbalance"] == last["router/L0/imbalance"]
    assert any(h.get("router/load.format") == "png" for h in history)

    report = draw_report(tmp_path / "a")
    assert report.with_name("report_router.png").is_file()

    exported = export_safetensors(tmp_path / "b", tmp_path / "moe.safetensors")
    model = build_model(FLAVORS["moe_debug"])
    load_model_weights(model, exported)
    for k, v in resumed.engine.module.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_init_from_a_dense_checkpoint_upcycles(tmp_path):
    """``checkpoint.init_from`` of a dense model's weights into an MoE model: the experts start
    as copies, and the outputs equal the dense model's (up to a 2-term sum's rounding)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    dense = build_model(FLAVORS["debug"])
    save_file(dense.state_dict(), str(tmp_path / "dense.safetensors"))
    cfg = FLAVORS["moe_debug"]
    import dataclasses

    moe = build_model(dataclasses.replace(cfg, moe_shared_experts=0, moe_ffn_dim=0))
    load_model_weights(moe, tmp_path / "dense.safetensors")
    batch = make_batch()
    with torch.no_grad():
        got, ref = moe(batch), dense(batch)
    torch.testing.assert_close(got["lm"], ref["lm"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["flow"], ref["flow"], rtol=1e-5, atol=1e-6)


def test_motmoe_debug_trains_resumes_bitwise_and_exports(shapes_dir, tmp_path):
    # MoT x MoE: each tower's FFN is an MoE; its router statistics are logged per tower
    args = ["model=motmoe_debug", "trainer.steps=4", "checkpoint.every=100", "trainer.log_every=2"]
    trainer = make_trainer(shapes_dir, tmp_path / "m", args)
    model = trainer.engine.module
    assert type(model.layers[0]).__name__ == "MoTMoEBlock"
    assert all(type(t.feed_forward).__name__ == "MoEFeedForward" for t in model.layers[0].towers)
    trainer.train()
    last = json.loads((tmp_path / "m" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["loss/moe_balance"] > 0 and torch.isfinite(torch.tensor(last["loss/total"]))
    for key in ("router/L0/imbalance", "router/L0/T1/imbalance"):
        assert key in last, sorted(k for k in last if k.startswith("router/"))

    # stopped at step 2 (a checkpoint) and resumed: the uninterrupted run's losses and weights
    resumed = stopped_and_resumed(shapes_dir, tmp_path / "r", args, 2)
    resumed.train()
    a, b = losses(tmp_path / "m"), losses(tmp_path / "r")
    assert sorted(a) == sorted(b) == [2, 4] and a == b, "losses after resume differ from the uninterrupted run"
    for (n, p), q in zip(trainer.engine.module.state_dict().items(), resumed.engine.module.state_dict().values()):
        assert torch.equal(p, q), n

    exported = export_safetensors(tmp_path / "r", tmp_path / "motmoe.safetensors")
    plain = build_model(FLAVORS["motmoe_debug"])
    load_model_weights(plain, exported)
    for k, v in resumed.engine.module.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k
