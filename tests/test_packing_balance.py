# Compute-balanced packing: the per-document estimate is the FLOP model; budgets keep resume and layout invariance.
import json

import pytest
import torch

from mmgen import documents
from mmgen.batch import CAUSAL, IMAGE, VIDEO
from mmgen.data import DataConfig, build_dataloader
from mmgen.data.pack import BatchPacker, DocumentCost
from mmgen.metrics.flops import training_flops, unit_costs
from mmgen.models import FLAVORS
from mmgen.models.tokenizers.text import ByteTokenizer

MODEL = FLAVORS["debug"]


def _doc(text: int, grid, modality=IMAGE, target=True, attention=None):
    t, h, w = grid
    vis = documents.Visual(torch.zeros(t * h * w, 1), grid, modality, target,
                           **({"attention": attention} if attention is not None else {}))
    return documents.build_document([[1], [65] * text, [2], vis, [3], [4]], 9, {"source": "s"})


def test_document_cost_is_the_flop_model_of_the_packed_batch():
    docs = [_doc(10, (1, 4, 4)), _doc(3, (4, 2, 2), VIDEO), _doc(30, (1, 2, 2), target=False),
            _doc(5, (1, 3, 3), attention=CAUSAL)]
    cost = DocumentCost.from_units(unit_costs(MODEL), 1.0)
    packer = BatchPacker(2, 64)
    assert all(packer.add(d) for d in docs)
    batch = packer.build(0, 1)
    assert training_flops(MODEL, batch) == pytest.approx(sum(cost(d) for d in docs), rel=1e-12)


def test_budget_closes_a_batch_before_the_document_that_exceeds_it():
    docs = [_doc(4, (1, 4, 4)) for _ in range(6)]
    cost = DocumentCost.from_units(unit_costs(MODEL), 0.5)
    budget = cost.budget(4, 64)
    packer = BatchPacker(4, 64, cost)
    taken = 0
    while packer.add(docs[taken]):
        taken += 1
    assert 0 < taken < 6 and packer.compute <= budget < packer.compute + cost(docs[taken])
    assert BatchPacker(4, 64).add(docs[0]) and all(BatchPacker(4, 64, cost).add(d) for d in docs[:1])
    tiny = DocumentCost.from_units(unit_costs(MODEL), 1e-9)   # a batch always takes its first doc
    assert BatchPacker(4, 64, tiny).add(docs[0])


def _cfg(shapes_dir, **kw):
    return DataConfig(**{"train_shards": f"{shapes_dir}/train", "batch_size": 4, "seq_len": 256,
                         "num_workers": 0, "pack_compute_budget": 0.6, **kw})


def _keys(loader, n, it=None):
    it = it or iter(loader)
    return [tuple(next(it).meta["key"]) for _ in range(n)]


def test_compute_packing_resumes_exactly_and_is_layout_invariant(shapes_dir):
    units, tok = unit_costs(MODEL), ByteTokenizer()
    ref = build_dataloader(_cfg(shapes_dir), tok, 0, 1, unit_costs=units)
    want = _keys(ref, 8)
    plain = _keys(build_dataloader(_cfg(shapes_dir, pack_compute_budget=0.0), tok, 0, 1), 8)
    assert [len(k) for k in want] != [len(k) for k in plain]    # the budget changes the cuts
    head = build_dataloader(_cfg(shapes_dir), tok, 0, 1, unit_costs=units)
    first = _keys(head, 3)
    again = build_dataloader(_cfg(shapes_dir), tok, 0, 1, unit_costs=units)
    again.load_state_dict(json.loads(json.dumps(head.state_dict())))
    assert first + _keys(again, 5) == want
    # 1 rank x grad_accum 2 reads the streams of 2 ranks x 1, batch for batch
    accum = _keys(build_dataloader(_cfg(shapes_dir), tok, 0, 1, grad_accum=2, unit_costs=units), 6)
    ranks = [_keys(build_dataloader(_cfg(shapes_dir), tok, r, 2, unit_costs=units), 3) for r in (0, 1)]
    assert accum == [ranks[i % 2][i // 2] for i in range(6)]


def test_compute_packing_needs_the_model_costs(shapes_dir):
    with pytest.raises(ValueError, match="needs the model's unit costs"):
        build_dataloader(_cfg(shapes_dir), ByteTokenizer(), 0, 1)
    with pytest.raises(ValueError, match="pack_compute_budget must be in"):
        _cfg(shapes_dir, pack_compute_budget=1.5).validate()
