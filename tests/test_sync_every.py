# trainer.sync_every: steps queued without the host reading their losses, on CPU.
from __future__ import annotations

import pytest
import torch

from tests.test_faults import poison_steps
from tests.test_trainer import losses, make_trainer

STEPS = ["trainer.steps=8", "trainer.log_every=4", "checkpoint.enabled=false"]


def adam_steps(trainer) -> set[int]:
    """The AdamW step counts of every parameter (one number when all were updated alike)."""
    return {int(s["step"]) for s in trainer.engine.optimizer.state.values()}


def test_deferred_reads_train_like_reading_every_step(shapes_dir, tmp_path):
    """sync_every=4 (the step skips or clips on the device, the host reads every 4 steps) gives
    the losses, counts and weights of reading every step with the same fused AdamW; the clip
    factor is applied inside the fused kernel (a division instead of a multiplication), so the
    two agree to rounding, not bitwise."""
    every = make_trainer(shapes_dir, tmp_path / "every", [*STEPS, "trainer.sync_every=1", "optim.fused_cpu=true",
                                                          "optim.grad_clip=0.05"])
    deferred = make_trainer(shapes_dir, tmp_path / "deferred", [*STEPS, "trainer.sync_every=4",
                                                                "optim.grad_clip=0.05"])
    assert every.sync_every == 1 and deferred.sync_every == 4
    assert deferred.engine.optimizer.defaults["fused"] and every.engine.optimizer.defaults["fused"]
    reads = []
    real = deferred.resolve_pending
    deferred.resolve_pending = lambda: reads.append(len(deferred.pending)) or real()
    every.train()
    deferred.train()
    assert reads == [4, 4], "the host read the queued steps once per 4 steps"
    a, b = losses(tmp_path / "every"), losses(tmp_path / "deferred")
    assert sorted(a) == sorted(b) == [4, 8]
    for step in a:
        for key in ("loss/total", "loss/text", "loss/visual", "optim/grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)
    assert a[4]["optim/grad_norm"] > 0.05, "the clip was active (else this would not test it)"
    assert deferred.state.tokens_seen == every.state.tokens_seen > 0
    assert deferred.state.visual_positions_seen == every.state.visual_positions_seen > 0
    for (name, p), q in zip(every.engine.module.named_parameters(), deferred.engine.module.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


def test_deferred_nonfinite_steps_are_skipped_on_the_device_and_counted_at_the_read(shapes_dir, tmp_path):
    from mmgen.trainer.trainer import NonFiniteLossError

    t = make_trainer(shapes_dir, tmp_path, [*STEPS, "trainer.sync_every=4", "trainer.max_nonfinite_steps=2"])
    poison_steps(t, {3, 6, 7, 8})   # one isolated bad step (read at 4), then three in a row (read at 8)
    seen = {}
    t.metrics.log = lambda step, values: seen.update({step: (values, adam_steps(t))})
    with pytest.raises(NonFiniteLossError, match="aborting at step 8: 3 consecutive"):
        t.train()
    assert t.state.nonfinite_steps == 4
    # at the read of step 4: 3 updates (step 3 skipped on the device), 1 non-finite step so far
    assert seen[4][1] == {3} and seen[4][0]["optim/nonfinite_steps"] == 1
    assert adam_steps(t) == {4}, "steps 6-8 were skipped too: only steps 1, 2, 4, 5 updated"
    assert all(torch.isfinite(p).all() for p in t.engine.module.parameters())


def test_sync_every_falls_back_to_every_step_where_the_engine_cannot_skip_on_the_device(shapes_dir, tmp_path):
    # the plain (foreach) AdamW needs the host to know the loss before it steps
    t = make_trainer(shapes_dir, tmp_path, [*STEPS, "trainer.sync_every=4", "optim.fused=false"])
    assert not t.engine.can_step_on_device and t.sync_every == 1
    # CPU default: read every step
    t = make_trainer(shapes_dir, tmp_path / "b", STEPS)
    assert t.sync_every == 1 and not t.engine.optimizer.defaults["fused"]


def test_scatter_add_lookup_matches_the_embedding_backward():
    """mmgen's Embedding on CUDA runs _ScatterAddLookup (no host sync in its backward); the
    function itself is device-independent, so its forward and gradient are checked here against
    torch's embedding on CPU, repeated ids included."""
    from mmgen.models.layers import _ScatterAddLookup

    torch.manual_seed(0)
    weight = torch.randn(50, 8, requires_grad=True)
    ids = torch.randint(0, 50, (3, 40))
    ids[0, :10] = 7                                       # one id many times
    upstream = torch.randn(3, 40, 8)
    ours = _ScatterAddLookup.apply(weight, ids)
    (ours * upstream).sum().backward()
    grad_ours, weight.grad = weight.grad, None
    ref = torch.nn.functional.embedding(ids, weight)
    (ref * upstream).sum().backward()
    assert torch.equal(ours, ref)
    torch.testing.assert_close(grad_ours, weight.grad, rtol=1e-6, atol=1e-6)
    assert grad_ours[7].abs().sum() > 0 and grad_ours[ids.unique()].ne(0).any(1).all()
