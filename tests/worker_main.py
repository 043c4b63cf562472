# The shared main() of the grouped torchrun test workers: run the named cases in order, write results.json.
"""A worker module defines a ``Cases`` class (``Cases(shapes, out, dist)``, one method per case,
``results`` dict) and an ``ORDER`` of case names, and calls :func:`run_cases` from its
``main()``. The first failing case stops the run; its traceback goes to results.json (rank 0)
and the process exits at once, since the other rank may wait in a collective forever."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from mmgen.parallel.dist import init_distributed


def run_cases(make_cases: Callable, order: list[str]) -> None:
    """Parse ``--shapes --out [--only a,b]``, start gloo, run the cases of ``order`` (or the
    ``--only`` subset), record ``_timings`` and ``_failed`` beside the cases' results."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default=",".join(order))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    dist = init_distributed("cpu", "gloo", 5.0)
    cases = make_cases(args.shapes, args.out, dist)
    timings, failed = {}, None
    for name in [c for c in order if c in args.only.split(",")]:
        t0 = time.time()
        try:
            getattr(cases, name)()
        except Exception:  # noqa: BLE001 - reported to the test, which fails with the traceback
            failed = f"case {name} on rank {dist.rank}:\n{traceback.format_exc()}"
            print(failed, file=sys.stderr, flush=True)
            break
        timings[name] = round(time.time() - t0, 2)
    if dist.is_main:
        cases.results["_timings"] = timings
        cases.results["_failed"] = failed
        (args.out / "results.json").write_text(json.dumps(cases.results, indent=1))
    if failed:
        os._exit(1)  # the other rank may wait in a collective forever
