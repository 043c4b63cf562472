# The unified transformer: shapes, init on the meta device, GQA, masking behaviour, overfitting.
import dataclasses

import pytest
import torch

from mmgen.batch import IGNORE_INDEX
from mmgen.models import FLAVORS, UnifiedTransformer, build_model, num_params
from mmgen.models.tokenizers.text import ByteTokenizer
from mmgen.objectives import ObjectiveConfig, build_objective, weighted_total
from mmgen.sampling.batching import image_to_text_doc, pack_rows, text_to_image_doc




TOK = ByteTokenizer()
CFG = FLAVORS["debug"]


def make_batch(seed: int = 0, seq_len: int = 64):
    """Two packed rows: a text-to-image and an image-to-text document, then padding."""
    gen = torch.Generator().manual_seed(seed)
    img = lambda g: torch.rand(g[1] * g[2], CFG.patch_dim, generator=gen) * 2 - 1  # noqa: E731
    rows = [[text_to_image_doc(TOK, "red circle", img((1, 2, 3)), (1, 2, 3)),
             image_to_text_doc(TOK, img((1, 2, 2)), (1, 2, 2), "blue")],
            [image_to_text_doc(TOK, img((1, 3, 2)), (1, 3, 2), "green square"),
             text_to_image_doc(TOK, "dot", img((1, 2, 2)), (1, 2, 2))]]
    return pack_rows(rows, TOK, seq_len)


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True, "visual_pos": "none",
                                            "qk_norm": False}])
def test_forward_shapes(overrides):
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(CFG, **overrides))
    batch = make_batch()
    out = model(batch)
    n_targets = int((batch.targets != IGNORE_INDEX).sum())
    assert out["lm"].shape == (n_targets, CFG.vocab_size)
    assert out["flow"].shape == (batch.patches.shape[0], CFG.patch_dim)
    assert torch.isfinite(out["lm"]).all()
    assert out["aux"] == {}                              # dense blocks have no auxiliary loss


def test_meta_build_equals_normal_build():
    meta_cfg = dataclasses.replace(CFG, tie_embeddings=True)
    for cfg in (CFG, meta_cfg):
        with torch.device("meta"):
            lazy = build_model(cfg)
        assert all(p.is_meta for p in lazy.parameters())
        lazy.to_empty(device="cpu")
        for p in lazy.parameters():
            p.data.fill_(float("nan"))
        torch.manual_seed(3)
        lazy.init_weights()
        torch.manual_seed(3)
        eager = build_model(cfg)
        plain = UnifiedTransformer(cfg)
        torch.manual_seed(3)
        plain.init_weights()
        for (name, a), b, c in zip(lazy.state_dict().items(), eager.state_dict().values(),
                                   plain.state_dict().values()):
            assert not a.isnan().any(), f"{name} not initialised"
            assert torch.equal(a, b) and torch.equal(a, c), name


def test_gqa_and_validation():
    cfg = dataclasses.replace(CFG, n_heads=4, n_kv_heads=1)
    model = build_model(cfg)
    assert model.layers[0].attention.wk.weight.shape == (cfg.head_dim, cfg.dim)
    out = model(make_batch())
    assert torch.isfinite(out["flow"]).all()
    bads = (dict(n_kv_heads=3), dict(dim=66), dict(attention="xformers"), dict(max_grid=[1, 2]))
    for bad in bads:
        with pytest.raises(ValueError):
            dataclasses.replace(CFG, **bad).validate()


def test_logits_only_at_text_targets():
    torch.manual_seed(0)
    model = build_model(CFG)
    batch = make_batch()
    full = model(batch)["lm"]
    keep = batch.targets != IGNORE_INDEX
    first = keep.flatten().nonzero()[0]
    batch.targets.view(-1)[first] = IGNORE_INDEX        # drop one target: one row fewer
    fewer = model(batch)["lm"]
    torch.testing.assert_close(fewer, full[1:])


def _output_change(model, edit) -> torch.Tensor:
    """Max change of the text logits at each position of row 0 when ``edit(batch)`` is applied.
    Every position gets a dummy target so logits come out everywhere (the visual head is
    zero-initialised and would hide changes)."""
    def logits(batch):
        real = batch.document_ids >= 0
        batch.targets = torch.where(real, torch.zeros_like(batch.targets), IGNORE_INDEX)
        return model(batch)["lm"][:int(real[0].sum())]
    batch = make_batch()
    before = logits(batch)
    edit(batch)
    return (logits(batch) - before).abs().amax(-1)


def test_text_is_causal_and_spans_are_bidirectional():
    torch.manual_seed(0)
    model = build_model(CFG)
    batch = make_batch()
    doc0 = int((batch.document_ids[0] == 0).sum())      # row 0 = [t2i doc 0][i2t doc 1]
    span0, len0 = int(batch.spans.start[0]), int(batch.spans.length[0])

    caption_pos = 3                                      # a byte of "red circle"
    delta = _output_change(model, lambda b: b.tokens[0].__setitem__(caption_pos, 120))
    assert delta[:caption_pos].max() == 0                # earlier text: causal
    assert delta[caption_pos:doc0].min() > 0
    assert delta[doc0:].max() == 0                       # no attention across documents

    def edit_last_patch(b):
        b.patches[len0 - 1] += 1.0
    delta = _output_change(model, edit_last_patch)
    assert delta[:span0].max() == 0                      # the caption before the span
    assert delta[span0:span0 + len0 - 1].min() > 0       # earlier patches of the same span
    assert delta[span0 + len0:doc0].min() > 0            # text after the span
    assert delta[doc0:].max() == 0


def test_num_params():
    model = build_model(CFG)
    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for n, p in model.named_parameters()
              if "tok_embeddings" in n or "visual_pos" in n)
    assert num_params(model, exclude_embedding=False) == total
    assert num_params(model) == total - emb
    with torch.device("meta"):
        small = UnifiedTransformer(FLAVORS["small"])
        big = UnifiedTransformer(FLAVORS["1b"])
    assert 80e6 < num_params(small) < 130e6
    assert 1.1e9 < num_params(big) < 1.3e9


def test_debug_model_overfits_one_batch():
    torch.manual_seed(0)
    model = build_model(CFG)
    objective = build_objective(ObjectiveConfig())
    batch = make_batch()
    counts = objective.local_counts(batch)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(50):
        # the same draw every step, so the visual loss can be memorised too
        losses = objective(model, batch, counts, torch.Generator().manual_seed(0))
        loss = weighted_total(losses, {"text": 1.0, "visual": 1.0})
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    assert history[-1]["text"] < 0.2 * history[0]["text"]
    assert history[-1]["visual"] < 0.5 * history[0]["visual"]
