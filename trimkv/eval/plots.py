"""Pictures (PNG, matplotlib's Agg backend, nothing shown on screen).

  * :func:`plot_accuracy_vs_budget` - per (task, length), score vs budget M, one line per policy, the full cache
    as a dashed horizontal line and the needle oracle (if run) dotted (from the harness's ``metrics.json``).
  * :func:`plot_fidelity`           - KL(full || bounded) vs budget per policy (from ``fidelity.json``).
  * :func:`retention_by_head` + :func:`plot_retention_heatmap` - mean log beta (or beta) per layer x KV head of
    a gate checkpoint on some text.
  * :func:`kept_positions` + :func:`plot_kept_tokens` - for one prompt, which positions each (layer, KV head)
    still holds at the end of a bounded prefill (the "sink / window / gist token" picture).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trimkv.eval.harness import mixes_gates, policy_cache, series_name
from trimkv.base_model import input_device
from trimkv.extras import require
from trimkv.serve import prefill

FULL = "full"


def _pyplot():
    matplotlib = require("matplotlib", "trimkv's plots")

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _budget_axis(ax, budgets) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted(set(budgets))
    ax.set_xticks(ticks, _spaced_labels(ticks))
    ax.minorticks_off()


def _spaced_labels(ticks: list, gap: float = 1.15) -> list[str]:
    """Tick labels on a log axis, blank where a tick sits within ``gap``x of the last labelled one (88 beside 96
    would print as one number)."""
    labels, last = [], None
    for t in ticks:
        labels.append(f"{t:g}" if last is None or t >= last * gap else "")
        last = t if labels[-1] else last
    return labels


def plot_accuracy_vs_budget(records: list[dict], path, x: str = "budget") -> Path:
    """One panel per (task, length): score (%) vs budget (log2 axis), a line per policy, full cache dashed.
    ``x="memory"``: vs the KV bytes each cache allocated (``kv_bytes``, MiB, log axis), so that allocations that pad
    their buffers (per-head budgets) sit where their memory puts them."""
    if x not in ("budget", "memory"):
        raise ValueError(f"x must be 'budget' or 'memory', got {x!r}")
    plt = _pyplot()
    panels = sorted({(r["task"], r["length"]) for r in records})
    if not panels:
        raise ValueError("no records to plot (run the harness first: its metrics.json)")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    tab20 = plt.get_cmap("tab20").colors                        # dark/light pairs; the gray pair (14, 15) is the oracle's
    palette = [tab20[i] for i in range(0, 20, 2) if i != 14] + [tab20[i] for i in range(1, 20, 2) if i != 15]
    tag = mixes_gates(records)                                   # two gate sets: each its own line
    records = [{**r, "policy": series_name(r, gates=tag)} for r in records]   # so is a policy with head budgets
    others = sorted({r["policy"] for r in records} - {FULL, "oracle"}, key=lambda p: (not p.startswith("trimkv"), p))
    color = {p: palette[i % len(palette)] for i, p in enumerate(others)}   # one colour per policy in every panel
    for ax, (task, length) in zip(axes[0], panels):
        rows = [r for r in records if r["task"] == task and r["length"] == length]
        for policy in sorted({r["policy"] for r in rows} - {FULL}):
            pts = sorted((r["budget"] if x == "budget" else r["kv_bytes"] / 2**20, 100 * r["score"])
                         for r in rows if r["policy"] == policy)
            style = (dict(ls=":", color="gray", label="oracle (keeps the needle)") if policy == "oracle"
                     else dict(color=color[policy]))
            if "(" in policy:                                  # the same policy with head budgets: dashed
                style.update(ls="--")
            if policy.startswith("trimkv"):
                style.update(lw=2.6 if policy == "trimkv" else 1.8, zorder=5)
            ax.plot(*zip(*pts), marker="o", **{"label": policy, "lw": 1.2, **style})
        for r in rows:
            if r["policy"] == FULL:
                ax.axhline(100 * r["score"], color="black", ls="--", lw=1, label="full cache")
        if x == "budget":
            _budget_axis(ax, [r["budget"] for r in rows if r["budget"] is not None])
            ax.set_xlabel("budget M (tokens per KV head)")
        else:
            ax.set_xscale("log", base=2)
            mib = [r["kv_bytes"] / 2**20 for r in rows if r["budget"] is not None]
            ticks = [t for t in (0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
                     if mib and min(mib) / 1.2 <= t <= max(mib) * 1.2]
            ax.set_xticks(ticks, _spaced_labels(ticks))
            ax.minorticks_off()
            ax.set_xlabel("allocated KV memory (MiB)")
        ax.set_title(f"{task} @ {length} tokens")
        ax.set_ylabel("score (%)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    legend = {}                                                # every policy of every panel, once
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    axes[0][-1].legend(legend.values(), legend.keys(), fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(fig, path)


def plot_fidelity(records: list[dict], path, metric: str = "kl") -> Path:
    """``metric`` (kl, top1 or ppl_ratio) vs budget, one line per policy (and allocation, and gate set when the
    records mix them)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    tag = mixes_gates(records)
    records = [{**r, "series": series_name(r, gates=tag)} for r in records]   # one line per allocation and gate set
    for series in sorted({r["series"] for r in records}):
        pts = sorted((r["budget"], r[metric]) for r in records if r["series"] == series)
        ax.plot(*zip(*pts), marker="o", label=series, lw=2.2 if series.startswith("trimkv") else 1.2)
    _budget_axis(ax, [r["budget"] for r in records])
    if metric == "kl":
        ax.set_yscale("log")
    ax.set_xlabel("budget M (tokens per KV head)")
    ax.set_ylabel({"kl": "KL(full || bounded), nats/token", "top1": "top-1 agreement",
                   "ppl_ratio": "perplexity ratio"}.get(metric, metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


@torch.no_grad()
def retention_by_head(model, ids: torch.Tensor, *, log: bool = True) -> np.ndarray:
    """Mean log beta (``log=True``) or mean beta per [layer, KV head] over the tokens of ``ids`` [1, T].
    The model must have gates attached (``trimkv.load_gates``)."""
    handle = getattr(model, "trimkv", None)
    if handle is None:
        raise ValueError("no gates attached: load a checkpoint first (trimkv.load_gates(model, path))")
    with handle.recording() as records:
        model(ids.to(input_device(model)), use_cache=False)
    out = np.zeros((len(handle.gates), handle.gates.config.num_kv_heads))
    for layer, rec in records.items():
        logb = rec.logb[0].float()                                                  # [Hkv, T]
        out[layer] = (logb if log else logb.exp()).mean(-1).cpu().numpy()
    return out


def plot_retention_heatmap(values: np.ndarray, path, *, log: bool = True) -> Path:
    """values [layers, KV heads] from :func:`retention_by_head`."""
    plt = _pyplot()
    L, H = values.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * H, 1.0 + 0.22 * L))
    im = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="mean log beta" if log else "mean beta")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_title("retention per head")
    return _save(fig, path)


@torch.no_grad()
def kept_positions(model, ids: torch.Tensor, *, budget: int, policy: str = "trimkv", sink: int = 4,
                   window: int = 16, prefill_chunk: int = 256) -> np.ndarray:
    """Prefill ``ids`` [1, T] into a bounded cache; returns kept [layers * KV heads, T] (bool), row l*H + h.
    ``trimkv`` needs gates attached; the heuristics need none."""
    ids = ids.to(input_device(model))
    cache = policy_cache(model, policy, budget, sink=sink, window=window)
    prefill(model, ids, cache, chunk=prefill_chunk)
    T = ids.shape[1]
    rows = []
    for layer in cache.layers:
        pos = layer.kept_positions()[0]                                             # [Hkv, S]
        mask = torch.zeros(pos.shape[0], T + 1, dtype=torch.bool)
        mask.scatter_(1, torch.where(pos >= 0, pos, T).cpu(), True)
        rows.append(mask[:, :T])
    return torch.cat(rows).numpy()


def plot_kept_tokens(kept: np.ndarray, path, *, num_kv_heads: int, tokens: list[str] | None = None,
                     title: str = "kept tokens") -> Path:
    """kept [layers * KV heads, T] from :func:`kept_positions`: dark = kept at the end, light = evicted."""
    plt = _pyplot()
    R, T = kept.shape
    fig, ax = plt.subplots(figsize=(min(3 + T / 40, 18), 1.2 + 0.12 * R))
    ax.imshow(kept, aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    ax.set_xlabel("token position")
    ax.set_ylabel("layer (rows: its KV heads)")
    layers = R // num_kv_heads
    step = max(1, layers // 10)
    ax.set_yticks([l * num_kv_heads for l in range(0, layers, step)], [str(l) for l in range(0, layers, step)])
    if tokens is not None and len(tokens) <= 80:
        ax.set_xticks(range(len(tokens)), [t.replace("\n", "\\n") for t in tokens], rotation=90, fontsize=6)
    ax.set_title(title)
    return _save(fig, path)
