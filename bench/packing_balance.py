# Compute balance of packed batches across ranks: position packing vs compute-budget packing (CPU simulation).
"""Simulates the per-rank document streams of a ``mix_v1``-like mixture (web pairs, clips,
interleaved documents; byte-token captions and texts with realistic length spreads), packs each
rank's stream with the real packer (``mmgen.data.pack.BatchPacker``, as the loader drives it:
a batch closes at the first document it refuses, which opens the next), and reports per step the
estimated compute of every rank (the Core v2 FLOP model, ``mmgen.metrics.flops``: linear layers
per position, heads where they run, attention per allowed pair, i.e. per span) for position-only
packing and for several compute budgets.

Figures: spread = mean over steps of (max - min) / mean across ranks; wait = mean over steps of
1 - mean / max (the share of a step the average rank waits for the slowest, if step time follows
compute); padding; and docs per unit time relative to position packing (documents consumed /
sum over steps of the slowest rank's compute). Every batch's estimate is checked against
``training_flops`` of the built batch.

    python bench/packing_balance.py [--ranks 8] [--steps 100]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmgen import documents  # noqa: E402
from mmgen.batch import IMAGE, VIDEO  # noqa: E402
from mmgen.data.pack import BatchPacker, DocumentCost  # noqa: E402
from mmgen.metrics.flops import training_flops, unit_costs  # noqa: E402
from mmgen.models import FLAVORS  # noqa: E402

BOS, EOS, BOI, EOI, BOV, EOV, VIS = 256, 257, 258, 259, 260, 261, 262
TEXT_ID = 65


def _text(rng, mean_chars: float, sigma: float = 0.6, cap: int = 4000) -> list[int]:
    n = int(min(cap, max(1, rng.lognormal(np.log(mean_chars), sigma))))
    return [TEXT_ID] * n


def _vis(grid, modality, target) -> documents.Visual:
    t, h, w = grid
    return documents.Visual(torch.zeros(t * h * w, 1), grid, modality, target)


def make_doc(rng, kind: str, setting: dict) -> documents.Document:
    """One document of ``kind`` ("pair", "clip", "doc") for the setting's sizes."""
    L = setting["seq_len"]
    if kind == "pair":
        target = rng.random() < 0.5
        cap, img = _text(rng, 60), _vis(setting["image_grid"], IMAGE, target)
        segs = [[BOS], cap, [BOI], img, [EOI], [EOS]] if target else [[BOS], [BOI], img, [EOI], cap, [EOS]]
    elif kind == "clip":
        target = rng.random() < 0.5
        cap, vid = _text(rng, 80), _vis(setting["video_grid"], VIDEO, target)
        segs = [[BOS], cap, [BOV], vid, [EOV], [EOS]] if target else [[BOS], [BOV], vid, [EOV], cap, [EOS]]
    else:   # interleaved, cut at the last segment that fits, as build_interleaved_document does
        room, segs = L - 2, [[BOS]]
        for i in range(int(rng.integers(1, 7))):
            t = _text(rng, 350, 0.8)[:room]
            if t:
                segs.append(t)
                room -= len(t)
            img = _vis(setting["image_grid"], IMAGE, rng.random() < 0.5)
            if len(img) + 2 > room:
                break
            segs += [[BOI], img, [EOI]]
            room -= len(img) + 2
        segs.append([EOS])
    doc = documents.build_document(segs, VIS, {"source": kind})
    return doc


def simulate(setting: dict, budget: float, ranks: int, steps: int, model) -> dict:
    kinds, weights = ["pair", "clip", "doc"], [0.8, 0.1, 0.1]   # laion+coyo, webvid, mmc4
    cost = DocumentCost.from_units(unit_costs(model), budget) if budget else None
    estimate = DocumentCost.from_units(unit_costs(model), 1.0)
    per_step = np.zeros((steps, ranks))
    docs = pad = positions = 0
    checked = 0
    for r in range(ranks):
        rng = np.random.default_rng([setting["seed"], r])   # the rank's own stream, every budget
        B, L = setting["batch_size"], setting["seq_len"]
        packer, pending = BatchPacker(B, L, cost), None
        for step in range(steps):
            while True:
                doc = pending or make_doc(rng, kinds[rng.choice(3, p=weights)], setting)
                pending = None
                if not packer.add(doc):
                    pending = doc
                    break
            placed = [d for _, _, d in packer.placed]
            per_step[step, r] = sum(estimate(d) for d in placed)
            if checked < 20:   # the estimate is the FLOP model of the built batch
                batch = packer.build(0, 1)
                assert abs(training_flops(model, batch) - per_step[step, r]) <= 1e-6 * per_step[step, r]
                checked += 1
            docs += len(placed)
            used = sum(packer.fill)
            positions += B * L
            pad += B * L - used
            packer = BatchPacker(B, L, cost)
    mx, mn, mean = per_step.max(1), per_step.min(1), per_step.mean(1)
    return {"spread": float(np.mean((mx - mn) / mean)), "wait": float(np.mean(1 - mean / mx)),
            "padding": pad / positions, "docs_per_time": docs / mx.sum(), "docs": docs}


SETTINGS = {
    # experiment=gpu_1b / data=mix_v1: 128-px images in 8-px patches, 8 x 64-px frames
    "mix_v1 (seq 2048, batch 4)": {"seq_len": 2048, "batch_size": 4, "image_grid": (1, 16, 16),
                                   "video_grid": (8, 8, 8), "seed": 0, "budgets": (0.95, 0.9, 0.85)},
    # long context: 32-frame 128-px clips (32 x 8 x 8 = 2048 positions), one 16k row per rank
    "long video (seq 16384, batch 1)": {"seq_len": 16384, "batch_size": 1, "image_grid": (1, 16, 16),
                                        "video_grid": (32, 8, 8), "seed": 1, "budgets": (0.7, 0.65, 0.6)},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    a = ap.parse_args()
    model = FLAVORS["1b"]
    for name, setting in SETTINGS.items():
        print(f"\n{name}, {a.ranks} ranks x {a.steps} steps, model 1b")
        print(f"{'packing':>22} | {'spread':>7} | {'wait':>6} | {'padding':>7} | {'docs/time':>9}")
        base = None
        # budgets: fractions of the reference batch (B rows of one causal seq_len document);
        # a mixture's batches cost 0.77-1.0 of it at seq 2048 and 0.55-0.77 at 16k
        for b in (0.0, *setting["budgets"]):
            out = simulate(setting, b, a.ranks, a.steps, model)
            base = base or out["docs_per_time"]
            label = "positions only" if b == 0 else f"compute budget {b:.2f}"
            print(f"{label:>22} | {out['spread']:7.1%} | {out['wait']:6.1%} | {out['padding']:7.1%} | "
                  f"{out['docs_per_time'] / base:9.3f}")


if __name__ == "__main__":
    main()
