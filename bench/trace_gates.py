"""How well gates order tokens by their utility, measured on a trace store without running the model.

    python -m bench.trace_gates STORE --gates distilled=checkpoints/smollm2-135m-qa-m64 fitted=runs/gates-fitted \
        --utility answer --budgets 64,128 --rows 56-63 --json results/trace-gates.json

For every layer and budget M: ``kept`` = the share of the utility an oracle cache of M tokens keeps that the top-M by
``(t - i) log beta_i`` keeps (:func:`trimkv.trace.fit.kept_utility`), at every 16th step past M (``all steps``) and at
the step that produces the first answer token of each QA row (``at answer``). The first ``--sink`` tokens (default
4) are kept by every method and left out of the measure (the attention sink would dominate it); the baseline
``recency`` keeps the newest M - sink beside them (StreamingLLM). Averaged over layers and KV heads.
With ``--pool``, instead: for every gate set, the share the global pool keeps (the top ``(M - sink - window) x layers x
KV heads`` scores over all heads, against the best tokens of all heads) and the per-head share at the same steps
(:func:`trimkv.trace.pool.kept_share`; sink and window left out of both).

    python -m bench.trace_gates STORE --pool --gates distilled=checkpoints/smollm2-135m-qa-m64 --utility recon \
        --budgets 64 --rows 0-15 --json results/trace-pool/trace_measures_recon.json

Not run by tests/test_bench.py (it needs a store); numbers come from here, never from tests.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _rows(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def answer_steps(loss_mask: torch.Tensor) -> torch.Tensor | None:
    """[R, 1] the query producing each row's first answer token (rows without one: None overall)."""
    aq = torch.zeros_like(loss_mask)
    aq[:, :-1] = loss_mask[:, 1:]
    if not bool(aq.any(-1).all()):
        return None
    return aq.float().argmax(-1, keepdim=True)


def layer_sums(store, gates: dict, rows: list[int], budgets: list[int], layers: list[int], utility: str, *,
               sink: int) -> dict[tuple, list[float]]:
    """{(method, M, when): one kept share per layer}: each gate set and recency, at every step and at the answer."""
    from trimkv.trace.fit import gate_input, kept_utility, utility_of

    steps = answer_steps(store.tokens(rows)["loss_mask"])
    sums: dict[tuple, list[float]] = {}
    for layer in layers:
        lt = store.layer(layer, rows=rows, hidden=any(not g.config.reads_kv for g in gates.values()) or None)
        u = utility_of(lt, {utility: 1.0})
        T = u.shape[-1]
        scores = {"recency": torch.full_like(u, -1.0)}
        with torch.no_grad():
            for name, g in gates.items():
                scores[name] = g[layer](gate_input(lt, g.config))
        for name, logb in scores.items():
            for M in budgets:
                if M >= T:
                    continue
                sums.setdefault((name, M, "all steps"), []).append(
                    kept_utility(logb, u, lt.pos, lt.valid, M, sink=sink))
                if steps is not None:
                    sums.setdefault((name, M, "at answer"), []).append(
                        kept_utility(logb, u, lt.pos, lt.valid, M, steps=steps, sink=sink))
    return sums


def pool_sums(store, gates: dict, rows: list[int], budgets: list[int], utility: str, *, sink: int,
              window: int) -> dict[tuple, list[float]]:
    """{(gates, M, "pool" / "per head, same steps"): [kept share]} over all layers at once (--pool)."""
    from trimkv.trace.pool import kept_share, pool_trace

    sums: dict[tuple, list[float]] = {}
    for name, g in gates.items():
        pt = pool_trace(store, g, {utility: 1.0}, rows=rows)
        for M in budgets:
            share = kept_share(pt, M, sink=sink, window=window)
            for when, key in (("pool", "pool"), ("per head, same steps", "per_head")):
                sums[(name, M, when)] = [] if share[key] is None else [share[key]]   # None: no step to measure
    return sums


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store")
    p.add_argument("--gates", nargs="*", default=[], metavar="NAME=CHECKPOINT")
    p.add_argument("--utility", default="answer", help="the store target to score against")
    p.add_argument("--budgets", default="64,128")
    p.add_argument("--rows", default=None, help="rows LO-HI (default: the last 8)")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: all; --pool reads all)")
    p.add_argument("--sink", type=int, default=4, help="first tokens kept by every method, left out of the measure")
    p.add_argument("--pool", action="store_true", help="the global pool's kept share instead (see the docstring)")
    p.add_argument("--window", type=int, default=16, help="with --pool: the recent tokens every method keeps")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from trimkv.share import load_gate_checkpoint
    from trimkv.trace import TraceStore

    store = TraceStore(args.store)
    rows = _rows(args.rows) if args.rows else list(range(max(store.num_rows - 8, 0), store.num_rows))
    budgets = [int(b) for b in args.budgets.split(",")]
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(store.layers)
    gates = {name: load_gate_checkpoint(path) for name, path in (g.split("=", 1) for g in args.gates)}
    t0 = time.perf_counter()
    if args.pool:
        sums = pool_sums(store, gates, rows, budgets, args.utility, sink=args.sink, window=args.window)
    else:
        sums = layer_sums(store, gates, rows, budgets, layers, args.utility, sink=args.sink)
    table = [["method", "M", "when", "kept utility"]]
    for (name, M, when), vals in sums.items():
        vals = [v for v in vals if v == v]
        table.append([name, str(M), when, f"{sum(vals) / max(len(vals), 1):.3f}"])
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    print(f"{store!r}: rows {rows[0]}-{rows[-1]}, utility {args.utility!r}, {len(layers)} layers, oracle = 1.000 "
          f"(sink {args.sink}; {time.perf_counter() - t0:.0f} s)")
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    result = {"benchmark": "trace_gates", "store": str(store.path), "rows": rows, "utility": args.utility,
              "sink": args.sink, "pool": args.pool, "window": args.window if args.pool else None,
              "gates": dict(g.split("=", 1) for g in args.gates), "rows_table": table}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
