"""Trace-fitted gates: train TRIM-KV gates on a trace store, without running the language model.

TRIM-KV evicts, at step t, the token with the lowest score ``s_t(i) = (t - i) log beta_i`` (arXiv 2512.03324). A cache
of any budget keeps the highest scores, so the gates serve every budget well when the scores *order* the tokens by
their future utility u_i (:mod:`trimkv.trace.targets`: the attention token i receives from later queries). The
objective, per layer and over sampled steps t:

* **ranking** (a RankNet-style pairwise loss, weighted by the utility gap as in LambdaRank): for pairs i, k < t of
  the same document, ``|u_i - u_k| * softplus(-sign(u_i - u_k) (s_t(i) - s_t(k)) / tau)``, normalised by the sum of
  the weights. A pair is ordered right for every budget that separates them, so sampling t (and so the ages
  t - i) covers every budget at once;
* **capacity** (the paper's term, :func:`trimkv.losses.capacity_loss`): ``S_t = sum_{i <= t} beta_i^(t - i)`` kept
  under the budget M, so distillation can start from these gates in the regime it trains in.

``loss = rank + capacity_weight * cap``. The utility is a weighted sum of the store's targets (``{"answer": 1.0,
"future@16": 0.25}``), the same at every step t, or - ``by_age`` - what is left of it from step t on
(:func:`utility_by_age`: ``future`` read as ``later@<h>`` for the largest horizon h below the token's age). Gates read what they read in the model: the attention input x (``rg``: the store must hold
``hidden``), or the post-RoPE ``[k; v]`` (``rg2`` / ``rg2-all`` / ``rg3``). Layers are independent (one gate each), so
they are fitted one after another, each from its own slice of the store (memory: one layer's rows).

:func:`kept_utility` measures a score on held-out rows: the share of the utility an oracle cache of M tokens would
keep that the gates' top-M keeps at a step t, without running the model.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..attention import capacity_sums
from ..attention_impl import packed_documents
from ..errors import DataError
from ..gate import GateConfig, RetentionGate, RetentionGates
from ..losses import capacity_loss
from .layer import LayerTrace


@dataclass
class FitSettings:
    """How gates are fitted on a store (see the module docstring).

    ``utility``: target name -> weight (a weighted sum of the store's targets). ``steps``: optimiser steps per layer,
    each over ``rows_per_step`` random rows, ``samples`` steps t per row and ``pairs`` token pairs per t and head.
    ``min_step``: the smallest t sampled (earlier steps fit any budget). ``budget``: M of the capacity term.
    ``eval_rows``: the last rows of the store, held out for :func:`kept_utility` (0 = none). ``by_age``: the utility
    from step t on (:func:`utility_by_age`; needs a store traced with the ``later`` target). ``temperature``: of the
    pairwise term (a larger one asks for larger score margins before a pair stops counting). ``recent_pairs``: the
    share of pairs whose second token is one of the ``2 * budget`` before t (:func:`ranking_loss`)."""

    utility: dict = field(default_factory=lambda: {"future": 1.0})
    by_age: bool = False
    steps: int = 200
    lr: float = 3e-3
    weight_decay: float = 0.0
    rows_per_step: int = 4
    samples: int = 16
    pairs: int = 256
    min_step: int = 16
    temperature: float = 1.0
    recent_pairs: float = 0.0
    budget: int = 64
    capacity_weight: float = 1.0
    capacity_form: str = "paper"
    eval_rows: int = 8
    seed: int = 0


def utility_of(lt: LayerTrace, weights: dict) -> torch.Tensor:
    """[R, Hkv, T] fp32: the weighted sum of the named targets (0 on padding)."""
    missing = [name for name in weights if name not in lt.utility]
    if missing:
        raise DataError(f"the trace store holds the targets {sorted(lt.utility)}, not {missing}: choose among them, "
                        "or trace again with them")
    u = sum(float(w) * lt.target(name) for name, w in weights.items())
    return u * lt.valid[:, None, :]


def utility_by_age(lt: LayerTrace, weights: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The utility of a token *from step t on*, by its age a = t - i: ``(U [K + 1, R, Hkv, T], edges [K])`` where
    ``U[k]`` is :func:`utility_of` with ``future`` replaced by ``later@<edges[k-1]>`` (``U[0]``: as given), and a token
    of age a reads ``U[number of edges below a]``: the attention it gets from queries more than h later, for the
    largest stored horizon h < a, bounds what it gets from step t on (queries at ages >= a)."""
    ages = sorted(int(name.split("@", 1)[1]) for name in lt.utility if name.startswith("later@"))
    if not ages:
        raise DataError("fitting by age reads the later@<h> targets, which this trace store does not hold: trace again "
                        "with --targets later,... (or fit without by_age)")
    if "future" not in weights:
        raise DataError(f"fitting by age replaces the 'future' target by later@<h>: give it a weight (got {weights})")
    stack = [utility_of(lt, weights)]
    for h in ages:
        w = {(f"later@{h}" if name == "future" else name): v for name, v in weights.items()}
        stack.append(utility_of(lt, w))
    return torch.stack(stack), torch.tensor(ages)


def gate_input(lt: LayerTrace, config: GateConfig) -> torch.Tensor:
    """What the gate of this layer reads in the model: x [R, T, d] or [k; v] [R, Hkv, T, 2D] (fp32)."""
    if config.reads_kv:
        return torch.cat([lt.keys, lt.values], dim=-1).float()
    if lt.hidden is None:
        raise DataError(f"{config.gate_type} gates read the attention input x, and this trace store does not keep it "
                        f"for layer {lt.layer}: trace again with --hidden, or fit a gate that reads [k; v] (rg2)")
    return lt.hidden.float()


def _starts(pos: torch.Tensor) -> torch.Tensor:
    """[R, T] index of the first token of each token's document (positions restart at 0 for each document)."""
    T = pos.shape[1]
    idx = torch.arange(T, device=pos.device).expand_as(pos)
    return (idx - pos).clamp_min(0)


def sample_steps(pos: torch.Tensor, valid: torch.Tensor, samples: int, min_step: int,
                 generator: torch.Generator) -> torch.Tensor:
    """[R, samples] step indices t, uniform over the valid tokens with at least ``max(min_step, 2)`` tokens of their
    document before them (rows with none: the last valid token)."""
    ok = valid & (pos >= max(min_step, 2))
    w = torch.where(ok.any(-1, keepdim=True), ok, valid & (pos >= 1)).float()
    w = w + (w.sum(-1, keepdim=True) == 0).float()         # a row of one token: any t (its pairs weigh nothing)
    return torch.multinomial(w.cpu(), samples, replacement=True, generator=generator).to(pos.device)


def draw_pairs(pos: torch.Tensor, steps: torch.Tensor, pairs: int, generator: torch.Generator, *,
               recent: float = 0.0, recent_span: int = 128) -> torch.Tensor:
    """[R, m, P, 2] token indices i, k < t of t's document for each step t of ``steps`` [R, m]: uniform, except that
    a share ``recent`` of the k are drawn among the last ``recent_span`` tokens before t."""
    R, m = steps.shape
    start = _starts(pos).gather(1, steps)                                    # [R, m]
    span = (steps - start).clamp_min(1).float()                              # tokens before t in its document
    draw = torch.rand(R, m, pairs, 2, generator=generator).to(pos.device)
    idx = start[..., None, None] + (draw * span[..., None, None]).long()     # [R, m, P, 2]
    if recent:
        near = torch.rand(R, m, pairs, generator=generator).to(pos.device) < recent
        late = (steps[..., None] - 1 - (draw[..., 1] * span.clamp_max(recent_span)[..., None]).long())
        late = late.clamp_min(start[..., None])
        idx[..., 1] = torch.where(near, late, idx[..., 1])
    return torch.minimum(idx, (steps - 1).clamp_min(0)[..., None, None])


def ranking_loss(logb: torch.Tensor, utility: torch.Tensor, pos: torch.Tensor, steps: torch.Tensor, *,
                 pairs: int, generator: torch.Generator, temperature: float = 1.0,
                 edges: torch.Tensor | None = None, recent: float = 0.0, recent_span: int = 128) -> torch.Tensor:
    """The pairwise ranking term (module docstring). logb [R, Hkv, T]; utility [R, Hkv, T], or [K + 1, R, Hkv, T] by
    age with ``edges`` [K] (:func:`utility_by_age`); pos [R, T]; steps [R, m] indices t. Pairs i, k are drawn
    uniformly among the tokens of t's document before t; with ``recent`` > 0 that share of the k are drawn among the
    last ``recent_span`` tokens before t instead: the young tokens an old one competes with for a small budget."""
    R, H, T = logb.shape
    m = steps.shape[1]
    idx = draw_pairs(pos, steps, pairs, generator, recent=recent, recent_span=recent_span)   # [R, m, P, 2]
    flat = idx.reshape(R, 1, -1).expand(R, H, -1)                            # [R, H, m * P * 2]
    lb = logb.gather(2, flat).reshape(R, H, m, pairs, 2)
    age = (pos.gather(1, steps)[..., None, None] - pos.gather(1, idx.reshape(R, -1)).reshape(R, m, pairs, 2)).float()
    if utility.dim() == 4:                                                   # by age: U[k] for k edges below the age
        K1 = utility.shape[0]
        u_all = utility.gather(3, flat[None].expand(K1, -1, -1, -1)).reshape(K1, R, H, m, pairs, 2)
        bucket = (age[..., None] > edges.to(age.device).float()).sum(-1)     # [R, m, P, 2]
        u = u_all.gather(0, bucket[None, :, None].expand(1, R, H, m, pairs, 2))[0]
    else:
        u = utility.gather(2, flat).reshape(R, H, m, pairs, 2)
    s = age[:, None] * lb                                                    # [R, H, m, P, 2] scores at step t
    gap = u[..., 0] - u[..., 1]
    w = gap.abs()
    loss = w * F.softplus(-torch.sign(gap) * (s[..., 0] - s[..., 1]) / temperature)
    return loss.sum() / w.sum().clamp_min(1e-12)


def layer_loss(gate: RetentionGate, x: torch.Tensor, utility: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor,
               settings: FitSettings, generator: torch.Generator,
               edges: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{"loss", "rank", "cap"}`` of one layer's gate on a batch of rows (x: :func:`gate_input` of those rows;
    utility [R, Hkv, T], or by age [K + 1, R, Hkv, T] with ``edges``)."""
    logb = gate(x)                                                           # [R, Hkv, T]
    steps = sample_steps(pos, valid, settings.samples, settings.min_step, generator)
    rank = ranking_loss(logb, utility, pos, steps, pairs=settings.pairs, generator=generator,
                        temperature=settings.temperature, edges=edges, recent=settings.recent_pairs,
                        recent_span=2 * settings.budget)
    cap = torch.zeros((), device=logb.device)
    if settings.capacity_weight:
        S = capacity_sums(logb.masked_fill(~valid[:, None, :], 0.0), pos, seg=packed_documents(pos), valid=valid)
        cap = capacity_loss(S, pos, settings.budget, form=settings.capacity_form, valid=valid)
    return {"loss": rank + settings.capacity_weight * cap, "rank": rank.detach(), "cap": cap.detach()}


def fit_gates(store, gates: RetentionGates, settings: FitSettings | None = None, *, layers=None,
              progress=print) -> dict:
    """Fit ``gates`` (in place) on ``store`` (a :class:`~trimkv.trace.store.TraceStore`), layer by layer; returns
    per-layer metrics (the last step's losses, and :func:`kept_utility` on the held-out rows). ``progress``: a
    function given one line per layer (None = silent)."""
    settings = settings or FitSettings()
    cfg = gates.config
    if cfg.gate_type == "rg10":
        raise DataError("rg10 gates share their last layer across layers; fitting them on a trace store is not "
                        "supported yet: use rg, rg2, rg2-all or rg3")
    s = store.manifest["shapes"]
    if (cfg.num_layers, cfg.num_kv_heads, cfg.hidden_size, cfg.head_dim) != \
            (s["num_layers"], s["num_kv_heads"], s["hidden_size"], s["head_dim"]):
        raise DataError(f"the gates are shaped for {cfg.num_layers} layers x {cfg.num_kv_heads} KV heads (hidden "
                        f"{cfg.hidden_size}, head dim {cfg.head_dim}); the store's model has {s['num_layers']} x "
                        f"{s['num_kv_heads']} (hidden {s['hidden_size']}, head dim {s['head_dim']})")
    n = store.num_rows
    held = min(settings.eval_rows, max(n - 1, 0))
    train_rows = list(range(n - held))
    g = torch.Generator().manual_seed(settings.seed)
    metrics = {}
    for layer in (layers if layers is not None else store.layers):
        t0, cpu0 = time.perf_counter(), time.process_time()
        lt = store.layer(layer, hidden=not cfg.reads_kv)
        x, u = gate_input(lt, cfg), utility_of(lt, settings.utility)
        ut, edges = utility_by_age(lt, settings.utility) if settings.by_age else (u, None)
        gate = gates[layer]
        device = next(gate.parameters()).device
        opt = torch.optim.AdamW(gate.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        for step in range(settings.steps):
            pick = torch.tensor(train_rows)[torch.randint(len(train_rows), (settings.rows_per_step,), generator=g)]
            up = ut[:, pick] if settings.by_age else ut[pick]
            out = layer_loss(gate, x[pick].to(device), up.to(device), lt.pos[pick].to(device),
                             lt.valid[pick].to(device), settings, g, edges)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
        m = {k: round(float(v.detach()), 5) for k, v in out.items()}
        if held:
            rows = list(range(n - held, n))
            with torch.no_grad():
                logb = gate(x[rows].to(device)).cpu()
            m["kept"] = round(kept_utility(logb, u[rows], lt.pos[rows], lt.valid[rows], settings.budget), 4)
            m["kept_recency"] = round(kept_utility(torch.full_like(logb, -1.0), u[rows], lt.pos[rows],
                                                   lt.valid[rows], settings.budget), 4)
        m["seconds"] = round(time.perf_counter() - t0, 2)
        m["cpu_seconds"] = round(time.process_time() - cpu0, 2)
        metrics[layer] = m
        if progress:
            progress(f"fit layer {layer}: " + ", ".join(f"{k} {v}" for k, v in m.items()))
        del x, u, ut, lt
    return metrics


def gates_for_store(store, **fields) -> RetentionGates:
    """Fresh gates shaped for the store's model (``fields``: GateConfig's gate_type, gate_hidden, bias_init, ...), as
    :class:`~trimkv.share.PretrainedGates`, recording the store's base model."""
    from ..base_model import DEFAULT_WEIGHTS, is_default_model
    from ..share import PretrainedGates

    s, model = store.manifest["shapes"], store.manifest["model"]
    base = {"base_model": model.get("name_or_path") or model.get("name") or None}
    if is_default_model(model.get("name")) or is_default_model(model.get("name_or_path")):
        base = {"base_model": DEFAULT_WEIGHTS["base_model"], "base_revision": DEFAULT_WEIGHTS["base_revision"],
                "base_load_kwargs": {"name": "smollm2"}}
    config = GateConfig(num_layers=s["num_layers"], hidden_size=s["hidden_size"], num_kv_heads=s["num_kv_heads"],
                        head_dim=s["head_dim"], **{**base, **fields})
    return PretrainedGates(config)


def save_fitted(gates: RetentionGates, path, store, settings: FitSettings | None, metrics: dict | None = None, *,
                pool=None, pool_metrics: dict | None = None):
    """Write trace-fitted gates as a gate checkpoint (``gates.init_from`` of a distillation recipe reads it); the
    config records the budget and the objective, the card the store it was fitted on. ``settings`` None: no per-layer
    fit this time (gates given by ``--init``, only calibrated). ``pool``: the
    :class:`~trimkv.trace.pool.PoolSettings` of a pool calibration, with its ``pool_metrics``."""
    import dataclasses

    from ..share import save_gates

    stamp = {"store": Path(str(store.path)).name, "store_fingerprint": store.manifest["fingerprint"]}
    extra = dict(gates.config.extra)
    meta = {"trace_store": store.manifest.get("data_description"), "rows": store.num_rows}
    if settings is not None:
        gates.config.train_budget = settings.budget
        gates.config.loss_weights = {"trace_rank": 1.0, "capacity": settings.capacity_weight,
                                     "capacity_form": settings.capacity_form}
        extra["trace_fit"] = {**stamp, "settings": dataclasses.asdict(settings)}
        meta["objective"] = ("trace-fitted (trimkv.trace.fit): pairwise ranking of (t - i) log beta by "
                             f"{settings.utility} + capacity")
        kept = [m["kept"] for m in (metrics or {}).values() if "kept" in m]
        if kept:
            meta["held_out_kept_utility"] = round(sum(kept) / len(kept), 4)
    if pool is not None:
        extra["pool_calibration"] = {**stamp, "settings": dataclasses.asdict(pool), "metrics": pool_metrics or {}}
        meta["pool_calibration"] = (f"per-(layer, KV head) bias shifts for the global pool (trimkv.trace.pool), by "
                                    f"{pool.utility}")
    gates.config.extra = extra
    return save_gates(gates, path, metadata=meta)


@torch.no_grad()
def kept_utility(logb: torch.Tensor, utility: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, budget: int,
                 steps: torch.Tensor | None = None, sink: int = 0) -> float:
    """The mean, over rows, heads and steps t, of the utility of the M tokens with the highest scores
    ``(t - i) log beta_i`` among i < t, over the utility of the best M (the oracle); t = every 16th valid token past
    M (or ``steps`` [R, m]). Ties among scores are broken toward recent tokens. 1.0 = the oracle. ``sink``: the first
    tokens of each document are kept by every method (as the caches' ``sink`` does) and left out of both sides, which
    then choose ``M - sink`` tokens (the attention sink would otherwise dominate the utility)."""
    R, H, T = logb.shape
    idx = torch.arange(T)
    ratios = []
    if not 0 <= sink < budget:
        raise ValueError(f"sink={sink} must leave room in the budget M={budget}")
    budget -= sink
    for r in range(R):
        L = int(valid[r].sum())
        ts = steps[r].tolist() if steps is not None else list(range(budget + sink + 1, L, 16))
        for t in ts:
            seg0 = int(t - pos[r, t])
            before = (idx >= seg0 + sink) & (idx < t)
            if int(before.sum()) <= budget:
                continue
            age = (pos[r, t] - pos[r]).float()
            score = (age * logb[r]).masked_fill(~before, -math.inf) + idx * 1e-9   # [H, T]
            keep = score.topk(budget, dim=-1).indices
            u = utility[r].masked_fill(~before, 0.0)
            best = u.topk(budget, dim=-1).values.sum(-1)
            got = u.gather(1, keep).sum(-1)
            ok = best > 0
            ratios += (got[ok] / best[ok]).tolist()
    return float(sum(ratios) / len(ratios)) if ratios else float("nan")
