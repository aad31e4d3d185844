"""``trimkv trace``: record what the frozen model's attention says about each token into a trace store
(:mod:`trimkv.trace`).

    trimkv trace --data builtin:qa-plain --rows 64 --seq-len 1024 --out runs/traces/qa-1k
    trimkv trace recipes/smollm2-135m-qa-m64.yaml --out runs/traces/qa --rows 32     # the recipe's model and data

Options on the command line override the recipe's ``trace:`` section, which overrides the defaults
(:class:`trimkv.trace.TraceSettings`). A folder that holds a store written with the same inputs is continued.
Building the parser imports no torch.
"""
from __future__ import annotations

import argparse
import hashlib
import json

from .command import Names, add_command, fraction, integer, integers, names, positive, quiet_loading
from .errors import DataError, UsageError
from .limits import MAX_LAYERS, MAX_TOKENS
from .names import DTYPE_CHOICES, TRACE_TARGETS

DEFAULT_DATA = "builtin:qa-plain"
DEFAULT_SEQ_LEN = 1024
STORE_DTYPES = ("float16", "bfloat16")


def layer_list(text: str):
    """``all`` or comma-separated layer indices."""
    if text.strip() == "all":
        return "all"
    return integers(0, MAX_LAYERS - 1, "a layer index")(text)


layer_list.__name__ = "layers"


def _settings(args: argparse.Namespace, base):
    """The trace settings: ``base`` (the recipe's trace section or the defaults) with the command line's options."""
    import dataclasses

    from .trace.settings import TraceSettings

    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(TraceSettings)}
    given = {"rows": args.rows, "layers": args.layers, "targets": args.targets, "horizons": args.horizons,
             "hidden_layers": args.hidden, "shard_rows": args.shard_rows, "dtype": args.store_dtype,
             "query_chunk": args.query_chunk}
    fields.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in given.items() if v is not None})
    return fields


def _data_config(args: argparse.Namespace, recipe, rows: int):
    import dataclasses

    from .data import DataConfig

    if recipe is not None and args.data is None:
        cfg = recipe.data
        return dataclasses.replace(cfg, seq_len=args.seq_len) if args.seq_len else cfg
    source = args.data or DEFAULT_DATA
    qa = source.startswith("builtin:qa")
    return DataConfig(source=source, seq_len=args.seq_len or DEFAULT_SEQ_LEN, pack=not qa,
                      max_samples=rows if qa else None, seed=args.seed)


def _trace(args: argparse.Namespace) -> int:
    recipe = None
    if args.recipe:
        from .recipe import load_recipe

        recipe = load_recipe(args.recipe, args.set)
    elif args.set:
        raise UsageError("--set changes a recipe field: give the recipe too (trimkv trace RECIPE --set ...)")
    from .recipe import TraceSection

    base = recipe.trace if recipe is not None else TraceSection()
    out = args.out or base.out
    if not out:
        raise UsageError("give --out FOLDER (where the trace store goes), or set trace.out in the recipe")
    fields = _settings(args, base)
    hidden_all = fields["hidden_layers"] == "all"
    layers_all = fields["layers"] == "all"
    if hidden_all:
        fields["hidden_layers"] = ()
    if layers_all:
        fields["layers"] = ()
    from .trace.settings import TraceSettings

    settings = TraceSettings(**fields)
    data_cfg = _data_config(args, recipe, settings.rows)

    import torch

    from .base_model import load_model
    from .eval.cli import check_device
    from .trace.collect import write_traces

    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_loading(args.verbose)
    if recipe is not None and args.model is None:
        m = recipe.model
        name = m.name
        model, tok = load_model(m.name, dtype=args.dtype if args.dtype != "auto" else m.dtype, revision=m.revision,
                                gguf_file=m.gguf_file, trust_remote_code=m.trust_remote_code, device=args.device)
    else:
        name = args.model or "smollm2"
        model, tok = load_model(name, dtype=args.dtype, device=args.device)
    if hidden_all:
        settings.hidden_layers = tuple(range(model.config.num_hidden_layers))
    recipe_hash = None
    if recipe is not None:
        recipe_hash = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
    store = write_traces(model, tok, data_cfg, out, settings, model_name=name, recipe_hash=recipe_hash,
                         overwrite=args.overwrite, progress=not args.quiet)
    cost = store.manifest["cost"]
    print(f"trimkv trace: {store!r}; {cost['tokens']:,} tokens in {cost['seconds']:.0f} s "
          f"({cost['cpu_seconds']:.0f} CPU s) this far")
    return 0


def add_trace(sub) -> None:
    t = add_command(sub, "trace", _trace,
                    "record the frozen model's keys, values and future-utility targets into a trace store",
                    description="Record what the frozen model's attention says about each token (post-RoPE keys and "
                    "values, future-utility targets, optionally the attention input) into a trace store. Rows come "
                    "from a recipe's data section or from --data; a size estimate comes first, and the store is "
                    "resumable (run the same command again to continue).")
    t.add_argument("recipe", nargs="?", default=None,
                   help="a recipe: its model, data and trace: sections (default: --data and the embedded model)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a recipe field (repeatable), e.g. --set trace.rows=16")
    t.add_argument("--data", default=None,
                   help=f"data source instead of the recipe's (default without a recipe: {DEFAULT_DATA}; the "
                        "builtin QA sources are traced one document per row)")
    t.add_argument("--rows", type=integer(1, 1 << 24, "rows"), default=None, help="rows to trace (default: 64)")
    t.add_argument("--seq-len", type=integer(2, MAX_TOKENS, "tokens per row"), default=None,
                   help=f"tokens per row (default: the recipe's data.seq_len, else {DEFAULT_SEQ_LEN})")
    t.add_argument("--seed", type=int, default=0, help="data seed (with --data)")
    t.add_argument("--model", default=None, help="base model: smollm2, a Hub id or a folder (default: the recipe's, "
                                                 "else smollm2)")
    t.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N | mps")
    t.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights dtype (auto: the recipe's, else the checkpoint's own)")
    t.add_argument("--out", default=None, help="the store's folder (default: the recipe's trace.out)")
    t.add_argument("--layers", type=layer_list, default=None, metavar="all|L[,L...]",
                   help="decoder layers to trace (default: all)")
    t.add_argument("--targets", type=names(Names(lambda: TRACE_TARGETS), "target"), default=None,
                   metavar="T[,T...]", help="targets besides future (default: future,answer; later adds later@<h> "
                                            "per horizon; mean: the mean attention received, H2O-style; recon "
                                            "adds a second forward, about 3.5x the cost)"
                   ).names = TRACE_TARGETS
    t.add_argument("--horizons", type=integers(1, MAX_TOKENS, "queries"), default=None,
                   help="one future@<h> target per horizon h (default: 16,64,256)")
    t.add_argument("--hidden", type=layer_list, default=None, metavar="all|L[,L...]",
                   help="also keep the attention input x of these layers (large: T x hidden per row and layer; "
                        "default: none)")
    t.add_argument("--shard-rows", type=integer(1, 1 << 20, "rows"), default=None,
                   help="rows per shard, the unit of resume (default: 8)")
    t.add_argument("--store-dtype", choices=STORE_DTYPES, default=None,
                   help="16-bit float of the stored tensors (default: float16)")
    t.add_argument("--query-chunk", type=integer(1, MAX_TOKENS, "queries"), default=None,
                   help="queries per attention block (memory O(chunk x T) per layer; default: 256)")
    t.add_argument("--threads", type=integer(1, 4096), default=None, help="torch CPU threads")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a store written with other inputs in --out (without it: refused)")
    t.add_argument("--quiet", action="store_true", help="no progress line")



# ------------------------------------------------------------------------------------------------- fit-trace


def utility_weights(text: str) -> dict[str, float]:
    """``answer=1,future@16=0.25`` (a name alone weighs 1) -> {name: weight}."""
    out = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, weight = item.partition("=")
        try:
            out[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: write TARGET=WEIGHT, e.g. answer=1") from None
    if not out:
        raise argparse.ArgumentTypeError("name at least one target, e.g. future or answer=1,future@16=0.25")
    return out


utility_weights.__name__ = "utility"


def _fit(args: argparse.Namespace) -> int:
    from pathlib import Path

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {out} exists: give a new folder, or --overwrite to replace it")
    if not args.steps and not args.init:
        raise UsageError("--steps 0 fits nothing on fresh gates: give --init CKPT (with --pool-steps, to calibrate "
                         "those gates for the global pool only)")
    if not args.steps and not args.pool_steps:
        raise UsageError("--steps 0 and no --pool-steps: nothing to fit")
    import torch

    from .trace import TraceStore
    from .trace.fit import FitSettings, fit_gates, gates_for_store, save_fitted

    if args.threads:
        torch.set_num_threads(args.threads)
    store = TraceStore(args.store)
    pool_utility = args.pool_utility or args.utility
    missing = sorted(set(pool_utility) - set(store.targets)) if args.pool_steps else []
    if missing:        # said before the fit, not after it
        raise DataError(f"the pool calibration ranks by {missing}, which the trace store does not hold (it holds "
                        f"{list(store.targets)}): trace again with them, or choose --pool-utility among these")
    if args.init:          # continue from gates fitted (or distilled) before: their type and width, not the flags'
        from .share import load_gate_checkpoint

        gates = load_gate_checkpoint(args.init)
    else:
        try:
            gates = gates_for_store(store, gate_type=args.gate_type, gate_hidden=args.gate_hidden,
                                    bias_init=args.bias_init)
        except ValueError as err:
            raise UsageError(str(err)) from None
    settings = FitSettings(utility=args.utility, steps=args.steps, lr=args.lr, rows_per_step=args.rows_per_step,
                           budget=args.budget, capacity_weight=args.capacity_weight, eval_rows=args.eval_rows,
                           seed=args.seed, by_age=args.by_age, temperature=args.temperature,
                           recent_pairs=args.recent_pairs)
    summary, metrics, pool = {}, {}, None
    if args.steps:
        print(f"trimkv fit-trace: {gates.config.gate_type} gates (width {gates.config.gate_hidden}) on {store!r}, "
              f"utility {settings.utility}, {settings.steps} steps per layer")
        metrics = fit_gates(store, gates, settings, layers=args.layers, progress=None if args.quiet else print)
        summary = {"seconds": round(sum(m["seconds"] for m in metrics.values()), 1),
                   "cpu_seconds": round(sum(m["cpu_seconds"] for m in metrics.values()), 1)}
        kept = [m["kept"] for m in metrics.values() if "kept" in m]
        base = [m["kept_recency"] for m in metrics.values() if "kept_recency" in m]
        if kept:
            summary.update(kept=round(sum(kept) / len(kept), 4), kept_recency=round(sum(base) / len(base), 4))
    if args.pool_steps:
        from .trace.pool import PoolSettings, calibrate_pool

        pool = PoolSettings(utility=pool_utility, steps=args.pool_steps, budget=args.budget,
                            eval_rows=args.eval_rows, seed=args.seed)
        print(f"trimkv fit-trace: one bias shift per (layer, KV head) for the global pool, utility {pool.utility}, "
              f"{pool.steps} steps")
        summary["pool"] = calibrate_pool(store, gates, pool, progress=None if args.quiet else print)
    path = save_fitted(gates, out, store, settings if args.steps else None, metrics, pool=pool,
                       pool_metrics=summary.get("pool"))
    print(json.dumps({"gates": str(path), **summary}))
    return 0


def add_fit(sub) -> None:
    f = add_command(sub, "fit-trace", _fit, "fit TRIM-KV gates on a trace store, without running the model",
                    description="Fit TRIM-KV gates on a trace store (trimkv.trace.fit): (t - i) log beta is trained "
                    "to order tokens by their utility in the store over sampled steps t, plus the capacity term. "
                    "With --pool-steps, one bias shift per (layer, KV head) then calibrates the scores across "
                    "heads for the global pool (trimkv.trace.pool). The gates are written as a checkpoint; a "
                    "distillation recipe continues from it with gates.init_from.")
    f.add_argument("store", help="a trace store folder (trimkv trace --out)")
    f.add_argument("--out", required=True, help="the gate checkpoint folder to write")
    f.add_argument("--init", default=None, metavar="CKPT",
                   help="start from these gates (a checkpoint folder or Hub id: an earlier fit to continue, or "
                        "distilled gates) instead of a fresh init; --gate-type, --gate-hidden and --bias-init are then "
                        "theirs")
    f.add_argument("--gate-type", default="rg", help="rg (reads x: the store needs --hidden) | rg2 | rg2-all | rg3")
    f.add_argument("--gate-hidden", type=integer(1, 1 << 16), default=256, help="gate MLP width")
    f.add_argument("--bias-init", type=float, default=8.0, help="initial per-head bias (beta0 = sigmoid of it)")
    f.add_argument("--utility", type=utility_weights, default={"future": 1.0}, metavar="T[=W][,T[=W]...]",
                   help="the store targets to rank by, weighted (e.g. answer=1,future@16=0.25)")
    f.add_argument("--by-age", action="store_true",
                   help="rank by the utility left from step t on (future replaced by later@<h> at each age; the "
                        "store needs the later target)")
    f.add_argument("--budget", type=integer(1, MAX_TOKENS), default=64, help="M of the capacity term")
    f.add_argument("--temperature", type=positive, default=1.0,
                   help="temperature of the pairwise ranking term (larger: larger score margins are asked for)")
    f.add_argument("--recent-pairs", type=fraction, default=0.0,
                   help="share of the pairs whose second token is among the 2 x budget tokens before the step: the "
                        "young tokens an old one competes with for a small budget")
    f.add_argument("--capacity-weight", type=float, default=1.0, help="weight of the capacity term")
    f.add_argument("--steps", type=integer(0, 10**7), default=200,
                   help="optimiser steps per layer (0: none, with --init and --pool-steps: calibrate those gates only)")
    f.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    f.add_argument("--rows-per-step", type=integer(1, 1 << 16), default=4, help="store rows per step")
    f.add_argument("--eval-rows", type=integer(0, 1 << 20), default=8,
                   help="last rows of the store held out to measure the kept utility")
    f.add_argument("--layers", type=integers(0, MAX_LAYERS - 1), default=None, help="fit only these layers")
    f.add_argument("--pool-steps", type=integer(0, 10**7), default=0,
                   help="then fit one bias shift per (layer, KV head) for this many steps, so that the scores compare "
                        "across layers and heads: gates for the global pool (--policies trimkv-global; "
                        "trimkv.trace.pool). 0 = no calibration")
    f.add_argument("--pool-utility", type=utility_weights, default=None, metavar="T[=W][,T[=W]...]",
                   help="the targets the pool calibration ranks by (default: --utility); one that compares across "
                        "layers, e.g. recon (the store needs --targets recon)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=integer(1, 4096), default=None, help="torch CPU threads")
    f.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    f.add_argument("--quiet", action="store_true", help="no line per layer")
