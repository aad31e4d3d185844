"""``trimkv`` command line: train / push / convert / generate / demo (and eval / plot from :mod:`trimkv.eval.cli`)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .cli_package import add_commands as add_package_commands
from .eval.cli import add_commands as add_eval_commands, add_device_args, add_model_args


def _train(args: argparse.Namespace) -> int:
    from .train.run import finetune

    out = finetune(args.recipe, overrides=args.set, progress=not args.quiet, resume=args.resume or None)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank runs this
        print(f"gate checkpoint: {out}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .share import push_to_hub

    records = None
    if args.results:
        records = []
        for folder in map(Path, args.results):
            found = [f for f in (folder / "metrics.json", folder / "fidelity.json") if f.is_file()]
            if not found:
                raise SystemExit(f"no metrics.json or fidelity.json in {folder}: run `trimkv eval --out {folder}` first")
            records += [r for f in found for r in json.loads(f.read_text())]
    url = push_to_hub(args.checkpoint, args.repo_id, private=args.private, revision=args.revision,
                      eval_records=records)
    print(url)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .share import convert_checkpoint

    print(convert_checkpoint(args.source, args.out, revision=args.revision))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .share import load_gates
    from .eval.cli import load_for_gates
    from .serve import answer

    requests = read_requests(Path(args.prompts))
    if args.budget is not None and not args.gates and args.policy in (None, "trimkv"):
        raise SystemExit("--budget with trimkv's retention needs --gates CKPT (or pick a heuristic --policy)")
    model, tok = load_for_gates(args)
    if args.gates:
        load_gates(model, args.gates)
    out = open(args.out, "w") if args.out else sys.stdout
    try:
        for i, req in enumerate(requests):
            res = answer(model, tok, req["context"], req["questions"], budget=args.budget, sink=args.sink,
                         window=args.window, policy=args.policy, prefill_chunk=args.prefill_chunk,
                         max_new_tokens=args.max_new_tokens, chat=args.chat)
            row = {"index": i, "questions": req["questions"], "answers": res.answers,
                   "context_tokens": res.context_tokens, "kv_bytes": res.kv_bytes, "seconds": round(res.seconds, 3)}
            out.write(json.dumps(row) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def read_requests(path: Path) -> list[dict]:
    """A prompt file: ``.txt`` = one prompt (the whole file, continued as is); ``.jsonl`` = one request per line,
    ``{"prompt": ...}`` or ``{"context": ..., "question": ...}`` / ``{"context": ..., "questions": [...]}``."""
    if not path.is_file():
        raise SystemExit(f"prompt file {path} does not exist")
    if path.suffix != ".jsonl":
        return [{"context": path.read_text(encoding="utf-8"), "questions": [""]}]
    requests = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        context = row.get("context", row.get("prompt"))
        questions = row.get("questions") or ([row["question"]] if "question" in row else [""])
        if not isinstance(context, str) or not all(isinstance(q, str) for q in questions):
            raise SystemExit(f"{path}:{n}: give a string 'prompt', or a string 'context' with 'question' / "
                             "'questions' (strings)")
        requests.append({"context": context, "questions": list(questions)})
    return requests


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(retrain=args.retrain, steps=args.steps, context=args.context, budget=args.budget, device=args.device,
             dtype=args.dtype)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trimkv", description="TRIM-KV retention gates: train, share, serve")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train gates from a recipe YAML")
    t.add_argument("recipe", help="path to a recipe, e.g. recipes/smollm2-135m-qa-m64.yaml")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a recipe field (repeatable), e.g. --set train.steps=10")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest valid training checkpoint in <run_dir>/checkpoints")
    t.set_defaults(func=_train)

    h = sub.add_parser("push", help="upload a gate checkpoint folder to the Hugging Face Hub")
    h.add_argument("checkpoint")
    h.add_argument("repo_id")
    h.add_argument("--private", action="store_true")
    h.add_argument("--revision", default=None)
    h.add_argument("--results", action="append", default=[], metavar="EVAL_OUT",
                   help="a `trimkv eval --out` folder (repeatable): its results for these gates go into the card's "
                        "model-index")
    h.set_defaults(func=_push)

    c = sub.add_parser("convert", help="the authors' released gates (folder or Hub id) -> a trimkv checkpoint folder")
    c.add_argument("source", help="e.g. ngocbh/TrimKV-Qwen3-4B-Math or a folder with config.json + trimkv_weights.pth")
    c.add_argument("out", help="output folder")
    c.add_argument("--revision", default=None, help="Hub revision of the source")
    c.set_defaults(func=_convert)

    g = sub.add_parser("generate", help="answer the prompts of a file with a bounded cache (JSON lines out)")
    g.add_argument("prompts", help=".txt (one prompt) or .jsonl ({prompt} or {context, question(s)} per line)")
    add_model_args(g)
    g.add_argument("--budget", type=int, default=None, help="tokens per KV head (default: the full cache, gates off)")
    g.add_argument("--policy", default=None, help="eviction policy (default: trimkv's retention)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the tokenizer's chat template (default: on)")
    g.add_argument("--out", default=None, help="JSONL output file (default: stdout)")
    g.set_defaults(func=_generate)

    d = sub.add_parser("demo", help="train (or load) gates on the embedded SmolLM2 and compare full vs bounded cache")
    d.add_argument("--retrain", action="store_true", help="train new gates even if checkpoints/ has some")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the demo recipe's)")
    d.add_argument("--context", type=int, default=2048, help="prompt length in tokens")
    d.add_argument("--budget", type=int, default=None, help="tokens per KV head (default: the gates' budget)")
    add_device_args(d)
    d.set_defaults(func=_demo)

    add_eval_commands(sub)   # eval, plot
    add_package_commands(sub)   # recipes, export
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
