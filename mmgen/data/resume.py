# Loader state: format upgrades, compatibility checks, and re-splitting onto a new layout.
"""The loader's state is one dict per rank (README.md, "State dict"). Resuming on the same
layout (world size, workers) restores every logical worker's state as it was: exact.

Resuming on a different layout needs the states of **all** old ranks. For every source, the
work an old reader had not finished is listed as items ``[epoch, shard, slot, stride, start]``
(the rest of its current shard, its later shards of that epoch, and whole epochs up to the
newest epoch any old reader had reached); these items, sorted in epoch-permutation order, are
dealt round-robin to the new readers as a *plan*; after its plan a new reader continues with
the next epoch in the new layout. Every sample of those epochs is read exactly once in total,
old run and new run together. What cannot carry over: the mixing generators (new readers get
fresh ones, seeded with the re-split count) and the task/caption-dropout choices, which never
depended on the layout anyway (they hash the sample key).
"""
from __future__ import annotations

import copy
from collections import Counter

from mmgen.data.sources import epoch_items, hashed_permutation

STATE_VERSION = 2


def fresh_source_state() -> dict:
    return {"cursor": {"epoch": 0, "shard": 0, "offset": 0}, "plan": None,
            "counters": {"samples_read": 0, "skipped": {}}}


def upgrade(state: dict, single_source: str) -> dict:
    """A version-1 state (one source, cursor per worker) as a version-2 state."""
    if state.get("version") == STATE_VERSION:
        return state
    if state.get("version") != 1:
        raise ValueError(f"data: cannot resume: unknown loader state version {state.get('version')!r}")
    out = {k: v for k, v in state.items() if k not in ("workers", "num_shards", "shards_fingerprint")}
    out.update(version=STATE_VERSION, shuffle_samples=None, resplits=0,
               rotation=state["batches"] % state["num_workers"],
               sources={single_source: {"type": "pair", "num_shards": state["num_shards"],
                                        "shards_fingerprint": state["shards_fingerprint"]}},
               workers=[{"mix": None, "sources": {single_source: {
                   "cursor": w["cursor"], "plan": None, "counters": w["counters"]}}}
                   for w in state["workers"]])
    return out


def check_compatible(state: dict, mine: dict) -> None:
    """Raise ValueError (one line) unless ``state`` can be continued by a loader whose fresh state
    is ``mine``: same split, seed and sample order, and the same shards for every common source."""
    for k in ("split", "seed", "shuffle_samples"):
        if state.get(k) is not None and state.get(k) != mine[k]:
            raise ValueError(f"data: cannot resume: state has {k}={state.get(k)!r}, this loader "
                             f"has {mine[k]!r} (sample offsets would point at other samples)")
    for name, info in state["sources"].items():
        now = mine["sources"].get(name)
        if now is None:
            continue
        for k in ("num_shards", "shards_fingerprint"):
            if info[k] != now[k]:
                raise ValueError(f"data: cannot resume source {name!r}: state has {k}={info[k]!r}, "
                                 f"the shards found now give {now[k]!r} (the shard set changed)")


def _remaining(names: list[str], seed: int, reader: int, num_readers: int, st: dict
               ) -> tuple[list[list[int]], int]:
    """Unfinished items of one old reader and the first epoch it had not started."""
    cur, plan = st["cursor"], st.get("plan")
    if plan:
        rest = [list(x) for x in plan["items"][cur["shard"]:]]
        frontier = int(plan["next_epoch"])
    else:
        e = int(cur["epoch"])
        rest = [[e, s, slot, stride, 0]
                for s, slot, stride in epoch_items(names, seed, e, reader, num_readers)[cur["shard"]:]]
        frontier = e + 1
    if rest:
        rest[0][4] = int(cur["offset"])
    return rest, frontier


def resplit(states: list[dict], source: str, names: list[str], seed: int, new_readers: int
            ) -> list[dict]:
    """Per-source states of the ``new_readers`` readers (index = reader id) that continue the
    old ranks' ``states`` (index = old rank) for ``source`` without losing or repeating a sample.

    Readers are numbered ``rank + world_size * worker`` (``sources.reader_index``)."""
    old_ws, old_w = states[0]["world_size"], states[0]["num_workers"]
    old_readers = old_ws * old_w
    per_reader: dict[int, dict] = {}
    for st in states:
        for w, ws in enumerate(st["workers"]):
            per_reader[st["rank"] + old_ws * w] = ws["sources"].get(source)
    if any(v is None for v in per_reader.values()):   # a source the old run did not have
        return [fresh_source_state() for _ in range(new_readers)]
    rests = {g: _remaining(names, seed, g, old_readers, st) for g, st in per_reader.items()}
    next_epoch = max(f for _, f in rests.values())
    items: list[list[int]] = []
    for g, (rest, frontier) in sorted(rests.items()):
        items += rest
        for e in range(frontier, next_epoch):
            items += [[e, s, slot, stride, 0]
                      for s, slot, stride in epoch_items(names, seed, e, g, old_readers)]
    position: dict[int, dict[int, int]] = {}
    for e in {it[0] for it in items}:
        position[e] = {s: i for i, s in enumerate(hashed_permutation(names, "shards", seed, e))}
    items.sort(key=lambda it: (it[0], position[it[0]][it[1]], it[2]))
    counters: list[Counter] = [Counter() for _ in range(new_readers)]
    skipped: list[Counter] = [Counter() for _ in range(new_readers)]
    for g, st in per_reader.items():   # keep the totals: old reader g's counts go to g % new
        c = st.get("counters", {})
        counters[g % new_readers].update({k: v for k, v in c.items() if isinstance(v, int)})
        skipped[g % new_readers].update(c.get("skipped", {}))
    out = []
    for g in range(new_readers):
        mine = items[g::new_readers]
        st = {"counters": {**dict(counters[g]), "samples_read": counters[g]["samples_read"],
                           "skipped": dict(skipped[g])}}
        if mine:
            st.update(cursor={"epoch": mine[0][0], "shard": 0, "offset": mine[0][4]},
                      plan={"items": mine, "next_epoch": next_epoch})
        else:
            st.update(cursor={"epoch": next_epoch, "shard": 0, "offset": 0}, plan=None)
        out.append(st)
    return out


def check_rank_set(states: list[dict]) -> list[dict]:
    """The old ranks' states sorted by rank; ValueError unless they are one complete, consistent
    set (every rank of one world size, same layout, same number of consumed batches)."""
    if not states:
        raise ValueError("data: cannot re-split: no rank states given")
    states = sorted(states, key=lambda s: s["rank"])
    ws = states[0]["world_size"]
    ranks = [s["rank"] for s in states]
    if ranks != list(range(ws)):
        raise ValueError(f"data: cannot re-split: need the states of all {ws} old ranks, got ranks "
                         f"{ranks}")
    for k in ("world_size", "num_workers", "batches", "split", "seed"):
        values = {repr(s.get(k)) for s in states}
        if len(values) > 1:
            raise ValueError(f"data: cannot re-split: the rank states disagree on {k} "
                             f"({', '.join(sorted(values))}); they are not from one checkpoint")
    return copy.deepcopy(states)
