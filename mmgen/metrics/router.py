# Router observability for MoE models: per-layer load metrics, dead-expert warnings, a load heat map.
"""Turns the raw counters of :func:`mmgen.models.moe.collect_router_stats` (already summed over
data-parallel ranks) into metrics.jsonl / W&B values, once per log interval:

* ``router/L<i>/load/e<j>``: share of layer ``i``'s assignments routed to expert ``j`` (sums to 1);
* ``router/L<i>/imbalance``: max / mean assignments per expert (1 = balanced, ``E/k``-ish worst);
* ``router/L<i>/dropped_frac``: assignments dropped by the capacity (0 when dropless);
* ``router/L<i>/entropy``: mean router entropy per token, nats (``log E`` = uniform);
* ``router/L<i>/bias/e<j>``: the aux-loss-free selection bias (when that mode is on);
* ``router/L<i>/<modality>/load/e<j>``: the same share per modality, when the layer got ids;
* ``router/imbalance_max``, ``router/dead_experts``: over all layers.

An expert that received no assignment in ``dead_after`` consecutive log intervals is reported
once with a warning (and counted in ``router/dead_experts`` while it stays dead).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MODALITY_NAMES = ("text", "image", "video", "other")


class RouterMonitor:
    """Metrics and dead-expert tracking over successive log intervals.

    Args:
        dead_after: consecutive empty intervals after which an expert is reported dead (0: never).
        log_bias: include the aux-free bias values.
    """

    def __init__(self, dead_after: int = 3, log_bias: bool = False):
        self.dead_after, self.log_bias = dead_after, log_bias
        self.empty_runs: dict[int, torch.Tensor] = {}
        self.reported: set[tuple[int, int]] = set()
        self.last_loads: dict[int, torch.Tensor] = {}

    def metrics(self, stats: dict[int, dict[str, torch.Tensor]], step: int | None = None) -> dict[str, float]:
        """Metric values of one interval.

        Args:
            stats: ``collect_router_stats`` output, summed over data-parallel ranks.
            step: for the warning text.
        """
        out: dict[str, float] = {}
        dead_total, worst = 0, 0.0
        for layer, s in sorted(stats.items()):
            load = s["load"].double().cpu()
            total = float(load.sum())
            e = load.numel()
            # a key >= 1000 is a second MoE FFN of one layer (modality towers: tower = key // 1000)
            p = f"router/L{layer % 1000}" + (f"/T{layer // 1000}" if layer >= 1000 else "")
            if total > 0:
                share = load / total
                for j in range(e):
                    out[f"{p}/load/e{j}"] = float(share[j])
                out[f"{p}/imbalance"] = float(load.max() / load.mean())
                out[f"{p}/dropped_frac"] = 1.0 - float(s["kept"].double().sum()) / total
                out[f"{p}/entropy"] = float(s["entropy_sum"]) / max(float(s["tokens"]), 1.0)
                worst = max(worst, out[f"{p}/imbalance"])
                self.last_loads[layer] = share.float()
                runs = self.empty_runs.get(layer, torch.zeros(e, dtype=torch.long))
                runs = torch.where(load == 0, runs + 1, torch.zeros_like(runs))
                self.empty_runs[layer] = runs
                dead_total += self._dead(layer, runs, step)
            if self.log_bias:
                for j, b in enumerate(s["bias"].float().cpu().tolist()):
                    out[f"{p}/bias/e{j}"] = b
            mod = s.get("modality_load")
            if mod is not None:
                mod = mod.double().cpu()
                for m, row in enumerate(mod):
                    if float(row.sum()) > 0:
                        for j, v in enumerate((row / row.sum()).tolist()):
                            out[f"{p}/{MODALITY_NAMES[m]}/load/e{j}"] = v
        if out:
            out["router/imbalance_max"] = worst
            out["router/dead_experts"] = float(dead_total)
        return out

    def _dead(self, layer: int, runs: torch.Tensor, step: int | None) -> int:
        if not self.dead_after:
            return 0
        dead = (runs >= self.dead_after).nonzero().flatten().tolist()
        for j in dead:
            if (layer, j) not in self.reported:
                self.reported.add((layer, j))
                log.warning("MoE layer %d: expert %d received no tokens for %d consecutive log intervals%s "
                            "(dead expert: consider the aux loss weight, moe_bias_update_rate or the router init)",
                            layer, j, int(runs[j]), f" (step {step})" if step is not None else "")
        for j in [j for (li, j) in self.reported if li == layer and runs[j] == 0]:
            self.reported.discard((layer, j))   # it came back: warn again if it dies again
        return len(dead)

    def heatmap(self, path: Path, title: str = "") -> Path | None:
        """The last interval's per-expert load share as a layers x experts heat map PNG."""
        if not self.last_loads:
            return None
        layers = sorted(self.last_loads)
        return draw_heatmap(torch.stack([self.last_loads[i] for i in layers]), layers, path, title)


def draw_heatmap(shares: torch.Tensor, layers: list[int], path: Path, title: str = "") -> Path:
    """Write ``shares`` ``[n_layers, E]`` (assignment share per expert) as a heat map.

    Args:
        shares: rows = MoE layers, columns = experts.
        layers: the layer index of each row (axis labels).
        path: the PNG to write.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, e = shares.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * e + 2), max(2.5, 0.35 * n + 1.5)), constrained_layout=True)
    im = ax.imshow(shares.numpy(), aspect="auto", cmap="viridis", vmin=0.0,
                   vmax=max(float(shares.max()), 2.0 / e))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(e))
    ax.set_yticks(range(n), [str(i) for i in layers])
    fig.colorbar(im, ax=ax, label="assignment share")
    ax.set_title(f"{title or 'MoE expert load'} (balanced = {1 / e:.3g})", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def loads_from_record(record: dict) -> tuple[list[int], torch.Tensor] | None:
    """``(layers, [n_layers, E] shares)`` from one metrics.jsonl record's ``router/L<i>/load/e<j>``
    keys (``mmgen report``); None when the record has none."""
    table: dict[int, dict[int, float]] = {}
    for key, value in record.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[0] == "router" and parts[2] == "load" and parts[1].startswith("L"):
            if isinstance(value, (int, float)) and math.isfinite(value):
                table.setdefault(int(parts[1][1:]), {})[int(parts[3][1:])] = float(value)
    if not table:
        return None
    layers = sorted(table)
    e = 1 + max(j for row in table.values() for j in row)
    shares = torch.zeros(len(layers), e)
    for r, layer in enumerate(layers):
        for j, v in table[layer].items():
            shares[r, j] = v
    return layers, shares
