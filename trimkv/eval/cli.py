"""``trimkv eval`` and ``trimkv plot``: the harness, long-text fidelity and the pictures from the command line.

    trimkv eval --gates checkpoints/smollm2 --tasks passkey,kv_retrieval --lengths 2048 \\
                --budgets 32,64,128 --policies full,trimkv,streaming,h2o --n 40 --out results/my-eval
    trimkv eval --fidelity --gates checkpoints/smollm2 --budgets 64,128 --policies trimkv,h2o --out results/my-fid
    trimkv plot accuracy results/my-eval                  # results/my-eval/accuracy_vs_budget.png
    trimkv plot fidelity results/my-fid                   # results/my-fid/fidelity_kl.png
    trimkv plot retention --gates checkpoints/smollm2 --out results/retention.png
    trimkv plot kept --gates checkpoints/smollm2 --budget 64 --policy trimkv --out results/kept.png
    trimkv profile --gates checkpoints/smollm2 --policies trimkv,snapkv --out checkpoints/smollm2-lukv   # LU-KV
    trimkv eval --gates checkpoints/smollm2 --head-budgets checkpoints/smollm2-lukv ...               # uses it

A bare ``trimkv eval`` is a small smoke test (passkey at 2k tokens, M = 64 and 128, 10 samples per cell) written to a
new folder ``runs/eval-<date>-<time>``; it says what it will run before it loads the model. Every argument is checked
before the model loads.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from trimkv.command import Names, add_command, csv, fraction, integer, integers, names, quiet_loading, run
from trimkv.errors import CacheError, UsageError
from trimkv.limits import MAX_TOKENS
from trimkv import names as _names

DEFAULT_POLICIES = ["full", "streaming", "h2o"]        # and trimkv first when --gates are given
DEFAULT_BUDGETS = [64, 128]
DEFAULT_N = 10


def _fractions(text: str) -> list[float]:
    try:
        values = [float(t) for t in csv(text)]
    except ValueError:
        values = []
    if len(values) != 2 or not 0.0 <= values[0] <= values[1] <= 1.0:
        raise argparse.ArgumentTypeError(f"expected two comma-separated fractions 0 <= LO <= HI <= 1, got {text!r}")
    return values


def _tasks() -> tuple[str, ...]:
    return _names.TASK_NAMES


def _eval_policies() -> tuple[str, ...]:
    return _names.EVAL_POLICY_NAMES


def _policies() -> tuple[str, ...]:
    return _names.POLICY_NAMES


def _dtypes() -> tuple[str, ...]:
    return _names.DTYPE_CHOICES


TASK_NAMES, EVAL_POLICY_NAMES, POLICY_NAMES, DTYPE_NAMES = (Names(_tasks), Names(_eval_policies), Names(_policies),
                                                            Names(_dtypes))


# ------------------------------------------------------------------------------------- model and checks


def load_for_gates(args):
    """``(model, tokenizer)`` as the command line says: ``--model`` (default: the base model recorded in ``--gates``,
    else the embedded SmolLM2), ``--dtype``, ``--device`` / ``--device-map``, ``--threads``."""
    import torch

    from trimkv.share import base_model_for, load_gate_config
    from trimkv.base_model import DEFAULT_MODEL, load_model

    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)   # on a busy shared CPU, 1 thread can beat oversubscribed ones
    name = args.model or (base_model_for(load_gate_config(args.gates)) if args.gates else DEFAULT_MODEL)
    quiet_loading(getattr(args, "verbose", False))
    return load_model(name, dtype=args.dtype, device=args.device, device_map=args.device_map)


def check_device(device: str | None) -> None:
    """UsageError naming ``--device`` when it names no device torch has here (checked before the model loads)."""
    import re

    import torch

    if device in (None, "auto", "cpu"):
        return
    match = re.fullmatch(r"(cuda|mps)(?::(\d+))?", device)
    if match is None:
        raise UsageError(f"--device {device!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    kind, index = match.group(1), match.group(2)
    if kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError("--device mps: this torch sees no Apple GPU; use --device auto or cpu")
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not count:
        raise UsageError(f"--device {device}: torch sees no CUDA GPU here (a CPU build of torch, or no driver); use "
                         "--device auto (CUDA when available) or cpu")
    if index is not None and int(index) >= count:
        raise UsageError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")


def check_budget_fits(model, budgets: list[int], flag: str) -> None:
    """CacheError naming ``flag`` when a bounded cache of the largest budget would not fit in the free memory of the
    model's device (checked before the cache is allocated)."""
    from trimkv.base_model import input_device
    from trimkv.limits import check_fits, kv_bytes

    largest = max(budgets)
    element = next(model.parameters()).element_size()
    check_fits(kv_bytes(model.config, largest, element_size=element), input_device(model),
               what=f"a bounded cache of {flag} {largest} tokens per KV head",
               fix=f"lower {flag} (a budget above the prompt length keeps every token: the full cache does that)",
               error=CacheError)


def _gate_config(gates: str | None):
    """The gates' config, read before any model loads (a missing or corrupt checkpoint fails here)."""
    if not gates:
        return None
    from trimkv.share import load_gate_config

    return load_gate_config(gates)


def _new_run_folder(kind: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path("runs") / f"{kind}-{stamp}"
    n = 2
    while folder.exists():
        folder = Path("runs") / f"{kind}-{stamp}-{n}"
        n += 1
    return folder


def _resolve_eval_args(args: argparse.Namespace) -> None:
    """Fill the defaults that depend on other arguments and check the combination, before the model loads."""
    from trimkv.eval.harness import uses_gates

    gated = [p for p in (args.policies or []) if uses_gates(p)]
    if args.policies is None:
        args.policies = (["full", "trimkv", *DEFAULT_POLICIES[1:]] if args.gates else list(DEFAULT_POLICIES))
    elif args.gates and not gated:
        raise UsageError(f"--gates {args.gates} is given but no policy of --policies {','.join(args.policies)} reads "
                         "gates: add trimkv (or trimkv-global) to --policies, or drop --gates")
    elif gated and not args.gates:
        raise UsageError(f"--policies {','.join(gated)} read trained gates: give --gates CKPT, or drop "
                         f"{','.join(gated)}")
    _gate_config(args.gates)
    check_kvp_args(args.kvp, args.policies, "--policies")
    ranked = [p for p in args.policies if _uses_rankers(p)]
    if ranked and args.fidelity:
        raise UsageError(f"--fidelity does not run {','.join(ranked)} yet: evaluate it on tasks (drop --fidelity)")
    if args.depths is None:
        from trimkv.eval.harness import DEPTHS

        args.depths = list(DEPTHS)
    if args.lookahead and not any(uses_gates(p) for p in args.policies):
        raise UsageError(f"--lookahead {args.lookahead} changes trimkv's score: add trimkv to --policies")
    small = [b for b in args.budgets if b <= args.sink + args.window]
    if small and any(p != "full" for p in args.policies):
        raise UsageError(f"--budgets {','.join(map(str, small))} leave no room beside --sink {args.sink} and --window "
                         f"{args.window} (always kept): raise the budgets or lower --sink / --window")
    check_head_budgets_arg(args, [p for p in args.policies if p != "full"])
    if args.out is None:
        args.out = str(_new_run_folder("fidelity" if args.fidelity else "eval"))
    elif Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file: give a folder")


def check_head_budgets_arg(args: argparse.Namespace, policies: list[str]) -> None:
    """``--head-budgets``: 'uniform' (None), or an allocation file or folder read and checked here, before the model
    loads: it must hold a table for every bounded policy, and the global pool takes none."""
    if getattr(args, "head_budgets", None) in (None, "uniform"):
        args.head_budgets = None
        return
    from trimkv.names import GLOBAL_SUFFIX
    from trimkv.serve.budgets import load_allocation

    pooled = [p for p in policies if p.endswith(GLOBAL_SUFFIX)]
    if pooled:
        raise UsageError(f"--head-budgets does not apply to {','.join(pooled)} (the global pool sizes its heads at run "
                         "time): evaluate those in a run without --head-budgets")
    alloc = load_allocation(args.head_budgets)
    missing = [p for p in policies if p not in alloc.tables]
    if missing:
        raise UsageError(f"--head-budgets {args.head_budgets} was profiled for {','.join(alloc.tables)}, not for "
                         f"{','.join(missing)}: run `trimkv profile --policies {','.join(missing)}` or drop them")
def _uses_rankers(spec: str) -> bool:
    from trimkv.eval.harness import uses_rankers

    return uses_rankers(spec)


def check_kvp_args(kvp: str | None, policies: list[str], flag: str) -> None:
    """--kvp and the policies that read KVP rankers come together; the checkpoint's config is read here, before the
    model loads (a missing or corrupt one fails now)."""
    ranked = [p for p in policies if _uses_rankers(p)]
    if ranked and not kvp:
        raise UsageError(f"{flag} {','.join(ranked)} reads trained KVP rankers: give --kvp CKPT (train them with "
                         "`trimkv kvp train --store TRACES --out CKPT`)")
    if kvp and not ranked:
        raise UsageError(f"--kvp {kvp} is given but no policy of {flag} {','.join(policies)} reads KVP rankers: "
                         "add kvp, or drop --kvp")
    if kvp:
        from trimkv.kvp import load_kvp_config

        load_kvp_config(kvp)


def add_kvp_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kvp", default=None, metavar="CKPT",
                   help="KVP ranker checkpoint (folder or Hub id) read by the kvp policy (`trimkv kvp train` makes one)")


def _cost(args: argparse.Namespace) -> str:
    """What an eval will run, said before the model loads."""
    bounded = [p for p in args.policies if p != "full"]
    if args.fidelity:
        runs = len(bounded) * len(args.budgets) + 1
        tokens = args.n * runs * (args.prefix + args.continuation)
        return (f"{args.n} texts x ({len(bounded)} policies x {len(args.budgets)} budgets + the full cache) = "
                f"{args.n * runs} passes of {args.prefix} + {args.continuation} tokens ({tokens:,} tokens)")
    cells_per = (1 if "full" in args.policies else 0) + len(bounded) * len(args.budgets)
    cells = len(args.tasks) * len(args.lengths) * cells_per
    prompts = cells * args.n
    tokens = args.n * cells_per * len(args.tasks) * sum(args.lengths)
    return (f"{cells} cells ({','.join(args.tasks)} x lengths {','.join(map(str, args.lengths))} x "
            f"{len(bounded)} bounded policies x {len(args.budgets)} budgets"
            f"{' + full' if 'full' in args.policies else ''}) x {args.n} samples = {prompts} prompts, "
            f"{tokens:,} prompt tokens; finished cells in --out are reused")


# ------------------------------------------------------------------------------------------------ eval


def _eval(args: argparse.Namespace) -> int:
    _resolve_eval_args(args)
    print(f"trimkv eval: {_cost(args)} -> {args.out}", file=sys.stderr)
    if args.n < 40:
        print(f"trimkv eval: n = {args.n} per cell is a smoke test; report numbers from --n 40 or more",
              file=sys.stderr)
    model, tok = load_for_gates(args)
    if any(p != "full" for p in args.policies):
        check_budget_fits(model, args.budgets, "--budgets")
    common = dict(budgets=args.budgets, policies=args.policies, gates=args.gates, seed=args.seed, sink=args.sink,
                  window=args.window, prefill_chunk=args.prefill_chunk, out_dir=args.out, progress=not args.quiet)
    if args.head_budgets is not None:
        from trimkv.serve.budgets import load_allocation
        from trimkv.serve.factory import model_shape

        load_allocation(args.head_budgets).check_model(*model_shape(model))
        common["head_budgets"] = args.head_budgets
    if args.fidelity:
        from trimkv.eval.fidelity import fidelity_table, run_fidelity

        recs = run_fidelity(model, tok, n_texts=args.n, prefix_tokens=args.prefix, step=args.step,
                            continuation_tokens=args.continuation, **common)
        print(fidelity_table(recs))
        print(f"results in {args.out}/ (fidelity.json)")
        return 0
    from trimkv.eval.harness import markdown_table, run_eval

    recs = run_eval(model, tok, tasks=args.tasks, lengths=args.lengths, n_samples=args.n, haystack=args.haystack,
                    chat=args.chat, depths=args.depths, lookahead=args.lookahead, kvp=args.kvp,
                    max_new_tokens=args.max_new_tokens, **common)
    print(markdown_table(recs))
    print(f"results in {args.out}/ (metrics.json, predictions.jsonl, results.md)")
    return 0


# --------------------------------------------------------------------------------------------- profile


def _profile(args: argparse.Namespace) -> int:
    from trimkv.eval.harness import uses_gates

    gated = [p for p in args.policies if uses_gates(p)]
    if gated and not args.gates:
        raise UsageError(f"--policies {','.join(gated)} read trained gates: give --gates CKPT")
    check_kvp_args(args.kvp, args.policies, "--policies")
    floor = args.sink + args.window + 1
    if any(r * args.length < floor for r in args.ratios):
        raise UsageError(f"--ratios {min(args.ratios):g} x --length {args.length} is below the per-head floor "
                         f"sink + window + 1 = {floor}: raise the ratios or the length")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file: give a folder")
    _gate_config(args.gates)
    print(f"trimkv profile: {len(args.policies)} policies x {args.docs} documents of {args.length} tokens x "
          f"{args.questions} questions -> {args.out}", file=sys.stderr)
    model, tok = load_for_gates(args)
    if gated:
        from trimkv.share import load_gates

        load_gates(model, args.gates)
    from trimkv.eval.profile import allocation_card, profile_allocation

    alloc = profile_allocation(model, tok, policies=args.policies, n_docs=args.docs, questions=args.questions,
                               length=args.length, seed=args.seed, grid=args.ratios, sink=args.sink,
                               window=args.window, prefill_chunk=args.prefill_chunk, name=Path(args.out).name,
                               gates=args.gates if gated else None, per=args.per, progress=not args.quiet,
                               kvp=args.kvp)
    print(alloc.save(args.out, card=allocation_card(alloc)))
    print(allocation_card(alloc))
    return 0


def _ratios(text: str) -> list[float]:
    try:
        values = sorted(float(t) for t in csv(text))
    except ValueError:
        values = []
    if not values or not all(0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated global keep ratios in (0, 1], got {text!r}")
    return values


def add_profile(sub) -> None:
    """``trimkv profile``: LU-KV per-head budget allocation (trimkv.eval.profile)."""
    p = add_command(sub, "profile", _profile, "LU-KV: profile per-head eviction loss and write a budget allocation",
                    description="LU-KV (arXiv 2602.08585): per (layer, KV head) eviction-loss curves of each policy "
                                "with full attention on builtin:qa-plain documents (nothing shared with the eval "
                                "prompts), convexified, solved greedily; writes allocation.json and a README card "
                                "to --out, for --head-budgets.")
    add_model_args(p)
    p.set_defaults(seed=23)
    p.add_argument("--policies", type=names(POLICY_NAMES, "policy"), default=["trimkv"], metavar="POLICY[,POLICY...]",
                   help="policies to profile (one table each)").names = POLICY_NAMES
    p.add_argument("--docs", type=integer(1, 10**4), default=4, help="profiling documents")
    p.add_argument("--questions", type=integer(1, 64), default=8, help="questions (queries) per document")
    p.add_argument("--length", type=integer(256, MAX_TOKENS), default=2048, help="tokens per document")
    p.add_argument("--ratios", type=_ratios, default=list(_names.LUKV_GRID), metavar="R[,R...]",
                   help="global keep ratios (mean budget / prompt length) the solutions are averaged over")
    p.add_argument("--per", choices=_names.LUKV_GRANULARITIES, default="head",
                   help="a budget per KV head (LU-KV; the cache pads each layer to its largest head) or per layer (all "
                        "KV heads of a layer alike: the allocated bytes equal the uniform cache's)")
    add_kvp_arg(p)
    p.add_argument("--out", required=True, help="output folder (allocation.json, README.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# ------------------------------------------------------------------------------------------------ plot


def _plot(args: argparse.Namespace) -> int:
    if args.what in ("accuracy", "fidelity"):
        return _plot_records(args)
    from trimkv.eval.harness import uses_gates

    if not args.gates and (args.what == "retention" or uses_gates(args.policy)):
        raise UsageError(f"`trimkv plot {args.what}`" + (f" with --policy {args.policy}" if args.what == "kept" else "")
                         + " needs --gates CKPT")
    if args.task and args.text:
        raise UsageError("`trimkv plot`: give --text or --task, not both")
    if args.what == "kept" and args.budget <= args.sink + args.window:
        raise UsageError(f"--budget {args.budget} leaves no room beside --sink {args.sink} and --window {args.window}")
    _gate_config(args.gates)
    model, tok = load_for_gates(args)
    if args.gates:
        from trimkv.share import load_gates

        load_gates(model, args.gates)
    from trimkv.data import corpus
    from trimkv.eval import plots

    if args.task:                  # one prompt of an evaluation task, --tokens long, the needle at --depth
        from trimkv.eval.tasks import make_samples, render_prompt

        sample = make_samples(args.task, tok, context_length=args.tokens, n=1, seed=args.seed, depths=[args.depth])[0]
        text = render_prompt(sample, tok)
        print(f"{args.task} prompt of {args.tokens} tokens, answer {sample.answers} at depth {args.depth:g}")
    else:
        text = args.text or corpus.prose_text("eval", 8 * args.tokens, seed=args.seed)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :args.tokens]
    if args.what == "retention":
        out = plots.plot_retention_heatmap(plots.retention_by_head(model, ids, log=not args.beta),
                                           args.out or "retention.png", log=not args.beta)
    else:
        check_budget_fits(model, [args.budget], "--budget")
        kept = plots.kept_positions(model, ids, budget=args.budget, policy=args.policy, sink=args.sink,
                                    window=args.window, prefill_chunk=args.prefill_chunk)
        toks = [tok.decode([i]) for i in ids[0].tolist()]
        from trimkv.serve.factory import model_shape

        out = plots.plot_kept_tokens(kept, args.out or "kept.png", num_kv_heads=model_shape(model)[1],
                                     tokens=toks, title=f"{args.policy}, M={args.budget}: kept tokens per head")
    print(out)
    return 0


def _plot_records(args: argparse.Namespace) -> int:
    from trimkv.eval import plots

    folders = [Path(f) for f in (args.results or ["."])]
    name = "metrics.json" if args.what == "accuracy" else "fidelity.json"
    missing = [str(f / name) for f in folders if not (f / name).is_file()]
    if missing:
        raise UsageError(f"no {name} in {', '.join(missing)}: run `trimkv eval` with that --out first")
    if args.tasks and args.what != "accuracy":
        raise UsageError(f"--tasks picks among the accuracy records; {name} holds one kind of text, not tasks")
    recs = [r for f in folders for r in read_records(f / name)]
    recs = _only(recs, "task", args.tasks, "--tasks")
    recs = _only(recs, "policy", args.policies, "--policies", keep=(plots.FULL,))
    if args.what == "accuracy":
        default = "accuracy_vs_budget.png" if args.x == "budget" else "accuracy_vs_memory.png"
        out = plots.plot_accuracy_vs_budget(recs, args.out or folders[0] / default, x=args.x)
    else:
        out = plots.plot_fidelity(recs, args.out or folders[0] / f"fidelity_{args.metric}.png", metric=args.metric)
    print(out)
    return 0


def _only(records: list[dict], field: str, wanted: list[str] | None, option: str, keep=()) -> list[dict]:
    """The records whose ``field`` is one of ``wanted`` (all when None) or of ``keep``; a UsageError naming what the
    records hold when one of ``wanted`` is not among them."""
    if not wanted:
        return records
    held = sorted({str(r.get(field)) for r in records})
    absent = [w for w in wanted if w not in held]
    if absent:
        raise UsageError(f"{option} {','.join(absent)}: not in these records, which hold {', '.join(held)}")
    return [r for r in records if r.get(field) in wanted or r.get(field) in keep]


def read_records(path: Path) -> list[dict]:
    """The records of a ``trimkv eval`` output file (``metrics.json`` / ``fidelity.json``): a JSON list of objects;
    a DataError naming the file (and the line) otherwise."""
    import json

    from trimkv.errors import DataError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); it is not a file trimkv eval wrote") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}); rerun trimkv eval to rewrite "
                        "it") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of records (objects), as trimkv eval writes")
    return data


# ------------------------------------------------------------------------------------------------ arguments


def add_device_args(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` (shared by every command that loads a model)."""
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES, metavar="DTYPE",
                   help="weights dtype; auto = the checkpoint's own (bf16 for most Hub models, fp32 for smollm2)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="base model: smollm2 (embedded default), a Hub id or a folder (default: the base model the "
                        "--gates were trained for, else smollm2)")
    add_device_args(p)
    p.add_argument("--device-map", default=None,
                   help="split the model over the visible GPUs (e.g. auto; overrides --device); gates follow each layer")
    p.add_argument("--gates", default=None,
                   help="gate checkpoint: folder or Hub id, trimkv's layout or the authors' (needed for trimkv)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples / texts")
    p.add_argument("--sink", type=integer(0, MAX_TOKENS), default=4, help="first tokens always kept (every policy)")
    p.add_argument("--window", type=integer(0, MAX_TOKENS), default=16,
                   help="most recent tokens always kept (every policy)")
    p.add_argument("--prefill-chunk", type=integer(1, MAX_TOKENS), default=256, help="prompt tokens per prefill step")
    p.add_argument("--threads", type=integer(1, 4096), default=None, help="torch CPU threads (default: torch's choice)")


def add_head_budgets_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head-budgets", default="uniform", metavar="FILE|uniform",
                   help="per-head budgets: an allocation folder or file from `trimkv profile` (LU-KV; the policy's "
                        "shares scaled to each budget, the same total memory), or uniform")


def add_commands(sub) -> None:
    """Add ``eval``, ``plot`` and ``profile`` to the ``trimkv`` command's subparsers."""
    e = add_command(sub, "eval", _eval, "accuracy (or --fidelity) of eviction policies over budgets, cached per cell",
                    description="Accuracy (or --fidelity) of eviction policies over budgets. A bare `trimkv eval` "
                                "is a small smoke test written to a new folder runs/eval-<date>-<time>; it says what "
                                "it will run before loading the model.")
    add_model_args(e)
    add_kvp_arg(e)
    e.add_argument("--tasks", type=names(TASK_NAMES, "task"), default=["passkey"], metavar="TASK[,TASK...]",
                   help="comma-separated tasks").names = TASK_NAMES
    e.add_argument("--lengths", type=integers(64, MAX_TOKENS, "prompt tokens"), default=[2048],
                   help="prompt lengths in tokens, e.g. 2048,4096")
    e.add_argument("--budgets", type=integers(1, MAX_TOKENS, "tokens per KV head"), default=DEFAULT_BUDGETS,
                   help="tokens per KV head (trimkv-global: the average; its pool holds budget x layers x KV heads)")
    e.add_argument("--policies", type=names(EVAL_POLICY_NAMES, "policy"), default=None, metavar="POLICY[,POLICY...]",
                   help=f"comma-separated policies (default: {','.join(DEFAULT_POLICIES)}, with trimkv added when "
                        "--gates are given)").names = EVAL_POLICY_NAMES
    e.add_argument("--n", type=integer(1, 10**6), default=DEFAULT_N,
                   help="samples per cell (texts with --fidelity); reported numbers need 40 or more")
    e.add_argument("--haystack", default="filler", choices=["filler", "prose"], help="what the needle hides in")
    e.add_argument("--depths", type=_fractions, default=None, metavar="LO,HI",
                   help="needle depths spread evenly over [LO, HI] (fractions of the haystack; default: the "
                        "harness's DEPTHS, 0.1,0.9)")
    e.add_argument("--chat", action="store_true",
                   help="wrap prompts in the chat template (default: RULER's plain template with an answer prefix; "
                        "SmolLM2-135M answers the pass key far more reliably that way)")
    e.add_argument("--max-new-tokens", type=integer(1, MAX_TOKENS), default=None,
                   help="tokens generated per answer (default: per task)")
    e.add_argument("--lookahead", type=integer(0, MAX_TOKENS), default=0, metavar="N",
                   help="trimkv / trimkv-global: rank kept tokens by DBTrimKV's future utility over N steps "
                        "(0 = the plain retention score)")
    add_head_budgets_arg(e)
    e.add_argument("--out", default=None,
                   help="output folder; finished cells in it are reused (default: a new folder runs/eval-<date>-<time>)")
    e.add_argument("--fidelity", action="store_true", help="long-text KL / top-1 / ppl ratio instead of tasks")
    e.add_argument("--prefix", type=integer(1, MAX_TOKENS), default=1024, help="--fidelity: prefilled tokens")
    e.add_argument("--continuation", type=integer(1, MAX_TOKENS), default=256,
                   help="--fidelity: teacher-forced tokens scored")
    e.add_argument("--step", type=integer(1, MAX_TOKENS), default=1, help="--fidelity: continuation tokens per forward")
    e.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add_command(sub, "plot", _plot, "PNG pictures: accuracy / fidelity curves, retention heat map, kept tokens")
    p.add_argument("what", choices=["accuracy", "fidelity", "retention", "kept"], help="which picture")
    p.add_argument("results", nargs="*", default=None,
                   help="accuracy/fidelity: eval --out folder(s), their records drawn together (default: .)")
    p.add_argument("--out", default=None, help="PNG path (default: in the first results folder, or ./<what>.png)")
    p.add_argument("--metric", default="kl", choices=["kl", "top1", "ppl_ratio"], help="fidelity: the y axis")
    p.add_argument("--x", default="budget", choices=["budget", "memory"],
                   help="accuracy: the x axis, the budget M or the KV bytes each cache allocated")
    p.add_argument("--tasks", type=names(TASK_NAMES, "task"), default=None, metavar="TASK[,TASK...]",
                   help="accuracy: draw these tasks only (default: every task in the records)")
    p.add_argument("--policies", type=names(EVAL_POLICY_NAMES, "policy"), default=None, metavar="POLICY[,POLICY...]",
                   help="accuracy/fidelity: draw these policies only (the full cache is always drawn; default: all)")
    add_model_args(p)
    p.add_argument("--text", default=None, help="retention/kept: text to run (default: eval-split prose)")
    p.add_argument("--task", default=None, choices=TASK_NAMES, metavar="TASK",
                   help="retention/kept: run one prompt of this eval task (e.g. passkey) instead of prose")
    p.add_argument("--depth", type=fraction, default=0.3, help="retention/kept with --task: where the needle sits (0-1)")
    p.add_argument("--tokens", type=integer(16, MAX_TOKENS), default=512, help="retention/kept: tokens of text")
    p.add_argument("--beta", action="store_true", help="retention: mean beta instead of mean log beta")
    p.add_argument("--budget", type=integer(1, MAX_TOKENS), default=64, help="kept: tokens per KV head")
    p.add_argument("--policy", default="trimkv", choices=EVAL_POLICY_NAMES, metavar="POLICY", help="kept: eviction policy")
    add_profile(sub)


def main(argv: list[str] | None = None) -> int:
    """``python -m trimkv.eval eval|plot ...``: the same commands and the same error boundary as ``trimkv``."""
    from trimkv.command import Parser, common_options

    parser = Parser(prog="python -m trimkv.eval")
    common_options(parser, top=True)
    add_commands(parser.add_subparsers(dest="command", required=True))
    return run(parser, argv)
