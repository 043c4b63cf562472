# Objectives: global-count normalisation, prediction-type conversions, reproducibility.
import dataclasses

import pytest
import torch

from mmgen.batch import IGNORE_INDEX
from mmgen.models import FLAVORS, build_model
from mmgen.models.tokenizers.text import ByteTokenizer
from mmgen.objectives import ObjectiveConfig, build_objective, weighted_total
from mmgen.objectives.flow import FlowSample, sample_flow, to_velocity
from mmgen.sampling.batching import build_batch, image_to_text_doc, text_to_image_doc




TOK = ByteTokenizer()
PATCH_DIM = FLAVORS["debug"].patch_dim


def make_docs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    img = lambda h, w: torch.rand(h * w, PATCH_DIM, generator=gen) * 2 - 1  # noqa: E731
    return [text_to_image_doc(TOK, "a red circle", img(2, 3), (1, 2, 3)),
            image_to_text_doc(TOK, img(2, 2), (1, 2, 2), "blue square"),
            text_to_image_doc(TOK, "", img(3, 3), (1, 3, 3)),
            [[TOK.bos] + TOK.encode("plain text only") + [TOK.eos]]]


def _model():
    torch.manual_seed(0)
    model = build_model(FLAVORS["debug"])
    # a non-zero visual head so the visual loss depends on the input
    torch.nn.init.normal_(model.visual_out.weight, std=0.1)
    return model


def test_local_counts():
    batch = build_batch(make_docs(), TOK)
    counts = build_objective(ObjectiveConfig()).local_counts(batch)
    assert int(counts["text"]) == int((batch.targets != IGNORE_INDEX).sum())
    assert int(counts["visual"]) == 2 * 3 + 3 * 3           # target spans only
    # text targets never point at or sit on visual positions
    assert (batch.targets[batch.span_ids >= 0] == IGNORE_INDEX).all()


def _slice_sample(sample: FlowSample, n_rows: slice, s_rows: slice) -> FlowSample:
    return FlowSample(x0=sample.x0[n_rows], noise=sample.noise[n_rows],
                      span_t=sample.span_t[s_rows], t=sample.t[n_rows],
                      x_t=sample.x_t[n_rows], is_loss=sample.is_loss[n_rows])


@pytest.mark.parametrize("prediction", ["v", "x", "eps"])
def test_split_into_micro_batches_gives_same_loss(prediction):
    model = _model()
    objective = build_objective(ObjectiveConfig(prediction=prediction))
    docs = make_docs()
    whole = build_batch(docs, TOK)
    parts = [build_batch(docs[:2], TOK), build_batch(docs[2:], TOK, seq_len=whole.shape[1])]
    counts = [objective.local_counts(b) for b in parts]
    global_counts = {k: sum(c[k] for c in counts) for k in counts[0]}
    assert global_counts == objective.local_counts(whole)

    sample = sample_flow(whole, objective.cfg, torch.Generator().manual_seed(1))
    reference = objective.losses(model, whole, sample, global_counts)
    n0, s0 = parts[0].patches.shape[0], len(parts[0].spans)
    slices = [(slice(0, n0), slice(0, s0)), (slice(n0, None), slice(s0, None))]
    split = [objective.losses(model, part, _slice_sample(sample, *sl), global_counts)
             for part, sl in zip(parts, slices)]
    for name in reference:
        torch.testing.assert_close(split[0][name] + split[1][name], reference[name],
                                   atol=1e-5, rtol=1e-5)


def test_empty_denominator_gives_zero_connected_loss():
    model = _model()
    objective = build_objective(ObjectiveConfig())
    text_only = build_batch([make_docs()[3]], TOK, patch_dim=PATCH_DIM)
    counts = objective.local_counts(text_only)
    assert int(counts["visual"]) == 0
    losses = objective(model, text_only, counts, torch.Generator().manual_seed(0))
    assert losses["visual"].item() == 0 and losses["visual"].requires_grad
    weighted_total(losses, {"text": 1.0, "visual": 1.0}).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(KeyError):
        weighted_total(losses, {"text": 1.0, "image": 1.0})


def test_prediction_conversions_agree():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(50, 8, generator=gen), torch.randn(50, 8, generator=gen)
    t = torch.rand(50, generator=gen) * 0.9 + 0.05
    x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
    v = noise - x0
    for prediction, out in (("v", v), ("x", x0), ("eps", noise)):
        torch.testing.assert_close(to_velocity(out, x_t, t, prediction, t_eps=0.01), v)


def test_condition_spans_are_clean_and_draws_are_reproducible():
    batch = build_batch(make_docs(), TOK)
    cfg = ObjectiveConfig(time_sampling="uniform")
    a = sample_flow(batch, cfg, torch.Generator().manual_seed(5))
    b = sample_flow(batch, cfg, torch.Generator().manual_seed(5))
    assert all(torch.equal(getattr(a, f.name), getattr(b, f.name))
               for f in dataclasses.fields(FlowSample))
    cond = ~batch.spans.is_target
    assert (a.span_t[cond] == 0).all() and (a.span_t[~cond] > 0).all()
    clean = a.t == 0
    assert torch.equal(a.x_t[clean], batch.patches[clean]) and torch.equal(clean, ~a.is_loss)


def test_objective_config_validation():
    for bad in (dict(prediction="score"), dict(time_sampling="cosine"), dict(t_eps=0.0)):
        with pytest.raises(ValueError):
            ObjectiveConfig(**bad).validate()
    with pytest.raises(ValueError):
        build_objective(ObjectiveConfig(name="nope"))
    text = build_objective(ObjectiveConfig(name="next_token"))
    batch = build_batch(make_docs(), TOK)
    losses = text(_model(), batch, text.local_counts(batch), None)
    assert set(losses) == {"text"} and torch.isfinite(losses["text"])
