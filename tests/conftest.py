# Shared fixtures: small shapes shards made on the fly, and helpers to run the CLI.
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# 2-core CI machines: one intra-op thread per process keeps parallel test processes from
# fighting over the cores (2 threads were ~20x slower under load).
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_cli(args: list[str], cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
                **(env or {})}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """A small shapes dataset (train/ and val/) shared by the tests of one session."""
    from mmgen.data.synthetic.shapes import make_splits

    out = tmp_path_factory.mktemp("shapes")
    make_splits(out, num_train=600, num_val=60, image_size=32, seed=0, samples_per_shard=100)
    return out


def data_overrides(shapes_dir: Path) -> list[str]:
    return [f"data.train_shards={shapes_dir}/train", f"data.val_shards={shapes_dir}/val"]


def logged_records(run: Path) -> list[dict]:
    """The complete records of a live run's metrics.jsonl: a reader polling while the trainer
    writes can see a record's first bytes before the rest, so a last line without its newline
    is not read yet."""
    f = run / "metrics.jsonl"
    if not f.is_file():
        return []
    text = f.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]
