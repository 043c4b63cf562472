# Accumulation streams: 1 rank x grad_accum N reads (and trains on) the global batches of N ranks.
from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest

from mmgen.data import build_dataloader
from mmgen.models.tokenizers.text import ByteTokenizer
from tests.conftest import BIN, data_overrides, run_cli
from tests.test_data_resume import mix_cfg, same, sources  # noqa: F401  (module fixture)
from tests.test_trainer import TINY, losses

TOK = ByteTokenizer()


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def keys(batches):
    return [k for b in batches for k in b.meta["key"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_one_rank_accumulating_reads_the_global_batches_of_n_ranks(sources, workers):  # noqa: F811
    cfg = mix_cfg(sources, video=False, num_workers=workers)
    steps = 5
    # 2 ranks, no accumulation: step s is (rank 0's batch s, rank 1's batch s)
    ranks = [take(build_dataloader(cfg, TOK, r, 2), steps) for r in range(2)]
    # 1 rank, grad_accum 2: micro-batches s0 a0, s0 a1, s1 a0, ...
    accum = take(build_dataloader(cfg, TOK, 0, 1, grad_accum=2), 2 * steps)
    same(accum[0::2], ranks[0])
    same(accum[1::2], ranks[1])
    # 4 streams as 2 ranks x 2 micro-batches: rank r micro a is stream a * 2 + r
    quads = [take(build_dataloader(cfg, TOK, r, 4), steps) for r in range(4)]
    for r in range(2):
        mixed = take(build_dataloader(cfg, TOK, r, 2, grad_accum=2), 2 * steps)
        same(mixed[0::2], quads[r])
        same(mixed[1::2], quads[2 + r])


def test_accumulating_loader_resumes_exactly_and_resplits(sources):  # noqa: F811
    cfg = mix_cfg(sources, video=False, num_workers=2)
    reference = take(build_dataloader(cfg, TOK, 0, 1, grad_accum=2), 14)
    first = build_dataloader(cfg, TOK, 0, 1, grad_accum=2)
    done = take(first, 6)
    state = json.loads(json.dumps(first.state_dict()))      # plain JSON, as in a checkpoint
    again = build_dataloader(cfg, TOK, 0, 1, grad_accum=2)
    assert again.same_layout(state)
    again.load_state_dict(state)
    same(done + take(again, 8), reference)
    stats = again.stats()
    assert stats["batches"] == 14 and stats["documents"] == sum(len(b.meta["key"]) for b in reference)
    # the same state continued by 3 plain ranks: every remaining sample of the running epochs
    # is read once, none of those already consumed again
    assert not build_dataloader(cfg, TOK, 0, 3).same_layout(state)
    with pytest.raises(ValueError, match="layout change"):
        build_dataloader(cfg, TOK, 0, 3).load_state_dict(state)
    new = [build_dataloader(cfg, TOK, r, 3) for r in range(3)]
    for loader in new:
        loader.load_state_dict({"ranks": [state]})
    after = [b for loader in new for b in take(loader, 12)]
    seen = Counter(keys(done)) + Counter(keys(after))
    pairs = {k for k in seen if k.startswith("p")}
    epoch0 = [k for b in done + after for k, e in zip(b.meta["key"], b.meta["epoch"])
              if e == 0 and k.startswith("p")]
    assert len(epoch0) == len(set(epoch0)), "a sample of epoch 0 was read twice"
    assert len(pairs) == sum((8, 12, 15, 10, 15)), "a pair sample of epoch 0 was never read"


def test_bad_grad_accum_is_refused(sources):  # noqa: F811
    with pytest.raises(ValueError, match="grad_accum"):
        build_dataloader(mix_cfg(sources, video=False), TOK, 0, 1, grad_accum=0)


def read_keys(run: Path) -> dict[tuple[int, int], list]:
    """(step, stream) -> documents, the later line winning (a resume may repeat steps)."""
    out = {}
    for f in sorted((run / "data_keys").glob("rank_*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out[rec["step"], rec["stream"]] = rec["docs"]
    return out


def test_one_process_accumulating_matches_two_ddp_processes(shapes_dir, tmp_path):
    """fp32 on CPU: same global batches and noise, so the loss curves agree up to the order of
    the gradient sums (two summands: measured identical here)."""
    common = [*TINY, *data_overrides(shapes_dir), "trainer.steps=6", "trainer.precision=fp32",
              "trainer.record_keys=true", "data.num_workers=1", "checkpoint.enabled=false"]
    r = run_cli([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m",
                 "mmgen.train", *common, "name=two"], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli([str(BIN / "mmgen-train"), *common, "name=one", "trainer.grad_accum=2"],
                cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    k1, k2 = read_keys(one), read_keys(two)
    assert sorted(k1) == sorted(k2) == [(s, v) for s in range(1, 7) for v in range(2)]
    assert k1 == k2
    flat = [tuple(d) for docs in k2.values() for d in docs if d[1] == 0]
    assert len(flat) == len(set(flat)), "two ranks read the same sample in one epoch"
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        for key in ("loss/total", "loss/text", "loss/visual", "optim/grad_norm"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-5, abs=1e-7), (step, key)
