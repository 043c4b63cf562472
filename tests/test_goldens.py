# Loss goldens: 20-step fp32 CPU loss curves of every reference layout, against recorded JSON.
"""Guards against silent numerical change (Core v2). Each case of tests/goldens/worker.py
(one process; grad_accum 2; 2-process DDP, ZeRO-2 and FSDP2) trains the debug flavor for 20
steps and is compared step by step with ``tests/goldens/<case>.json``.

Runs are deterministic (fp32, CPU, one thread), so on the machine that recorded them the
curves are bit-identical; another CPU may round matmuls differently (vector width, BLAS
kernel), which 20 steps amplify to ~1e-6 relative, so the assertion allows ``RTOL``. Any real
change (initialisation, noise, data order, loss normalisation, a mask) moves the losses by
far more than that already at step 1. Re-record only in a commit of its own that says why:
``MMGEN_RECORD_GOLDENS=1 pytest tests/test_goldens.py``.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.conftest import BIN, ROOT, run_cli

GOLDENS = ROOT / "tests" / "goldens"
WORKER = GOLDENS / "worker.py"
RTOL = 2e-5
ONE_PROCESS = ("single", "accum2")
TWO_PROCESSES = ("ddp", "zero2", "fsdp2", "megatron")


@pytest.fixture(scope="module")
def curves(shapes_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("goldens")
    common = ["--shapes", str(shapes_dir), "--out", str(out)]
    r1 = run_cli([str(BIN / "python"), str(WORKER), "--cases", ",".join(ONE_PROCESS), *common], ROOT, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_cli([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(WORKER),
                  "--cases", ",".join(TWO_PROCESSES), *common], ROOT, timeout=900)
    assert r2.returncode == 0, r2.stderr[-3000:]
    if os.environ.get("MMGEN_RECORD_GOLDENS") == "1":
        for case in (*ONE_PROCESS, *TWO_PROCESSES):
            shutil.copy(out / f"{case}.json", GOLDENS / f"{case}.json")
    return {case: json.loads((out / f"{case}.json").read_text()) for case in (*ONE_PROCESS, *TWO_PROCESSES)}


@pytest.mark.parametrize("case", [*ONE_PROCESS, *TWO_PROCESSES])
def test_loss_curve_matches_golden(curves, case):
    golden = json.loads((GOLDENS / f"{case}.json").read_text())
    got = curves[case]
    assert golden["overrides"] == got["overrides"], "the case's overrides changed: re-record in its own commit"
    assert [s["step"] for s in got["curve"]] == [s["step"] for s in golden["curve"]] == list(range(1, 21))
    worst = 0.0
    for g, r in zip(golden["curve"], got["curve"]):
        for key, want in g.items():
            if key in ("step", "hex"):
                continue
            assert key in r, f"{case} step {g['step']}: {key} no longer logged"
            rel = abs(r[key] - want) / max(abs(want), 1e-12)
            worst = max(worst, rel)
            assert rel <= RTOL, (f"{case} step {g['step']} {key}: {r[key]!r} vs golden {want!r} "
                                 f"(rel {rel:.2e} > {RTOL})")
    bitwise = all(g["hex"] == r["hex"] for g, r in zip(golden["curve"], got["curve"]))
    print(f"{case}: {'bit-identical' if bitwise else f'max rel diff {worst:.2e}'}")


def test_layouts_agree_with_each_other(curves):
    """The goldens are not arbitrary numbers: the same global batch under every layout gives
    the same step-1 loss (identical weights, only the fp32 summation order differs)."""
    first = {case: c["curve"][0]["loss/total"] for case, c in curves.items()}
    ref = first["ddp"]
    for case in ("zero2", "fsdp2", "megatron"):
        assert abs(first[case] - ref) <= 1e-5 * abs(ref), first
    # 1 process x grad_accum 2 reads the same global batches as 2 processes (data streams)
    for a, b in zip(curves["accum2"]["curve"], curves["ddp"]["curve"]):
        assert abs(a["loss/total"] - b["loss/total"]) <= 1e-5 * abs(b["loss/total"]), (a["step"], a, b)
