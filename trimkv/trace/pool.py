"""Pool calibration: one bias shift per (layer, KV head), so that gates fitted layer by layer serve the global pool.

The global pool (:mod:`trimkv.serve.pool`, DBTrimKV's cache, ``--policies trimkv-global``) keeps, at each step t, the
tokens with the highest scores ``(t - i) log beta_i`` over *all* layers and KV heads. Gates fitted one layer at a time
(:mod:`trimkv.trace.fit`) order the tokens of each head, but nothing in that fit says how one head's scores compare
with another's (distillation learns it from the KL of the whole model). Here a shift ``b[l, h]`` of each head's bias is
fitted on the trace store instead. With ``log beta = logsigmoid(z + b) ~ -exp(-(z + b))`` for the tokens worth keeping
(beta near 1), the shift scales the head's scores by about ``exp(-b)``: it sets how much of the pool the head holds,
and leaves the head's own order nearly as it was.

The objective is the fit's pairwise ranking (:func:`trimkv.trace.fit.ranking_loss`), over pairs of tokens drawn from
*any* two (layer, head)s of a row at a sampled step t, among the tokens the pool may evict (past the sink, before the
recent window), weighted by their utility gap. The utility must compare across layers: KVzip's reconstruction score
(``recon``, the attention a token gets while the model repeats its context; ``trimkv trace --targets recon``) does.

Memory: the gate logits and the utility of every layer for the rows used ([L, R, Hkv, T] fp32 each), one layer's
stored inputs at a time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import DataError
from ..gate import SHARED_HEAD_TYPES, RetentionGates


@dataclass
class PoolSettings:
    """How the shifts are fitted. ``utility``: target name -> weight (as :class:`~trimkv.trace.fit.FitSettings`).
    ``steps`` optimiser steps (Adam, ``lr``), each over ``rows_per_step`` rows, one step t and ``pairs`` token pairs per
    row. ``sink`` / ``window``: the tokens the pool always keeps (left out of the pairs and the measure). ``budget``:
    the mean tokens per head of the held-out measure (:func:`kept_share`). ``eval_rows``: the last rows of the store,
    held out for it."""

    utility: dict = field(default_factory=lambda: {"recon": 1.0})
    steps: int = 300
    lr: float = 0.05
    rows_per_step: int = 4
    pairs: int = 8192
    temperature: float = 1.0
    sink: int = 4
    window: int = 16
    budget: int = 64
    eval_rows: int = 8
    seed: int = 0


@dataclass
class PoolTrace:
    """What the calibration reads, for R rows: the gate logits (``log beta = logsigmoid(logits)``) and the utility of
    every layer [L, R, Hkv, T] fp32, positions and the valid mask [R, T]."""

    logits: torch.Tensor
    utility: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor


def check_gates(gates: RetentionGates) -> None:
    if gates.config.gate_type in SHARED_HEAD_TYPES:
        raise DataError(f"{gates.config.gate_type} gates share one bias across layers and are calibrated for the pool "
                        "by their own training: pool calibration shifts the per-layer biases of rg, rg2, rg2-all or "
                        "rg3 gates")


@torch.no_grad()
def pool_trace(store, gates: RetentionGates, utility: dict, rows=None, batch: int = 16) -> PoolTrace:
    """The gates' logits and the weighted utility (:func:`~trimkv.trace.fit.utility_of`) of every layer of ``store``
    for ``rows`` (default: all)."""
    from .fit import gate_input, utility_of

    check_gates(gates)
    missing = [layer for layer in range(gates.config.num_layers) if layer not in store.layers]
    if missing:
        raise DataError(f"pool calibration compares every layer's scores, and the trace store lacks layers {missing}: "
                        "trace all layers (--layers all)")
    logits, utils = [], []
    for layer in range(gates.config.num_layers):
        lt = store.layer(layer, rows, hidden=not gates.config.reads_kv)
        x, gate = gate_input(lt, gates.config), gates[layer]
        device = next(gate.parameters()).device
        logits.append(torch.cat([gate.logits(x[i:i + batch].to(device)).cpu() for i in range(0, x.shape[0], batch)]))
        utils.append(utility_of(lt, utility))
        pos, valid = lt.pos, lt.valid
    return PoolTrace(torch.stack(logits), torch.stack(utils), pos, valid)


def evictable(pos: torch.Tensor, t: int, sink: int, window: int) -> tuple[int, int]:
    """[lo, hi): the tokens of step t's document (one row's ``pos`` [T]) that the pool may evict at t - past the
    document's first ``sink`` tokens, before the last ``window`` ones."""
    start = t - int(pos[t])
    return start + sink, t - window


def pool_loss(shift: torch.Tensor, pt: PoolTrace, rows: list[int], settings: PoolSettings,
              generator: torch.Generator) -> torch.Tensor:
    """The cross-head pairwise ranking term (module docstring) at one random step t of each row of ``rows``; shift
    [L, Hkv]."""
    L, _, H, _ = pt.logits.shape
    losses = []
    for r in rows:
        n = int(pt.valid[r].sum())
        lo_t = settings.sink + settings.window + 2
        if n <= lo_t:
            continue
        t = int(torch.randint(lo_t, n, (1,), generator=generator))
        lo, hi = evictable(pt.pos[r], t, settings.sink, settings.window)
        if hi - lo < 2:
            continue
        P = settings.pairs
        li = torch.randint(L, (P, 2), generator=generator)
        hh = torch.randint(H, (P, 2), generator=generator)
        ii = torch.randint(lo, hi, (P, 2), generator=generator)
        z, u = pt.logits[li, r, hh, ii], pt.utility[li, r, hh, ii]
        age = (pt.pos[r, t] - pt.pos[r, ii]).float()
        s = age * F.logsigmoid(z + shift[li, hh])
        gap = u[:, 0] - u[:, 1]
        w = gap.abs()
        if float(w.sum()) <= 0:
            continue
        losses.append((w * F.softplus(-torch.sign(gap) * (s[:, 0] - s[:, 1]) / settings.temperature)).sum() / w.sum())
    return torch.stack(losses).mean() if losses else shift.sum() * 0.0


def fit_shifts(pt: PoolTrace, settings: PoolSettings, rows: list[int]) -> torch.Tensor:
    """The bias shifts [L, Hkv] that minimise :func:`pool_loss` over ``rows`` (from zero)."""
    if not rows:
        raise DataError("pool calibration needs rows to fit on: the store holds no more rows than --eval-rows")
    L, _, H, _ = pt.logits.shape
    g = torch.Generator().manual_seed(settings.seed)
    shift = torch.zeros(L, H, requires_grad=True)
    opt = torch.optim.Adam([shift], lr=settings.lr)
    pick = torch.tensor(rows)
    for _ in range(settings.steps):
        batch = pick[torch.randint(len(rows), (settings.rows_per_step,), generator=g)].tolist()
        loss = pool_loss(shift, pt, batch, settings, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return shift.detach()


@torch.no_grad()
def kept_share(pt: PoolTrace, budget: int, shift: torch.Tensor | None = None, rows=None, *, sink: int = 4,
               window: int = 16, every: int = 64) -> dict[str, float]:
    """How much of the evictable utility the scores keep, against an oracle that keeps the best tokens, at every
    ``every``-th step t of ``rows``: ``{"pool": ..., "per_head": ...}``. ``pool``: the top ``(budget - sink - window)
    x L x Hkv`` scores over all layers and heads (the global pool), against the best tokens of all heads; ``per_head``:
    the top ``budget - sink - window`` of each head against that head's best, averaged over heads (as
    :func:`~trimkv.trace.fit.kept_utility`). 1.0 = the oracle's choice."""
    L, R, H, T = pt.logits.shape
    shift = torch.zeros(L, H) if shift is None else shift
    k = budget - sink - window
    if k < 1:
        raise ValueError(f"budget={budget} must exceed sink + window = {sink + window}")
    pool, head = [], []
    for r in (range(R) if rows is None else rows):
        n = int(pt.valid[r].sum())
        lb = F.logsigmoid(pt.logits[:, r] + shift[:, :, None])                   # [L, H, T]
        for t in range(budget + 1, n, every):
            lo, hi = evictable(pt.pos[r], t, sink, window)
            if hi - lo <= k:
                continue
            s = (pt.pos[r, t] - pt.pos[r, lo:hi]).float() * lb[:, :, lo:hi]      # [L, H, C]
            u = pt.utility[:, r, :, lo:hi]
            best = u.topk(k, -1).values.sum(-1)                                  # [L, H]
            got = u.gather(2, s.topk(k, -1).indices).sum(-1)
            head += (got[best > 0] / best[best > 0]).tolist()
            flat_u = u.flatten()
            best = flat_u.topk(k * L * H).values.sum()
            if best > 0:
                pool.append(float(flat_u[s.flatten().topk(k * L * H).indices].sum() / best))
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None          # noqa: E731 (None: no step to measure)
    return {"pool": mean(pool), "per_head": mean(head)}


def calibrate_pool(store, gates: RetentionGates, settings: PoolSettings | None = None, *, progress=print) -> dict:
    """Fit the bias shifts on ``store`` and add them to ``gates``' per-head biases (in place). Returns the shifts'
    range, the held-out :func:`kept_share` before and after, and the time taken."""
    settings = settings or PoolSettings()
    t0, cpu0 = time.perf_counter(), time.process_time()
    pt = pool_trace(store, gates, settings.utility)
    R = pt.logits.shape[1]
    held = min(settings.eval_rows, max(R - 1, 0))
    train, test = list(range(R - held)), list(range(R - held, R))
    shift = fit_shifts(pt, settings, train)
    with torch.no_grad():
        for layer in range(gates.config.num_layers):
            bias = gates[layer].bias
            bias += shift[layer].to(bias.device, bias.dtype)
    out = {"shift_min": round(float(shift.min()), 3), "shift_max": round(float(shift.max()), 3)}
    if test:
        kw = dict(sink=settings.sink, window=settings.window)
        out["before"] = kept_share(pt, settings.budget, None, test, **kw)
        out["after"] = kept_share(pt, settings.budget, shift, test, **kw)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["cpu_seconds"] = round(time.process_time() - cpu0, 2)
    if progress:
        progress("pool calibration: " + ", ".join(f"{k} {v}" for k, v in out.items()))
    return out
