# Token-choice MoE: routing, capacity, aux-free bias, shared experts, expert kernels, upcycling, router metrics.
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F

from mmgen.metrics.flops import BatchWork, forward_flops
from mmgen.metrics.router import RouterMonitor, loads_from_record
from mmgen.models import FLAVORS, ModelConfig, build_model
from mmgen.models.moe import (BALANCE, ZLOSS, MoEFeedForward, active_params, aux_loss_weights,
                              collect_router_stats, step_loads, update_expert_bias, upcycle_state_dict)
from tests.test_model import make_batch

# dim 16 keeps torch._grouped_mm's 16-byte stride rule (fp32) so the grouped path really runs it
CFG = ModelConfig(dim=16, n_heads=2, n_kv_heads=1, ffn_dim=24, block="moe", moe_experts=4, moe_top_k=2,
                  moe_ffn_dim=32)


def ffn(seed: int = 0, **kw) -> MoEFeedForward:
    torch.manual_seed(seed)
    m = MoEFeedForward(dataclasses.replace(CFG, **kw))
    m.init_weights(0.3, 0.3)   # large weights: outputs far from 0, differences visible
    return m


def swiglu(x, m: MoEFeedForward, e: int):
    w = m.experts
    return (F.silu(x @ w.w1[e]) * (x @ w.w3[e])) @ w.w2[e]


def test_output_equals_per_token_reference():
    """Every token's output is the weighted sum of its chosen experts (naive loop over tokens)
    plus the shared experts; softmax and sigmoid scores; 2-D and 3-D input."""
    for score in ("softmax", "sigmoid"):
        m = ffn(moe_score=score, moe_shared_experts=1)
        x = torch.randn(3, 5, 16)
        y, aux = m(x)
        r = m.router(x.reshape(-1, 16))
        ref = torch.stack([sum(r.weights[t, j] * swiglu(xt, m, int(r.experts[t, j])) for j in range(2))
                           + m.shared(xt) for t, xt in enumerate(x.reshape(-1, 16))])
        torch.testing.assert_close(y.reshape(-1, 16), ref, rtol=1e-5, atol=1e-6)
        assert set(aux) == {BALANCE, ZLOSS} and all(v.dim() == 0 for v in aux.values())
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(15))   # moe_norm_topk
        y2, _ = m(x.reshape(-1, 16))
        torch.testing.assert_close(y2, y.reshape(-1, 16))


@pytest.mark.parametrize("capacity", [0.0, 0.75])
def test_grouped_experts_match_the_loop(capacity):
    """torch._grouped_mm and the padded bmm give the loop's outputs and gradients (fp32: only
    the summation order may differ; 1e-5 is ~100 ulps of these O(1) values)."""
    assert hasattr(torch, "_grouped_mm")
    m = ffn(moe_capacity_factor=capacity)
    x = torch.randn(40, 16)
    routing = m.router(x)
    order = torch.sort(torch.where(routing.keep.reshape(-1), routing.experts.reshape(-1), 4), stable=True).indices
    order = order[:int(routing.keep.sum())]
    counts = torch.bincount(routing.experts.reshape(-1)[order], minlength=4).tolist()
    rows = x[order // 2]
    results = {}
    for name, fn in (("loop", m.experts._loop), ("grouped_mm", m.experts._grouped_mm),
                     ("bmm", m.experts._padded_bmm)):
        m.zero_grad()
        out = fn(rows, counts)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results[name] = (out.detach(), [p.grad.clone() for p in m.experts.parameters()])
    for name in ("grouped_mm", "bmm"):
        torch.testing.assert_close(results[name][0], results["loop"][0], rtol=1e-5, atol=1e-5)
        for g, ref in zip(results[name][1], results["loop"][1]):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)
    # and the whole FFN, module path selection included
    y_loop, _ = ffn(moe_experts_impl="loop", moe_capacity_factor=capacity)(x)
    y_grouped, _ = ffn(moe_experts_impl="grouped", moe_capacity_factor=capacity)(x)
    torch.testing.assert_close(y_grouped, y_loop, rtol=1e-5, atol=1e-5)


def constructed_ffn(top_k: int, capacity: float, shared: int = 0) -> MoEFeedForward:
    """A router whose choice is readable from the input: dim 16, expert e scores x[e] * 10, so
    a token with x = onehot(a) * 1 + onehot(b) * 0.5 picks a first, b second."""
    m = ffn(moe_top_k=top_k, moe_capacity_factor=capacity, moe_shared_experts=shared)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[:, :4] = torch.eye(4) * 10
    return m


def tokens(pairs) -> torch.Tensor:
    x = torch.zeros(len(pairs), 16)
    for t, (a, b) in enumerate(pairs):
        x[t, a], x[t, b] = 1.0, 0.5
        x[t, 4 + t % 12] = 0.3    # distinct tokens, no effect on routing
    return x


def test_capacity_drops_exactly_the_tokens_it_should():
    # 8 tokens, 4 experts, top-1, factor 1: capacity ceil(8 / 4) = 2 per expert
    pairs = [(0, 1)] * 5 + [(1, 0), (2, 0), (2, 0)]
    m = constructed_ffn(top_k=1, capacity=1.0)
    r = m.router(tokens(pairs))
    assert r.capacity == 2 and r.experts[:, 0].tolist() == [0, 0, 0, 0, 0, 1, 2, 2]
    assert r.keep[:, 0].tolist() == [True, True, False, False, False, True, True, True]
    y, _ = m(tokens(pairs))
    assert (y[2:5] == 0).all() and (y[[0, 1, 5, 6, 7]].abs().sum(-1) > 0).all()
    # top-2, factor 0.5: capacity ceil(0.5 * 8 * 2 / 4) = 2; every first choice goes before any
    # second choice, then token order
    m = constructed_ffn(top_k=2, capacity=0.5)
    pairs = [(0, 1), (0, 1), (1, 0), (2, 3), (3, 2), (3, 2), (3, 2), (1, 3)]
    r = m.router(tokens(pairs))
    assert r.capacity == 2
    # expert 0: first choices of tokens 0, 1 -> full; the second choice of token 2 dropped
    # expert 1: first choices of 2 and 7, so the second choices of 0 and 1 are dropped
    # expert 2: first choice of 3, second choice of 4 kept, of 5 and 6 dropped
    # expert 3: first choices of 4 and 5; first choice of 6 dropped, seconds of 3 and 7 too
    assert r.keep.tolist() == [[True, False], [True, False], [True, False], [True, False],
                               [True, True], [True, False], [False, False], [True, False]]
    assert (r.weights[~r.keep] == 0).all()
    y, _ = m(tokens(pairs))
    assert (y[6] == 0).all()
    # dropless: nothing dropped whatever the load
    assert constructed_ffn(top_k=2, capacity=0.0).router(tokens(pairs)).keep.all()


def test_shared_experts_see_every_token():
    # tight capacity (most routed assignments dropped) and routed experts that output 0:
    # what is left is the shared expert, on every token
    m = constructed_ffn(top_k=1, capacity=0.25, shared=1)
    with torch.no_grad():
        m.experts.w2.zero_()
    x = tokens([(0, 1)] * 8)
    assert int(m.router(x).keep.sum()) == 1
    y, _ = m(x)
    torch.testing.assert_close(y, m.shared(x))
    assert (y.abs().sum(-1) > 0).all()
    # and the shared expert's gradient reaches every token
    x.requires_grad_(True)
    m(x)[0].sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all()


def test_aux_free_bias_balances_a_skewed_router():
    """A router that sends ~all tokens to expert 0 first; the bias update alone (no gradient
    step) brings max/mean load from > 3 to under 1.25 within 12 updates at rate 0.02, and it
    stays there (stated bound; the sign update then oscillates by +-rate around balance)."""
    m = ffn(moe_score="sigmoid", moe_top_k=1, moe_bias_update_rate=0.02).train()
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[:, 0] = torch.tensor([3.0, 1.0, 0.0, -1.0])   # feature 0 is constant 1
        m.router.weight[:, 1:] = torch.randn(4, 15) * 0.3
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 16, generator=gen)
    x[:, 0] = 1.0

    def imbalance():
        load = torch.bincount(m.router(x).experts.flatten(), minlength=4).float()
        return float(load.max() / load.mean())

    before = imbalance()
    assert before > 3.0, before
    history = []
    for _ in range(20):
        m(x)
        update_expert_bias(torch.nn.Module(), None, 0.0)      # a model without MoE: no-op
        wrapper = torch.nn.Module()
        wrapper.layers = torch.nn.ModuleList([m])
        update_expert_bias(wrapper, step_loads(wrapper), 0.02)
        history.append(imbalance())
    # measured: 3.41 -> 1.16 after 10 updates, then oscillating between 1.07 and 1.19
    assert all(h < 1.25 for h in history[12:]), history
    assert m.router.expert_bias[0] < 0 < m.router.expert_bias[3]
    assert "router.expert_bias" in dict(m.named_buffers())    # checkpointed
    assert m._step_load is None                                # counters reset per step


def test_upcycled_model_matches_the_dense_one_at_step_zero():
    dense_cfg = FLAVORS["debug"]
    torch.manual_seed(0)
    dense = build_model(dense_cfg)
    moe_cfg = dataclasses.replace(dense_cfg, block="moe", moe_experts=4, moe_top_k=2, moe_every=1)
    batch = make_batch()
    with torch.no_grad():
        ref = dense(batch)
    for router in ("keep", "zero"):
        torch.manual_seed(1)
        moe = build_model(moe_cfg)
        moe.load_state_dict(upcycle_state_dict(moe, dense.state_dict(), router=router))
        with torch.no_grad():
            out = moe(batch)
        # copies of one FFN, weights summing to 1: only the order of a 2-term sum differs
        for head in ("lm", "flow"):
            torch.testing.assert_close(out[head], ref[head], rtol=1e-5, atol=1e-6)
        assert set(out["aux"]) == {BALANCE, ZLOSS}
    bad = dataclasses.replace(moe_cfg, moe_shared_experts=1)
    with pytest.raises(ValueError, match="shared experts"):
        upcycle_state_dict(build_model(bad), dense.state_dict())


def test_flops_count_active_parameters_only():
    work = BatchWork(positions=100, tokens=90, text_targets=10, visual_positions=20, spans=2, attention_pairs=900)
    dense = forward_flops(FLAVORS["debug"], work)["linear"]
    moe_cfg = dataclasses.replace(FLAVORS["debug"], block="moe", moe_experts=8, moe_top_k=2, moe_every=2)
    moe16 = dataclasses.replace(moe_cfg, moe_experts=16)
    d, f = 64, 192
    # one MoE layer of two: router + 2 experts instead of one dense SwiGLU
    assert forward_flops(moe_cfg, work)["linear"] - dense == 90 * (2 * d * 8 + 2 * 3 * 2 * d * f - 3 * 2 * d * f)
    # doubling the experts adds only the router's extra columns
    assert forward_flops(moe16, work)["linear"] - forward_flops(moe_cfg, work)["linear"] == 90 * 2 * d * 8
    total, active = active_params(FLAVORS["moe_8x"])
    assert 0.95e9 < active < 1.1e9 and total > 3 * active
    assert aux_loss_weights(FLAVORS["debug"]) == {}
    assert aux_loss_weights(moe_cfg) == {BALANCE: 0.01, ZLOSS: 0.001}


def test_dense_default_is_untouched():
    cfg = ModelConfig()
    assert cfg.moe_experts == 0 and cfg.block == "dense"
    names = [n for n, _ in build_model(cfg, device="meta").named_parameters()]
    assert not any("router" in n or "experts" in n for n in names)
    with pytest.raises(ValueError, match="moe_experts > 0"):
        ModelConfig(block="moe").validate()
    with pytest.raises(ValueError, match="moe_top_k"):
        ModelConfig(block="moe", moe_experts=2, moe_top_k=3).validate()


def test_router_metrics_and_dead_expert_warning(caplog, tmp_path):
    """A constructed router that never picks expert 3: reported dead after K=2 intervals, once;
    loads, imbalance, dropped fraction and entropy are those of the counts."""
    m = constructed_ffn(top_k=1, capacity=1.0).train()
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([m])
    x = tokens([(0, 1)] * 4 + [(1, 0), (2, 0)] * 2)      # loads 4, 2, 2, 0 of 8
    monitor = RouterMonitor(dead_after=2)
    with caplog.at_level(logging.WARNING, logger="mmgen.metrics.router"):
        for interval in range(3):
            m(x, modality=torch.tensor([0, 1] * 4))
            m(x, modality=torch.tensor([0, 1] * 4))
            values = monitor.metrics(collect_router_stats(model), step=interval)
            assert values["router/dead_experts"] == (1.0 if interval >= 1 else 0.0)
    assert sum("expert 3 received no tokens for 2 consecutive" in r.message for r in caplog.records) == 1
    assert [values[f"router/L0/load/e{j}"] for j in range(4)] == [0.5, 0.25, 0.25, 0.0]
    assert values["router/L0/imbalance"] == 2.0
    assert values["router/L0/dropped_frac"] == 0.25        # capacity 2: two of expert 0's four dropped
    with torch.no_grad():
        p = torch.softmax(m.router(x).logits, -1)
    entropy = float(-(p * p.log()).sum(-1).mean())
    assert abs(values["router/L0/entropy"] - entropy) < 1e-5
    assert values["router/L0/text/load/e0"] == 0.5 and "router/L0/image/load/e1" in values
    # eval-mode forwards (sampling) are not counted
    m.eval()
    m(x)
    assert collect_router_stats(model)[0]["tokens"] == 0
    path = monitor.heatmap(tmp_path / "heat.png")
    assert path.is_file() and path.stat().st_size > 1000
    layers, shares = loads_from_record(values)
    assert layers == [0] and shares.tolist() == [[0.5, 0.25, 0.25, 0.0]]


def test_stats_are_not_counted_twice_under_activation_checkpointing():
    from torch.utils.checkpoint import checkpoint

    m = ffn().train()
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([m])
    x = torch.randn(10, 16, requires_grad=True)
    y = checkpoint(lambda t: m(t)[0], x, use_reentrant=False)
    y.sum().backward()     # recomputes the forward inside the backward
    assert float(collect_router_stats(model)[0]["tokens"]) == 10
    assert float(step_loads(model).sum()) == 20


def test_compiled_grouped_experts_fall_back_where_grouped_mm_takes_bf16_only():
    """Under torch.compile, torch._grouped_mm's meta function takes bf16 only (on any device):
    an fp32 MoE compiled on CPU failed in dynamo before; the grouped impl now runs padded bmm
    there, and matches the loop."""
    from mmgen.models.moe import Experts

    torch.manual_seed(0)
    experts = Experts(4, 16, 32, "grouped")
    experts.init_weights(0.1, 0.1)
    x = torch.randn(24, 16)
    counts = [10, 0, 6, 8]
    compiled = torch.compile(lambda rows: experts(rows, counts), backend="eager", fullgraph=False)
    torch.testing.assert_close(compiled(x), experts(x, counts, impl="loop"), rtol=1e-5, atol=1e-6)
