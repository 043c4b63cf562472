# 20 randomised bad command-line overrides: each is one line on stderr and exit code 2.
"""Most cases call ``check_overrides`` (what ``mmgen-train`` runs first) in-process; three go
through the real ``mmgen-train`` to show that the process itself behaves the same."""
from __future__ import annotations

import os
import random
import string

import pytest

from mmgen.cli.preflight import check_overrides
from tests.conftest import BIN, run_cli

SEED = int(os.environ.get("MMGEN_OVERRIDES_SEED", "4"))
MALFORMED = ["model.dim==", "=3", "model.", "model..dim=3", "model.dim=[1,2", "a b=1", "model.dim='x",
             "+", "@", "model.dim"]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(5, 9)))


def bad_overrides(seed: int) -> list[str]:
    """10 malformed ones and 10 drawn at random: unknown keys, wrong types, missing options."""
    rng = random.Random(seed)
    makers = [
        lambda: f"{rng.choice(['model', 'data', 'trainer', 'optim', 'checkpoint', 'metrics'])}.{_word(rng)}={rng.randint(0, 9)}",
        lambda: f"+{rng.choice(['model', 'trainer'])}.{_word(rng)}=1",
        lambda: f"{rng.choice(['trainer.steps', 'model.dim', 'data.batch_size', 'checkpoint.every'])}={rng.choice([_word(rng), '1.5', '[1]', 'true'])}",
        lambda: f"optim.lr={_word(rng)}",
        lambda: f"{rng.choice(['model', 'data', 'experiment', 'parallel', 'optim', 'objective'])}={_word(rng)}",
        lambda: f"trainer.{rng.choice(['device', 'precision'])}={_word(rng)}",
    ]
    drawn: list[str] = []
    while len(drawn) < 10:  # every kind at least once, no repeats
        case = makers[len(drawn) % len(makers)]()
        if case not in drawn:
            drawn.append(case)
    return MALFORMED + drawn


CASES = bad_overrides(SEED)


@pytest.mark.parametrize("override", CASES, ids=[f"{i}:{c}" for i, c in enumerate(CASES)])
def test_bad_override_is_one_line_and_exit_2(override, capsys):
    with pytest.raises(SystemExit) as e:
        check_overrides([override])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert e.value.code == 2, (override, err)
    assert len(lines) == 1 and lines[0].startswith("mmgen-train: error: "), (override, err)
    assert "Traceback" not in err and len(lines[0]) > len("mmgen-train: error: ") + 10


def test_twenty_distinct_cases_and_good_overrides_pass(capsys):
    assert len(set(CASES)) == 20, CASES
    check_overrides(["trainer.steps=5", "experiment=smoke", "model.dim=64"])  # returns: nothing wrong
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("override,needle", [
    ("model.dim==", "model.dim=="),
    ("experiment=nope", "experiment/nope"),  # an optional group: Hydra alone would ignore it
    ("--no-such-flag", "--no-such-flag"),
])
def test_real_process_prints_one_line_and_exits_2(tmp_path, override, needle):
    r = run_cli([str(BIN / "mmgen-train"), override], cwd=tmp_path, timeout=120)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("mmgen-train: error:") and needle in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()
