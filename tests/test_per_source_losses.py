# Per-source losses: loss/<name>/<source> normalised by the source's own counts; main losses unchanged.
import torch

from mmgen.models import FLAVORS, build_model
from mmgen.models.tokenizers.text import ByteTokenizer
from mmgen.objectives import ObjectiveConfig, build_objective, weighted_total
from mmgen.objectives.flow import sample_flow
from mmgen.sampling.batching import build_batch, image_to_text_doc, text_to_image_doc

TOK = ByteTokenizer()
PATCH_DIM = FLAVORS["debug"].patch_dim
SOURCES = ("laion", "mmc4")


def _docs():
    gen = torch.Generator().manual_seed(0)
    img = lambda h, w: torch.rand(h * w, PATCH_DIM, generator=gen) * 2 - 1  # noqa: E731
    return [text_to_image_doc(TOK, "a red circle", img(2, 3), (1, 2, 3)),
            image_to_text_doc(TOK, img(2, 2), (1, 2, 2), "blue square"),
            text_to_image_doc(TOK, "green", img(3, 3), (1, 3, 3)),
            [[TOK.bos] + TOK.encode("plain text only") + [TOK.eos]]]


def _batch(docs, names, seq_len=None):
    batch = build_batch(docs, TOK, seq_len=seq_len, patch_dim=PATCH_DIM)
    batch.meta["source"] = list(names)          # one per document, as the data pipeline sets it
    return batch


def _model():
    torch.manual_seed(0)
    model = build_model(FLAVORS["debug"])
    torch.nn.init.normal_(model.visual_out.weight, std=0.1)
    return model


def test_per_source_losses_split_the_main_loss_and_leave_it_bit_identical():
    model, docs = _model(), _docs()
    names = ["laion", "mmc4", "mmc4", "laion"]
    batch = _batch(docs, names)
    plain = build_objective(ObjectiveConfig())
    split = build_objective(ObjectiveConfig(), SOURCES)
    assert build_objective(ObjectiveConfig(), ("only",)).sources == ()   # one source: no repeat
    counts = split.local_counts(batch)
    # own counts: text targets and visual target positions of each source's documents
    for src in SOURCES:
        mine = [i for i, n in enumerate(names) if n == src]
        sub = build_batch([docs[i] for i in mine], TOK, patch_dim=PATCH_DIM)
        own = plain.local_counts(sub)
        assert int(counts[f"text/{src}"]) == int(own["text"])
        assert int(counts[f"visual/{src}"]) == int(own["visual"])
    sample = sample_flow(batch, plain.cfg, torch.Generator().manual_seed(1))
    ref = plain.losses(model, batch, sample, plain.local_counts(batch))
    got = split.losses(model, batch, sample, counts)
    for k in ref:                                   # main losses: same bits
        assert torch.equal(ref[k], got[k]), k
    for loss in ("text", "visual"):                 # count-weighted per-source = main
        weighted = sum(got[f"{loss}/{s}"] * counts[f"{loss}/{s}"] for s in SOURCES)
        torch.testing.assert_close(weighted / counts[loss], ref[loss], rtol=1e-5, atol=1e-6)
        assert not got[f"{loss}/laion"].requires_grad
        assert float(got[f"{loss}/laion"]) != float(got[f"{loss}/mmc4"])
    # the per-source view is not part of the total
    assert torch.equal(weighted_total(got, {"text": 1.0, "visual": 1.0}),
                       weighted_total(ref, {"text": 1.0, "visual": 1.0}))


def test_per_source_loss_is_normalised_by_global_counts_across_micro_batches():
    model, docs = _model(), _docs()
    names = ["laion", "mmc4", "laion", "mmc4"]
    objective = build_objective(ObjectiveConfig(), SOURCES)
    whole = _batch(docs, names)
    parts = [_batch(docs[:2], names[:2], seq_len=whole.shape[1]),
             _batch(docs[2:], names[2:], seq_len=whole.shape[1])]
    counts = [objective.local_counts(b) for b in parts]
    total = {k: sum(c[k] for c in counts) for k in counts[0]}
    assert total == objective.local_counts(whole)
    sample = sample_flow(whole, objective.cfg, torch.Generator().manual_seed(2))
    ref = objective.losses(model, whole, sample, total)
    n0, s0 = parts[0].patches.shape[0], len(parts[0].spans)
    from tests.test_objectives import _slice_sample

    got = [objective.losses(model, p, _slice_sample(sample, *sl), total)
           for p, sl in zip(parts, [(slice(0, n0), slice(0, s0)), (slice(n0, None), slice(s0, None))])]
    for k in (f"{loss}/{s}" for loss in ("text", "visual") for s in SOURCES):
        torch.testing.assert_close(got[0][k] + got[1][k], ref[k], rtol=1e-5, atol=1e-6)


def test_document_sources_maps_positions_to_the_run_list():
    docs = _docs()
    batch = _batch(docs, ["mmc4", "laion", "other", "mmc4"], seq_len=64)
    idx = batch.document_sources(SOURCES)
    assert set(idx[batch.document_ids == 0].tolist()) == {1}
    assert set(idx[batch.document_ids == 1].tolist()) == {0}
    assert set(idx[batch.document_ids == 2].tolist()) == {-1}      # not a run source
    assert (idx[batch.document_ids < 0] == -1).all()               # padding
    batch.meta.pop("source")
    assert (batch.document_sources(SOURCES) == -1).all()
