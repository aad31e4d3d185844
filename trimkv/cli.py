"""``trimkv`` command line: train / push / convert / generate / demo (and eval / plot from :mod:`trimkv.eval.cli`,
recipes / export from :mod:`trimkv.cli_package`, trace from :mod:`trimkv.cli_trace`).

    trimkv train recipes/smollm2-135m-qa-m64.yaml --set train.steps=50
    trimkv generate prompts.jsonl --gates checkpoints/smollm2-135m-qa-m64
    python -m trimkv --version

Every argument is checked before a model loads; an error ends in one line and an exit code per kind of error
(:mod:`trimkv.command`), ``--debug`` shows the traceback. Building the parser imports no torch, so ``--help`` is
immediate. To add a sub-command, write ``add_<name>(sub)`` with :func:`add_command` and list it in :data:`COMMANDS`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

from . import __version__
from .cli_package import add_commands as add_package_commands
from .cli_trace import add_fit, add_trace
from .command import Names, Parser, add_command, common_options, deepspeed_in_use, integer, quiet_loading, run
from .errors import DataError, UsageError, decode_utf8
from .eval.cli import (add_commands as add_eval_commands, add_device_args, add_head_budgets_arg, add_kvp_arg,
                       add_model_args, check_budget_fits, check_device, check_head_budgets_arg, check_kvp_args,
                       read_records)
from .limits import MAX_TOKENS
from .names import GLOBAL_SUFFIX, POLICY_NAMES


# ------------------------------------------------------------------------------------------------ train


def _train(args: argparse.Namespace) -> int:
    from .recipe import load_recipe
    from .train.run import finetune

    recipe = load_recipe(args.recipe, args.set)
    if recipe.train.engine == "deepspeed":
        deepspeed_in_use()
    quiet_loading(args.verbose)
    out = finetune(recipe, progress=not args.quiet, resume=args.resume or None, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank runs this
        print(f"gate checkpoint: {out}")
    return 0


def add_train(sub) -> None:
    t = add_command(sub, "train", _train, "train gates from a recipe YAML")
    t.add_argument("recipe", help="path to a recipe, e.g. recipes/smollm2-135m-qa-m64.yaml")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a recipe field (repeatable; the value is read as YAML), e.g. --set train.steps=10")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest valid training checkpoint in <run_dir>/checkpoints")
    t.add_argument("--overwrite", action="store_true",
                   help="replace gates in output.checkpoint that this run did not write, and start over a run_dir "
                        "that holds an earlier run (without it: the gates go to a new folder beside them, and an "
                        "earlier run is refused)")


# ------------------------------------------------------------------------------------------- push, convert

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")


def _push(args: argparse.Namespace) -> int:
    if not _REPO_ID.fullmatch(args.repo_id):
        raise UsageError(f"repo_id {args.repo_id!r} is not a Hub repo id: write 'user/name'")
    records = None
    if args.results:
        records = []
        for folder in map(Path, args.results):
            found = [f for f in (folder / "metrics.json", folder / "fidelity.json") if f.is_file()]
            if not found:
                raise UsageError(f"--results {folder}: no metrics.json or fidelity.json in it: run "
                                 f"`trimkv eval --out {folder}` first")
            records += [r for f in found for r in read_records(f)]
    from .share import push_to_hub

    url = push_to_hub(args.checkpoint, args.repo_id, private=args.private, revision=args.revision,
                      eval_records=records)
    print(url)
    return 0


def add_push(sub) -> None:
    h = add_command(sub, "push", _push, "upload a gate checkpoint folder to the Hugging Face Hub")
    h.add_argument("checkpoint", help="a gate checkpoint folder (trimkv's layout)")
    h.add_argument("repo_id", help="the Hub repo, user/name (created if needed)")
    h.add_argument("--private", action="store_true", help="create the repo private")
    h.add_argument("--revision", default=None, help="a branch to push to (created if needed; default: main)")
    h.add_argument("--results", action="append", default=[], metavar="EVAL_OUT",
                   help="a `trimkv eval --out` folder (repeatable): its results for these gates go into the card's "
                        "model-index")


def _convert(args: argparse.Namespace) -> int:
    from .share import convert_checkpoint

    print(convert_checkpoint(args.source, args.out, revision=args.revision))
    return 0


def add_convert(sub) -> None:
    c = add_command(sub, "convert", _convert,
                    "the authors' released gates (folder or Hub id) -> a trimkv checkpoint folder")
    c.add_argument("source", help="e.g. ngocbh/TrimKV-Qwen3-4B-Math or a folder with config.json + trimkv_weights.pth")
    c.add_argument("out", help="output folder")
    c.add_argument("--revision", default=None, help="Hub revision of the source")


# --------------------------------------------------------------------------------------------- generate


def _generate(args: argparse.Namespace) -> int:
    requests = read_requests(Path(args.prompts))
    out_path = _check_out_file(args.out)
    policy, budget = _generate_cache(args)
    from .eval.cli import load_for_gates

    model, tok = load_for_gates(args)
    if args.gates:
        from .share import load_gates

        load_gates(model, args.gates)
    if budget is not None:
        check_budget_fits(model, [budget], "--budget")
    if args.head_budgets is not None:
        from .serve.budgets import load_allocation
        from .serve.factory import model_shape

        load_allocation(args.head_budgets).check_model(*model_shape(model))
    if args.kvp:
        from .base_model import input_device
        from .kvp import load_rankers
        from .serve.policies import KVPPolicy

        policy = KVPPolicy(load_rankers(args.kvp, model, device=input_device(model)))
    from .serve import answer

    out = open(out_path, "w", encoding="utf-8") if out_path else sys.stdout
    written = 0
    try:
        for i, req in enumerate(requests):
            res = answer(model, tok, req["context"], req["questions"], budget=budget, sink=args.sink,
                         window=args.window, policy=policy, prefill_chunk=args.prefill_chunk,
                         max_new_tokens=args.max_new_tokens, chat=args.chat, head_budgets=args.head_budgets)
            row = {"index": i, "questions": req["questions"], "answers": res.answers,
                   "context_tokens": res.context_tokens, "kv_bytes": res.kv_bytes, "seconds": round(res.seconds, 3)}
            out.write(json.dumps(row) + "\n")
            out.flush()
            written += 1
    finally:
        if out is not sys.stdout:
            out.close()
        if out_path and written < len(requests):
            print(f"trimkv generate: {written} of {len(requests)} requests answered in {out_path} before stopping",
                  file=sys.stderr)
    if out_path:
        print(f"trimkv generate: {written} answers in {out_path}", file=sys.stderr)
    return 0


def _generate_cache(args: argparse.Namespace) -> tuple[str | None, int | None]:
    """``(policy, budget)`` the command line asks for, checked before the model loads: with ``--gates`` and no
    ``--budget`` the gates' training budget (said on stderr); no ``--policy`` means TRIM-KV's retention with gates,
    the full cache without."""
    from .serve.policies import POLICIES, parse_policy

    needs_gates = POLICIES[parse_policy(args.policy)[0]].uses_gates if args.policy else bool(args.gates)
    budget = args.budget
    if args.gates:
        from .share import load_gate_config

        config = load_gate_config(args.gates)         # a missing or corrupt checkpoint fails here, not after loading
        if not needs_gates:
            print(f"trimkv generate: --policy {args.policy} does not read the gates of --gates {args.gates}",
                  file=sys.stderr)
        if budget is None and needs_gates:
            if not config.train_budget:
                raise UsageError(f"--gates {args.gates} does not record the budget it was trained for: give --budget "
                                 "(tokens per KV head)")
            budget = config.train_budget
            print(f"trimkv generate: --budget {budget} (the budget --gates {args.gates} were trained for)",
                  file=sys.stderr)
    elif needs_gates:
        raise UsageError(f"--policy {args.policy} reads trained gates: give --gates CKPT, or pick a heuristic policy "
                         "(e.g. --policy snapkv)")
    if budget is None and args.policy:
        raise UsageError(f"--policy {args.policy} evicts to a budget: give --budget (tokens per KV head)")
    check_kvp_args(args.kvp, [args.policy] if args.policy else [], "--policy")
    if budget is not None and not args.policy and not args.gates:
        raise UsageError("--budget with trimkv's retention needs --gates CKPT (or pick a heuristic --policy, "
                         "e.g. --policy snapkv)")
    if budget is not None and budget <= args.sink + args.window:
        raise UsageError(f"--budget {budget} leaves no room beside --sink {args.sink} and --window {args.window} "
                         "(always kept): raise --budget or lower them")
    policy = args.policy or ("trimkv" if budget is not None else None)
    if args.head_budgets not in (None, "uniform") and policy is None:
        raise UsageError("--head-budgets splits a bounded cache's budget: give --budget (and --gates or --policy)")
    args.budget = budget
    check_head_budgets_arg(args, [policy] if policy else [])
    return policy, budget


def _check_out_file(out: str | None) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--out {out} is a folder: give a file path (JSON lines)")
    if not path.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {path.parent} does not exist: create it or give another path")
    return path


def read_requests(path: Path) -> list[dict]:
    """A prompt file: ``.txt`` = one prompt (the whole file, continued as is); ``.jsonl`` = one request per line,
    ``{"prompt": ...}`` or ``{"context": ..., "question": ...}`` / ``{"context": ..., "questions": [...]}``. A problem
    is a :class:`DataError` naming the file, the line and the field."""
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    raw = path.read_bytes()
    text = decode_utf8(raw, path, DataError, "save the file as UTF-8")
    if path.suffix == ".json":
        raise DataError(f"{path}: a prompt file is .txt (one prompt) or .jsonl (one JSON request per line): rename it "
                        "to .jsonl with one request per line")
    if path.suffix != ".jsonl":
        if not text.strip():
            raise DataError(f"{path} is empty: write the prompt into it")
        return [{"context": text, "questions": [""]}]
    requests = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            requests.append(_request(line, f"{path}:{n}"))
    if not requests:
        raise DataError(f"{path} holds no request: write one JSON object per line, e.g. "
                        '{"context": "...", "question": "..."}')
    return requests


def _request(line: str, where: str) -> dict:
    shape = ('give {"prompt": "..."} or {"context": "...", "question": "..."} / {"context": "...", '
             '"questions": ["...", ...]}')
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}:{err.colno}: not valid JSON ({err.msg}); {shape}") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: a request is a JSON object, got {type(row).__name__}; {shape}")
    unknown = sorted(set(row) - {"prompt", "context", "question", "questions"})
    if unknown:
        raise DataError(f"{where}: unknown field(s) {unknown}; {shape}")
    if ("prompt" in row) == ("context" in row):
        raise DataError(f"{where}: give exactly one of 'prompt' and 'context'; {shape}")
    key = "context" if "context" in row else "prompt"
    if not isinstance(row[key], str):
        raise DataError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
    if "question" in row and "questions" in row:
        raise DataError(f"{where}: give 'question' (one string) or 'questions' (a list), not both")
    if "question" in row:
        if not isinstance(row["question"], str):
            raise DataError(f"{where}: 'question' must be a string, got {type(row['question']).__name__}")
        questions = [row["question"]]
    elif "questions" in row:
        qs = row["questions"]
        if not isinstance(qs, list) or not qs or not all(isinstance(q, str) for q in qs):
            got = f"the string {qs!r:.60}" if isinstance(qs, str) else f"{qs!r:.60}"
            raise DataError(f"{where}: 'questions' must be a non-empty list of strings, got {got}"
                            + ("; for one question write \"question\": \"...\"" if isinstance(qs, str) else ""))
        questions = list(qs)
    else:
        questions = [""]
    return {"context": row[key], "questions": questions}


def _policy_names() -> list[str]:
    return [*POLICY_NAMES, *(f"{name}{GLOBAL_SUFFIX}" for name in POLICY_NAMES)]


def add_generate(sub) -> None:
    g = add_command(sub, "generate", _generate, "answer the prompts of a file with a bounded cache (JSON lines out)")
    g.add_argument("prompts", help=".txt (one prompt) or .jsonl ({prompt} or {context, question(s)} per line)")
    add_model_args(g)
    add_kvp_arg(g)
    g.add_argument("--budget", type=integer(1, MAX_TOKENS, "tokens per KV head"), default=None,
                   help="tokens per KV head (default: with --gates the budget they were trained for; without, "
                        "the full cache)")
    g.add_argument("--policy", default=None, choices=Names(_policy_names), metavar="POLICY",
                   help="eviction policy (default: trimkv's retention with --gates, else the full cache)")
    add_head_budgets_arg(g)
    g.add_argument("--max-new-tokens", type=integer(1, MAX_TOKENS), default=64, help="tokens generated per answer")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the tokenizer's chat template")
    g.add_argument("--out", default=None, help="JSONL output file (default: stdout)")


# --------------------------------------------------------------------------------------------------- kvp


def _kvp_train(args: argparse.Namespace) -> int:
    if not Path(args.store).is_dir():
        raise UsageError(f"--store {args.store} is not a folder: give a trace store (issue 21's `trimkv trace` output)")
    from .kvp.run import train_from_store

    minutes = args.time_limit
    out = train_from_store(args.store, args.out, hidden=args.hidden, target=args.target, objective=args.objective,
                           steps=args.steps, rows=args.rows, tokens=args.tokens, lr=args.lr, sink=args.sink,
                           window=args.window, time_limit=None if minutes is None else 60.0 * minutes,
                           seed=args.seed, resume=args.resume, progress=not args.quiet)
    print(f"KVP rankers: {out}")
    return 0


def _kvp_push(args: argparse.Namespace) -> int:
    from .kvp import push_rankers

    print(push_rankers(args.checkpoint, args.repo_id, private=args.private, revision=args.revision))
    return 0


def add_kvp(sub) -> None:
    k = sub.add_parser("kvp", help="KVP rankers (KV Policy, arXiv 2602.10238): train from a trace store, push",
                       description="KVP: per-head eviction rankers learned from key/value traces; the kvp policy "
                                   "of `trimkv eval` / `trimkv generate` reads them with --kvp CKPT.")
    common_options(k)
    ksub = k.add_subparsers(dest="kvp_command", required=True, metavar="COMMAND")
    t = add_command(ksub, "train", _kvp_train, "train rankers on a trace store (layer by layer, resumable)")
    t.add_argument("--store", required=True, help="trace store folder (issue 21)")
    t.add_argument("--out", required=True, help="checkpoint folder to write (config.json, model.safetensors, README)")
    t.add_argument("--hidden", type=integer(1, 1 << 16), default=64, help="hidden units per head's MLP (paper: 256)")
    t.add_argument("--target", default="auto",
                   help="the store's utility target to rank by (auto: answer when the store holds it, else future)")
    t.add_argument("--objective", default="expected", choices=["expected", "rloo"],
                   help="expected: the RL objective in closed form; rloo: the paper's sampled REINFORCE estimator")
    t.add_argument("--steps", type=integer(1, 10**7), default=300, help="steps per layer")
    t.add_argument("--rows", type=integer(1, 1 << 16), default=8, help="trace rows per step")
    t.add_argument("--tokens", type=integer(2, MAX_TOKENS), default=256, help="candidate tokens per row and step")
    t.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (cosine decay to 5%%)")
    t.add_argument("--sink", type=integer(0, MAX_TOKENS), default=4, help="first positions never ranked (kept)")
    t.add_argument("--window", type=integer(0, MAX_TOKENS), default=16, help="last tokens never ranked (kept)")
    t.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="stop after this many minutes (shared equally by the layers left)")
    t.add_argument("--seed", type=int, default=0, help="seed of the draws and the initial weights")
    t.add_argument("--resume", action="store_true", help="continue the run left in <out>.partial")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    p = add_command(ksub, "push", _kvp_push, "check a ranker checkpoint, then upload it to the Hugging Face Hub")
    p.add_argument("checkpoint", help="checkpoint folder")
    p.add_argument("repo_id", help="user/name")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None, help="branch to push to")


# ------------------------------------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    check_device(args.device)
    quiet_loading(args.verbose)
    run_demo(retrain=args.retrain, steps=args.steps, context=args.context, budget=args.budget, device=args.device,
             dtype=args.dtype)
    return 0


def add_demo(sub) -> None:
    d = add_command(sub, "demo", _demo,
                    "train (or load) gates on the embedded SmolLM2 and compare full vs bounded cache")
    d.add_argument("--retrain", action="store_true", help="train new gates even if checkpoints/ has some")
    d.add_argument("--steps", type=integer(1, 10**7), default=None, help="training steps (default: the demo recipe's)")
    d.add_argument("--context", type=integer(64, MAX_TOKENS), default=2048, help="prompt length in tokens")
    d.add_argument("--budget", type=integer(1, MAX_TOKENS), default=None,
                   help="tokens per KV head (default: the gates' budget)")
    add_device_args(d)


# ----------------------------------------------------------------------------------------------- parser

COMMANDS: list[Callable] = [add_train, add_push, add_convert, add_generate, add_demo, add_eval_commands,
                            add_package_commands, add_trace, add_fit, add_kvp]


def build_parser() -> argparse.ArgumentParser:
    """The ``trimkv`` parser: one sub-command per entry of :data:`COMMANDS` (no torch imported)."""
    p = Parser(prog="trimkv", description="TRIM-KV retention gates: train, share, serve. "
                                          "`trimkv COMMAND --help` shows a command's options.")
    p.add_argument("--version", action="version", version=f"trimkv {__version__}")
    common_options(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
