# Trunk + registered heads: the objective picks heads and positions, aux losses, next_token under DDP.
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mmgen.cli.preflight import compose_job
from mmgen.errors import ConfigError
from mmgen.models import BLOCKS, FLAVORS, build_model
from mmgen.models.trunk import TransformerBlock
from mmgen.objectives import ObjectiveConfig, build_objective, weighted_total
from mmgen.objectives.flow import sample_flow
from tests.conftest import BIN, data_overrides, run_cli
from tests.test_model import make_batch

CFG = FLAVORS["debug"]


def _grads_after_one_step(model, objective_name: str) -> dict[str, torch.Tensor | None]:
    objective = build_objective(ObjectiveConfig(name=objective_name))
    batch = make_batch()
    losses = objective(model, batch, objective.local_counts(batch), torch.Generator().manual_seed(0))
    weighted_total(losses, {"text": 1.0, "visual": 1.0}).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("objective, heads", [("transfusion", ["lm", "flow"]), ("next_token", ["lm"])])
def test_the_objective_heads_give_every_parameter_a_gradient(objective, heads):
    """With the heads its objective names, every parameter gets a gradient (DDP's default reducer
    requires that); with Transfusion's pair, next_token leaves the flow head without one."""
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(CFG, heads=heads))
    assert model.head_names == tuple(heads)
    grads = _grads_after_one_step(model, objective)
    assert [n for n, g in grads.items() if g is None] == []
    if objective == "next_token":
        assert not hasattr(model, "visual_out")
        both = build_model(CFG)
        missing = [n for n, g in _grads_after_one_step(both, objective).items() if g is None]
        assert missing == ["visual_out.weight", "visual_out.bias"]


def test_heads_run_where_asked():
    torch.manual_seed(0)
    model = build_model(CFG)
    batch = make_batch()
    rows = torch.zeros_like(batch.targets, dtype=torch.bool)
    rows[0, :5] = True
    out = model(batch, heads={"lm": rows})
    assert sorted(out) == ["aux", "lm"] and out["lm"].shape == (5, CFG.vocab_size)
    # the same hidden states as the default call: the head is a function of h only
    everywhere = batch.document_ids >= 0
    full = model(batch, heads={"lm": everywhere})["lm"]
    torch.testing.assert_close(out["lm"], full[:5], rtol=0, atol=0)
    text_only = build_model(dataclasses.replace(CFG, heads=["lm"]))
    with pytest.raises(ValueError, match="no 'flow' head"):
        text_only(batch, heads={"flow": batch.continuous_mask()})
    assert sorted(text_only(batch)) == ["aux", "lm"]            # default: every built head


class _ZLossBlock(TransformerBlock):
    """A dense block that also reports a z-loss-style auxiliary value (the MoE block protocol)."""

    def forward(self, x, rope, mask, kv=None):
        x = super().forward(x, rope, mask, kv)
        return x, {"zloss": x.float().square().mean()}


def test_aux_losses_reach_the_objective_as_named_weighted_losses(monkeypatch):
    monkeypatch.setitem(BLOCKS, "zloss", _ZLossBlock)
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(CFG, block="zloss"))
    objective = build_objective(ObjectiveConfig())
    whole = make_batch()
    sample = sample_flow(whole, objective.cfg, torch.Generator().manual_seed(0))
    aux = model(whole, sample.x_t, sample.span_t)["aux"]
    assert set(aux) == {"zloss"} and aux["zloss"] > 0
    counts = objective.local_counts(whole)
    losses = objective.losses(model, whole, sample, counts)
    assert sorted(losses) == ["text", "visual", "zloss"]
    # one micro-batch is the whole step: the aux loss is the trunk's value (summed over blocks)
    torch.testing.assert_close(losses["zloss"], aux["zloss"])
    with pytest.raises(KeyError, match="zloss"):             # a weight for every loss
        weighted_total(losses, {"text": 1.0, "visual": 1.0})
    weighted_total(losses, {"text": 1.0, "visual": 1.0, "zloss": 1e-3}).backward()
    assert model.layers[0].attention.wq.weight.grad is not None
    # half the step's positions: half the weight (position-weighted mean over micro-batches)
    doubled = {**counts, "positions": 2 * counts["positions"]}
    torch.testing.assert_close(objective.losses(model, whole, sample, doubled)["zloss"],
                               aux["zloss"] / 2)


def test_model_heads_follow_the_objective_in_a_job():
    assert compose_job([]).model.heads == ["lm", "flow"]
    assert compose_job(["objective=next_token", "model=small"]).model.heads == ["lm"]
    with pytest.raises(ConfigError, match="no gradient"):
        compose_job(["objective=next_token", "model.heads=[lm,flow]"])
    with pytest.raises(ConfigError, match="lacks"):
        compose_job(["model.heads=[lm]"])
    with pytest.raises(ConfigError, match="model.heads"):
        compose_job(["model.heads=[lm,flow,mar]"])


def test_next_token_trains_under_two_process_ddp(shapes_dir, tmp_path):
    """DDP's default reducer (find_unused_parameters=false) stops at step 2 if a parameter got
    no gradient in step 1, so finishing every step means every parameter trained; the run
    directory then rebuilds the same lm-only model for sampling and export."""
    run = tmp_path / "nt"
    args = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "mmgen.train",
            "experiment=smoke", "objective=next_token", *data_overrides(shapes_dir), f"run_dir={run}",
            "data.num_workers=0", "trainer.steps=8", "trainer.log_every=1", "trainer.num_threads=1",
            "metrics.progress=false", "optim.warmup_steps=2", "checkpoint.every=8"]
    r = run_cli(args, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [rec["loss/text"] for rec in records if "loss/text" in rec]
    assert len(curve) == 8 and all("loss/visual" not in rec for rec in records)
    assert curve[-1] < curve[0] - 0.1, curve
    from mmgen.cli.main import _load_run

    job, model, _ = _load_run(str(run))           # strict load of the checkpoint
    assert job.model.heads == ["lm"] and model.head_names == ("lm",)
