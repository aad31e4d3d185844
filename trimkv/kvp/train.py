"""Training KVP rankers on a trace store, one decoder layer at a time (arXiv 2602.10238, Alg. 1, offline: no LLM runs).

    rankers = train_rankers(store.layer, config, steps=300, time_limit=600)

For each layer (``traces(l)`` -> :class:`~trimkv.trace.LayerTrace`), every KV head's ranker trains at once (the heads
are independent; their weights are batched). A step, as in the paper's Algorithm 1:

1. draw ``rows`` rows and, per row, a cache size n ~ U[min_cache, row length] (the first n tokens are the cache);
2. the candidates are that cache less what the bounded cache protects anyway (the first ``sink`` positions and the
   last ``window`` tokens; the paper likewise never ranks the first 4 and last 16), at most ``tokens`` of them
   drawn uniformly (the pairwise objective is O(tokens^2));
3. loss = the objective (:mod:`trimkv.kvp.objective`) of the rankers' scores against the trace's utility target.

Deviation: the paper's utility of a token is the attention it receives from the queries after the cut n; the trace
store keeps one target per token over all later queries (``future``: max over them), so the cut chooses which
tokens compete, not what they are worth.

k, v and the position feature are standardised per (head, feature) from the layer's data, and the affine map is
folded into the first linear map when the layer is done, so the saved rankers read raw keys and values. Each layer
gets an equal share of what is left of ``time_limit`` (seconds); a layer stops at its step count or its share (but
not before 20 steps).
``on_layer`` (layer index, rankers, metrics) runs after each layer: the command line saves a resumable checkpoint
there.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Callable, Iterable

import torch

from ..progress import Progress
from ..trace import LayerTrace
from .objective import OBJECTIVES, expected_loss, normalized_cost, rloo_loss
from .ranker import KVPConfig, KVPRankers, position_feature


def features(trace: LayerTrace, rows: torch.Tensor, idx: torch.Tensor, pos_scale: int) -> torch.Tensor:
    """[k, v, phi(pos)] of tokens ``idx`` [Rb, N] of rows ``rows`` [Rb] -> [Rb, H, N, 2D + 1] fp32."""
    H, D = trace.num_kv_heads, trace.keys.shape[-1]
    at = idx[:, None, :, None].expand(-1, H, -1, D)
    k = trace.keys[rows].gather(2, at).float()
    v = trace.values[rows].gather(2, at).float()
    p = position_feature(trace.pos[rows].gather(1, idx), pos_scale)[:, None, :, None].expand(-1, H, -1, 1)
    return torch.cat([k, v, p], -1)


def candidates(trace: LayerTrace, rows: torch.Tensor, *, tokens: int, sink: int, window: int, min_cache: int,
               generator: torch.Generator | None, full: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices [Rb, N] and their mask [Rb, N] of one draw: a random cache prefix per row (the whole row when
    ``full``), less the sink positions and the last ``window`` tokens, subsampled to ``tokens``."""
    valid = trace.valid[rows]                                                        # [Rb, T]
    order = torch.cumsum(valid.long(), 1) - 1                                        # index among the valid tokens
    length = valid.sum(1)                                                            # [Rb]
    if full:
        cut = length
    else:
        lo = torch.minimum(length, torch.full_like(length, min_cache))
        cut = lo + (torch.rand(length.shape, generator=generator) * (length - lo + 1).float()).long()
    keep = valid & (order < cut[:, None]) & (order < (cut - window)[:, None]) & (trace.pos[rows] >= sink)
    draw = torch.rand(keep.shape, generator=generator).masked_fill(~keep, -1.0)
    n = min(tokens, keep.shape[1])
    val, idx = draw.topk(n, dim=1)
    return idx, val >= 0


def standardizer(trace: LayerTrace, pos_scale: int, sample: int = 4096,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(head, feature) mean and std [H, 2D + 1] of the layer's features, from up to ``sample`` tokens per head."""
    R, T = trace.valid.shape
    flat = trace.valid.reshape(-1).nonzero().squeeze(1)
    pick = flat[torch.randperm(flat.numel(), generator=generator)[:sample]]
    r, t = pick // T, pick % T
    p = position_feature(trace.pos[r, t], pos_scale)[:, None, None].expand(-1, trace.num_kv_heads, 1)
    x = torch.cat([trace.keys[r, :, t].float(), trace.values[r, :, t].float(), p], -1)   # [n, H, Din]
    return x.mean(0), x.std(0).clamp_min(1e-4)


def train_layer(trace: LayerTrace, config: KVPConfig, *, steps: int, rows: int, tokens: int, lr: float, sink: int,
                window: int, min_cache: int, objective: str, samples: int, seconds: float | None, seed: int,
                val_rows: torch.Tensor, train_rows: torch.Tensor, bar: Progress | None = None,
                min_steps: int = 20) -> tuple[KVPRankers, dict]:
    """One layer's rankers (a one-layer :class:`KVPRankers`, inputs folded) and its metrics; at least ``min_steps``
    steps (or ``steps``, if fewer) whatever the time share says, so no layer is left untrained."""
    g = torch.Generator().manual_seed(seed)
    one = KVPRankers(replace(config, num_layers=1), seed=seed)
    shift, scale = standardizer(trace, config.pos_scale, generator=g)
    target = trace.target(config.target)
    opt = torch.optim.Adam(one.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1))))
    t0, done, loss = time.perf_counter(), 0, float("nan")
    for step in range(steps):
        if seconds is not None and step >= min_steps and time.perf_counter() - t0 > seconds:
            break
        rb = train_rows[torch.randint(len(train_rows), (min(rows, len(train_rows)),), generator=g)]
        idx, mask = candidates(trace, rb, tokens=tokens, sink=sink, window=window, min_cache=min_cache, generator=g)
        x = (features(trace, rb, idx, config.pos_scale) - shift[:, None]) / scale[:, None]
        u = target[rb].gather(2, idx[:, None, :].expand(-1, trace.num_kv_heads, -1))        # [Rb, H, N]
        m = mask[:, None, :].expand_as(u)
        s = one.score_features(0, x)
        out = expected_loss(s, u, m) if objective == "expected" else rloo_loss(s, u, m, samples=samples, generator=g)
        opt.zero_grad(set_to_none=True)
        out.backward()
        torch.nn.utils.clip_grad_norm_(one.parameters(), 5.0)
        opt.step()
        sched.step()
        done, loss = step + 1, float(out.detach())
        if bar is not None and step % 10 == 0:
            bar.update(info=f"layer {trace.layer} step {done} loss {loss:.3f}")
    one.fold_inputs_(0, shift, scale)
    metrics = dict(layer=trace.layer, steps=done, loss=round(loss, 4), seconds=round(time.perf_counter() - t0, 1))
    metrics.update(validate(one, trace, config, val_rows, tokens=tokens, sink=sink, window=window, seed=seed))
    return one, metrics


@torch.no_grad()
def validate(one: KVPRankers, trace: LayerTrace, config: KVPConfig, rows: torch.Tensor, *, tokens: int, sink: int,
             window: int, seed: int) -> dict:
    """Held-out normalised all-budget cost (1 = the best order) of the rankers, of recency (newest first) and of a
    random order, on whole rows (up to ``tokens`` candidates each), averaged over rows and heads."""
    if len(rows) == 0:
        return {}
    g = torch.Generator().manual_seed(seed + 1)
    idx, mask = candidates(trace, rows, tokens=tokens, sink=sink, window=window, min_cache=0, generator=g, full=True)
    u = trace.target(config.target)[rows].gather(2, idx[:, None, :].expand(-1, trace.num_kv_heads, -1))
    m = mask[:, None, :].expand_as(u)
    pos = trace.pos[rows].gather(1, idx)[:, None, :].expand_as(u).float()
    got = dict(kvp=one.score_features(0, features(trace, rows, idx, config.pos_scale)),
               recency=pos, random=torch.rand(u.shape, generator=g))
    return {f"val_cost_{k}": round(float(normalized_cost(s, u, m).mean()), 4) for k, s in got.items()}


def train_rankers(traces: Callable[[int], LayerTrace], config: KVPConfig, *, steps: int = 300, rows: int = 8,
                  tokens: int = 256, lr: float = 3e-3, sink: int = 4, window: int = 16, min_cache: int = 64,
                  objective: str = "expected", samples: int = 8, val_fraction: float = 0.1,
                  time_limit: float | None = None, seed: int = 0, layers: Iterable[int] | None = None,
                  rankers: KVPRankers | None = None, on_layer: Callable | None = None,
                  progress: bool = True) -> KVPRankers:
    """Train every layer of ``layers`` (default all) into ``rankers`` (default: new ones) and return them."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    rankers = rankers if rankers is not None else KVPRankers(replace(config, objective=objective), seed=seed)
    todo = list(range(config.num_layers) if layers is None else layers)
    t0 = time.perf_counter()
    with Progress("kvp", total=len(todo), enabled=progress) as bar:
        for i, layer in enumerate(todo):
            trace = traces(layer)
            _check_trace(trace, config, layer)
            share = None
            if time_limit is not None:
                share = max(0.0, time_limit - (time.perf_counter() - t0)) / (len(todo) - i)
            perm = torch.randperm(trace.num_rows, generator=torch.Generator().manual_seed(seed))
            n_val = max(1, int(trace.num_rows * val_fraction)) if trace.num_rows > 1 and val_fraction > 0 else 0
            one, metrics = train_layer(trace, config, steps=steps, rows=rows, tokens=tokens, lr=lr, sink=sink,
                                       window=window, min_cache=min_cache, objective=objective, samples=samples,
                                       seconds=share, seed=seed * 1000 + layer, val_rows=perm[:n_val],
                                       train_rows=perm[n_val:], bar=bar)
            with torch.no_grad():
                for name, p in one.named_parameters():
                    getattr(rankers, name)[layer] = p[0]
            if on_layer is not None:
                on_layer(layer, rankers, metrics)
            bar.update(advance=1, info=" ".join(f"{k} {v}" for k, v in metrics.items() if k != "layer"))
    return rankers


def _check_trace(trace: LayerTrace, config: KVPConfig, layer: int) -> None:
    R, H, T, D = trace.keys.shape
    if trace.layer != layer or H != config.num_kv_heads or D != config.head_dim:
        raise ValueError(f"trace of layer {trace.layer} ({H} KV heads of dim {D}) does not fit rankers for layer "
                         f"{layer} with {config.num_kv_heads} KV heads of dim {config.head_dim}")
    if config.target not in trace.utility:
        raise ValueError(f"trace of layer {layer} holds the targets {sorted(trace.utility)}, not {config.target!r}")
