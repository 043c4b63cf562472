# Loader counters summed over logical workers: samples read, skips, padding, per-source shares.
from __future__ import annotations

from collections import Counter


def loader_stats(sources: list, workers: list[dict], totals: Counter, batches: int
                 ) -> dict:
    """``MultimodalLoader.stats()`` over the logical workers ``workers`` (of one or more streams)."""
    skipped: Counter[str] = Counter()
    per: dict[str, Counter] = {s.name: Counter() for s in sources}
    epoch = 0
    for w in workers:
        for name, st in w["sources"].items():
            c = st.get("counters", {})
            skipped.update(c.get("skipped", {}))
            if name in per:
                per[name]["samples_read"] += c.get("samples_read", 0)
                per[name]["skipped"] += sum(c.get("skipped", {}).values())
                per[name]["images_dropped"] += c.get("images_dropped", 0)
                per[name]["truncated"] += c.get("truncated", 0)
                per[name]["epoch"] = max(per[name]["epoch"], st["cursor"]["epoch"])
            epoch = max(epoch, st["cursor"]["epoch"])
    positions, docs = totals["positions"], totals["documents"]
    out = {
        "samples_read": sum(p["samples_read"] for p in per.values()),
        "skipped": dict(skipped), "skipped_total": sum(skipped.values()),
        "batches": batches, "documents": docs,
        "padding_fraction": totals["padding"] / positions if positions else 0.0,
        "epoch": epoch,
    }
    for name, p in per.items():
        n = totals[f"documents/{name}"]
        out.update({f"source/{name}/documents": n,
                    f"source/{name}/share": n / docs if docs else 0.0,
                    f"source/{name}/samples_read": p["samples_read"],
                    f"source/{name}/skipped": p["skipped"],
                    f"source/{name}/epoch": p["epoch"]})
        if p["images_dropped"] or p["truncated"]:
            out[f"source/{name}/images_dropped"] = p["images_dropped"]
            out[f"source/{name}/truncated"] = p["truncated"]
    return out
