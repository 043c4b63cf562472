# Two real ranks (torchrun, gloo) on uneven shards and fewer shards than readers: no hang.
from __future__ import annotations

import json
import sys
import textwrap

from tests.conftest import ROOT, run_cli
from tests.test_data_pipeline import make_sample, timeout_fixture, write_shard

_deadline = timeout_fixture(200)

WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    from mmgen.data import DataConfig, build_dataloader
    from mmgen.models.tokenizers.text import ByteTokenizer

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for name, shards, workers in json.loads(sys.argv[1]):
        cfg = DataConfig(train_shards=shards, batch_size=2, seq_len=256, num_workers=workers)
        loader = build_dataloader(cfg, ByteTokenizer(), rank, world)
        steps, tokens, epochs = 0, 0, 0
        for batch in loader:                        # a collective per batch, as a training step
            t = torch.tensor([float(batch.num_tokens()), 1.0])
            dist.all_reduce(t)
            tokens += int(t[0]); steps += int(t[1]) // world
            if steps == 30:
                break
        out[name] = {"steps": steps, "epoch": loader.stats()["epoch"],
                     "keys": loader.stats()["samples_read"]}
    dist.barrier()
    # one file per rank: two ranks printing to one pipe interleave their lines
    with open(os.path.join(sys.argv[2], f"result_{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
''')


def test_uneven_shards_do_not_hang_two_ranks(tmp_path):
    """3 shards of 2, 3 and 40 samples: rank 0 reads a tiny shard and wraps epochs many times
    while rank 1 is still in its first; with 2 workers per rank there are fewer shards (3) than
    readers (4) too. Both ranks make 30 steps with an all_reduce per step, in bounded time."""
    uneven, few = tmp_path / "uneven", tmp_path / "few"
    uneven.mkdir()
    few.mkdir()
    for s, n in enumerate((2, 3, 40)):
        write_shard(uneven / f"u-{s}.tar", [make_sample(f"u{s}-{i:02d}", i) for i in range(n)])
    write_shard(few / "only.tar", [make_sample(f"f{i:02d}", i) for i in range(9)])
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cases = [["uneven", str(uneven), 0], ["few_shards", str(uneven), 2], ["one_shard", str(few), 2]]
    r = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", "2", str(script), json.dumps(cases), str(tmp_path)],
                cwd=ROOT, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    results = {rank: json.loads((tmp_path / f"result_{rank}.json").read_text())
               for rank in (0, 1) if (tmp_path / f"result_{rank}.json").is_file()}
    assert set(results) == {0, 1}, r.stdout + r.stderr[-2000:]
    for name, _, _ in cases:
        assert results[0][name]["steps"] == results[1][name]["steps"] == 30
    # the tiny shards made one rank wrap around epochs much more often than the other
    assert results[0]["uneven"]["epoch"] != results[1]["uneven"]["epoch"]
